//! The event log: an EventStoreDB-style store on sled, its record envelope and codec,
//! catch-up subscriptions, the ledger interface (local or over HTTP), export and import,
//! verification, and the catalogue of domain events.
//!
//! This module knows nothing of products or mosaics beyond the catalogue.

pub mod catalogue;
pub mod error;
pub mod flat_json;
pub mod jsonl;
pub mod ledger;
pub mod record;
pub mod shape;
pub mod store;
pub mod verify;

pub use error::{ExpectedRevision, StoreError};
pub use ledger::Ledger;
pub use record::{ProposedEvent, RecordedEvent};
pub use store::{AppendResult, Direction, RawRecord, Store, Subscription};
