//! The event store on sled: one writer thread with group commit, reads of streams and of
//! `$all`, and catch-up subscriptions.
//!
//! One sled tree, `ledger`, holds four kinds of key, told apart by a first byte (numbers
//! big-endian so that sled's byte order is numeric order):
//! - `L` position -> a chunk: the encoded records of one commit from that position on
//!   (the truth, `$all`);
//! - `H` stream -> last revision (the stream head);
//! - `S` stream 0x00 revision -> position (the stream index);
//! - `I` stream 0x00 event id -> revision, position (the durable idempotency index).
//!
//! One tree because a sled batch on one tree is atomic, crash included: a group commit
//! writes events, heads and both indexes in one `apply_batch`, which costs a fraction of
//! a multi-tree transaction. Stream names hold no control character, so 0x00 cannot occur
//! inside one.
//!
//! Appends go through two threads. The writer takes every queued request, decides each
//! (expected revision, idempotency), and applies the accepted ones in one batch; the
//! syncer then makes everything applied so far durable (sled flush, then `fdatasync` of
//! the data file) and only then answers. While the syncer waits on the disk the writer
//! applies the next requests, so a group commit grows with the load by itself.
//!
//! Readers only see events up to the durable head: an event becomes visible after the
//! batch holding it has been flushed and `fdatasync`ed, at the moment its writers are
//! acknowledged. So nothing a projection folds can vanish in a crash.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::error::be_u64;
use super::error::{ExpectedRevision, StoreError};
use super::record::{
    ProposedEvent, RecordRef, RecordedEvent, validate_event_type, validate_stream_name,
};
use super::shape::{Before, LogShape};

/// Largest `data` or `metadata` payload accepted, in bytes. Events are facts, not files;
/// the bound also keeps every value out of sled's separately written blob files.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most events one group commit writes.
const MAX_COMMIT_EVENTS: usize = 4096;
/// Most events one append request may carry.
/// What the store keeps in a ledger folder: the owner's lock and the sled database. No
/// other root may lie there.
pub const LOCK_FILE: &str = "contimg.lock";
pub const LOG_DIR: &str = "log";
pub const STORE_ENTRIES: &[&str] = &[LOCK_FILE, LOG_DIR];

pub const MAX_BATCH_EVENTS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// What an append returns: the stream's new last revision and the global position of the
/// last event written (or found, for an idempotent repeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    pub next_expected_version: u64,
    pub position: u64,
}

struct AppendRequest {
    stream: String,
    expected: ExpectedRevision,
    events: Vec<ProposedEvent>,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

struct ImportRequest {
    records: Vec<RecordedEvent>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

enum WriterMsg {
    Append(AppendRequest),
    Import(ImportRequest),
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    /// Projection snapshots, each stored with its checkpoint in one value.
    snapshots: sled::Tree,
    /// Number of durable events: positions `0..durable` are readable.
    durable: AtomicU64,
    /// Durability rounds (flush + fdatasync) since open.
    syncs: AtomicU64,
    head_tx: watch::Sender<u64>,
    sender: Mutex<Option<mpsc::Sender<WriterMsg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set by `close`, after the writer has answered everything.
    closed: AtomicBool,
    /// Set after a failed flush: the state on disk is unknown, so no more appends.
    poisoned: Arc<AtomicBool>,
    _lock: File,
}

/// A stored projection snapshot: its checkpoint and its bytes.
pub type Snapshot = (Option<u64>, Vec<u8>);

/// A handle to an open ledger. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Key layout of the `ledger` tree.
pub(crate) mod keys {
    pub const LOG: u8 = b'L';
    pub const HEAD: u8 = b'H';
    pub const INDEX: u8 = b'S';
    pub const ID: u8 = b'I';

    pub fn log(position: u64) -> [u8; 9] {
        let mut k = [LOG; 9];
        k[1..].copy_from_slice(&position.to_be_bytes());
        k
    }

    pub fn head(stream: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(stream.len() + 1);
        k.push(HEAD);
        k.extend_from_slice(stream.as_bytes());
        k
    }

    /// `kind`, stream, 0x00, `suffix`.
    pub fn in_stream(kind: u8, stream: &str, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(stream.len() + 2 + suffix.len());
        k.push(kind);
        k.extend_from_slice(stream.as_bytes());
        k.push(0);
        k.extend_from_slice(suffix);
        k
    }

    pub fn index(stream: &str, revision: u64) -> Vec<u8> {
        in_stream(INDEX, stream, &revision.to_be_bytes())
    }

    pub fn id(stream: &str, id: &uuid::Uuid) -> Vec<u8> {
        in_stream(ID, stream, id.as_bytes())
    }
}

/// A log value holds the records of one commit (or a part of one, up to
/// [`chunk::MAX_BYTES`]), keyed by the first one's position: one sled insert per commit
/// instead of one per event, and one sled step per chunk when replaying.
/// Layout: `[TAG]` then, per record, `[length: u32 LE][record]`.
pub(crate) mod chunk {
    use std::ops::Range;

    pub const TAG: u8 = 0xC1;
    /// Records are added to a chunk while it stays under this size (a single larger
    /// record gets a chunk of its own).
    pub const MAX_BYTES: usize = 64 * 1024;

    pub fn encode(records: &[Vec<u8>]) -> Vec<u8> {
        let len = 1 + records.iter().map(|r| r.len() + 4).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(TAG);
        for r in records {
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    /// Byte ranges of the records in a chunk.
    pub fn entries(bytes: &[u8]) -> Result<Vec<Range<usize>>, String> {
        if bytes.first() != Some(&TAG) {
            return Err("log value is not a chunk".into());
        }
        let mut out = Vec::new();
        let mut at = 1;
        while at < bytes.len() {
            let Some(len) = bytes.get(at..at + 4) else {
                return Err(format!("chunk truncated at byte {at}"));
            };
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let start = at + 4;
            if start + len > bytes.len() {
                return Err(format!("chunk truncated at byte {at}"));
            }
            out.push(start..start + len);
            at = start + len;
        }
        if out.is_empty() {
            return Err("empty chunk".into());
        }
        Ok(out)
    }
}

/// One record's place: its position and its bytes inside a chunk value.
type LogEntry = (u64, sled::IVec, std::ops::Range<usize>);

/// Walks log chunks lazily, yielding the records whose positions lie in `[from, to)`.
struct LogIter {
    chunks: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send>,
    pending: VecDeque<LogEntry>,
    from: u64,
    to: u64,
    backward: bool,
}

impl Iterator for LogIter {
    type Item = Result<LogEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            let (k, v) = match self.chunks.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let start = match be_u64(&k[1..], "log key") {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let ranges = match chunk::entries(&v) {
                Ok(r) => r,
                Err(reason) => {
                    return Some(Err(StoreError::Corrupt {
                        position: start,
                        reason,
                    }));
                }
            };
            let mut entries: Vec<LogEntry> = ranges
                .into_iter()
                .enumerate()
                .map(|(i, r)| (start + i as u64, v.clone(), r))
                .filter(|(p, _, _)| *p >= self.from && *p < self.to)
                .collect();
            if self.backward {
                entries.reverse();
            }
            self.pending.extend(entries);
        }
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Takes the folder's lock file, or says who holds it.
fn lock_folder(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(StoreError::Locked {
            dir: dir.display().to_string(),
            pid: text.trim().parse().ok(),
        });
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    file.sync_data()?;
    Ok(file)
}

impl Store {
    /// Opens (creating if needed) the ledger in `dir`. Fails at once, naming the folder and
    /// the owner's pid, when another process holds it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Folder {
            path: dir.clone(),
            source,
        })?;
        let lock = lock_folder(&dir)?;
        let sled_dir = dir.join(LOG_DIR);
        let fresh = !sled_dir.exists();
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(1024 * 1024 * 1024)
            .open()
            .map_err(|e| StoreError::Folder {
                path: sled_dir.clone(),
                source: match e {
                    sled::Error::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                },
            })?;
        if fresh {
            // New files exist now: make their directory entries durable.
            File::open(&sled_dir)?.sync_all()?;
            File::open(&dir)?.sync_all()?;
        }
        let tree = db.open_tree("ledger")?;
        let (next_position, last_created) = match tree
            .range(keys::log(0)..=keys::log(u64::MAX))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item?;
                let start = be_u64(&k[1..], "log key")?;
                // A damaged last chunk must not keep `verify` from reporting on it.
                match chunk::entries(&v) {
                    Ok(ranges) => {
                        let last = start + ranges.len() as u64 - 1;
                        let r = ranges.last().expect("a chunk is never empty").clone();
                        let created = decode_at(last, &v[r]).map_or_else(
                            |e| {
                                tracing::error!(error = %e, "the last record is damaged; run contimg verify");
                                now_micros()
                            },
                            |r| r.created_micros,
                        );
                        (last + 1, created)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, position = start, "the last log chunk is damaged; run contimg verify");
                        (start + 1, now_micros())
                    }
                }
            }
            None => (0, i64::MIN),
        };
        let data_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(sled_dir.join("db"))?;
        let (head_tx, _) = watch::channel(next_position);
        let (tx, rx) = mpsc::channel();
        let poisoned = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            dir,
            db: db.clone(),
            tree: tree.clone(),
            snapshots: db.open_tree("snapshots")?,
            durable: AtomicU64::new(next_position),
            syncs: AtomicU64::new(0),
            head_tx,
            sender: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            poisoned: poisoned.clone(),
            closed: AtomicBool::new(false),
            _lock: lock,
        });
        let writer = Writer {
            tree,
            next_position,
            last_created,
            poisoned: poisoned.clone(),
        };
        let syncer = Syncer {
            db,
            data_file,
            blobs_dir: sled_dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
            queue: Arc::new(SyncQueue::default()),
            inner: Arc::downgrade(&inner),
            poisoned,
        };
        let handle = std::thread::Builder::new()
            .name("contimg-writer".into())
            .spawn(move || writer.run(rx, syncer))?;
        *inner.writer.lock().expect("writer mutex") = Some(handle);
        Ok(Store { inner })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Number of durable events; the last position is this minus one.
    pub fn event_count(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// Durability rounds (one flush and one fdatasync each) since the store was opened.
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// The last durable position, `None` when the log is empty.
    pub fn last_position(&self) -> Option<u64> {
        self.event_count().checked_sub(1)
    }

    /// Appends a batch to one stream, all or nothing, acknowledged once durable.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<AppendResult, StoreError> {
        let rx = self.submit_append(stream, expected, events)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The same append for callers outside a runtime (import, tools, benchmarks).
    pub fn append_blocking(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<AppendResult, StoreError> {
        let rx = self.submit_append(stream, expected, events)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn submit_append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<oneshot::Receiver<Result<AppendResult, StoreError>>, StoreError> {
        check_append(stream, &events)?;
        let (reply, rx) = oneshot::channel();
        self.send(WriterMsg::Append(AppendRequest {
            stream: stream.to_string(),
            expected,
            events,
            reply,
        }))?;
        Ok(rx)
    }

    /// Writes records exactly as given (ids, revisions, positions, times): the other half
    /// of an export. Each record must come next in the log and in its stream.
    pub fn import_blocking(&self, records: Vec<RecordedEvent>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriterMsg::Import(ImportRequest { records, reply }))?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn send(&self, msg: WriterMsg) -> Result<(), StoreError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned);
        }
        let guard = self.inner.sender.lock().expect("sender mutex");
        let sender = guard.as_ref().ok_or(StoreError::Closed)?;
        sender.send(msg).map_err(|_| StoreError::Closed)
    }

    /// Stops taking appends, lets the writer finish (and acknowledge) what it holds, and
    /// waits for it. Later appends fail with [`StoreError::Closed`].
    pub fn close(&self) {
        drop(self.inner.sender.lock().expect("sender mutex").take());
        if let Some(handle) = self.inner.writer.lock().expect("writer mutex").take() {
            let _ = handle.join();
        }
        // Wake caught-up subscribers so that they see the end.
        self.inner.closed.store(true, Ordering::Release);
        self.inner.head_tx.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The last revision of a stream among durable events, `None` when it has none.
    pub fn stream_head(&self, stream: &str) -> Result<Option<u64>, StoreError> {
        let Some(rev) = self.inner.tree.get(keys::head(stream))? else {
            return Ok(None);
        };
        // The head may be ahead of durability for a moment; step back to the durable part.
        let durable = self.event_count();
        let prefix_len = keys::in_stream(keys::INDEX, stream, &[]).len();
        for item in self
            .inner
            .tree
            .range(keys::index(stream, 0)..=keys::index(stream, be_u64(&rev, "stream head")?))
            .rev()
        {
            let (k, v) = item?;
            if be_u64(&v, "stream index value")? < durable {
                return Ok(Some(be_u64(
                    k.get(prefix_len..).unwrap_or_default(),
                    "stream index key",
                )?));
            }
        }
        Ok(None)
    }

    /// Reads up to `limit` events of a stream from revision `from` (inclusive; `None`
    /// means the start going forward and the end going backward).
    pub fn read_stream(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let durable = self.event_count();
        let low = keys::index(stream, 0);
        let high = keys::index(stream, u64::MAX);
        let exists = match self.inner.tree.range(low.clone()..=high.clone()).next() {
            Some(item) => be_u64(&item?.1, "stream index value")? < durable,
            None => false,
        };
        if !exists {
            return Err(StoreError::StreamNotFound(stream.to_string()));
        }
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match direction
        {
            Direction::Forward => Box::new(
                self.inner
                    .tree
                    .range(keys::index(stream, from.unwrap_or(0))..=high),
            ),
            Direction::Backward => Box::new(
                self.inner
                    .tree
                    .range(low..=keys::index(stream, from.unwrap_or(u64::MAX)))
                    .rev(),
            ),
        };
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let position = be_u64(&item?.1, "stream index value")?;
            if position >= durable {
                // Not yet durable: invisible. Going forward nothing after it is either.
                if direction == Direction::Forward {
                    break;
                }
                continue;
            }
            out.push(self.get(position)?);
        }
        Ok(out)
    }

    /// The event at a position.
    pub fn get(&self, position: u64) -> Result<RecordedEvent, StoreError> {
        if position >= self.event_count() {
            return Err(StoreError::InvalidInput(format!(
                "position {position} is past the end of the log"
            )));
        }
        match self.log_range(position, position + 1).next() {
            Some(entry) => {
                let (p, bytes, r) = entry?;
                decode_at(p, &bytes[r])
            }
            None => Err(StoreError::Corrupt {
                position,
                reason: "missing from the log".into(),
            }),
        }
    }

    /// The key of the chunk holding `position` (its first position).
    fn chunk_start(&self, position: u64) -> Result<u64, StoreError> {
        Ok(
            match self
                .inner
                .tree
                .range(keys::log(0)..=keys::log(position))
                .next_back()
            {
                Some(item) => be_u64(&item?.0[1..], "log key")?,
                None => position,
            },
        )
    }

    /// Records in `[from, to)`, in order, read lazily chunk by chunk.
    fn log_range(&self, from: u64, to: u64) -> LogIter {
        self.log_iter(from, to, false)
    }

    /// Records in `[from, to)`, last first.
    fn log_range_rev(&self, from: u64, to: u64) -> LogIter {
        self.log_iter(from, to, true)
    }

    fn log_iter(&self, from: u64, to: u64, backward: bool) -> LogIter {
        let first = if from >= to {
            to
        } else {
            self.chunk_start(from).unwrap_or(from)
        };
        let range = self
            .inner
            .tree
            .range(keys::log(first)..keys::log(to.max(first)));
        LogIter {
            chunks: if backward {
                Box::new(range.rev())
            } else {
                Box::new(range)
            },
            pending: VecDeque::new(),
            from,
            to,
            backward,
        }
    }

    /// Reads up to `limit` events of `$all` from position `from` (inclusive; `None` means
    /// the start going forward and the end going backward).
    pub fn read_all(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let durable = self.event_count();
        let mut out = Vec::with_capacity(limit.min(4096));
        let entries: LogIter = match direction {
            Direction::Forward => {
                let start = from.unwrap_or(0);
                if start >= durable {
                    return Ok(out);
                }
                self.log_range(start, durable)
            }
            Direction::Backward => {
                let Some(last) = durable.checked_sub(1) else {
                    return Ok(out);
                };
                let start = from.unwrap_or(last).min(last);
                self.log_range_rev(0, start + 1)
            }
        };
        for entry in entries.take(limit) {
            let (position, bytes, r) = entry?;
            out.push(decode_at(position, &bytes[r])?);
        }
        Ok(out)
    }

    /// Visits every durable event from `from` (inclusive) in order, without collecting them:
    /// the replay path of projections, reports and `verify`.
    pub fn for_each_from(
        &self,
        from: u64,
        mut f: impl FnMut(RecordedEvent) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let durable = self.event_count();
        let mut n = 0;
        for entry in self.log_range(from, durable.max(from)) {
            let (position, bytes, r) = entry?;
            f(decode_at(position, &bytes[r])?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every durable event from `from` on, decoded lazily, in order.
    pub fn events_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<RecordedEvent, StoreError>> + use<> {
        let durable = self.event_count();
        self.log_range(from, durable.max(from))
            .map(|entry| entry.and_then(|(p, bytes, r)| decode_at(p, &bytes[r])))
    }

    /// Every durable record from `from` on, in order, undecoded: [`RawRecord::view`] reads
    /// one in place. For folds over the whole log that skip most of what they read.
    pub fn raw_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<RawRecord, StoreError>> + Send + use<> {
        let durable = self.event_count();
        self.log_range(from, durable.max(from)).map(|entry| {
            entry.map(|(position, bytes, range)| RawRecord {
                position,
                bytes,
                range,
            })
        })
    }

    /// A catch-up subscription to `$all` starting after `after` (exclusive; `None` means from
    /// the first event): history first, then live events, with no gap and no duplicate.
    pub fn subscribe_all(&self, after: Option<u64>) -> Subscription {
        Subscription {
            store: self.clone(),
            next: after.map_or(0, |p| p + 1),
            head: self.inner.head_tx.subscribe(),
            buf: VecDeque::new(),
        }
    }

    /// Stores a projection snapshot together with its checkpoint (the position of the last
    /// event folded into it), in one value so the two cannot disagree.
    pub fn save_snapshot(
        &self,
        name: &str,
        checkpoint: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(bytes.len() + 9);
        value.push(1u8);
        value.extend_from_slice(&checkpoint.map_or(0, |c| c + 1).to_be_bytes());
        value.extend_from_slice(bytes);
        self.inner.snapshots.insert(name.as_bytes(), value)?;
        Ok(())
    }

    /// The last snapshot saved under `name`, with its checkpoint.
    pub fn load_snapshot(&self, name: &str) -> Result<Option<Snapshot>, StoreError> {
        let Some(v) = self.inner.snapshots.get(name.as_bytes())? else {
            return Ok(None);
        };
        if v.len() < 9 || v[0] != 1 {
            return Ok(None);
        }
        let c = be_u64(&v[1..9], "snapshot checkpoint")?;
        Ok(Some((c.checked_sub(1), v[9..].to_vec())))
    }

    /// Raw access for `verify`.
    pub(crate) fn raw_tree(&self) -> sled::Tree {
        self.inner.tree.clone()
    }

    /// Bytes sled occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
}

/// One stored record, still in its log chunk (shared, not copied).
pub struct RawRecord {
    pub position: u64,
    bytes: sled::IVec,
    range: std::ops::Range<usize>,
}

impl RawRecord {
    /// The record, read in place: checksum checked, position matched.
    pub fn view(&self) -> Result<RecordRef<'_>, StoreError> {
        let r = RecordRef::decode(&self.bytes[self.range.clone()]).map_err(|e| {
            StoreError::Corrupt {
                position: self.position,
                reason: e.to_string(),
            }
        })?;
        if r.position != self.position {
            return Err(StoreError::Corrupt {
                position: self.position,
                reason: format!("record says position {}", r.position),
            });
        }
        Ok(r)
    }
}

fn decode_at(position: u64, bytes: &[u8]) -> Result<RecordedEvent, StoreError> {
    let r = RecordedEvent::decode(bytes).map_err(|e| StoreError::Corrupt {
        position,
        reason: e.to_string(),
    })?;
    if r.position != position {
        return Err(StoreError::Corrupt {
            position,
            reason: format!("record says position {}", r.position),
        });
    }
    Ok(r)
}

/// Checks done before a request reaches the writer, so that bad input costs it nothing.
fn check_append(stream: &str, events: &[ProposedEvent]) -> Result<(), StoreError> {
    validate_stream_name(stream).map_err(StoreError::InvalidInput)?;
    if events.is_empty() {
        return Err(StoreError::InvalidInput("no events to append".into()));
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(StoreError::InvalidInput(format!(
            "{} events in one append; at most {MAX_BATCH_EVENTS}",
            events.len()
        )));
    }
    let mut seen = HashSet::with_capacity(events.len());
    for e in events {
        if !seen.insert(e.event_id) {
            return Err(StoreError::InvalidInput(format!(
                "event id {} appears twice in one append",
                e.event_id
            )));
        }
        validate_event_type(&e.event_type).map_err(StoreError::InvalidInput)?;
        if e.data.len() > MAX_PAYLOAD_BYTES || e.metadata.len() > MAX_PAYLOAD_BYTES {
            return Err(StoreError::InvalidInput(format!(
                "event {} is larger than {MAX_PAYLOAD_BYTES} bytes",
                e.event_id
            )));
        }
    }
    Ok(())
}

/// A catch-up subscription. History is read from the store page by page; once caught up
/// it waits on the durable-head watch, which the writer only ever overwrites, so a slow
/// subscriber costs the writer nothing and loses nothing (it re-reads from the store).
pub struct Subscription {
    store: Store,
    next: u64,
    head: watch::Receiver<u64>,
    buf: VecDeque<RecordedEvent>,
}

impl Subscription {
    /// The next event, waiting for one if caught up. `Err(Closed)` once the store is gone.
    pub async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                return Ok(e);
            }
            if self.next < self.store.event_count() {
                let page = self
                    .store
                    .read_all(Some(self.next), Direction::Forward, 1024)?;
                if let Some(last) = page.last() {
                    self.next = last.position + 1;
                }
                self.buf.extend(page);
                continue;
            }
            if self.store.is_closed() {
                return Err(StoreError::Closed);
            }
            self.head.changed().await.map_err(|_| StoreError::Closed)?;
        }
    }

    /// The position the next event will have.
    pub fn next_position(&self) -> u64 {
        self.next
    }
}

/// Planned writes of one group commit.
#[derive(Default)]
struct Plan {
    batch: sled::Batch,
    /// Encoded records of the chunk being filled, and the position of its first one.
    chunk: Vec<Vec<u8>>,
    chunk_start: u64,
    chunk_bytes: usize,
    head_overlay: HashMap<String, u64>,
    id_overlay: HashMap<(String, Uuid), (u64, u64)>,
    written: usize,
}

/// Owns appends. Runs on its own thread because sled and fdatasync block.
struct Writer {
    tree: sled::Tree,
    next_position: u64,
    last_created: i64,
    poisoned: Arc<AtomicBool>,
}

/// One applied batch waiting to be made durable, with the answers it owes.
struct Ticket {
    /// The log's next position once this batch is in.
    end: u64,
    replies: Vec<Reply>,
}

enum Reply {
    Append(
        oneshot::Sender<Result<AppendResult, StoreError>>,
        Result<AppendResult, StoreError>,
    ),
    Import(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Import(tx, r) => drop(tx.send(r)),
        }
    }

    /// Turns a success into `err()`: the batch it belongs to never became durable.
    fn fail(self, err: impl Fn() -> StoreError) {
        match self {
            Reply::Append(tx, r) => drop(tx.send(r.and_then(|_| Err(err())))),
            Reply::Import(tx, r) => drop(tx.send(r.and_then(|_| Err(err())))),
        }
    }
}

/// Applied batches on their way to the disk. The writer pushes; the syncer drains
/// everything queued, makes it durable with one flush and one fdatasync, then answers.
/// While the syncer waits on the disk the writer applies the next batches, so the size of
/// a group commit follows the load by itself.
#[derive(Default)]
struct SyncQueue {
    state: Mutex<(VecDeque<Ticket>, bool)>,
    ready: Condvar,
}

impl SyncQueue {
    fn push(&self, ticket: Ticket) {
        self.state.lock().expect("sync queue").0.push_back(ticket);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.state.lock().expect("sync queue").1 = true;
        self.ready.notify_one();
    }

    /// Everything queued, waiting for some; `None` once closed and empty.
    fn take(&self) -> Option<Vec<Ticket>> {
        let mut state = self.state.lock().expect("sync queue");
        loop {
            if !state.0.is_empty() {
                return Some(state.0.drain(..).collect());
            }
            if state.1 {
                return None;
            }
            state = self.ready.wait(state).expect("sync queue");
        }
    }
}

struct Syncer {
    db: sled::Db,
    data_file: File,
    blobs_dir: PathBuf,
    /// Blob files already synced (sled names each blob once).
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
    queue: Arc<SyncQueue>,
    inner: std::sync::Weak<Inner>,
    poisoned: Arc<AtomicBool>,
}

impl Syncer {
    fn run(self) {
        while let Some(tickets) = self.queue.take() {
            let end = tickets.last().map_or(0, |t| t.end);
            if self.poisoned.load(Ordering::Acquire) {
                tickets
                    .into_iter()
                    .flat_map(|t| t.replies)
                    .for_each(|r| r.fail(|| StoreError::Poisoned));
                continue;
            }
            match self.sync() {
                Ok(()) => {
                    if let Some(inner) = self.inner.upgrade() {
                        inner.syncs.fetch_add(1, Ordering::Relaxed);
                        inner.durable.store(end, Ordering::Release);
                        inner.head_tx.send_replace(end);
                    }
                    tickets
                        .into_iter()
                        .flat_map(|t| t.replies)
                        .for_each(Reply::send);
                }
                Err(e) => {
                    self.poisoned.store(true, Ordering::Release);
                    tracing::error!(error = %super::error::chain(&e), "making appends durable failed; refusing appends until restart");
                    // Each caller gets the cause (io::Error is not Clone: same kind and text).
                    let (step, kind, text) = match &e {
                        StoreError::NotDurable { step, source } => {
                            (step.clone(), source.kind(), source.to_string())
                        }
                        other => (
                            "sync".to_string(),
                            std::io::ErrorKind::Other,
                            super::error::chain(other),
                        ),
                    };
                    tickets.into_iter().flat_map(|t| t.replies).for_each(|r| {
                        r.fail(|| StoreError::NotDurable {
                            step: step.clone(),
                            source: std::io::Error::new(kind, text.clone()),
                        })
                    });
                }
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| StoreError::NotDurable {
            step: "flush".into(),
            source: match e {
                sled::Error::Io(io) => io,
                other => std::io::Error::other(other.to_string()),
            },
        })?;
        // sled's flush ends in sync_file_range, which leaves the disk's write cache alone.
        self.data_file
            .sync_data()
            .map_err(|source| StoreError::NotDurable {
                step: "fdatasync of the data file".into(),
                source,
            })?;
        self.sync_blobs()
    }

    /// sled writes a page larger than its blob threshold (about 128 KiB: a big merged
    /// leaf) to a file of its own under `blobs/` and never syncs it. Sync the ones that
    /// appeared since the last round, and the folder, so an acknowledged batch cannot
    /// live only in the page cache.
    fn sync_blobs(&self) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(&self.blobs_dir) else {
            return Ok(()); // no blob written yet
        };
        let mut synced = self.synced_blobs.lock().expect("blob set");
        let mut any = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if synced.contains(&name) {
                continue;
            }
            if let Ok(f) = File::open(entry.path()) {
                f.sync_all().map_err(|source| StoreError::NotDurable {
                    step: format!("fsync of sled blob {}", entry.path().display()),
                    source,
                })?;
            }
            synced.insert(name);
            any = true;
        }
        if any {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<WriterMsg>, syncer: Syncer) {
        let queue = syncer.queue.clone();
        let syncer = std::thread::Builder::new()
            .name("contimg-sync".into())
            .spawn(move || syncer.run());
        let syncer = match syncer {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sync thread");
                self.poisoned.store(true, Ordering::Release);
                return;
            }
        };
        // recv() keeps returning queued messages after every sender is gone, so a close
        // still answers everything that was submitted.
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut count = msg_len(&batch[0]);
            while count < MAX_COMMIT_EVENTS {
                match rx.try_recv() {
                    Ok(m) => {
                        count += msg_len(&m);
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch, &queue);
        }
        queue.close();
        let _ = syncer.join();
    }

    fn commit_batch(&mut self, batch: Vec<WriterMsg>, queue: &SyncQueue) {
        if self.poisoned.load(Ordering::Acquire) {
            // The disk failed under an earlier batch: what is in sled now is unknown.
            for msg in batch {
                match msg {
                    WriterMsg::Append(r) => drop(r.reply.send(Err(StoreError::Closed))),
                    WriterMsg::Import(r) => drop(r.reply.send(Err(StoreError::Closed))),
                }
            }
            return;
        }
        let start_position = self.next_position;
        let start_created = self.last_created;
        let mut plan = Plan::default();
        let mut replies = Vec::with_capacity(batch.len());
        for msg in batch {
            match msg {
                WriterMsg::Append(req) => {
                    let result = self.plan_append(&req, &mut plan);
                    replies.push(Reply::Append(req.reply, result));
                }
                WriterMsg::Import(req) => {
                    let result = self.plan_import(&req.records, &mut plan);
                    replies.push(Reply::Import(req.reply, result));
                }
            }
        }
        plan.seal_chunk();
        if plan.written > 0 {
            // Atomic, crash included: events, heads and both indexes land together or not
            // at all. Durability is the syncer's job.
            if let Err(e) = self.tree.apply_batch(plan.batch) {
                tracing::error!(error = %e, "applying a batch failed; its appends are refused");
                self.next_position = start_position;
                self.last_created = start_created;
                let e = e.to_string();
                replies.into_iter().for_each(|r| {
                    r.fail(|| StoreError::NotDurable {
                        step: "applying the batch".into(),
                        source: std::io::Error::other(e.clone()),
                    })
                });
                return;
            }
        }
        // Answers wait for the syncer even when nothing was written: a refusal or an
        // idempotent repeat may rest on events of a batch that is not durable yet.
        queue.push(Ticket {
            end: self.next_position,
            replies,
        });
    }

    fn head(&self, plan: &Plan, stream: &str) -> Result<Option<u64>, StoreError> {
        if let Some(&r) = plan.head_overlay.get(stream) {
            return Ok(Some(r));
        }
        self.tree
            .get(keys::head(stream))?
            .map(|v| be_u64(&v, "stream head"))
            .transpose()
    }

    fn find_id(
        &self,
        plan: &Plan,
        stream: &str,
        id: Uuid,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(&hit) = plan.id_overlay.get(&(stream.to_string(), id)) {
            return Ok(Some(hit));
        }
        self.tree
            .get(keys::id(stream, &id))?
            .map(|v| {
                Ok((
                    be_u64(&v, "id index value")?,
                    be_u64(v.get(8..).unwrap_or_default(), "id index value")?,
                ))
            })
            .transpose()
    }

    fn plan_append(
        &mut self,
        req: &AppendRequest,
        plan: &mut Plan,
    ) -> Result<AppendResult, StoreError> {
        let current = self.head(plan, &req.stream)?;
        let wrong = || StoreError::WrongExpectedVersion {
            stream: req.stream.clone(),
            expected: req.expected,
            current,
        };
        // Idempotency: the same ids, already committed at consecutive revisions.
        if let Some((r0, _)) = self.find_id(plan, &req.stream, req.events[0].event_id)? {
            let mut last_position = 0;
            for (i, e) in req.events.iter().enumerate() {
                match self.find_id(plan, &req.stream, e.event_id)? {
                    Some((r, p)) if r == r0 + i as u64 => last_position = p,
                    _ => return Err(wrong()),
                }
            }
            let admitted = match req.expected {
                ExpectedRevision::Any | ExpectedRevision::StreamExists => true,
                ExpectedRevision::NoStream => r0 == 0,
                ExpectedRevision::Exact(n) => n.checked_add(1) == Some(r0),
            };
            if !admitted {
                return Err(wrong());
            }
            return Ok(AppendResult {
                next_expected_version: r0 + req.events.len() as u64 - 1,
                position: last_position,
            });
        }
        for e in &req.events[1..] {
            if self.find_id(plan, &req.stream, e.event_id)?.is_some() {
                return Err(wrong());
            }
        }
        if !req.expected.admits(current) {
            return Err(wrong());
        }
        let now = now_micros().max(self.last_created);
        let mut revision = current.map_or(0, |c| c + 1);
        for e in &req.events {
            let mut record = RecordedEvent {
                event_id: e.event_id,
                stream_id: req.stream.clone(),
                revision,
                position: self.next_position,
                event_type: e.event_type.clone(),
                event_version: e.event_version,
                data: e.data.clone(),
                metadata: e.metadata.clone(),
                created_micros: now,
                checksum: 0,
            };
            self.stage_record(&mut record, plan);
            revision += 1;
        }
        self.last_created = now;
        Ok(AppendResult {
            next_expected_version: revision - 1,
            position: self.next_position - 1,
        })
    }

    fn plan_import(
        &mut self,
        records: &[RecordedEvent],
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        // Check everything before staging anything: a bad import writes nothing.
        struct InStore<'a> {
            writer: &'a Writer,
            plan: &'a Plan,
        }
        impl Before for InStore<'_> {
            fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
                self.writer.head(self.plan, stream)
            }
            fn has_id(&mut self, stream: &str, id: Uuid) -> Result<bool, StoreError> {
                Ok(self.writer.find_id(self.plan, stream, id)?.is_some())
            }
        }
        let mut shape = LogShape::after(self.next_position, self.last_created, true);
        let mut before = InStore { writer: self, plan };
        let mut created = self.last_created;
        for r in records {
            validate_stream_name(&r.stream_id).map_err(StoreError::InvalidInput)?;
            shape
                .check(r, &mut before)?
                .map_err(|e| StoreError::InvalidInput(e.to_string()))?;
            created = created.max(r.created_micros);
        }
        for r in records {
            let mut record = r.clone();
            self.stage_record(&mut record, plan);
        }
        self.last_created = created;
        Ok(())
    }

    fn stage_record(&mut self, record: &mut RecordedEvent, plan: &mut Plan) {
        let pos = record.position.to_be_bytes();
        let rev = record.revision.to_be_bytes();
        let encoded = record.encode();
        if !plan.chunk.is_empty() && plan.chunk_bytes + encoded.len() > chunk::MAX_BYTES {
            plan.seal_chunk();
        }
        if plan.chunk.is_empty() {
            plan.chunk_start = record.position;
        }
        plan.chunk_bytes += encoded.len() + 4;
        plan.chunk.push(encoded);
        plan.batch.insert(keys::head(&record.stream_id), &rev);
        plan.batch
            .insert(keys::index(&record.stream_id, record.revision), &pos);
        let mut id_value = [0u8; 16];
        id_value[..8].copy_from_slice(&rev);
        id_value[8..].copy_from_slice(&pos);
        plan.batch
            .insert(keys::id(&record.stream_id, &record.event_id), &id_value);
        plan.head_overlay
            .insert(record.stream_id.clone(), record.revision);
        plan.id_overlay.insert(
            (record.stream_id.clone(), record.event_id),
            (record.revision, record.position),
        );
        plan.written += 1;
        self.next_position = record.position + 1;
    }
}

impl Plan {
    /// Moves the chunk being filled into the batch.
    fn seal_chunk(&mut self) {
        if !self.chunk.is_empty() {
            self.batch
                .insert(&keys::log(self.chunk_start), chunk::encode(&self.chunk));
            self.chunk.clear();
            self.chunk_bytes = 0;
        }
    }
}

fn msg_len(m: &WriterMsg) -> usize {
    match m {
        WriterMsg::Append(r) => r.events.len(),
        WriterMsg::Import(r) => r.records.len(),
    }
}
