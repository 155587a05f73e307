//! Errors of the event store boundary.

use std::fmt;

/// What the caller expected the stream's last revision to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedRevision {
    /// No check (`ES-ExpectedVersion: -2`).
    Any,
    /// The stream must not exist (`-1`).
    NoStream,
    /// The stream must exist (`-4`).
    StreamExists,
    /// The stream's last revision must be exactly this (`N`).
    Exact(u64),
}

impl ExpectedRevision {
    /// The EventStoreDB wire number: -2 any, -1 no stream, -4 stream exists, N exact.
    pub fn to_wire(self) -> i64 {
        match self {
            ExpectedRevision::Any => -2,
            ExpectedRevision::NoStream => -1,
            ExpectedRevision::StreamExists => -4,
            ExpectedRevision::Exact(n) => n as i64,
        }
    }

    pub fn from_wire(n: i64) -> Option<Self> {
        match n {
            -2 => Some(ExpectedRevision::Any),
            -1 => Some(ExpectedRevision::NoStream),
            -4 => Some(ExpectedRevision::StreamExists),
            n if n >= 0 => Some(ExpectedRevision::Exact(n as u64)),
            _ => None,
        }
    }

    /// Whether a stream whose last revision is `current` satisfies this expectation.
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            ExpectedRevision::Any => true,
            ExpectedRevision::NoStream => current.is_none(),
            ExpectedRevision::StreamExists => current.is_some(),
            ExpectedRevision::Exact(n) => current == Some(n),
        }
    }
}

impl fmt::Display for ExpectedRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedRevision::Any => f.write_str("any"),
            ExpectedRevision::NoStream => f.write_str("no stream"),
            ExpectedRevision::StreamExists => f.write_str("stream exists"),
            ExpectedRevision::Exact(n) => write!(f, "{n}"),
        }
    }
}

/// `current` of a stream on the wire: its last revision, or -1 when it does not exist.
pub fn current_to_wire(current: Option<u64>) -> i64 {
    current.map_or(-1, |c| c as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream's revision did not match; nothing was written. HTTP 409.
    #[error(
        "wrong expected version for stream {stream}: expected {expected}, current {}",
        current_to_wire(*.current)
    )]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedRevision,
        current: Option<u64>,
    },
    /// HTTP 404.
    #[error("stream {0} not found")]
    StreamNotFound(String),
    /// The request itself is wrong (stream name, duplicate ids, sizes). HTTP 400.
    #[error("{0}")]
    InvalidInput(String),
    /// Another process owns the ledger folder.
    #[error(
        "ledger at {dir} is held by another process{}; stop it, or talk to it with --url",
        .pid.map(|p| format!(" (contimg pid {p})")).unwrap_or_default()
    )]
    Locked { dir: String, pid: Option<u32> },
    /// The store has shut down; the append was not written.
    #[error("the event store is shut down")]
    Closed,
    /// A stored record failed to decode or its checksum failed.
    #[error("corrupt record at position {position}: {reason}")]
    Corrupt { position: u64, reason: String },
    /// Disk or sled failure; the append was not acknowledged. HTTP 500.
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}
