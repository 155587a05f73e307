//! `contimg verify`: positions gapless from 0, every checksum matching, stream revisions
//! consecutive, ids unique in each stream, and the stream heads (PostgreSQL's table; on
//! sled, the stream index's last entries), stream index (and, in layouts 1 and 2, the id
//! index; from layout 4, the id index of the streams marked indexed) agreeing with the log,
//! entry for entry.

use serde::Serialize;

use super::error::StoreError;
use super::record::RecordedEvent;
use super::shape::{Empty, LogShape, ShapeError};
use super::store::{Store, chunk, keys};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The log position at fault, when one is.
    pub position: Option<u64>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub streams: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The first bad position, the one an operator starts from.
    pub fn first_bad_position(&self) -> Option<u64> {
        self.problems.iter().filter_map(|p| p.position).min()
    }
}

/// Stop collecting after this many problems: the first ones are what matters.
const MAX_PROBLEMS: usize = 100;

fn be(bytes: &[u8]) -> Option<u64> {
    super::error::be_u64(bytes, "key").ok()
}

/// Checks a store opened by this process (so nobody appends meanwhile).
pub fn verify(store: &Store, progress: impl FnMut(u64)) -> Result<VerifyReport, StoreError> {
    match (store.as_sled(), store.as_postgres()) {
        (Some(_), _) => Ok(verify_sled(store, progress)?),
        (None, Some(pg)) => verify_postgres(pg, progress),
        (None, None) => unreachable!("a store has a backend"),
    }
}

/// Checks a PostgreSQL ledger: every row's record decodes, matches its columns and its
/// position, positions gapless from 0, revisions consecutive, ids unique per stream, commit
/// times never going back, and the heads (the log's, each stream's) agreeing with the rows.
fn verify_postgres(
    pg: &super::store::postgres::PgStore,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, StoreError> {
    let mut problems = Vec::new();
    let mut add = |position: Option<u64>, message: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(Problem { position, message });
        }
    };
    let mut shape = LogShape::from_start(true);
    let mut expected_pos = 0u64;
    let mut events = 0u64;
    let mut scan = pg.scan_snapshot()?;
    let (head, stored) = (scan.head, std::mem::take(&mut scan.heads));
    for row in scan {
        let row = row?;
        let pos = row.position;
        if pos != expected_pos {
            add(
                Some(expected_pos),
                format!("gap: positions {expected_pos}..{pos} are missing"),
            );
        }
        expected_pos = pos + 1;
        events += 1;
        if events.is_multiple_of(65536) {
            progress(events);
        }
        let r = match RecordedEvent::decode(&row.record) {
            Ok(r) => r,
            Err(e) => {
                add(Some(pos), format!("record does not decode: {e}"));
                continue;
            }
        };
        if r.position != pos {
            add(Some(pos), format!("record says position {}", r.position));
        }
        if r.stream_id != row.stream || r.revision != row.revision || r.event_id != row.event_id {
            add(
                Some(pos),
                format!(
                    "row says {}@{} {}, its record {}@{} {}",
                    row.stream, row.revision, row.event_id, r.stream_id, r.revision, r.event_id
                ),
            );
        }
        if let Ok(Err(fault)) = shape.check(&r, &mut Empty)
            && !matches!(fault, ShapeError::Position { .. })
        {
            add(Some(pos), fault.to_string());
        }
    }
    progress(events);
    if head != events {
        add(
            None,
            format!("the log's head says {head} events; the table holds {events}"),
        );
    }
    for (stream, revision) in &stored {
        match shape.heads().get(stream) {
            Some(&r) if r == *revision => {}
            seen => add(
                None,
                format!("head of {stream} is {revision}, log ends at {seen:?}"),
            ),
        }
    }
    if stored.len() != shape.heads().len() {
        add(
            None,
            format!(
                "{} stream heads for {} streams",
                stored.len(),
                shape.heads().len()
            ),
        );
    }
    problems.sort_by_key(|p| p.position.unwrap_or(u64::MAX));
    Ok(VerifyReport {
        events,
        streams: shape.heads().len() as u64,
        problems,
    })
}

/// The (stream, id) pairs met so far in a log with no id index of every stream (layouts
/// 3 and 4): a hash of each with the position it was first met at, a repeat of a hash
/// confirmed from the log, and the pairs whose hash another pair took first, whole.
#[derive(Default)]
struct IdsMet {
    first: std::collections::HashMap<u64, u64>,
    collided: std::collections::HashMap<(String, uuid::Uuid), u64>,
}

impl IdsMet {
    /// Where `r`'s (stream, id) was met before, if it was; `pos` is `r`'s position. An
    /// error names the earlier position that could not be read.
    fn earlier(
        &mut self,
        sled: &super::store::sled::SledStore,
        r: &RecordedEvent,
        pos: u64,
    ) -> Result<Option<u64>, (u64, StoreError)> {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = foldhash::quality::FixedState::with_seed(0).build_hasher();
        r.stream_id.hash(&mut h);
        r.event_id.hash(&mut h);
        let first = match self.first.entry(h.finish()) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(pos);
                return Ok(None);
            }
            std::collections::hash_map::Entry::Occupied(o) => *o.get(),
        };
        let e = sled.get(first).map_err(|e| (first, e))?;
        if e.stream_id == r.stream_id && e.event_id == r.event_id {
            return Ok(Some(first));
        }
        Ok(self.collided.insert((r.stream_id.clone(), r.event_id), pos))
    }
}

/// A run's key as a report names it: its stream and first id (`K` stream 0x00 id).
fn run_key(k: &[u8]) -> String {
    match keys::indexed_run_parts(k) {
        Some((stream, first)) => format!(
            "the id index of {}: its run from id {first}",
            String::from_utf8_lossy(stream)
        ),
        None => format!("a `K` key of {} bytes, not stream 0x00 id", k.len()),
    }
}

fn verify_sled(store: &Store, mut progress: impl FnMut(u64)) -> Result<VerifyReport, sled::Error> {
    let sled = store.as_sled().expect("a sled store");
    let tree = sled.raw_tree();
    let mut problems = Vec::new();
    let mut add = |position: Option<u64>, message: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(Problem { position, message });
        }
    };
    // Positions, revisions and commit times; ids are checked below, through the id index
    // in layouts 1 and 2, else against the ids met so far (`IdsMet`), and from layout 4,
    // for the streams marked indexed, also through their id index.
    let id_index = sled.layout() < 3;
    // Layout 5's runs hold ids of the marked streams too; a build of layout 4 reads none.
    let runs_max = (sled.layout() >= 5).then(uuid::Uuid::max);
    let mut marked = std::collections::HashMap::new();
    for item in tree.scan_prefix([keys::INDEXED]) {
        let (k, _) = item?;
        marked.insert(String::from_utf8_lossy(&k[1..]).into_owned(), 0u64);
    }
    // Layout 5's runs, before the log (whose problems may fill the report): each whole
    // entries in the ids' order. A run of no event is allowed, as a key is: a lookup
    // checks the log.
    let mut runs_len = 0u64;
    for item in tree.scan_prefix([keys::INDEXED_RUN]) {
        let (k, v) = item?;
        runs_len += 1;
        if let Err(e) = super::store::sled::run::entries(&v) {
            add(None, format!("{}: {e}", run_key(&k)));
        }
    }
    if runs_max.is_none() && runs_len > 0 {
        add(
            None,
            format!(
                "{runs_len} `K` id runs in a ledger of layout {}, which reads none",
                sled.layout()
            ),
        );
    }
    // Marked streams whose index does not read: said once a stream.
    let mut unreadable = std::collections::HashSet::new();
    let mut met = IdsMet::default();
    let mut shape = LogShape::from_start(false);
    let mut expected_pos = 0u64;
    let mut events = 0u64;
    let mut records = Vec::new();
    let mut chunks = 0u64;
    for item in tree.scan_prefix([keys::LOG]) {
        let (k, v) = item?;
        chunks += 1;
        let Some(start) = be(&k[1..]).filter(|_| k.len() == 9) else {
            add(
                None,
                format!("log key of {} bytes is not a position", k.len()),
            );
            continue;
        };
        if start != expected_pos {
            add(
                Some(expected_pos.min(start)),
                format!("gap: positions {expected_pos}..{start} are missing"),
            );
        }
        let ranges = match chunk::entries(&v) {
            Ok(r) => r,
            Err(e) => {
                add(Some(start), format!("log chunk does not parse: {e}"));
                expected_pos = start + 1;
                continue;
            }
        };
        records.clear();
        for (i, r) in ranges.into_iter().enumerate() {
            records.push((start + i as u64, RecordedEvent::decode(&v[r])));
        }
        expected_pos = start + records.len() as u64;
        for (pos, decoded) in records.drain(..) {
            events += 1;
            if events.is_multiple_of(65536) {
                progress(events);
            }
            let r = match decoded {
                Ok(r) => r,
                Err(e) => {
                    add(Some(pos), format!("record does not decode: {e}"));
                    continue;
                }
            };
            if r.position != pos {
                add(Some(pos), format!("record says position {}", r.position));
            }
            if let Ok(Err(fault)) = shape.check(&r, &mut Empty) {
                // A position fault was reported from the key already.
                if !matches!(fault, ShapeError::Position { .. }) {
                    add(Some(pos), fault.to_string());
                }
            }
            match tree
                .get(keys::index(&r.stream_id, r.revision))?
                .as_deref()
                .and_then(be)
            {
                Some(p) if p == pos => {}
                other => add(
                    Some(pos),
                    format!(
                        "stream index for {}@{} points at {other:?}",
                        r.stream_id, r.revision
                    ),
                ),
            }
            // An id index entry (`I` or `J`) holds the event's revision and position,
            // written as the store writes them.
            let entry_holds = |key: Vec<u8>| -> Result<bool, sled::Error> {
                Ok(tree.get(key)?.as_deref() == Some(&keys::id_value(r.revision, pos)[..]))
            };
            if id_index {
                if !entry_holds(keys::id(&r.stream_id, &r.event_id))? {
                    add(
                        Some(pos),
                        format!(
                            "id index lacks or misplaces event {} of {}",
                            r.event_id, r.stream_id
                        ),
                    );
                }
            } else {
                if let Some(seen) = marked.get_mut(&r.stream_id) {
                    *seen += 1;
                    // Its `J` key or its run (`K`) holds the event's place.
                    let places = super::store::sled::indexed_places(
                        &tree,
                        &r.stream_id,
                        &r.event_id,
                        runs_max,
                    );
                    match places {
                        Ok(places) if places.contains(&(r.revision, pos)) => {}
                        Ok(_) => add(
                            Some(pos),
                            format!(
                                "the id index of {} lacks or misplaces its event {}",
                                r.stream_id, r.event_id
                            ),
                        ),
                        Err(e) => {
                            if unreadable.insert(r.stream_id.clone()) {
                                let reason = match e {
                                    StoreError::CorruptIndex { reason, .. } => reason,
                                    other => other.to_string(),
                                };
                                add(
                                    Some(pos),
                                    format!(
                                        "the id index of {} does not read: {reason}",
                                        r.stream_id
                                    ),
                                );
                            }
                        }
                    }
                }
                match met.earlier(sled, &r, pos) {
                    Ok(None) => {}
                    Ok(Some(earlier)) => add(
                        Some(pos),
                        format!(
                            "event id {} is in {} twice (also at position {earlier})",
                            r.event_id, r.stream_id
                        ),
                    ),
                    Err((first, e)) => add(Some(first), format!("record does not read: {e}")),
                }
            }
        }
    }
    progress(events);
    // Nothing in the indexes that the log does not hold.
    let index_len = tree.scan_prefix([keys::INDEX]).count() as u64;
    if index_len != events {
        add(
            None,
            format!("stream index has {index_len} entries for {events} events"),
        );
    }
    let ids_len = tree.scan_prefix([keys::ID]).count() as u64;
    if id_index && ids_len != events {
        add(
            None,
            format!("id index has {ids_len} entries for {events} events"),
        );
    }
    if !id_index && ids_len != 0 {
        add(
            None,
            format!(
                "{ids_len} `I` id index keys in a ledger of layout {}, which has none",
                sled.layout()
            ),
        );
    }
    // The id index of long streams (layouts 4 and 5): every event of a marked stream has
    // its key or its place in a run (checked above). A key of no event is allowed, a
    // commit's that failed (`sled/writer.rs`): the writer trusts a key only once the log
    // holds its event. A mark is on a stream of `INDEXED_FROM` events or more, or the
    // writer never sees it.
    let indexed_len = tree.scan_prefix([keys::INDEXED_ID]).count() as u64;
    for (stream, events) in &marked {
        if (*events as usize) < super::store::sled::INDEXED_FROM {
            add(
                None,
                format!(
                    "{stream} is marked indexed with {events} events, fewer than the {} a mark needs",
                    super::store::sled::INDEXED_FROM
                ),
            );
        }
    }
    // In layout 2 a stream's head is its last stream-index entry, checked with the others
    // above. A layout 1 ledger (opened to read, and left as it was) also keeps a head key
    // per stream, which must name the stream's last revision.
    let mut heads = 0u64;
    if sled.layout() == 1 {
        for item in tree.scan_prefix([keys::HEAD]) {
            let (k, v) = item?;
            heads += 1;
            let stream = String::from_utf8_lossy(&k[1..]).to_string();
            match (shape.heads().get(&stream), be(&v)) {
                (Some(&r), Some(h)) if r == h => {}
                (seen, h) => add(
                    None,
                    format!("head of {stream} is {h:?}, log ends at {seen:?}"),
                ),
            }
        }
        let streams = shape.heads().len() as u64;
        if heads != streams {
            add(None, format!("{heads} stream heads for {streams} streams"));
        }
    }
    let known = chunks + index_len + ids_len + heads + marked.len() as u64 + indexed_len + runs_len;
    let total = tree.len() as u64;
    if total != known {
        add(
            None,
            format!("{} keys of no known kind", total.saturating_sub(known)),
        );
    }
    problems.sort_by_key(|p| p.position.unwrap_or(u64::MAX));
    Ok(VerifyReport {
        events,
        streams: shape.heads().len() as u64,
        problems,
    })
}
