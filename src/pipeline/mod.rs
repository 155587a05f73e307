//! The pipeline that produces events: ingest, grouping, stage runners, mosaicking,
//! staging and publishing.

pub mod casa;
pub mod dirsync;
pub mod ingest;
pub mod mosaic;
pub mod moves;
pub mod paths;
pub mod publish;
pub mod safeguards;
pub mod sim;
pub mod stages;
pub mod state;
pub mod uvh5;
pub mod worker;

pub use worker::{Pipeline, PipelineConfig};
