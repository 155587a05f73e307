//! contimg: an event-sourced product ledger for the DSA-110 continuum imaging pipeline.
//!
//! Commands become events appended to a sled-backed log; projections fold those events
//! into read models; the HTTP API and the command line read the projections.
//!
//! # Layout
//! - [`events`]: the event store (sled), record envelope and codec, subscriptions, the
//!   ledger interface (local or over HTTP) and the catalogue of domain events.
//! - [`projections`]: read models folded from the log.
//! - [`pipeline`]: ingest, grouping, stage runners, mosaicking, staging and publishing.
//! - [`api`]: the axum routers, errors and the server loop.
//! - [`config`]: the TOML configuration file and its embedded defaults.
//! - [`cli`]: the `contimg` subcommands; `main.rs` only parses and dispatches.

pub mod api;
pub mod cli;
pub mod config;
pub mod disk;
pub mod events;
pub mod memory;
pub mod pipeline;
pub mod projections;
