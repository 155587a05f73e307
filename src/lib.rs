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

/// A random generator for a unit test and its seed, taken from `CONTIMG_TEST_SEED` or
/// afresh; the seed is printed so a failure can be replayed (the integration tests have
/// their own, in `tests/common`).
#[cfg(test)]
pub(crate) fn test_rng() -> (rand::rngs::StdRng, u64) {
    use rand::SeedableRng;
    let seed = std::env::var("CONTIMG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with CONTIMG_TEST_SEED={seed})");
    (rand::rngs::StdRng::seed_from_u64(seed), seed)
}
