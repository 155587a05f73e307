//! The event store on sled, the embedded backend: one writer thread with group commit,
//! reads of streams and of `$all`.
//!
//! One sled tree, `ledger`, holds two kinds of key (and three more for long streams),
//! told apart by a first byte (numbers big-endian so that sled's byte order is numeric
//! order):
//! - `L` position -> a chunk: the encoded records from that position on, of one commit or
//!   several (the truth, `$all`; see `layout::chunk`);
//! - `S` stream 0x00 revision -> position (the stream index; its last entry for a stream
//!   is the stream's head). Idempotency finds an id in a stream through it and the
//!   records it points at (`ids.rs`), so a commit writes one index key an event;
//! - for the long streams the writer has dropped from memory only, `X` stream (the mark),
//!   `K` stream 0x00 first event id -> a run of ids with their revisions and positions
//!   (the ids it held when it dropped the stream: `layout::run`), and `J` stream 0x00
//!   event id -> revision, position (their id index, `ids.rs`), which every later commit
//!   to such a stream extends.
//!
//! Ledgers in layout 1 also kept `H` stream -> last revision, a key per stream written
//! again by every commit to it, and ledgers in layouts 1 and 2 an id index, `I` stream
//! 0x00 event id -> revision, position: a second key an event. Opening such a ledger to
//! write drops those keys (`check_layout`), and the tools that only read leave them
//! ([`LAYOUT`]).
//!
//! One tree because a sled batch on one tree is atomic, crash included: a group commit
//! writes events and their index entries in one `apply_batch`, which costs a fraction of
//! a multi-tree transaction. Stream names hold no control character, so 0x00 cannot occur
//! inside one.
//!
//! Appends go through one thread, the writer, in rounds. A round takes every queued
//! request (and waits a little for callers it has just answered: `store::gather`),
//! decides each (expected revision, idempotency), applies the accepted ones in one batch,
//! makes them durable (sled flush, then `fdatasync` of the data file: `syncer.rs`) and
//! only then answers. Requests that arrive during a round form the next, so a group commit
//! grows with the load by itself.
//!
//! Readers only see events up to the durable head: an event becomes visible after the
//! batch holding it has been flushed and `fdatasync`ed, at the moment its writers are
//! acknowledged. So nothing a projection folds can vanish in a crash.
//!
//! A failed sync (the flush, the `fdatasync`, or the fsync of a new sled blob file)
//! poisons the store: every later append is refused until a restart. A second tree,
//! `snapshots`, holds each projection's snapshot: its bytes in parts of 7 KiB under a
//! generation, and a header naming the generation with the checkpoint (plus one, u64
//! big-endian, 0 for none), written last, so a snapshot and its checkpoint cannot
//! disagree (format 1, one value, is still read). See `save_snapshot`. It is not part of the log; `verify` ignores it.
//!
//! Tunable numbers (besides the store's, in `store/mod.rs`): a log chunk is filled while
//! it stays under 7 KiB (`chunk::MAX_BYTES` in `layout.rs`; a larger record gets a chunk
//! of its own), and a commit joins the last chunk while that is under 2 KiB
//! (`chunk::JOIN_BYTES`); sled's page cache is `[ledger] cache_mb` for the server
//! (`store::DEFAULT_CACHE_BYTES`) and `store::SCAN_CACHE_BYTES` for the tools that read
//! the log once, in order. sled is the copy in `vendor/sled`, whose cache keeps to its
//! capacity (see its `PATCHED.md`).

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::super::error::{StoreError, be_u64};
use super::super::record::{RecordRef, RecordedEvent};
use super::{
    DEFAULT_RESERVE_BYTES, Direction, LOCK_FILE, LOG_DIR, MAX_COMMIT_EVENTS, RawBytes, RawRecord,
    SnapshotReader, WriterMsg, damaged_snapshot, decode_at, now_micros,
};

mod ids;
mod layout;
mod syncer;
mod writer;

pub(crate) use ids::{INDEXED_FROM, indexed_places};
pub(crate) use layout::{chunk, keys, run};
use syncer::Syncer;
use writer::{Reply, Ticket, Writer};

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    /// Projection snapshots: per name a header and the parts it names.
    snapshots: sled::Tree,
    /// Snapshot saves take turns (each picks the next generation).
    snapshot_saves: std::sync::Mutex<()>,
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
    /// Free bytes a commit leaves on the ledger's file system.
    reserve: Arc<AtomicU64>,
    /// The ledger's layout: [`LAYOUT`], or 1 for one opened to read and left as it was
    /// (no appends then: they would write no head keys).
    layout: u32,
    _lock: File,
}

/// A handle to an open sled ledger. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Records of the log in order, undecoded, each in its shared chunk.
pub struct RawIter(LogIter);

impl Iterator for RawIter {
    type Item = Result<RawRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.0.next()?.map(|(position, bytes, range)| RawRecord {
            position,
            bytes: RawBytes::Sled(bytes),
            range,
        }))
    }
}

/// One record's place: its position and its bytes inside a chunk value.
type LogEntry = (u64, sled::IVec, std::ops::Range<usize>);

/// Walks log chunks lazily, yielding the records whose positions lie in `[from, to)`.
pub struct LogIter {
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

/// Opens sled's database in `dir`. Called with the folder's own lock held, so a lock of
/// sled's that is still taken can only be this process's: a store closed a moment ago,
/// whose sled thread has not yet let go of its file. That is waited out (up to 5 s), not
/// reported as another owner.
fn open_sled(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let config = sled::Config::new().path(dir).cache_capacity(cache_bytes);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The layout of the `ledger` tree this build writes and reads (its keys and chunks). A
/// change that an older build would misread bumps it, and that older build, from the
/// marker's first release on, refuses the ledger instead of misreading it:
/// `tools/deploy.sh` may put the previous binary back. Kept in a tree of its own, `meta`,
/// under `layout` (u32 big-endian), which builds from before the marker ignore.
///
/// - 1: per stream a head key (`H` stream -> last revision) beside the stream index.
/// - 2: no head keys; a stream's head is its last stream-index entry.
/// - 3: no id index (`I` stream 0x00 id); an id is found in a stream through the stream
///   index and the records it points at.
/// - 4: an id index of the long streams the writer drops from memory (`X` stream, `J`
///   stream 0x00 id), which every commit to such a stream extends: a build of layout 3
///   would append to them without it.
/// - 5: that index's ids as the writer held them when it dropped the stream, in runs
///   (`K` stream 0x00 first id -> a run of ids with their places), not a key an id: a
///   build of layout 4 would not find them.
pub const LAYOUT: u32 = 5;

/// The layout a ledger's marker names, `None` when it has none (new, or written before
/// there was one, in layout 1). A ledger in a layout newer than [`LAYOUT`] is refused here,
/// before anything reads or changes it.
fn read_layout(meta: &sled::Tree) -> Result<Option<u32>, StoreError> {
    let Some(v) = meta.get(b"layout")? else {
        return Ok(None);
    };
    let layout = <[u8; 4]>::try_from(v.as_ref())
        .map(u32::from_be_bytes)
        .map_err(|_| {
            StoreError::NotALedger(format!("its layout marker is {} bytes, not 4", v.len()))
        })?;
    if layout > LAYOUT {
        return Err(StoreError::NotALedger(format!(
            "its layout is version {layout}, written by a newer contimg; this one reads layout {LAYOUT} (run the contimg that wrote it)"
        )));
    }
    Ok(Some(layout))
}

/// Writes the layout marker and makes it durable (sled's flush, then `fdatasync` of its
/// data file) before anything that relies on it is changed.
fn mark_layout(db: &sled::Db, sled_dir: &Path, layout: u32) -> Result<(), StoreError> {
    db.open_tree("meta")?
        .insert(b"layout", &layout.to_be_bytes())?;
    db.flush()?;
    File::open(sled_dir.join("db"))?.sync_data()?;
    Ok(())
}

/// Refuses a ledger written in a newer layout than [`LAYOUT`], changing nothing. With
/// `convert`, a ledger in an older layout (or unmarked) is marked with this one first,
/// durably, and then brought to it: an older build refuses it from the marker on, so it
/// never reads a ledger half-changed; a crash on the way leaves the rest for the next
/// open. Without, an older ledger is left as it is (this build reads layouts 1 and 2 as it
/// reads 3: the stream index is the same). Returns the layout the ledger is in after.
fn check_layout(
    db: &sled::Db,
    sled_dir: &Path,
    tree: &sled::Tree,
    convert: bool,
) -> Result<u32, StoreError> {
    let layout = read_layout(&db.open_tree("meta")?)?;
    if !convert && layout != Some(LAYOUT) {
        return Ok(layout.unwrap_or(1));
    }
    if layout != Some(LAYOUT) {
        mark_layout(db, sled_dir, LAYOUT)?;
    }
    // Also after a crash in the middle of this, or of a `ledger-layout --to 1` or `--to 2`
    // (the marker still says this layout then). The id index of long streams (layouts 4
    // and 5) is not among them.
    drop_older_keys(db, tree)?;
    Ok(LAYOUT)
}

/// Drops what layouts 1 and 2 kept and layout 3 on do not: the head keys and the id index
/// of every stream.
fn drop_older_keys(db: &sled::Db, tree: &sled::Tree) -> Result<(), StoreError> {
    drop_keys(db, tree, keys::HEAD, "stream head keys (layout 1)")?;
    drop_keys(db, tree, keys::ID, "id index keys (layouts 1 and 2)")?;
    Ok(())
}

/// A stream's head as its stream-index entries give it: the last revision whose event's
/// position is below `below`, `None` when there is none. The writer passes `u64::MAX`
/// (every entry applied, durable or not: its last is the head), readers the durable count
/// (the index may be ahead of durability for a moment). Exact: stream names hold no 0x00,
/// so the range holds this stream's entries and no other's.
pub(super) fn head_in_index(
    tree: &sled::Tree,
    stream: &str,
    below: u64,
) -> Result<Option<u64>, StoreError> {
    let prefix_len = keys::in_stream(keys::INDEX, stream, &[]).len();
    for item in tree
        .range(keys::index(stream, 0)..=keys::index(stream, u64::MAX))
        .rev()
    {
        let (k, v) = item?;
        if be_u64(&v, "stream index value")? < below {
            return Ok(Some(be_u64(
                k.get(prefix_len..).unwrap_or_default(),
                "stream index key",
            )?));
        }
    }
    Ok(None)
}

/// The log chunk holding `position` (the last one starting at or before it): its first
/// position and its bytes; `None` when no chunk starts there or before.
pub(super) fn chunk_at(
    tree: &sled::Tree,
    position: u64,
) -> Result<Option<(u64, sled::IVec)>, StoreError> {
    match tree.range(keys::log(0)..=keys::log(position)).next_back() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((be_u64(&k[1..], "log key")?, v)))
        }
        None => Ok(None),
    }
}

/// Keys removed or written per sled batch when a ledger changes layout.
const LAYOUT_BATCH: usize = 10_000;

/// Drops every key of a `kind` an older layout kept: the head keys (`H` stream) of
/// layout 1, which said what the stream index's last entry says, and the id index (`I`
/// stream 0x00 id) of layouts 1 and 2, which said what the stream index and the records
/// say. In batches; a crash on the way leaves some for the next open, and nothing reads
/// them meanwhile.
fn drop_keys(db: &sled::Db, tree: &sled::Tree, kind: u8, what: &str) -> Result<u64, StoreError> {
    let mut dropped = 0u64;
    loop {
        let found = tree
            .scan_prefix([kind])
            .keys()
            .take(LAYOUT_BATCH)
            .collect::<Result<Vec<_>, _>>()?;
        if found.is_empty() {
            break;
        }
        let mut batch = sled::Batch::default();
        for k in &found {
            batch.remove(k.clone());
        }
        tree.apply_batch(batch)?;
        dropped += found.len() as u64;
    }
    if dropped > 0 {
        db.flush()?;
        tracing::info!(
            dropped,
            "dropped the {what}, which the ledger's layout does not keep"
        );
    }
    Ok(dropped)
}

/// What [`to_layout`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LayoutChange {
    /// The ledger's layout before (1 for a ledger with no marker).
    pub from: u32,
    pub to: u32,
    /// Head keys written (going to layout 1).
    pub heads_written: u64,
    /// Id index keys written (going from layout 3 or later to 2 or 1).
    pub ids_written: u64,
    /// Keys of the id index of long streams dropped (`J` keys and `K` runs, going from
    /// layout 5 to an older one, or from 4 to one older than 4).
    pub ids_dropped: u64,
}

/// Puts a stopped ledger in `layout` for a build that reads that one (the folder's lock is
/// held meanwhile). Going back (a rollback), it drops the id index of long streams
/// (layouts 4 and 5; going to 4, a layout 5 ledger's, since layout 4 reads no runs),
/// writes what the older layout kept and this one does not (to 2 or 1: the id index of
/// every stream, from the log; to 1: every stream's head key, from the stream index),
/// then the marker, durably; to [`LAYOUT`], what an open to write
/// does. `layout: None` changes nothing and reports the ledger's layout. `None` when `dir`
/// holds no sled ledger.
pub fn to_layout(dir: &Path, layout: Option<u32>) -> Result<Option<LayoutChange>, StoreError> {
    let sled_dir = dir.join(LOG_DIR);
    if !sled_dir.join("db").is_file() {
        return Ok(None);
    }
    let _lock = lock_folder(dir)?;
    let db = open_sled(&sled_dir, crate::events::store::SCAN_CACHE_BYTES)?;
    let tree = db.open_tree("ledger")?;
    let from = read_layout(&db.open_tree("meta")?)?.unwrap_or(1);
    let mut change = LayoutChange {
        from,
        to: layout.unwrap_or(from),
        heads_written: 0,
        ids_written: 0,
        ids_dropped: 0,
    };
    match layout {
        None => {}
        Some(LAYOUT) => {
            check_layout(&db, &sled_dir, &tree, true)?;
        }
        Some(to @ (1..=4)) => {
            // The id index of long streams first, the marks before the keys: a stream
            // unmarked is read from the log, so a crash on the way leaves a ledger this
            // build reads right (a `J` key or `K` run of an unmarked stream is never asked,
            // and is written again if its stream is marked). Layout 4 keeps such an index
            // too, without runs: from 5 it starts again with every stream unmarked.
            if to < 4 || from > 4 {
                drop_keys(
                    &db,
                    &tree,
                    keys::INDEXED,
                    "id index marks (layouts 4 and 5)",
                )?;
                change.ids_dropped =
                    drop_keys(
                        &db,
                        &tree,
                        keys::INDEXED_ID,
                        "id index keys (layouts 4 and 5)",
                    )? + drop_keys(&db, &tree, keys::INDEXED_RUN, "id index runs (layout 5)")?;
            }
            // What the older layout keeps next, under the marker that tells older builds
            // to stay away; a crash before the marker changes leaves keys the next open
            // drops again. Layouts 1 and 2 already have their id index.
            if to < 3 && from >= 3 {
                room_for_id_keys(&tree, &sled_dir)?;
                change.ids_written = write_id_keys(&tree)?;
            }
            if to == 1 {
                change.heads_written = write_head_keys(&tree)?;
            }
            db.flush()?;
            mark_layout(&db, &sled_dir, to)?;
            if to >= 3 {
                // From layout 1 or 2: what layouts 3 and 4 do not keep, once marked, as a
                // build of them would drop it.
                drop_older_keys(&db, &tree)?;
            }
        }
        Some(other) => {
            return Err(StoreError::InvalidInput(format!(
                "layout {other} is not one this contimg can write (1 to {LAYOUT})"
            )));
        }
    }
    Ok(Some(change))
}

/// Bytes the id index of layouts 1 and 2 takes on disk, an event: 0.9 GB for the 3.3
/// million events of a million products, rounded up.
const ID_KEY_BYTES: u64 = 300;

/// Refuses, writing nothing, to write the id index back on a file system without room for
/// it and the ledger's reserve: sled cannot go on after a write that found no space.
fn room_for_id_keys(tree: &sled::Tree, sled_dir: &Path) -> Result<(), StoreError> {
    let events = match chunk_at(tree, u64::MAX)? {
        Some((start, v)) => start + chunk::entries(&v).map_or(1, |r| r.len() as u64),
        None => 0,
    };
    let need = events * ID_KEY_BYTES + DEFAULT_RESERVE_BYTES;
    match crate::disk::space(sled_dir) {
        Some((free, _)) if free < need => Err(StoreError::InvalidInput(format!(
            "writing the id index of {events} events back needs about {} MB and leaves the reserve of {} MB; {} has {} MB free: free space first (nothing was changed)",
            events * ID_KEY_BYTES / 1_000_000,
            DEFAULT_RESERVE_BYTES / 1_000_000,
            sled_dir.display(),
            free / 1_000_000
        ))),
        _ => Ok(()),
    }
}

/// Writes `I` stream 0x00 event id -> revision, position for every record of the log, as
/// layouts 1 and 2 kept them.
fn write_id_keys(tree: &sled::Tree) -> Result<u64, StoreError> {
    let mut written = 0u64;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for item in tree.range(keys::log(0)..=keys::log(u64::MAX)) {
        let (k, v) = item?;
        let start = be_u64(&k[1..], "log key")?;
        let ranges = chunk::entries(&v).map_err(|reason| StoreError::Corrupt {
            position: start,
            reason,
        })?;
        for (i, r) in ranges.into_iter().enumerate() {
            let position = start + i as u64;
            let record = RecordRef::decode(&v[r]).map_err(|e| StoreError::Corrupt {
                position,
                reason: e.to_string(),
            })?;
            batch.insert(
                keys::id(record.stream_id, &record.event_id),
                &keys::id_value(record.revision, position),
            );
            written += 1;
            in_batch += 1;
            if in_batch == LAYOUT_BATCH {
                tree.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
    }
    tree.apply_batch(batch)?;
    Ok(written)
}

/// Writes `H` stream -> last revision for every stream in the stream index, as layout 1
/// kept them.
fn write_head_keys(tree: &sled::Tree) -> Result<u64, StoreError> {
    let mut written = 0u64;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    let mut last: Option<(Vec<u8>, [u8; 8])> = None;
    let mut put = |stream: Vec<u8>, revision: [u8; 8], batch: &mut sled::Batch| {
        batch.insert(keys::head(&stream), &revision);
        written += 1;
    };
    for item in tree.scan_prefix([keys::INDEX]) {
        let (k, _) = item?;
        let Some(split) = k.len().checked_sub(9).filter(|&at| at >= 1 && k[at] == 0) else {
            return Err(StoreError::CorruptKey {
                what: "stream index key",
                len: k.len(),
                want: 10,
            });
        };
        let stream = &k[1..split];
        let revision: [u8; 8] = k[split + 1..].try_into().expect("8 bytes");
        match &mut last {
            Some((s, r)) if s.as_slice() == stream => *r = revision,
            _ => {
                if let Some((s, r)) = last.replace((stream.to_vec(), revision)) {
                    put(s, r, &mut batch);
                    in_batch += 1;
                    if in_batch == LAYOUT_BATCH {
                        tree.apply_batch(std::mem::take(&mut batch))?;
                        in_batch = 0;
                    }
                }
            }
        }
    }
    if let Some((s, r)) = last {
        put(s, r, &mut batch);
    }
    tree.apply_batch(batch)?;
    Ok(written)
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

impl SledStore {
    /// Opens (creating if needed) the ledger in `dir`. Fails at once, naming the folder and
    /// the owner's pid, when another process holds it. `convert` brings a ledger in an older
    /// layout to [`LAYOUT`]; without it such a ledger is left as it is and takes no appends
    /// (the tools that only read: `verify`, `audit`, `export`, `validate`).
    pub fn open(
        dir: impl AsRef<Path>,
        sync_seconds: prometheus_client::metrics::histogram::Histogram,
        cache_bytes: u64,
        convert: bool,
    ) -> Result<SledStore, StoreError> {
        Self::open_holding(dir, sync_seconds, cache_bytes, convert, ids::HELD)
    }

    /// [`SledStore::open`] with the writer holding at most `held` ids (`ids.rs`).
    fn open_holding(
        dir: impl AsRef<Path>,
        sync_seconds: prometheus_client::metrics::histogram::Histogram,
        cache_bytes: u64,
        convert: bool,
        held: usize,
    ) -> Result<SledStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Folder {
            path: dir.clone(),
            source,
        })?;
        let lock = lock_folder(&dir)?;
        let sled_dir = dir.join(LOG_DIR);
        let fresh = !sled_dir.exists();
        let db = open_sled(&sled_dir, cache_bytes).map_err(|e| StoreError::Folder {
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
        let layout = check_layout(&db, &sled_dir, &tree, convert)?;
        let (next_position, last_created) = match chunk_at(&tree, u64::MAX)? {
            Some((start, v)) => {
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
        let reserve = Arc::new(AtomicU64::new(DEFAULT_RESERVE_BYTES));
        let inner = Arc::new(Inner {
            dir,
            db: db.clone(),
            tree: tree.clone(),
            snapshots: db.open_tree("snapshots")?,
            snapshot_saves: std::sync::Mutex::new(()),
            durable: AtomicU64::new(next_position),
            syncs: AtomicU64::new(0),
            head_tx,
            sender: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            poisoned: poisoned.clone(),
            reserve: reserve.clone(),
            layout,
            closed: AtomicBool::new(false),
            _lock: lock,
        });
        let writer = Writer {
            tree,
            planner: crate::events::store::plan::Planner {
                next_position,
                last_created,
            },
            poisoned: poisoned.clone(),
            reserve: writer::Reserve {
                dir: sled_dir.clone(),
                bytes: reserve,
                refusing: false,
            },
            tail: None,
            ids: ids::StreamIds::new(held),
        };
        let mut syncer = Syncer {
            db,
            data_file,
            blobs_dir: sled_dir.join("blobs"),
            synced_blobs: HashSet::new(),
            inner: Arc::downgrade(&inner),
            poisoned,
            sync_seconds,
        };
        // What sled recovered may be only in the page cache: a process killed after a
        // batch was applied and before its sync leaves it there. Durable from here on, so
        // that readers, and a round that answers without writing (an idempotent repeat
        // of such an event), rest on durable events only.
        syncer.sync()?;
        let handle = std::thread::Builder::new()
            .name("contimg-writer".into())
            .spawn(move || writer.run(rx, syncer))?;
        *inner.writer.lock().expect("writer mutex") = Some(handle);
        Ok(SledStore { inner })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Sets the free space commits leave on the ledger's file system
    /// ([`DEFAULT_RESERVE_BYTES`] until set; 0 turns the check off).
    pub fn set_reserve_bytes(&self, bytes: u64) {
        self.inner.reserve.store(bytes, Ordering::Relaxed);
    }

    /// Number of durable events; the last position is this minus one.
    pub fn event_count(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// The ledger's layout: [`LAYOUT`], or an older one it was opened to read in.
    pub fn layout(&self) -> u32 {
        self.inner.layout
    }

    /// Durability rounds (one flush and one fdatasync each) since the store was opened.
    pub fn sync_count(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    pub(super) fn send(&self, msg: WriterMsg) -> Result<(), StoreError> {
        if self.inner.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned);
        }
        if self.inner.layout != LAYOUT {
            return Err(StoreError::InvalidInput(format!(
                "the ledger is in layout {} and was opened to read: contimg serve or import brings it to layout {LAYOUT} and writes",
                self.inner.layout
            )));
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
        head_in_index(&self.inner.tree, stream, self.event_count())
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
        Ok(chunk_at(&self.inner.tree, position)?.map_or(position, |(start, _)| start))
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

    /// Every durable record from `from` on, in order, undecoded.
    pub fn raw_from(&self, from: u64) -> RawIter {
        let durable = self.event_count();
        RawIter(self.log_range(from, durable.max(from)))
    }

    /// The durable head's watch.
    pub fn head_watch(&self) -> watch::Receiver<u64> {
        self.inner.head_tx.subscribe()
    }

    /// Stores a projection snapshot together with its checkpoint (the position of the last
    /// event folded into it). The bytes go in parts of [`SNAPSHOT_PART`] under a new
    /// generation (`name`, 0x00, generation u64, part u32), written in small batches (a
    /// sled batch holds sled's write lock, and one of hundreds of megabytes would stall
    /// every append and read); then one small insert of the header under `name` (format 3,
    /// checkpoint plus one, generation, part count, length) makes them the snapshot; then
    /// the parts of every other generation go. A crash at any point leaves the last
    /// complete snapshot in place. Parts keep every sled page small: a value of hundreds of
    /// megabytes became a sled blob, which sled's cache counts by its pointer's size and
    /// so never lets go of. Saves take turns.
    pub fn save_snapshot(
        &self,
        name: &str,
        checkpoint: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        check_snapshot_name(name)?;
        let parts = u32::try_from(bytes.len().div_ceil(SNAPSHOT_PART))
            .map_err(|_| StoreError::InvalidInput("a snapshot over 30 TB".into()))?;
        let _one_at_a_time = self
            .inner
            .snapshot_saves
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let snapshots = &self.inner.snapshots;
        let generation = match snapshots.get(name.as_bytes())? {
            Some(h) => SnapshotHeader::parse(&h).map_or(1, |h| h.generation.wrapping_add(1)),
            None => 1,
        };
        for (n, group) in bytes
            .chunks(SNAPSHOT_PART * SNAPSHOT_PARTS_PER_BATCH)
            .enumerate()
        {
            let mut batch = sled::Batch::default();
            for (i, part) in group.chunks(SNAPSHOT_PART).enumerate() {
                let number = (n * SNAPSHOT_PARTS_PER_BATCH + i) as u32;
                batch.insert(snapshot_part_key(name, generation, number), part);
            }
            snapshots.apply_batch(batch)?;
        }
        let header = SnapshotHeader {
            checkpoint_plus_one: checkpoint.map_or(0, |c| c + 1),
            generation,
            parts,
            len: bytes.len() as u64,
        };
        snapshots.insert(name.as_bytes(), header.encode())?;
        // Every other part: the generation replaced, and any a crash left.
        let mut stale = Vec::new();
        for item in snapshots.scan_prefix(snapshot_parts_prefix(name)) {
            let (key, _) = item?;
            // Ours: this generation and a part number below the count (a crash before
            // any header was written may have left more parts under the same one).
            let ours = key.len() == name.len() + 13
                && key[name.len() + 1..name.len() + 9] == generation.to_be_bytes()
                && key[name.len() + 9..] < parts.to_be_bytes()[..];
            if !ours {
                stale.push(key);
            }
            if stale.len() == SNAPSHOT_PARTS_PER_BATCH {
                remove_all(snapshots, std::mem::take(&mut stale))?;
            }
        }
        remove_all(snapshots, stale)?;
        Ok(())
    }

    /// The last snapshot saved under `name`, read part by part as it is decoded (sled's
    /// cache, not a copy of the whole, holds what has been read). One in an unknown format
    /// is none; parts missing or out of place fail the read (`SnapshotReader`).
    pub fn open_snapshot(&self, name: &str) -> Result<Option<SnapshotReader>, StoreError> {
        if check_snapshot_name(name).is_err() {
            return Ok(None);
        }
        let Some(v) = self.inner.snapshots.get(name.as_bytes())? else {
            return Ok(None);
        };
        // Format 1: the checkpoint and the bytes in the one value.
        if v.first() == Some(&1) && v.len() >= 9 {
            let c = be_u64(&v[1..9], "snapshot checkpoint")?;
            let bytes = v.subslice(9, v.len() - 9);
            let len = bytes.len() as u64;
            return Ok(Some(SnapshotReader::new(
                c.checked_sub(1),
                len,
                Box::new(std::io::Cursor::new(bytes)),
            )));
        }
        let Some(h) = SnapshotHeader::parse(&v) else {
            return Ok(None);
        };
        // Parts are read as the snapshot is decoded, not at once: a save under the same
        // name meanwhile (none runs while a server opens) would remove them, and the load
        // would see a part missing and replay from the log.
        let parts = SnapshotParts {
            iter: self
                .inner
                .snapshots
                .range(snapshot_part_key(name, h.generation, 0)..),
            name: name.to_string(),
            generation: h.generation,
            parts: h.parts,
            next: 0,
            part: sled::IVec::default(),
            at: 0,
        };
        Ok(Some(SnapshotReader::new(
            h.checkpoint_plus_one.checked_sub(1),
            h.len,
            Box::new(parts),
        )))
    }

    /// Raw access for `verify`.
    pub fn raw_tree(&self) -> sled::Tree {
        self.inner.tree.clone()
    }

    /// Bytes sled occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
}

/// A snapshot's parts in order, as one stream of bytes: each part must be the next one of
/// its generation, and the stream ends after the header's count.
struct SnapshotParts {
    iter: sled::Iter,
    name: String,
    generation: u64,
    parts: u32,
    next: u32,
    part: sled::IVec,
    at: usize,
}

impl std::io::Read for SnapshotParts {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.part.len() {
            if self.next == self.parts {
                return Ok(0);
            }
            let (key, part) = match self.iter.next() {
                Some(item) => item.map_err(std::io::Error::other)?,
                None => return Err(damaged_snapshot(format_args!("part {} missing", self.next))),
            };
            if key.as_ref() != snapshot_part_key(&self.name, self.generation, self.next).as_slice()
            {
                return Err(damaged_snapshot(format_args!("part {} missing", self.next)));
            }
            self.next += 1;
            self.part = part;
            self.at = 0;
        }
        let n = buf.len().min(self.part.len() - self.at);
        buf[..n].copy_from_slice(&self.part[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Bytes per part of a stored snapshot: 17 parts (the most a sled leaf holds) stay under
/// sled's blob threshold, as log chunks do.
const SNAPSHOT_PART: usize = 7 * 1024;
/// Parts written (or removed) per sled batch while a snapshot is saved: about 450 KB.
const SNAPSHOT_PARTS_PER_BATCH: usize = 64;

/// The value under a snapshot's name (format 3).
struct SnapshotHeader {
    checkpoint_plus_one: u64,
    generation: u64,
    parts: u32,
    len: u64,
}

impl SnapshotHeader {
    const FORMAT: u8 = 3;
    const LEN: usize = 29;

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.push(Self::FORMAT);
        v.extend_from_slice(&self.checkpoint_plus_one.to_be_bytes());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&self.parts.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        v
    }

    /// `None` for another format or a damaged header.
    fn parse(v: &[u8]) -> Option<Self> {
        if v.len() != Self::LEN || v[0] != Self::FORMAT {
            return None;
        }
        let u64_at = |i: usize| v.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
        let h = SnapshotHeader {
            checkpoint_plus_one: u64_at(1)?,
            generation: u64_at(9)?,
            parts: u32::from_be_bytes(v.get(17..21)?.try_into().ok()?),
            len: u64_at(21)?,
        };
        // The parts must be able to hold the length, and no more.
        (h.len.div_ceil(SNAPSHOT_PART as u64) == u64::from(h.parts)).then_some(h)
    }
}

/// Snapshot names are ours (`publish-v1`); a 0x00 in one would mix its parts with
/// another's.
fn check_snapshot_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.contains('\0') {
        return Err(StoreError::InvalidInput(format!("snapshot name {name:?}")));
    }
    Ok(())
}

fn snapshot_parts_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 13);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

fn snapshot_part_key(name: &str, generation: u64, part: u32) -> Vec<u8> {
    let mut k = snapshot_parts_prefix(name);
    k.extend_from_slice(&generation.to_be_bytes());
    k.extend_from_slice(&part.to_be_bytes());
    k
}

fn remove_all(tree: &sled::Tree, keys: Vec<sled::IVec>) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for k in keys {
        batch.remove(k);
    }
    tree.apply_batch(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot under `name`, read whole; `None` for none or a damaged one.
    fn whole(store: &SledStore, name: &str) -> Option<(Option<u64>, Vec<u8>)> {
        store.open_snapshot(name).unwrap()?.read_all().unwrap()
    }

    /// A snapshot saved by an earlier version (format 1: one value) still loads, and the
    /// next save replaces it; a smaller save leaves no part of the larger behind; a
    /// snapshot whose parts are missing, or whose header is damaged, is no snapshot.
    #[test]
    fn snapshots_of_the_earlier_format_load_and_incomplete_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let timings = crate::events::store::Timings::default();
        let store = SledStore::open(
            dir.path(),
            timings.sync_seconds.clone(),
            crate::events::store::DEFAULT_CACHE_BYTES,
            true,
        )
        .unwrap();
        let mut v = vec![1u8];
        v.extend_from_slice(&42u64.to_be_bytes());
        v.extend_from_slice(b"old bytes");
        store.inner.snapshots.insert("publish", v).unwrap();
        assert_eq!(
            whole(&store, "publish"),
            Some((Some(41), b"old bytes".to_vec()))
        );
        let parts_of = |s: &SledStore| {
            s.inner
                .snapshots
                .scan_prefix(snapshot_parts_prefix("publish"))
                .count()
        };
        let large = vec![5u8; 200 * SNAPSHOT_PART + 1];
        store.save_snapshot("publish", Some(8), &large).unwrap();
        assert_eq!(parts_of(&store), 201);
        let bytes = vec![6u8; 3 * SNAPSHOT_PART + 1];
        store.save_snapshot("publish", Some(9), &bytes).unwrap();
        assert_eq!(parts_of(&store), 4);
        assert_eq!(whole(&store, "publish"), Some((Some(9), bytes)));
        // A damaged header (its length disagrees with its part count) is no snapshot.
        let mut h = store
            .inner
            .snapshots
            .get("publish")
            .unwrap()
            .unwrap()
            .to_vec();
        h[21..29].copy_from_slice(&u64::MAX.to_be_bytes());
        store.inner.snapshots.insert("publish", h.clone()).unwrap();
        assert_eq!(whole(&store, "publish"), None);
        h[21..29].copy_from_slice(&((3 * SNAPSHOT_PART + 1) as u64).to_be_bytes());
        store.inner.snapshots.insert("publish", h).unwrap();
        assert!(whole(&store, "publish").is_some());
        // A part gone: no snapshot.
        let gone = store
            .inner
            .snapshots
            .scan_prefix(snapshot_parts_prefix("publish"))
            .nth(2)
            .unwrap()
            .unwrap()
            .0;
        store.inner.snapshots.remove(gone).unwrap();
        assert_eq!(whole(&store, "publish"), None);
        assert!(store.save_snapshot("pub\0lish", None, b"x").is_err());
        store.close();
    }

    /// Appends to more long streams than the writer holds: each long stream it drops is
    /// indexed (`ids.rs`), and from then on its commits write its events' `J` keys. A
    /// repeat of any event, before or after its stream was indexed, is answered with its
    /// place, also after a reopen (where only the index knows the later ones), and a
    /// partial repeat or a wrong expected revision is refused. `verify` checks the index;
    /// going back to layout 4 drops it, and forward again idempotency still holds.
    #[test]
    fn long_streams_the_writer_drops_are_indexed_and_their_repeats_still_found() {
        use crate::events::{ExpectedRevision, ProposedEvent};
        let dir = tempfile::tempdir().unwrap();
        let open = |held| {
            let timings = crate::events::store::Timings::default();
            let sled = SledStore::open_holding(
                dir.path(),
                timings.sync_seconds.clone(),
                crate::events::store::DEFAULT_CACHE_BYTES,
                true,
                held,
            )
            .unwrap();
            super::super::Store {
                backend: super::super::Backend::Sled(sled),
                timings,
            }
        };
        let event =
            |i: usize| ProposedEvent::new("Noted", 1, format!("{{\"n\":{i}}}").into_bytes());
        let store = open(256);
        // The writer indexes 140 to 192 of these ids at a time, in runs of 16: in batches
        // that end within a stream and between streams while a batch holds fewer
        // (`ids::INDEX_BATCH` runs).
        const { assert!(ids::INDEX_BATCH * run::MAX_IDS < 140) };
        let streams: Vec<String> = (0..6).map(|s| format!("scratch-long-{s}")).collect();
        // (stream, the events, where the last of them went)
        let mut written: Vec<(String, Vec<ProposedEvent>, u64)> = Vec::new();
        for round in 0..40 {
            for stream in &streams {
                // Two events a commit, and a short stream between: 6 long streams of 80.
                let events = vec![event(round * 2), event(round * 2 + 1)];
                let at = store
                    .append_blocking(stream, ExpectedRevision::Any, events.clone())
                    .unwrap();
                written.push((stream.clone(), events, at.position));
                store
                    .append_blocking(
                        &format!("product-{round}-{stream}"),
                        ExpectedRevision::NoStream,
                        vec![event(0)],
                    )
                    .unwrap();
            }
        }
        let tree_of = |store: &super::super::Store| store.as_sled().unwrap().raw_tree();
        let count = |tree: &sled::Tree, kind: u8| tree.scan_prefix([kind]).count() as u64;
        // Ids in the index: a `J` key each, or an entry of a run.
        let entries = |tree: &sled::Tree| {
            let in_runs: usize = tree
                .scan_prefix([keys::INDEXED_RUN])
                .values()
                .map(|v| v.unwrap().len() / run::ENTRY)
                .sum();
            count(tree, keys::INDEXED_ID) + in_runs as u64
        };
        let marked = count(&tree_of(&store), keys::INDEXED);
        assert_eq!(
            marked, 5,
            "the long streams dropped after they were read back"
        );
        assert_eq!(
            entries(&tree_of(&store)),
            marked * 80,
            "every event of a marked stream, and nothing else"
        );
        // Runs written as each stream was dropped, and keys by the commits after.
        let (keyed, runs) = (
            count(&tree_of(&store), keys::INDEXED_ID),
            count(&tree_of(&store), keys::INDEXED_RUN),
        );
        assert!(keyed > 0 && runs > 0, "{keyed} keys, {runs} runs");
        // Every repeat answered with its place, a partial one and a wrong expected
        // revision refused, nothing appended, and `verify` content.
        let check = |store: &super::super::Store,
                     written: &[(String, Vec<ProposedEvent>, u64)],
                     events: u64,
                     head: u64| {
            for (stream, batch, position) in written {
                let again = store
                    .append_blocking(stream, ExpectedRevision::Any, batch.clone())
                    .unwrap();
                assert_eq!(again.position, *position, "a repeat in {stream}");
            }
            for stream in &streams {
                let (_, batch, _) = written.iter().find(|(s, _, _)| s == stream).unwrap();
                let partial = store.append_blocking(
                    stream,
                    ExpectedRevision::Any,
                    vec![batch[1].clone(), event(9)],
                );
                assert!(
                    matches!(partial, Err(StoreError::WrongExpectedVersion { .. })),
                    "{partial:?}"
                );
                let wrong =
                    store.append_blocking(stream, ExpectedRevision::Exact(3), vec![event(9)]);
                assert!(
                    matches!(
                        wrong,
                        Err(StoreError::WrongExpectedVersion { current: Some(h), .. }) if h == head
                    ),
                    "{wrong:?}"
                );
            }
            assert_eq!(store.event_count(), events);
            let report = crate::events::verify::verify(store, |_| {}).unwrap();
            assert!(report.ok(), "{:?}", report.problems);
        };
        let mut events = 6 * 80 + 6 * 40;
        check(&store, &written, events, 79);
        store.close();
        drop(store);
        // Reopened, holding the default: the marked streams are read through their index,
        // and commits to them extend it, as a second reopen finds.
        let store = open(ids::HELD);
        check(&store, &written, events, 79);
        for stream in &streams {
            let batch = vec![event(100), event(101)];
            let at = store
                .append_blocking(stream, ExpectedRevision::Exact(79), batch.clone())
                .unwrap();
            written.push((stream.clone(), batch, at.position));
        }
        events += 12;
        assert_eq!(
            (
                count(&tree_of(&store), keys::INDEXED_ID),
                entries(&tree_of(&store))
            ),
            (keyed + marked * 2, marked * 82),
            "the commits since, a key an event"
        );
        store.close();
        drop(store);
        let store = open(ids::HELD);
        check(&store, &written, events, 81);
        store.close();
        drop(store);
        // What `verify` finds: a marked stream's event without its key, and a mark on a
        // short stream. A key that names an event the log does not hold there (a failed
        // commit's) is allowed, and not taken for a repeat.
        let raw = |edit: &dyn Fn(&sled::Tree)| {
            let db = open_sled(
                &dir.path().join(LOG_DIR),
                crate::events::store::SCAN_CACHE_BYTES,
            )
            .unwrap();
            edit(&db.open_tree("ledger").unwrap());
            db.flush().unwrap();
        };
        let marked_stream = |tree: &sled::Tree| {
            let k = tree
                .scan_prefix([keys::INDEXED])
                .keys()
                .next()
                .unwrap()
                .unwrap();
            String::from_utf8(k[1..].to_vec()).unwrap()
        };
        let lost = std::cell::Cell::new(None);
        raw(&|tree| {
            let stream = marked_stream(tree);
            let (_, batch, _) = written.iter().rev().find(|(s, _, _)| *s == stream).unwrap();
            let key = keys::indexed_id(&stream, &batch[1].event_id);
            lost.set(Some((key.clone(), tree.remove(&key).unwrap().unwrap())));
            tree.insert(keys::indexed("product-0-scratch-long-0"), &[])
                .unwrap();
        });
        let store = open(ids::HELD);
        let report = crate::events::verify::verify(&store, |_| {}).unwrap();
        let said = |what: &str| report.problems.iter().any(|p| p.message.contains(what));
        assert!(
            said("lacks or misplaces its event"),
            "{:?}",
            report.problems
        );
        assert!(
            said("fewer than the 64 a mark needs"),
            "{:?}",
            report.problems
        );
        assert_eq!(
            report.problems.len(),
            3,
            "the short stream lacks its key too: {:?}",
            report.problems
        );
        store.close();
        drop(store);
        // Keys that name no event of their stream there: an id of this stream at another
        // event's place, an event of another stream, a place past the log's end.
        let (stray, other_event, past) = (event(7), written[1].1[0].clone(), event(8));
        raw(&|tree| {
            let (key, value) = lost.take().unwrap();
            tree.insert(key, value).unwrap();
            tree.remove(keys::indexed("product-0-scratch-long-0"))
                .unwrap();
            let stream = marked_stream(tree);
            assert_ne!(written[1].0, stream, "another stream's event");
            let (_, _, position) = written.iter().find(|(s, _, _)| *s == stream).unwrap();
            let lies = [
                (&stray, keys::id_value(1, *position)),
                (&other_event, keys::id_value(0, written[1].2 - 1)),
                (&past, keys::id_value(84, events + 1000)),
            ];
            for (e, value) in lies {
                tree.insert(keys::indexed_id(&stream, &e.event_id), &value)
                    .unwrap();
            }
        });
        let store = open(ids::HELD);
        let stream = marked_stream(&tree_of(&store));
        for (revision, e) in [(82, &stray), (83, &other_event), (84, &past)] {
            let at = store
                .append_blocking(
                    &stream,
                    ExpectedRevision::Exact(revision - 1),
                    vec![e.clone()],
                )
                .unwrap();
            assert_eq!((at.next_expected_version, at.position), (revision, events));
            written.push((stream.clone(), vec![e.clone()], at.position));
            events += 1;
        }
        // An import of one round into a marked stream and a new one: the marked stream's
        // record gets its key, the new stream's none.
        let keys_before = count(&tree_of(&store), keys::INDEXED_ID);
        let imported = |stream: &str, revision: u64, position: u64| {
            RecordedEvent::noted(
                stream,
                revision,
                position,
                uuid::Uuid::now_v7(),
                now_micros(),
            )
        };
        let records = vec![
            imported(&stream, 85, events),
            imported("scratch-imported", 0, events + 1),
        ];
        store.import_blocking(records.clone()).unwrap();
        assert_eq!(count(&tree_of(&store), keys::INDEXED_ID), keys_before + 1);
        let repeat = ProposedEvent {
            event_id: records[0].event_id,
            ..event(0)
        };
        written.push((stream.clone(), vec![repeat], events));
        events += 2;
        for other in streams.iter().filter(|s| **s != stream) {
            let batch: Vec<_> = (0..4).map(|i| event(102 + i)).collect();
            let at = store
                .append_blocking(other, ExpectedRevision::Exact(81), batch.clone())
                .unwrap();
            written.push((other.clone(), batch, at.position));
            events += 4;
        }
        let report = crate::events::verify::verify(&store, |_| {}).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        check(&store, &written, events, 85);
        store.close();
        drop(store);
        // Back to layout 4, which reads no runs: the index is gone, and forward again every
        // repeat still holds.
        let back = to_layout(dir.path(), Some(4)).unwrap().unwrap();
        assert_eq!(
            (back.from, back.to, back.ids_written, back.ids_dropped),
            (LAYOUT, 4, 0, keyed + marked * 6 + runs),
            "the keys and runs, and each marked stream's 6 keys since (the keys that lied \
             were written again, as their events' own)"
        );
        raw(&|tree| {
            assert_eq!(
                count(tree, keys::INDEXED)
                    + count(tree, keys::INDEXED_ID)
                    + count(tree, keys::INDEXED_RUN),
                0
            )
        });
        let store = open(256);
        assert_eq!(store.as_sled().unwrap().layout(), LAYOUT);
        assert_eq!(store.event_count(), events);
        check(&store, &written, events, 85);
        store.close();
    }

    /// A ledger as a layout 4 build leaves it (a marked stream's ids as a `J` key each,
    /// no runs): `--to 4` keeps that index, `--to 3` drops it; left by layout 4 again,
    /// this build opens it (marking it layout 5) and answers every repeat through the
    /// `J` keys: an event whose key is gone is not found, and `verify` says so.
    #[test]
    fn a_layout_4_id_index_is_kept_at_4_dropped_below_and_read_at_5() {
        use crate::events::{ExpectedRevision, ProposedEvent, Store};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut written = Vec::new();
        for i in 0..80 {
            let e = ProposedEvent::new("Noted", 1, format!("{{\"n\":{i}}}").into_bytes());
            let at = store
                .append_blocking("scratch-long", ExpectedRevision::Any, vec![e.clone()])
                .unwrap();
            written.push((e, at.position));
        }
        store.close();
        drop(store);
        let sled_dir = dir.path().join(LOG_DIR);
        let raw = |edit: &dyn Fn(&sled::Db, &sled::Tree)| {
            let db = open_sled(&sled_dir, crate::events::store::SCAN_CACHE_BYTES).unwrap();
            edit(&db, &db.open_tree("ledger").unwrap());
            db.flush().unwrap();
        };
        let as_layout_4 = || {
            raw(&|db, tree| {
                for (revision, (e, position)) in written.iter().enumerate() {
                    tree.insert(
                        keys::indexed_id("scratch-long", &e.event_id),
                        &keys::id_value(revision as u64, *position),
                    )
                    .unwrap();
                }
                tree.insert(keys::indexed("scratch-long"), &[]).unwrap();
                mark_layout(db, &sled_dir, 4).unwrap();
            })
        };
        let index_keys = || {
            let n = std::cell::Cell::new(0);
            raw(&|_, tree| {
                let kinds = [keys::INDEXED, keys::INDEXED_ID, keys::INDEXED_RUN];
                n.set(kinds.map(|k| tree.scan_prefix([k]).count()).iter().sum());
            });
            n.get()
        };
        as_layout_4();
        let kept = to_layout(dir.path(), Some(4)).unwrap().unwrap();
        assert_eq!((kept.from, kept.to, kept.ids_dropped), (4, 4, 0));
        assert_eq!(index_keys(), 81, "the mark and a key an id, kept");
        let dropped = to_layout(dir.path(), Some(3)).unwrap().unwrap();
        assert_eq!((dropped.from, dropped.to, dropped.ids_dropped), (4, 3, 80));
        assert_eq!(index_keys(), 0);
        as_layout_4();
        let lost = &written[5].0;
        raw(&|_, tree| {
            tree.remove(keys::indexed_id("scratch-long", &lost.event_id))
                .unwrap();
        });
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.as_sled().unwrap().layout(), LAYOUT);
        for (e, position) in &written {
            let again = store
                .append_blocking("scratch-long", ExpectedRevision::Any, vec![e.clone()])
                .unwrap();
            if e.event_id == lost.event_id {
                assert_eq!(again.position, 80, "without its key, appended again");
            } else {
                assert_eq!(again.position, *position, "a repeat, found by its `J` key");
            }
        }
        assert_eq!(store.event_count(), 81);
        let report = crate::events::verify::verify(&store, |_| {}).unwrap();
        let said = |what: &str| report.problems.iter().any(|p| p.message.contains(what));
        assert!(
            said("lacks or misplaces its event") && said("is in scratch-long twice"),
            "{:?}",
            report.problems
        );
        store.close();
    }
}
