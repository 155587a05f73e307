//! The pipeline that produces events: ingest, grouping, stage runners, mosaicking,
//! staging and publishing.

pub mod mosaic;
pub mod paths;
pub mod publish;
