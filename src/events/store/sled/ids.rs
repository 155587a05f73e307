//! Where an event id is in a stream, as the writer asks it (idempotency, DESIGN §4). The
//! durable answer is the stream index (revision -> position) and the records it points
//! at, which hold the ids: a stream's ids are read from them the first time the writer
//! asks about the stream, and kept, with what later commits add, while the stream is among
//! the recently used ones. So a commit writes one index key an event, and a lookup costs a
//! hash probe for a stream already asked about, one read of the stream for another. A held
//! stream's head (its highest revision) is answered the same way, without a backward step
//! through the stream index, which cost the writer a third of its time.
//!
//! What is kept is brought back under [`HELD`] ids after every group commit (with their
//! streams' names and tables, about 60 bytes an id for product streams: 16 MB), whether
//! it wrote or not: past the bound, the streams used least recently are dropped until half
//! is left. Within one commit it may hold more: every stream the commit asks about, whole.
//!
//! A long stream ([`INDEXED_FROM`] ids or more) is not forgotten when it is dropped if
//! the writer had to read some of its ids from the log (it came back after a drop, or was
//! first asked about after a start) or the last commit wrote to it (it would be read back
//! at its next one): its ids go to its id index, then the stream is marked (`X`,
//! layout 4). The ids it held go in sorted runs (`K` keys, [`run::MAX_IDS`] ids each,
//! layout 5), not a key an id: indexing 135,000 ids took 9 to 32 ms in runs, against 0.53
//! to 0.64 s as `J` keys (`docs/benchmarks.md`). From then on every commit to it writes
//! its events' `J` keys as well as their stream index entries, and its ids are looked up
//! there, not held: one sled read for an id not in the stream (two when the id is below
//! the highest id of its runs), and for one that is (a repeat) its record and stream
//! index entry too. Reading such a stream again costs [`INDEXED_FROM`] stream index
//! entries, the mark, its last run and a backward step to its head, not the stream.
//! Without this, appends to more long streams than the bound holds read every stream
//! again, whole, at every commit: 64 streams of 4,000 to 6,000 events took appends from
//! 5,100 a second to 83 (`docs/benchmarks.md`). A commit writes its `J` keys in a batch
//! before its events', and a stream's marks follow its runs: a sled batch that fails may
//! be applied in part, in no set order, and keep that part after a restart, so the index
//! may name an event that never landed, and never lacks one that did (the runs of a
//! failed attempt are dropped when the stream is indexed again). A hit is trusted only
//! once the log and the stream index hold that event there. A long stream written and
//! dropped in the same run, neither read back nor in the last commit (a bulk import), is
//! forgotten, and one short (a product, a group, a mosaic) is never indexed. So a commit
//! to the streams the writer holds still writes one index key an event, and a long
//! stream costs at most one whole read before it is indexed.

use std::collections::HashMap;

use uuid::Uuid;

use super::super::super::error::{StoreError, be_u64};
use super::super::super::record::RecordRef;
use super::layout::{chunk, keys, run};

/// Ids kept, at most, before the least recently used streams are dropped.
pub(super) const HELD: usize = 1 << 18;

/// A stream of this many ids or more, some read from the log or some in the last commit,
/// is indexed (`K` runs, `X` mark) when dropped, rather than forgotten. Reading a stream,
/// the mark is looked for once it has shown this many entries, so a change to this is a
/// new layout: a build looking later than another marked would miss marks, and append
/// without extending the index.
pub(crate) const INDEXED_FROM: usize = 64;

/// Runs (`K` keys, [`run::MAX_IDS`] ids each) a sled batch holds when streams are indexed:
/// a stream's runs are written in several batches, then the marks. Each insert copies its
/// leaf (up to 16 runs), and sled's `apply_batch` holds one epoch guard for the whole
/// batch, so the copies it replaced are freed only after it: in batches of 10,000 `J`
/// keys, 80% of the writer's time while it indexed went to the kernel zeroing fresh pages
/// (perf, `docs/benchmarks.md`). Under test a batch holds 2 runs (32 ids): the long-stream
/// test in `mod.rs` indexes 140 to 192 ids at a time, so its batches end within a stream
/// and between streams (the test holds them under 140 ids).
pub(super) const INDEX_BATCH: usize = if cfg!(test) { 2 } else { 64 };

/// The ids of recently used streams: for each, every id committed (applied) in it with its
/// revision and position, as the stream index and the log say, or, for an indexed stream,
/// the mark that its id index has them.
pub(super) struct StreamIds {
    streams: HashMap<String, Known>,
    /// Ids held over all streams, plus one a stream.
    held: usize,
    /// Indexed streams among those held: while there is none, a commit asks nothing.
    indexed_held: usize,
    bound: usize,
    /// Counts lookups and commits: when a stream was last used.
    clock: u64,
    /// The clock of the last commit: a stream it wrote to was used then.
    last_commit: u64,
}

struct Known {
    /// Every id of the stream; empty for an indexed one.
    ids: HashMap<Uuid, (u64, u64)>,
    /// Whether the stream's ids are in its id index (the stream is marked `X`).
    indexed: bool,
    /// An indexed stream's highest id in its runs (`K` keys), `None` when it has none: an
    /// id above it is not looked for there (ids of version 7, as `ProposedEvent::new`
    /// makes them, rise with time).
    runs_max: Option<Uuid>,
    /// The highest revision of the stream.
    head: Option<u64>,
    /// Whether some of its ids were read from the log (it came back after a drop, or was
    /// first asked about after a start, and had events): long, it is indexed when
    /// dropped, not forgotten.
    read_back: bool,
    used: u64,
}

impl StreamIds {
    pub(super) fn new(bound: usize) -> StreamIds {
        StreamIds {
            streams: HashMap::new(),
            held: 0,
            indexed_held: 0,
            bound,
            clock: 0,
            last_commit: 0,
        }
    }

    /// Where `id` is committed in `stream`: (revision, position), `None` when it is not.
    /// Reads the stream's ids from `tree` when they are not held, or asks its id index.
    pub(super) fn find(
        &mut self,
        tree: &sled::Tree,
        stream: &str,
        id: Uuid,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let known = self.known(tree, stream)?;
        if !known.indexed {
            return Ok(known.ids.get(&id).copied());
        }
        let runs_max = known.runs_max;
        // A `J` key is written before its event (`writer.rs`), so one whose commit failed
        // may name a place the log does not hold, or holds another event at: a hit counts
        // only once the record there is this event.
        for (revision, position) in indexed_places(tree, stream, &id, runs_max)? {
            if holds(tree, stream, id, revision, position)? {
                return Ok(Some((revision, position)));
            }
        }
        Ok(None)
    }

    /// The last revision committed in `stream`, `None` when it has none, as the stream
    /// index's last entry says.
    pub(super) fn head(
        &mut self,
        tree: &sled::Tree,
        stream: &str,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.known(tree, stream)?.head)
    }

    /// The streams among `streams` whose commits write their events' `J` keys. Every
    /// stream a commit decided on is held already (deciding asked for its head), so this
    /// reads nothing, and asks nothing while no indexed stream is held.
    pub(super) fn indexed_among<'s>(
        &mut self,
        tree: &sled::Tree,
        streams: impl Iterator<Item = &'s str>,
    ) -> Result<std::collections::HashSet<&'s str>, StoreError> {
        let mut indexed = std::collections::HashSet::new();
        if self.indexed_held == 0 {
            debug_assert!(
                streams.into_iter().all(|s| self.streams.contains_key(s)),
                "a commit's streams are held"
            );
            return Ok(indexed);
        }
        for stream in streams {
            if self.known(tree, stream)?.indexed {
                indexed.insert(stream);
            }
        }
        Ok(indexed)
    }

    /// The ids of `stream`, read from `tree` when they are not held.
    fn known(&mut self, tree: &sled::Tree, stream: &str) -> Result<&mut Known, StoreError> {
        self.clock += 1;
        if !self.streams.contains_key(stream) {
            let known = read_ids(tree, stream)?;
            self.held += known.ids.len() + 1;
            self.indexed_held += usize::from(known.indexed);
            self.streams.insert(stream.to_string(), known);
        }
        let known = self.streams.get_mut(stream).expect("inserted above");
        known.used = self.clock;
        Ok(known)
    }

    /// Takes in the events of a commit just applied: each joins its stream's ids when the
    /// stream is held, as every stream the commit decided on is (deciding asked for its
    /// head); one that is not is read whole when next asked about. An indexed stream's
    /// events' `J` keys went in a batch before the commit's. [`StreamIds::keep_bound`]
    /// follows.
    pub(super) fn committed<'a>(
        &mut self,
        events: impl Iterator<Item = (&'a str, Uuid, u64, u64)>,
    ) {
        self.clock += 1;
        self.last_commit = self.clock;
        for (stream, id, revision, position) in events {
            let Some(known) = self.streams.get_mut(stream) else {
                continue;
            };
            known.used = self.clock;
            known.head = known.head.max(Some(revision));
            if !known.indexed && known.ids.insert(id, (revision, position)).is_none() {
                self.held += 1;
            }
        }
    }

    /// Drops the streams used least recently while more than the bound is held, until
    /// half is left; a long stream some of whose ids were read from the log, or that the
    /// last commit wrote to, is indexed as it goes (its runs in batches of
    /// [`INDEX_BATCH`], then the marks). The writer calls it after every group commit. An
    /// error leaves what was written unknown: the caller refuses appends from then on.
    pub(super) fn keep_bound(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
        if self.held <= self.bound {
            return Ok(());
        }
        let mut by_use: Vec<(u64, usize, &String)> = self
            .streams
            .iter()
            .map(|(s, k)| (k.used, k.ids.len() + 1, s))
            .collect();
        by_use.sort_unstable_by_key(|(used, _, _)| *used);
        let started = std::time::Instant::now();
        let mut held = self.held;
        let mut dropped = Vec::new();
        let mut marks = sled::Batch::default();
        let mut marking = 0usize;
        let mut indexed_ids = 0usize;
        let mut runs = sled::Batch::default();
        let mut in_batch = 0;
        for (_, size, stream) in by_use {
            if held <= self.bound / 2 {
                break;
            }
            let known = &self.streams[stream];
            // Long, and read back from the log, or written by the last commit: in use, so
            // indexed from the ids held rather than read back whole at its next commit.
            let in_use = known.read_back || known.used == self.last_commit;
            if known.ids.len() >= INDEXED_FROM && in_use {
                // Runs of an attempt whose batch failed, before its mark: they would
                // overlap these, and a lookup takes the last run keyed at or below an id.
                let prefix = keys::in_stream(keys::INDEXED_RUN, stream, &[]);
                for stale in tree.scan_prefix(prefix).keys() {
                    runs.remove(stale?);
                }
                let mut sorted: Vec<_> = known.ids.iter().collect();
                sorted.sort_unstable_by_key(|(id, _)| **id);
                for entries in sorted.chunks(run::MAX_IDS) {
                    runs.insert(
                        keys::indexed_run(stream, entries[0].0),
                        run::encode(entries.iter().map(|(id, place)| (*id, **place))),
                    );
                    in_batch += 1;
                    if in_batch == INDEX_BATCH {
                        tree.apply_batch(std::mem::take(&mut runs))?;
                        in_batch = 0;
                    }
                }
                marks.insert(keys::indexed(stream), &[]);
                marking += 1;
                indexed_ids += known.ids.len();
            }
            held -= size;
            dropped.push(stream.clone());
        }
        // The marks only once every run is in: a batch that fails may be applied in
        // part (sled applies its keys in no set order) and keep that part after a restart.
        if in_batch > 0 {
            tree.apply_batch(runs)?;
        }
        if marking > 0 {
            tree.apply_batch(marks)?;
            // Appends wait meanwhile: a pause an operator may see in their latency.
            tracing::info!(
                streams = marking,
                ids = indexed_ids,
                ms = started.elapsed().as_millis() as u64,
                "indexed long streams the writer dropped from memory (their id index, in runs)"
            );
        }
        for stream in dropped {
            if self.streams.remove(&stream).is_some_and(|k| k.indexed) {
                self.indexed_held -= 1;
            }
        }
        self.held = held;
        Ok(())
    }

    /// Forgets everything: after a batch that may be partly applied.
    pub(super) fn clear(&mut self) {
        self.streams.clear();
        self.held = 0;
        self.indexed_held = 0;
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }
}

/// The places a marked stream's id index gives `id`: its `J` key's, then its run's (`K`),
/// looked for only while `id` is at most `runs_max` (the highest id in the stream's runs;
/// `Some(Uuid::max())` looks whatever the id). Neither is trusted as it is: a `J` key may
/// be a failed commit's ([`holds`] checks a place against the log).
pub(crate) fn indexed_places(
    tree: &sled::Tree,
    stream: &str,
    id: &Uuid,
    runs_max: Option<Uuid>,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut places = Vec::new();
    if let Some(v) = tree.get(keys::indexed_id(stream, id))? {
        let value = v.as_ref().try_into().map_err(|_| {
            corrupt_index(stream, format!("a `J` value of {} bytes, not 16", v.len()))
        })?;
        places.push(keys::id_place(value));
    }
    if runs_max.is_some_and(|max| *id <= max) {
        let first = keys::indexed_run(stream, &Uuid::nil());
        if let Some(item) = tree
            .range(first..=keys::indexed_run(stream, id))
            .next_back()
        {
            let (_, bytes) = item?;
            let place = run::find(&bytes, id).map_err(|reason| corrupt_index(stream, reason))?;
            places.extend(place);
        }
    }
    Ok(places)
}

fn corrupt_index(stream: &str, reason: String) -> StoreError {
    StoreError::CorruptIndex {
        stream: stream.to_string(),
        reason,
    }
}

/// Whether the log holds event `id` of `stream` at `revision` and `position`, and the
/// stream index agrees, as reading the stream would have required.
fn holds(
    tree: &sled::Tree,
    stream: &str,
    id: Uuid,
    revision: u64,
    position: u64,
) -> Result<bool, StoreError> {
    let Some((start, bytes)) = super::chunk_at(tree, position)? else {
        return Ok(false);
    };
    let ranges = chunk::entries(&bytes).map_err(|reason| StoreError::Corrupt {
        position: start,
        reason,
    })?;
    let Some(range) = usize::try_from(position - start)
        .ok()
        .and_then(|i| ranges.get(i))
    else {
        return Ok(false);
    };
    let record = RecordRef::decode(&bytes[range.clone()]).map_err(|e| StoreError::Corrupt {
        position,
        reason: e.to_string(),
    })?;
    let in_log = record.event_id == id
        && record.stream_id == stream
        && record.revision == revision
        && record.position == position;
    // And the stream index holds it, as reading the stream would have required.
    let in_index = in_log
        && tree
            .get(keys::index(stream, revision))?
            .is_some_and(|v| be_u64(&v, "stream index value").ok() == Some(position));
    Ok(in_index)
}

/// Every id of `stream` with its revision and position, from the stream index and the
/// records it points at (each chunk read once for the stream's records in it); for an
/// indexed stream, only its head (it shows [`INDEXED_FROM`] entries, then its mark).
fn read_ids(tree: &sled::Tree, stream: &str) -> Result<Known, StoreError> {
    let prefix = keys::in_stream(keys::INDEX, stream, &[]).len();
    let entry = |item: Result<(sled::IVec, sled::IVec), sled::Error>| {
        let (k, v) = item?;
        Ok::<_, StoreError>((
            be_u64(k.get(prefix..).unwrap_or_default(), "stream index key")?,
            be_u64(&v, "stream index value")?,
        ))
    };
    let mut entries = tree.range(keys::index(stream, 0)..=keys::index(stream, u64::MAX));
    let mut index = Vec::new();
    for item in entries.by_ref() {
        index.push(entry(item)?);
        if index.len() == INDEXED_FROM {
            break;
        }
    }
    if index.len() == INDEXED_FROM && tree.get(keys::indexed(stream))?.is_some() {
        // The highest id of its runs: the last entry of its last run.
        let last_run = tree
            .scan_prefix(keys::in_stream(keys::INDEXED_RUN, stream, &[]))
            .next_back()
            .transpose()?;
        let runs_max = match last_run {
            Some((_, bytes)) => run::entries(&bytes)
                .map_err(|reason| corrupt_index(stream, reason))?
                .last()
                .map(|e| run::id(e)),
            None => None,
        };
        return Ok(Known {
            ids: HashMap::new(),
            indexed: true,
            runs_max,
            head: super::head_in_index(tree, stream, u64::MAX)?,
            read_back: false,
            used: 0,
        });
    }
    for item in entries {
        index.push(entry(item)?);
    }
    let mut ids = HashMap::with_capacity(index.len());
    let mut head = None;
    let mut last_chunk: Option<(u64, sled::IVec, Vec<std::ops::Range<usize>>)> = None;
    for (revision, position) in index {
        let held = last_chunk.as_ref().is_some_and(|(start, _, ranges)| {
            *start <= position && position - start < ranges.len() as u64
        });
        if !held {
            let (start, bytes) =
                super::chunk_at(tree, position)?.ok_or_else(|| missing(position))?;
            let ranges = chunk::entries(&bytes).map_err(|reason| StoreError::Corrupt {
                position: start,
                reason,
            })?;
            last_chunk = Some((start, bytes, ranges));
        }
        let (start, bytes, ranges) = last_chunk.as_ref().expect("read above");
        let range = ranges
            .get((position - start) as usize)
            .ok_or_else(|| missing(position))?;
        let record = RecordRef::decode(&bytes[range.clone()]).map_err(|e| StoreError::Corrupt {
            position,
            reason: e.to_string(),
        })?;
        if record.position != position || record.stream_id != stream || record.revision != revision
        {
            return Err(StoreError::Corrupt {
                position,
                reason: format!(
                    "the stream index puts {stream}@{revision} here, the record is {}@{} at {}",
                    record.stream_id, record.revision, record.position
                ),
            });
        }
        ids.insert(record.event_id, (revision, position));
        head = Some(revision);
    }
    Ok(Known {
        read_back: !ids.is_empty(),
        ids,
        indexed: false,
        runs_max: None,
        head,
        used: 0,
    })
}

fn missing(position: u64) -> StoreError {
    StoreError::Corrupt {
        position,
        reason: "missing from the log".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ExpectedRevision, ProposedEvent, Store};

    fn event() -> ProposedEvent {
        ProposedEvent::new("Noted", 1, b"{}".to_vec())
    }

    /// Appends one event to `stream`: the stream, its id, revision and position.
    fn append(store: &Store, stream: &str) -> (String, Uuid, u64, u64) {
        let e = event();
        let at = store
            .append_blocking(stream, ExpectedRevision::Any, vec![e.clone()])
            .unwrap();
        let revision = at.next_expected_version;
        (stream.to_string(), e.event_id, revision, at.position)
    }

    /// Ids are read from the stream index and the log (streams spread over several chunks,
    /// among other streams' records), found with their revision and position, and not
    /// found in another stream; commits join held streams, not others; past the bound, the
    /// streams used least recently go, and are read again.
    #[test]
    fn ids_come_from_the_log_and_the_least_recently_used_streams_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut written = Vec::new();
        for round in 0..60u64 {
            for s in 0..3u64 {
                let appended = append(&store, &format!("scratch-{s}"));
                assert_eq!(appended.2, round);
                written.push(appended);
            }
        }
        let tree = store.as_sled().unwrap().raw_tree();
        assert!(
            tree.scan_prefix([keys::LOG]).count() > 2,
            "the streams span several chunks"
        );
        let mut ids = StreamIds::new(128);
        for (stream, id, revision, position) in &written {
            assert_eq!(
                ids.find(&tree, stream, *id).unwrap(),
                Some((*revision, *position))
            );
        }
        assert_eq!(ids.find(&tree, "scratch-1", written[0].1).unwrap(), None);
        assert_eq!(ids.find(&tree, "scratch-9", written[0].1).unwrap(), None);
        assert_eq!(ids.head(&tree, "scratch-2").unwrap(), Some(59));
        assert_eq!(ids.head(&tree, "scratch-9").unwrap(), None);
        // Three streams of 60 and an empty one are held: over the bound of 128 only once
        // a commit says so.
        assert_eq!(ids.held(), 3 * 61 + 1);
        // A stream the commit below begins: asked about first, as deciding it does.
        assert_eq!(ids.head(&tree, "scratch-new").unwrap(), None);
        let new = Uuid::now_v7();
        ids.committed(
            [
                ("scratch-0", new, 60, 1000),
                ("scratch-new", new, 0, 1001),
                ("scratch-other", new, 5, 1002),
            ]
            .into_iter(),
        );
        ids.keep_bound(&tree).unwrap();
        // scratch-0 and scratch-new were used last; the others went until half (64) was left.
        let mut held: Vec<_> = ids.streams.keys().cloned().collect();
        held.sort();
        assert_eq!(held, ["scratch-0", "scratch-new"]);
        assert_eq!(ids.held(), 62 + 2);
        assert_eq!(ids.find(&tree, "scratch-0", new).unwrap(), Some((60, 1000)));
        assert_eq!(ids.head(&tree, "scratch-0").unwrap(), Some(60));
        assert_eq!(
            ids.find(&tree, "scratch-new", new).unwrap(),
            Some((0, 1001))
        );
        // A dropped stream is read again, whole.
        let (stream, id, revision, position) = &written[4];
        assert_eq!(
            ids.find(&tree, stream, *id).unwrap(),
            Some((*revision, *position))
        );
        ids.clear();
        assert_eq!(ids.held(), 0);
        store.close();
    }

    /// A stream is indexed in runs, after runs an earlier attempt left (its batch failed
    /// before the mark) are dropped: one keyed in the middle of the stream's ids would
    /// hide every id above it, and one under the first run's own key is written over.
    /// Each id is then found in the runs, after a reopen too, and an id of no event is
    /// not; `verify` agrees. A run that is not whole entries is an error that names its
    /// stream, and one out of order is what `verify` reports.
    #[test]
    fn a_stream_indexed_in_runs_replaces_the_runs_of_a_failed_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut written = Vec::new();
        for _ in 0..100u64 {
            for s in 0..2 {
                written.push(append(&store, &format!("scratch-{s}")));
            }
        }
        let tree = store.as_sled().unwrap().raw_tree();
        let (first, middle) = (written[0].1, written[100].1);
        for stale in [first, middle] {
            let run = run::encode([(&stale, (7, 7))].into_iter());
            tree.insert(keys::indexed_run("scratch-0", &stale), run)
                .unwrap();
        }
        let mut ids = StreamIds::new(128);
        // Both read whole (101 held each, with the stream), then over the bound: both are
        // indexed, as read back from the log, and dropped.
        assert_eq!(ids.head(&tree, "scratch-0").unwrap(), Some(99));
        assert_eq!(ids.head(&tree, "scratch-1").unwrap(), Some(99));
        ids.keep_bound(&tree).unwrap();
        assert!(ids.streams.is_empty());
        let runs = |tree: &sled::Tree, stream: &str| -> Vec<sled::IVec> {
            tree.scan_prefix(keys::in_stream(keys::INDEXED_RUN, stream, &[]))
                .values()
                .map(|v| v.unwrap())
                .collect()
        };
        for stream in ["scratch-0", "scratch-1"] {
            assert!(tree.get(keys::indexed(stream)).unwrap().is_some());
            let sizes: Vec<_> = runs(&tree, stream)
                .iter()
                .map(|v| v.len() / run::ENTRY)
                .collect();
            assert_eq!(sizes, [16, 16, 16, 16, 16, 16, 4], "100 ids in runs of 16");
        }
        let check = |ids: &mut StreamIds, tree: &sled::Tree| {
            for (stream, id, revision, position) in &written {
                assert_eq!(
                    ids.find(tree, stream, *id).unwrap(),
                    Some((*revision, *position)),
                    "{stream}@{revision}"
                );
            }
            assert_eq!(ids.find(tree, "scratch-0", Uuid::nil()).unwrap(), None);
            assert_eq!(ids.find(tree, "scratch-0", Uuid::max()).unwrap(), None);
        };
        check(&mut ids, &tree);
        store.close();
        drop((store, tree));
        let store = Store::open(dir.path()).unwrap();
        let tree = store.as_sled().unwrap().raw_tree();
        check(&mut StreamIds::new(128), &tree);
        let report = crate::events::verify::verify(&store, |_| {}).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        // A middle run of scratch-1 cut short: an id in it does not read (the lookup's
        // error); then its last run too: nothing of the stream reads (its reading's).
        let cut = |tree: &sled::Tree, i: usize| {
            let run = runs(tree, "scratch-1")[i].clone();
            let first = run::id(&run);
            tree.insert(keys::indexed_run("scratch-1", &first), &run[..40])
                .unwrap();
            first
        };
        let corrupt = |found: Result<Option<(u64, u64)>, StoreError>| match found {
            Err(StoreError::CorruptIndex { stream, reason }) => {
                assert_eq!(stream, "scratch-1");
                assert!(reason.contains("a run of 40 bytes"), "{reason}");
            }
            other => panic!("{other:?}"),
        };
        let in_middle = cut(&tree, 3);
        let mut ids = StreamIds::new(128);
        corrupt(ids.find(&tree, "scratch-1", in_middle));
        assert_eq!(ids.head(&tree, "scratch-1").unwrap(), Some(99));
        cut(&tree, 6);
        corrupt(StreamIds::new(128).find(&tree, "scratch-1", written[1].1));
        // Two ids of a run of scratch-0 swapped.
        let second = runs(&tree, "scratch-0")[1].to_vec();
        let key = keys::indexed_run("scratch-0", &run::id(&second));
        let mut swapped = second.clone();
        let (a, b) = swapped.split_at_mut(run::ENTRY);
        a.swap_with_slice(&mut b[..run::ENTRY]);
        tree.insert(key, swapped).unwrap();
        let report = crate::events::verify::verify(&store, |_| {}).unwrap();
        let said = |what: &str| report.problems.iter().any(|p| p.message.contains(what));
        assert!(
            said("a run's ids are not in order"),
            "{:?}",
            report.problems
        );
        let of_scratch_1 = |what: &str| {
            let said = report.problems.iter().filter(|p| p.message.contains(what));
            said.count()
        };
        assert_eq!(
            (
                of_scratch_1("scratch-1: its run from id"),
                of_scratch_1("the id index of scratch-1 does not read: a run of 40 bytes")
            ),
            (2, 1),
            "each run cut short, and the stream's index once: {:?}",
            report.problems
        );
        store.close();
    }

    /// A long stream that the last commit wrote to is indexed from the ids held when it is
    /// dropped, though none was read from the log (it would be read back whole at its next
    /// commit), and so is one some of whose ids were read from the log; one neither read
    /// back nor in the last commit is forgotten, and a short one is never indexed.
    #[test]
    fn a_long_stream_in_the_last_commit_is_indexed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = store.as_sled().unwrap().raw_tree();
        // (stream, events before it is asked about, events in the first commit, in the
        // last commit).
        let streams = [
            ("scratch-old", 0, 70, 0),
            ("scratch-back", 10, 60, 0),
            ("scratch-0", 0, 0, 70),
            ("scratch-1", 0, 0, 70),
            ("scratch-2", 0, 0, 70),
            ("scratch-short", 0, 0, 10),
        ];
        let mut before = Vec::new();
        for (stream, n, _, _) in streams {
            before.extend((0..n).map(|_| append(&store, stream)));
        }
        // Bound 20: every stream is dropped, down to 10 held.
        let mut ids = StreamIds::new(20);
        // Asked about before the commits, as deciding them asks: scratch-back is read
        // with 10 ids, the others are new.
        for (stream, n, _, _) in streams {
            let head = ids.head(&tree, stream).unwrap();
            assert_eq!(head, u64::try_from(n).unwrap().checked_sub(1));
        }
        let mut commits: Vec<Vec<(String, Uuid, u64, u64)>> = vec![Vec::new(), Vec::new()];
        for (stream, _, first, last) in streams {
            commits[0].extend((0..first).map(|_| append(&store, stream)));
            commits[1].extend((0..last).map(|_| append(&store, stream)));
        }
        for commit in &commits {
            ids.committed(commit.iter().map(|(s, id, r, p)| (s.as_str(), *id, *r, *p)));
        }
        ids.keep_bound(&tree).unwrap();
        assert!(ids.streams.is_empty(), "every stream dropped");
        let marked: Vec<_> = streams
            .iter()
            .map(|(stream, ..)| *stream)
            .filter(|s| tree.get(keys::indexed(s)).unwrap().is_some())
            .collect();
        assert_eq!(
            marked,
            ["scratch-back", "scratch-0", "scratch-1", "scratch-2"]
        );
        let runs: Vec<_> = streams.iter().map(|(s, ..)| runs_of(&tree, s)).collect();
        assert_eq!(runs, [0, 5, 5, 5, 5, 0], "70 ids in runs of 16");
        for (stream, id, revision, position) in before.iter().chain(commits.iter().flatten()) {
            assert_eq!(
                ids.find(&tree, stream, *id).unwrap(),
                Some((*revision, *position)),
                "{stream}@{revision}"
            );
        }
        store.close();
    }

    fn runs_of(tree: &sled::Tree, stream: &str) -> usize {
        tree.scan_prefix(keys::in_stream(keys::INDEXED_RUN, stream, &[]))
            .count()
    }
}
