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

/// What can go wrong in the ledger, each variant with the status the API maps it to. The
/// causes are kept (`source`), so `contimg: {err:#}` prints the whole chain.
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
    /// The store has shut down; the append was not written. HTTP 503.
    #[error("the event store is shut down")]
    Closed,
    /// A stored record failed to decode or its checksum failed. HTTP 500.
    #[error("corrupt record at position {position}: {reason}")]
    Corrupt { position: u64, reason: String },
    /// A key or value of the store's own layout is not what it writes. HTTP 500.
    #[error("corrupt {what}: {len} bytes where at least {want} were expected")]
    CorruptKey {
        what: &'static str,
        len: usize,
        want: usize,
    },
    /// A long stream's id index (a `J` key or a run) is not what the writer writes. HTTP
    /// 500.
    #[error(
        "the id index of stream {stream} is corrupt: {reason} (contimg verify lists what is amiss; with the server stopped, contimg ledger-layout --to 3, given the server's --config or --data-dir, drops that index, and the server builds it again)"
    )]
    CorruptIndex { stream: String, reason: String },
    /// The ledger folder could not be created or opened. HTTP 500.
    #[error("opening the ledger folder {path}")]
    Folder {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file beside the ledger (an export) could not be opened or read.
    #[error("reading {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A batch could not be made durable (flush, fdatasync, fsync); it was not
    /// acknowledged, and the store takes no more writes. HTTP 503.
    #[error("making appends durable failed ({step})")]
    NotDurable {
        step: String,
        #[source]
        source: std::io::Error,
    },
    /// The ledger's file system has less free space than the reserve; nothing was written,
    /// and appends succeed again once space is freed. HTTP 507.
    #[error(
        "the ledger's file system ({path}) has {free} bytes free, under the reserve of {reserve} \
         ([ledger] reserve_mb); nothing was written. Free space and try again"
    )]
    NoSpace {
        path: std::path::PathBuf,
        free: u64,
        reserve: u64,
    },
    /// An earlier batch could not be made durable; writes are refused until the store is
    /// reopened (a restart). HTTP 503.
    #[error("an earlier flush failed; restart to recover")]
    Poisoned,
    /// The ledger database failed or could not be reached; the append was not
    /// acknowledged. HTTP 503.
    #[error("{what}")]
    Database {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The ledger database is unreachable now; nothing was acknowledged. HTTP 503.
    #[error("the ledger database is unavailable: {0}")]
    Unavailable(String),
    /// The database named as the ledger is not one this build can use.
    #[error("the database is not a contimg ledger this version can use: {0}")]
    NotALedger(String),
    /// sled failed. HTTP 500.
    #[error("storage error")]
    Sled(#[from] sled::Error),
    /// Other file-system failure. HTTP 500.
    #[error("storage I/O")]
    Io(#[from] std::io::Error),
    /// The ledger server could not be reached or its answer not read. HTTP 502 to a
    /// client of ours, an error for the tools.
    #[error("ledger server {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The ledger server answered with an error this client does not map.
    #[error("ledger server answered {status}: {detail}")]
    Server { status: u16, detail: String },
    /// A worker thread or task of the store's caller failed (panicked or was cancelled).
    #[error("{0}")]
    Task(String),
}

/// An error and its causes on one line, `a: b: c`, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Reads a big-endian u64 at the start of `bytes`; a short value is `CorruptKey`, never a
/// panic. The one reader of the store's keys and values.
pub fn be_u64(bytes: &[u8], what: &'static str) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(StoreError::CorruptKey {
            what,
            len: bytes.len(),
            want: 8,
        })
}
