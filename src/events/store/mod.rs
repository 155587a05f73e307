//! The event store: one contract, two backends.
//!
//! - [`sled`](self::sled): an embedded sled folder, the default; one process owns it.
//! - [`postgres`]: a PostgreSQL database, which several servers may share.
//!
//! Both decide appends with the same code ([`plan`]): expected revision, idempotency by
//! (stream, event id), positions and commit times; only how a decided batch is written
//! and made durable differs. Both give the same guarantees: an append is acknowledged
//! only once durable; `$all` positions are gapless and readers see them in order, never
//! N+1 before N; a catch-up subscription switches from history to live without a gap.
//! `tests/store.rs` runs one body of tests against both.
//!
//! Tunable numbers: a payload (`data` or `metadata`) is at most 64 KiB
//! (`MAX_PAYLOAD_BYTES`), an append request at most 1,000 events (`MAX_BATCH_EVENTS`);
//! a writer takes queued requests into one group commit while it holds fewer than 4,096
//! events (`MAX_COMMIT_EVENTS`); a catch-up subscription reads history 1,024 events a page.

use std::collections::{HashSet, VecDeque};
use std::path::Path;

use tokio::sync::{oneshot, watch};

use super::error::{ExpectedRevision, StoreError};
use super::record::{
    ProposedEvent, RecordRef, RecordedEvent, validate_event_type, validate_stream_name,
};

pub mod gather;
pub mod plan;
pub mod postgres;
pub mod sled;
mod subscription;

pub(crate) use self::sled::{chunk, keys};
pub use subscription::Subscription;

/// Largest `data` or `metadata` payload accepted, in bytes. Events are facts, not files;
/// the bound also keeps every value out of sled's separately written blob files.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Most events one group commit writes.
const MAX_COMMIT_EVENTS: usize = 4096;
/// What the store keeps in a ledger folder: the owner's lock and the sled database. No
/// other root may lie there.
pub const LOCK_FILE: &str = "contimg.lock";
pub const LOG_DIR: &str = "log";
pub const STORE_ENTRIES: &[&str] = &[LOCK_FILE, LOG_DIR];

/// Free space the ledger leaves on its file system by default (`[ledger] reserve_mb`):
/// commits are refused below it ([`StoreError::NoSpace`]).
pub const DEFAULT_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// sled's page cache for a server (`[ledger] cache_mb`): what it keeps of the log and its
/// indexes between reads, pages counted by their stored size (sled as patched in
/// `vendor/sled` keeps to it, give or take 512 pages; see its `PATCHED.md`). A start's
/// replay reads each log page once and appends touch the indexes' newest pages, so a
/// larger cache mostly holds what was read at start: 256 MiB took 160 MB more with a
/// million products than 64 MiB, and 64 MiB about 45 MB more than 16, and neither made a
/// figure of `docs/benchmarks.md` better.
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// sled's page cache for the tools that read the log once, in order (`audit`, `report`,
/// `export`): a page is not read twice, so a larger cache would only hold what has been
/// folded already. (`verify` looks up both indexes for every event, and keeps the
/// server's.)
pub const SCAN_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Most events one append request may carry.
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

impl WriterMsg {
    fn len(&self) -> usize {
        match self {
            WriterMsg::Append(r) => r.events.len(),
            WriterMsg::Import(r) => r.records.len(),
        }
    }

    /// Bytes of payload it carries.
    fn bytes(&self) -> usize {
        match self {
            WriterMsg::Append(r) => r
                .events
                .iter()
                .map(|e| e.data.len() + e.metadata.len())
                .sum(),
            WriterMsg::Import(r) => r
                .records
                .iter()
                .map(|e| e.data.len() + e.metadata.len())
                .sum(),
        }
    }

    /// Answers with `err()` without writing.
    fn refuse(self, err: impl Fn() -> StoreError) {
        match self {
            WriterMsg::Append(r) => drop(r.reply.send(Err(err()))),
            WriterMsg::Import(r) => drop(r.reply.send(Err(err()))),
        }
    }
}

/// A stored projection snapshot: its checkpoint and its bytes.
pub type Snapshot = (Option<u64>, Vec<u8>);

/// A stored projection snapshot being read: its checkpoint, and its bytes as they come
/// from the store, so that a load can decode them without holding them whole (a million
/// products' snapshot is about 200 MB). A snapshot that ends before its stated length,
/// goes past it, or misses a part fails the read with `InvalidData`: it is damaged, not a
/// storage failure.
pub struct SnapshotReader {
    /// The position of the last event folded into the snapshot.
    pub checkpoint: Option<u64>,
    len: u64,
    done: u64,
    inner: Box<dyn std::io::Read + Send>,
}

impl SnapshotReader {
    /// `inner` yields the snapshot's bytes and then ends; `len` is what the store says it
    /// holds.
    pub fn new(checkpoint: Option<u64>, len: u64, inner: Box<dyn std::io::Read + Send>) -> Self {
        SnapshotReader {
            checkpoint,
            len,
            done: 0,
            inner,
        }
    }

    /// Bytes the store says are left to read (a damaged snapshot may hold fewer).
    pub fn remaining(&self) -> u64 {
        self.len - self.done
    }

    /// The whole snapshot in memory with its checkpoint; `None` when it is damaged
    /// (logged). A storage failure is an error.
    pub fn read_all(mut self) -> std::io::Result<Option<Snapshot>> {
        use std::io::Read;
        // Room for the whole at once, but no more than 1 GiB whatever the store says.
        let mut bytes = Vec::with_capacity(self.remaining().min(1 << 30) as usize);
        match self.read_to_end(&mut bytes) {
            Ok(_) => Ok(Some((self.checkpoint, bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "snapshot unusable");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// An error reading a snapshot that says it is damaged.
pub fn damaged_snapshot(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("damaged snapshot: {what}"),
    )
}

impl std::io::Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = usize::try_from(self.remaining()).map_or(buf.len(), |r| r.min(buf.len()));
        if room == 0 {
            // At the stated length the store's bytes must end too.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(damaged_snapshot("more bytes than its length")),
            };
        }
        let n = self.inner.read(&mut buf[..room])?;
        if n == 0 {
            return Err(damaged_snapshot(format_args!(
                "{} bytes of {}",
                self.done, self.len
            )));
        }
        self.done += n as u64;
        Ok(n)
    }
}

/// A handle to an open ledger, on either backend. Cheap to clone; all clones share one
/// writer.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    timings: Timings,
}

/// How long appends take, as Prometheus histograms (clones share their values).
#[derive(Clone, Debug)]
pub struct Timings {
    /// From an append's submission to its answer (durable, or refused).
    pub append_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Each group commit's durability step: sled's flush and `fdatasync`, or PostgreSQL's
    /// `COMMIT` transaction.
    pub sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        // 50 µs to about 1.6 s.
        let buckets = || prometheus_client::metrics::histogram::exponential_buckets(5e-5, 2.0, 16);
        Timings {
            append_seconds: prometheus_client::metrics::histogram::Histogram::new(buckets()),
            sync_seconds: prometheus_client::metrics::histogram::Histogram::new(buckets()),
        }
    }
}

#[derive(Clone, Debug)]
enum Backend {
    Sled(self::sled::SledStore),
    Postgres(postgres::PgStore),
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sled($s) => $e,
            Backend::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the sled ledger in `dir`. Fails at once, naming the
    /// folder and the owner's pid, when another process holds it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_cached(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`] with sled's page cache set to `cache_bytes` (see
    /// [`DEFAULT_CACHE_BYTES`] and [`SCAN_CACHE_BYTES`]).
    pub fn open_cached(dir: impl AsRef<Path>, cache_bytes: u64) -> Result<Store, StoreError> {
        Self::open_sled(dir, cache_bytes, true)
    }

    /// An existing sled ledger for the tools that only read it: one in an older layout is
    /// left in it (it reads the same) and takes no appends, so a read changes nothing an
    /// older build needs.
    pub fn open_to_read(dir: impl AsRef<Path>, cache_bytes: u64) -> Result<Store, StoreError> {
        Self::open_sled(dir, cache_bytes, false)
    }

    fn open_sled(
        dir: impl AsRef<Path>,
        cache_bytes: u64,
        convert: bool,
    ) -> Result<Store, StoreError> {
        let timings = Timings::default();
        Ok(Store {
            backend: Backend::Sled(self::sled::SledStore::open(
                dir,
                timings.sync_seconds.clone(),
                cache_bytes,
                convert,
            )?),
            timings,
        })
    }

    /// Connects to the PostgreSQL ledger at `url`, creating its tables in an empty
    /// database. `dir` is the local folder whose free space the server reports.
    pub fn connect(url: &str, dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::connect_pg(url, dir.as_ref(), true)
    }

    fn connect_pg(url: &str, dir: &Path, create: bool) -> Result<Store, StoreError> {
        let timings = Timings::default();
        Ok(Store {
            backend: Backend::Postgres(postgres::PgStore::connect(
                url,
                dir,
                create,
                timings.sync_seconds.clone(),
            )?),
            timings,
        })
    }

    /// Connects to an existing PostgreSQL ledger; an empty database is refused, not
    /// given tables (the read-only tools change nothing).
    pub fn connect_existing(url: &str, dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::connect_pg(url, dir.as_ref(), false)
    }

    /// The append and sync latency histograms.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Where the ledger lives, for people: a folder, or a database URL without its
    /// password.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sled(s) => s.dir().display().to_string(),
            Backend::Postgres(p) => p.describe(),
        }
    }

    /// Whether the ledger is a PostgreSQL database (shared by several servers).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The local folder of this ledger: the sled folder, or (PostgreSQL) the data folder
    /// the server was given.
    pub fn dir(&self) -> &Path {
        both!(self, s => s.dir())
    }

    /// Sets the free space commits leave on the ledger's file system (sled only: a
    /// database server guards its own disk).
    pub fn set_reserve_bytes(&self, bytes: u64) {
        if let Backend::Sled(s) = &self.backend {
            s.set_reserve_bytes(bytes);
        }
    }

    /// Number of durable events this handle can read: positions `0..event_count()`.
    pub fn event_count(&self) -> u64 {
        both!(self, s => s.event_count())
    }

    /// Durability rounds (group commits made durable) since the store was opened.
    pub fn sync_count(&self) -> u64 {
        both!(self, s => s.sync_count())
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
        check_append(stream, &events)?;
        let started = std::time::Instant::now();
        let rx = self.submit_append(stream, expected, events)?;
        let result = rx.await.map_err(|_| StoreError::Closed)?;
        self.timings
            .append_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The same append for callers outside a runtime (import, tools, benchmarks).
    pub fn append_blocking(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<AppendResult, StoreError> {
        check_append(stream, &events)?;
        let started = std::time::Instant::now();
        let rx = self.submit_append(stream, expected, events)?;
        let result = rx.blocking_recv().map_err(|_| StoreError::Closed)?;
        self.timings
            .append_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn submit_append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<oneshot::Receiver<Result<AppendResult, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let msg = WriterMsg::Append(AppendRequest {
            stream: stream.to_string(),
            expected,
            events,
            reply,
        });
        both!(self, s => s.send(msg))?;
        Ok(rx)
    }

    /// Writes records exactly as given (ids, revisions, positions, times): the other half
    /// of an export. Each record must come next in the log and in its stream.
    pub fn import_blocking(&self, records: Vec<RecordedEvent>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        both!(self, s => s.send(WriterMsg::Import(ImportRequest { records, reply })))?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Stops taking appends, lets the writer finish (and acknowledge) what it holds, and
    /// waits for it. Later appends fail with [`StoreError::Closed`].
    pub fn close(&self) {
        both!(self, s => s.close())
    }

    pub fn is_closed(&self) -> bool {
        both!(self, s => s.is_closed())
    }

    /// The last revision of a stream among durable events, `None` when it has none.
    pub fn stream_head(&self, stream: &str) -> Result<Option<u64>, StoreError> {
        both!(self, s => s.stream_head(stream))
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
        both!(self, s => s.read_stream(stream, from, direction, limit))
    }

    /// The event at a position.
    pub fn get(&self, position: u64) -> Result<RecordedEvent, StoreError> {
        if position >= self.event_count() {
            return Err(StoreError::InvalidInput(format!(
                "position {position} is past the end of the log"
            )));
        }
        match self.read_all(Some(position), Direction::Forward, 1)?.pop() {
            Some(e) if e.position == position => Ok(e),
            _ => Err(StoreError::Corrupt {
                position,
                reason: "missing from the log".into(),
            }),
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
        both!(self, s => s.read_all(from, direction, limit))
    }

    /// Visits every durable event from `from` (inclusive) in order, without collecting them:
    /// the store's replay (a rebuild's catch-up, `benches/ledger.rs`). A thread of its own
    /// reads the log ([`read_in_batches`]) while this one decodes the records and calls
    /// `f`, so the two halves of a replay run on two cores; where the system gives no
    /// thread, this one does both. A reading thread that fails is an error, not a short
    /// replay.
    pub fn for_each_from(
        &self,
        from: u64,
        mut f: impl FnMut(RecordedEvent) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        use std::sync::mpsc::{channel, sync_channel};
        let mut n = 0;
        let mut visit = |raw: Result<RawRecord, StoreError>| {
            let raw = raw?;
            f(decode_at(raw.position, raw.bytes())?)?;
            n += 1;
            Ok::<(), StoreError>(())
        };
        let raw = self.raw_from(from);
        let (tx, rx) = sync_channel::<Vec<Result<RawRecord, StoreError>>>(4);
        let (back_tx, back_rx) = channel();
        // The reader is handed over only once it runs: `Some` still here means it did not.
        let mut unread = Some(raw);
        std::thread::scope(|scope| {
            let spawned = std::thread::Builder::new()
                .name("replay-read".into())
                .spawn_scoped(scope, {
                    let raw = &mut unread;
                    move || {
                        if let Some(raw) = raw.take() {
                            read_in_batches(raw, &[tx], &back_rx);
                        }
                    }
                });
            let Ok(reader) = spawned else {
                return Ok(());
            };
            // Takes `rx`, so that it is gone before the join below, whatever `f` did: a
            // reader waiting on a full channel then wakes and ends.
            let visited = (|| -> Result<(), StoreError> {
                for mut batch in rx {
                    for raw in batch.drain(..) {
                        visit(raw)?;
                    }
                    // The emptied batch goes back to be filled again.
                    let _ = back_tx.send(batch);
                }
                Ok(())
            })();
            let read = reader.join();
            visited?;
            read.map_err(|_| {
                StoreError::Task(
                    "the thread reading the log failed; the replay is incomplete".into(),
                )
            })
        })?;
        if let Some(raw) = unread {
            for r in raw {
                visit(r)?;
            }
        }
        Ok(n)
    }

    /// Every durable event from `from` on, decoded lazily, in order.
    pub fn events_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<RecordedEvent, StoreError>> + Send + use<> {
        self.raw_from(from)
            .map(|r| r.and_then(|r| decode_at(r.position, r.bytes())))
    }

    /// Every durable record from `from` on (up to the durable end when called), in order,
    /// undecoded: [`RawRecord::view`] reads one in place. For folds over the whole log
    /// that skip most of what they read.
    pub fn raw_from(&self, from: u64) -> RawIter {
        match &self.backend {
            Backend::Sled(s) => RawIter::Sled(s.raw_from(from)),
            Backend::Postgres(p) => RawIter::Postgres(p.raw_from(from)),
        }
    }

    /// A catch-up subscription to `$all` starting after `after` (exclusive; `None` means from
    /// the first event): history first, then live events, with no gap and no duplicate.
    pub fn subscribe_all(&self, after: Option<u64>) -> Subscription {
        Subscription {
            store: self.clone(),
            next: after.map_or(0, |p| p + 1),
            head: both!(self, s => s.head_watch()),
            buf: VecDeque::new(),
        }
    }

    /// Stores a projection snapshot together with its checkpoint (the position of the last
    /// event folded into it), so that the two cannot disagree.
    pub fn save_snapshot(
        &self,
        name: &str,
        checkpoint: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        both!(self, s => s.save_snapshot(name, checkpoint, bytes))
    }

    /// The last snapshot saved under `name`, to be read as it is decoded. One in a
    /// format this build does not know is none.
    pub fn open_snapshot(&self, name: &str) -> Result<Option<SnapshotReader>, StoreError> {
        both!(self, s => s.open_snapshot(name))
    }

    /// The last snapshot saved under `name`, whole, with its checkpoint. A damaged one
    /// (incomplete, or of another length than stored) is none.
    pub fn load_snapshot(&self, name: &str) -> Result<Option<Snapshot>, StoreError> {
        match self.open_snapshot(name)? {
            Some(r) => Ok(r.read_all()?),
            None => Ok(None),
        }
    }

    /// Bytes the log occupies on disk (sled's files, or the events table and its indexes).
    pub fn size_on_disk(&self) -> u64 {
        both!(self, s => s.size_on_disk())
    }

    /// Whether this server may run the ledger's single-owner duties now (the automatic
    /// publisher, crash recovery): always for a sled folder, which one process owns; on
    /// PostgreSQL, while this server holds the ledger's advisory lock. The watch follows
    /// the lock as it is won and lost.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        match &self.backend {
            Backend::Sled(_) => watch::channel(true).1,
            Backend::Postgres(p) => p.leadership(),
        }
    }

    /// The sled backend, for what only it has (`verify`'s index walk, the tests of its
    /// files).
    pub fn as_sled(&self) -> Option<&self::sled::SledStore> {
        match &self.backend {
            Backend::Sled(s) => Some(s),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL backend, when the ledger lives there.
    pub fn as_postgres(&self) -> Option<&postgres::PgStore> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sled(_) => None,
        }
    }
}

/// Records read in order without decoding them, from either backend.
pub enum RawIter {
    Sled(self::sled::RawIter),
    Postgres(postgres::RawIter),
}

impl Iterator for RawIter {
    type Item = Result<RawRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            RawIter::Sled(i) => i.next(),
            RawIter::Postgres(i) => i.next(),
        }
    }
}

/// The bytes a record lies in: a shared sled chunk, or a row's own copy.
pub enum RawBytes {
    Sled(::sled::IVec),
    Owned(Vec<u8>),
}

impl std::ops::Deref for RawBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            RawBytes::Sled(v) => v,
            RawBytes::Owned(v) => v,
        }
    }
}

/// Records (or anything read in order) in batches, sent to `outputs` in turn, until
/// `items` ends, an item is an error (sent as the last of its batch), or a receiver is
/// gone. The reading half of a replay, on a thread of its own: the receivers send each
/// batch back on `back` once used, to be filled again (the whole-log fold sends the
/// records back in it too, to be freed here: memory is freed fastest by the thread that
/// allocated it).
pub(crate) fn read_in_batches<T>(
    mut items: impl Iterator<Item = Result<T, StoreError>>,
    outputs: &[std::sync::mpsc::SyncSender<Vec<Result<T, StoreError>>>],
    back: &std::sync::mpsc::Receiver<Vec<Result<T, StoreError>>>,
) {
    const BATCH: usize = 2048;
    for turn in 0usize.. {
        // The batches the receivers are done with are freed here, and the last one's
        // room is used again.
        let mut batch = Vec::new();
        while let Ok(mut used) = back.try_recv() {
            used.clear();
            batch = used;
        }
        batch.reserve(BATCH);
        let mut failed = false;
        for item in items.by_ref() {
            failed = item.is_err();
            batch.push(item);
            if batch.len() == BATCH || failed {
                break;
            }
        }
        let last = batch.len() < BATCH || failed;
        if batch.is_empty() || outputs[turn % outputs.len()].send(batch).is_err() || last {
            break;
        }
    }
}

/// One stored record, still in the bytes it was read in (a sled chunk is shared, not
/// copied).
pub struct RawRecord {
    pub position: u64,
    bytes: RawBytes,
    range: std::ops::Range<usize>,
}

impl RawRecord {
    /// The encoded record.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }

    /// The record, read in place: checksum checked, position matched.
    pub fn view(&self) -> Result<RecordRef<'_>, StoreError> {
        let r = RecordRef::decode(self.bytes()).map_err(|e| StoreError::Corrupt {
            position: self.position,
            reason: e.to_string(),
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

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
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

#[cfg(test)]
mod tests {
    use super::SnapshotReader;

    fn reader(stated: u64, bytes: &[u8]) -> SnapshotReader {
        SnapshotReader::new(
            Some(7),
            stated,
            Box::new(std::io::Cursor::new(bytes.to_vec())),
        )
    }

    /// A snapshot reads whole when the store holds exactly its stated length; shorter or
    /// longer, it is damaged (`InvalidData`), never cut or run on silently.
    #[test]
    fn a_snapshot_reader_holds_the_store_to_the_stated_length() {
        assert_eq!(
            reader(5, b"12345").read_all().unwrap(),
            Some((Some(7), b"12345".to_vec()))
        );
        assert_eq!(reader(6, b"12345").read_all().unwrap(), None);
        assert_eq!(reader(4, b"12345").read_all().unwrap(), None);
        let mut short = reader(6, b"12345");
        let e = std::io::Read::read_to_end(&mut short, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        let mut long = reader(4, b"12345");
        let e = std::io::Read::read_to_end(&mut long, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    }
}
