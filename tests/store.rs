//! The event log's contract, one body of tests run on both backends: a real sled folder,
//! and a throwaway PostgreSQL cluster of the test's own (`mod postgres`, not run without
//! the PostgreSQL binaries). Semantics against a model, concurrency, idempotency across a
//! reopen, subscriptions, `verify`, large commits; and what only sled has (one owner per
//! folder).

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use contimg::events::{
    Direction, ExpectedRevision, ProposedEvent, RecordedEvent, Store, StoreError,
};
use proptest::prelude::*;
use uuid::Uuid;

/// Where the ledgers of one test live, and how one is opened again.
pub enum Ledgers {
    Sled(tempfile::TempDir),
    Postgres(common::pg::PgCluster, tempfile::TempDir),
}

/// One ledger: a folder or a database URL.
#[derive(Clone)]
pub enum Location {
    Folder(std::path::PathBuf),
    Url(String),
}

impl Ledgers {
    pub fn sled() -> Ledgers {
        Ledgers::Sled(tempfile::tempdir().unwrap())
    }

    pub fn postgres() -> Ledgers {
        Ledgers::Postgres(common::pg::PgCluster::start(), tempfile::tempdir().unwrap())
    }

    /// A new, empty ledger, open.
    pub fn fresh(&self) -> (Location, Store) {
        let loc = match self {
            Ledgers::Sled(dir) => {
                Location::Folder(tempfile::tempdir_in(dir.path()).unwrap().keep())
            }
            Ledgers::Postgres(cluster, _) => Location::Url(cluster.create_db()),
        };
        let store = self.open(&loc);
        (loc, store)
    }

    pub fn open(&self, loc: &Location) -> Store {
        match (loc, self) {
            (Location::Folder(p), _) => Store::open(p).unwrap(),
            (Location::Url(u), Ledgers::Postgres(_, dir)) => Store::connect(u, dir.path()).unwrap(),
            (Location::Url(_), Ledgers::Sled(_)) => unreachable!(),
        }
    }

    /// Damages the record at `position` (flips a byte) and removes the one at `gone`,
    /// behind the store's back, on a closed ledger.
    pub fn damage(&self, loc: &Location, position: u64, gone: u64) {
        match loc {
            Location::Folder(dir) => {
                // Through sled itself: every log chunk (`[0xC1]`, then `[u32 LE length]
                // [record]` per record, keyed `L` + its first position) is read into its
                // records and removed; `position` gets a byte flipped, `gone` is left out,
                // and each run of consecutive records is written back as one chunk, so
                // `gone` leaves a gap between two chunks' keys.
                let key = |p: u64| [&[b'L'][..], &p.to_be_bytes()].concat();
                let db = open_raw_sled(dir);
                let log = db.open_tree("ledger").unwrap();
                let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
                for item in log.scan_prefix([b'L']) {
                    let (k, v) = item.unwrap();
                    let mut p = u64::from_be_bytes(k[1..9].try_into().unwrap());
                    let mut at = 1;
                    while at < v.len() {
                        let len = u32::from_le_bytes(v[at..at + 4].try_into().unwrap()) as usize;
                        records.push((p, v[at + 4..at + 4 + len].to_vec()));
                        at += 4 + len;
                        p += 1;
                    }
                    log.remove(k).unwrap();
                }
                records.retain(|(p, _)| *p != gone);
                let mut runs: Vec<(u64, Vec<u8>, u64)> = Vec::new();
                for (p, mut bytes) in records {
                    if p == position {
                        let last = bytes.len() - 1;
                        bytes[last] ^= 0x55;
                    }
                    match runs.last_mut() {
                        Some((_, chunk, next)) if *next == p => {
                            chunk.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                            chunk.extend_from_slice(&bytes);
                            *next = p + 1;
                        }
                        _ => {
                            let mut chunk = vec![0xC1];
                            chunk.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                            chunk.extend_from_slice(&bytes);
                            runs.push((p, chunk, p + 1));
                        }
                    }
                }
                for (start, chunk, _) in runs {
                    log.insert(key(start), chunk).unwrap();
                }
                db.flush().unwrap();
            }
            Location::Url(url) => {
                let Ledgers::Postgres(cluster, _) = self else {
                    unreachable!()
                };
                let db = url.rsplit('/').next().unwrap();
                cluster.sql(
                    db,
                    &format!(
                        "UPDATE contimg_events SET record = overlay(record placing \
                         decode(lpad(to_hex(get_byte(record, length(record) - 1) # 85), 2, '0'), 'hex') \
                         from length(record)) WHERE position = {position}; \
                         DELETE FROM contimg_events WHERE position = {gone};"
                    ),
                );
            }
        }
    }
}

fn ev(n: u32) -> ProposedEvent {
    ProposedEvent::new("Noted", 1, format!("{{\"n\":{n}}}").into_bytes())
}

/// Appends `ev(i)` for each `i` of `events`, one commit each, to `scratch-{i % streams}`.
fn append_round_robin(store: &Store, events: std::ops::Range<u32>, streams: u32) {
    for i in events {
        store
            .append_blocking(
                &format!("scratch-{}", i % streams),
                ExpectedRevision::Any,
                vec![ev(i)],
            )
            .unwrap();
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        stream: usize,
        expected: u8,
        exact: u64,
        count: usize,
    },
    /// Re-send the last successful append to a stream (same ids).
    Repeat { stream: usize },
    ReadStream {
        stream: usize,
        from: Option<u64>,
        backward: bool,
        limit: usize,
    },
    ReadAll {
        from: Option<u64>,
        backward: bool,
        limit: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..4u8, 0..6u64, 1..4usize).prop_map(|(stream, expected, exact, count)| Op::Append { stream, expected, exact, count }),
        1 => (0..3usize).prop_map(|stream| Op::Repeat { stream }),
        2 => (0..3usize, proptest::option::of(0..8u64), any::<bool>(), 1..6usize)
            .prop_map(|(stream, from, backward, limit)| Op::ReadStream { stream, from, backward, limit }),
        2 => (proptest::option::of(0..20u64), any::<bool>(), 1..8usize)
            .prop_map(|(from, backward, limit)| Op::ReadAll { from, backward, limit }),
    ]
}

/// The model: `$all` as a list of (stream, id, revision).
#[derive(Default)]
struct Model {
    all: Vec<(String, Uuid, u64)>,
    last_append: HashMap<String, (ExpectedRevision, Vec<ProposedEvent>, u64, u64)>,
}

impl Model {
    fn head(&self, stream: &str) -> Option<u64> {
        self.all
            .iter()
            .filter(|(s, _, _)| s == stream)
            .map(|(_, _, r)| *r)
            .max()
    }
    fn stream(&self, stream: &str) -> Vec<(Uuid, u64, u64)> {
        self.all
            .iter()
            .enumerate()
            .filter(|(_, (s, _, _))| s == stream)
            .map(|(p, (_, id, r))| (*id, *r, p as u64))
            .collect()
    }
}

fn slice<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> u64,
    from: Option<u64>,
    backward: bool,
    limit: usize,
) -> Vec<T> {
    if backward {
        let from = from.unwrap_or(u64::MAX);
        items
            .iter()
            .rev()
            .filter(|x| key(x) <= from)
            .take(limit)
            .cloned()
            .collect()
    } else {
        let from = from.unwrap_or(0);
        items
            .iter()
            .filter(|x| key(x) >= from)
            .take(limit)
            .cloned()
            .collect()
    }
}

/// The store against a model: random appends (every expected revision), repeats, and
/// reads of streams and of `$all` in both directions.
fn append_and_read_match_the_model(l: &Ledgers) {
    let (seed, _) = common::seeded_rng();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..30), |ops| {
            model_case(l, ops)
        })
        .unwrap();
}

fn model_case(l: &Ledgers, ops: Vec<Op>) -> Result<(), TestCaseError> {
    {
        let (_, store) = l.fresh();
        let mut model = Model::default();
        let names = ["product-a", "scratch-b", "group-c"];
        let mut n = 0;
        for op in ops {
            match op {
                Op::Append {
                    stream,
                    expected,
                    exact,
                    count,
                } => {
                    let name = names[stream];
                    let expected = match expected {
                        0 => ExpectedRevision::Any,
                        1 => ExpectedRevision::NoStream,
                        2 => ExpectedRevision::StreamExists,
                        _ => ExpectedRevision::Exact(exact),
                    };
                    let events: Vec<_> = (0..count)
                        .map(|_| {
                            n += 1;
                            ev(n)
                        })
                        .collect();
                    let current = model.head(name);
                    let result = store.append_blocking(name, expected, events.clone());
                    if expected.admits(current) {
                        let r = result.unwrap();
                        let first = current.map_or(0, |c| c + 1);
                        for (i, e) in events.iter().enumerate() {
                            model
                                .all
                                .push((name.to_string(), e.event_id, first + i as u64));
                        }
                        prop_assert_eq!(r.next_expected_version, first + count as u64 - 1);
                        prop_assert_eq!(r.position, model.all.len() as u64 - 1);
                        model.last_append.insert(
                            name.to_string(),
                            (expected, events, r.next_expected_version, r.position),
                        );
                    } else {
                        match result {
                            Err(StoreError::WrongExpectedVersion { current: c, .. }) => {
                                prop_assert_eq!(c, current)
                            }
                            other => prop_assert!(false, "expected a conflict, got {:?}", other),
                        }
                    }
                }
                Op::Repeat { stream } => {
                    let name = names[stream];
                    if let Some((expected, events, next, pos)) =
                        model.last_append.get(name).cloned()
                    {
                        let before = store.event_count();
                        let first = next + 1 - events.len() as u64;
                        let r = store.append_blocking(name, expected, events.clone());
                        // The same ids at the same place are accepted without a second write;
                        // a NoStream repeat of a stream's first batch is still that place.
                        let admitted = match expected {
                            ExpectedRevision::Any | ExpectedRevision::StreamExists => true,
                            ExpectedRevision::NoStream => first == 0,
                            ExpectedRevision::Exact(n) => n + 1 == first,
                        };
                        if admitted {
                            let r = r.unwrap();
                            prop_assert_eq!(r.next_expected_version, next);
                            prop_assert_eq!(r.position, pos);
                        } else {
                            let is_conflict =
                                matches!(r, Err(StoreError::WrongExpectedVersion { .. }));
                            prop_assert!(is_conflict);
                        }
                        prop_assert_eq!(store.event_count(), before);
                    }
                }
                Op::ReadStream {
                    stream,
                    from,
                    backward,
                    limit,
                } => {
                    let name = names[stream];
                    let dir = if backward {
                        Direction::Backward
                    } else {
                        Direction::Forward
                    };
                    let want = model.stream(name);
                    match store.read_stream(name, from, dir, limit) {
                        Ok(got) => {
                            let want = slice(&want, |x| x.1, from, backward, limit);
                            let got: Vec<_> = got
                                .iter()
                                .map(|e| (e.event_id, e.revision, e.position))
                                .collect();
                            prop_assert_eq!(got, want);
                        }
                        Err(StoreError::StreamNotFound(_)) => prop_assert!(want.is_empty()),
                        Err(e) => prop_assert!(false, "read failed: {e}"),
                    }
                }
                Op::ReadAll {
                    from,
                    backward,
                    limit,
                } => {
                    let dir = if backward {
                        Direction::Backward
                    } else {
                        Direction::Forward
                    };
                    let items: Vec<(u64, Uuid)> = model
                        .all
                        .iter()
                        .enumerate()
                        .map(|(p, (_, id, _))| (p as u64, *id))
                        .collect();
                    let want = slice(&items, |x| x.0, from, backward, limit);
                    let got: Vec<_> = store
                        .read_all(from, dir, limit)
                        .unwrap()
                        .iter()
                        .map(|e| (e.position, e.event_id))
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
        store.close();
    }
    Ok(())
}

async fn sixty_four_racing_exact_appenders_never_share_a_revision(l: &Ledgers) {
    let (_, store) = l.fresh();
    let stream = "product-race";
    let mut successes = Vec::new();
    let mut conflicts = 0;
    for _round in 0..10 {
        let head = store.stream_head(stream).unwrap();
        let expected = head.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
        let barrier = Arc::new(tokio::sync::Barrier::new(64));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let e = ev(i);
                    let id = e.event_id;
                    barrier.wait().await;
                    (id, store.append(stream, expected, vec![e]).await)
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            match t.await.unwrap() {
                (id, Ok(r)) => {
                    winners += 1;
                    successes.push((id, r.next_expected_version));
                }
                (_, Err(StoreError::WrongExpectedVersion { current, .. })) => {
                    conflicts += 1;
                    assert!(current > head || head.is_none() && current.is_some());
                }
                (_, Err(e)) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(winners, 1, "exactly one appender wins each round");
    }
    assert_eq!(conflicts, 63 * 10);
    let mut revs: Vec<u64> = successes.iter().map(|s| s.1).collect();
    revs.sort();
    assert_eq!(revs, (0..10).collect::<Vec<_>>());
    let events = store
        .read_stream(stream, None, Direction::Forward, 1000)
        .unwrap();
    assert_eq!(events.len(), 10);
    for (id, rev) in successes {
        assert_eq!(events[rev as usize].event_id, id);
    }
    assert_eq!(store.event_count(), 10);
}

async fn concurrent_any_appends_are_all_kept_once(l: &Ledgers) {
    let (_, store) = l.fresh();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                for j in 0..20 {
                    store
                        .append(
                            "scratch-shared",
                            ExpectedRevision::Any,
                            vec![ev(i * 100 + j)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let events = store
        .read_stream("scratch-shared", None, Direction::Forward, 5000)
        .unwrap();
    assert_eq!(events.len(), 64 * 20);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.revision, i as u64);
        assert_eq!(e.position, i as u64);
    }
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

fn partial_overlap_of_committed_ids_is_a_conflict_and_writes_nothing(l: &Ledgers) {
    let (_, store) = l.fresh();
    let (a, b, c) = (ev(1), ev(2), ev(3));
    store
        .append_blocking(
            "product-x",
            ExpectedRevision::NoStream,
            vec![a.clone(), b.clone()],
        )
        .unwrap();
    // b is committed at revision 1, c is new: neither a clean repeat nor new work.
    let r = store.append_blocking(
        "product-x",
        ExpectedRevision::Any,
        vec![b.clone(), c.clone()],
    );
    assert!(matches!(
        r,
        Err(StoreError::WrongExpectedVersion {
            current: Some(1),
            ..
        })
    ));
    let r = store.append_blocking("product-x", ExpectedRevision::Any, vec![c, a.clone()]);
    assert!(matches!(r, Err(StoreError::WrongExpectedVersion { .. })));
    assert_eq!(store.event_count(), 2);
    // The same ids in another stream are other events.
    store
        .append_blocking("product-y", ExpectedRevision::NoStream, vec![a, b])
        .unwrap();
    assert_eq!(store.event_count(), 4);
}

fn idempotency_survives_a_reopen(l: &Ledgers) {
    let e = ev(7);
    let (loc, store) = l.fresh();
    {
        store
            .append_blocking("product-x", ExpectedRevision::NoStream, vec![e.clone()])
            .unwrap();
        store.close();
        drop(store);
    }
    let store = l.open(&loc);
    let r = store
        .append_blocking("product-x", ExpectedRevision::NoStream, vec![e])
        .unwrap();
    assert_eq!((r.next_expected_version, r.position), (0, 0));
    assert_eq!(store.event_count(), 1);
    let next = store
        .append_blocking("product-x", ExpectedRevision::Exact(0), vec![ev(8)])
        .unwrap();
    assert_eq!(next.position, 1);
}

#[test]
fn a_second_opener_of_a_sled_folder_is_refused_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Locked { pid: Some(p), .. } if p == std::process::id()));
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    store.close();
    drop(store);
    Store::open(dir.path()).expect("free again once closed");
}

/// Single-event commits share log chunks (a commit joins the last chunk while that is
/// small), and every record reads back in both directions, by stream and after a reopen,
/// when the next commit starts a chunk of its own.
#[test]
fn single_event_commits_share_log_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = |dir: &std::path::Path| {
        let db = open_raw_sled(dir);
        let n = db.open_tree("ledger").unwrap().scan_prefix([b'L']).count();
        drop(db);
        n
    };
    let store = Store::open(dir.path()).unwrap();
    append_round_robin(&store, 0..300, 7);
    store.close();
    drop(store);
    // 300 records of a hundred-odd bytes: chunks of about 2 KiB, not one a commit.
    let first = chunks(dir.path());
    assert!((5..=60).contains(&first), "{first} chunks");
    let store = Store::open(dir.path()).unwrap();
    for i in 300..310 {
        store
            .append_blocking("scratch-0", ExpectedRevision::Any, vec![ev(i)])
            .unwrap();
    }
    let all = store.read_all(None, Direction::Forward, 1000).unwrap();
    let n: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(n, (0..310).collect::<Vec<_>>());
    let back = store.read_all(Some(305), Direction::Backward, 100).unwrap();
    assert_eq!(back.first().map(|e| e.position), Some(305));
    assert_eq!(back.len(), 100);
    let s0 = store
        .read_stream("scratch-0", Some(0), Direction::Forward, 1000)
        .unwrap();
    assert_eq!(s0.len(), 43 + 10);
    assert!(s0.windows(2).all(|w| w[1].revision == w[0].revision + 1));
    store.close();
    drop(store);
    assert_eq!(
        chunks(dir.path()),
        first + 1,
        "the reopened writer starts a chunk"
    );
    let store = Store::open(dir.path()).unwrap();
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// A ledger carries the layout it was written in (`meta` tree, `layout`): one without a
/// marker (new, or from before there was one) is marked at open, and one written in a
/// newer layout is refused with a clear error and left as it is, so a binary put back
/// after an upgrade cannot misread it.
#[test]
fn a_ledger_of_a_newer_layout_is_refused_and_left_as_it_is() {
    let dir = stopped_ledger(&[("scratch-1", 1)]);
    let marker = |dir: &std::path::Path, set: Option<&[u8]>| {
        let (marker, _, logged) = raw_layout(dir, |meta, _| {
            if let Some(v) = set {
                meta.insert(b"layout", v).unwrap();
            }
        });
        (marker, logged)
    };
    let current = contimg::events::store::sled::LAYOUT;
    assert_eq!(
        marker(dir.path(), None),
        (Some(current.to_be_bytes().to_vec()), 1)
    );
    let newer = (current + 1).to_be_bytes();
    marker(dir.path(), Some(&newer));
    let Err(refused) = Store::open(dir.path()) else {
        panic!("a newer layout is refused");
    };
    let text = refused.to_string();
    assert!(
        matches!(refused, StoreError::NotALedger(_))
            && text.contains(&format!("version {}", current + 1)),
        "{text}"
    );
    assert_eq!(
        marker(dir.path(), None),
        (Some(newer.to_vec()), 1),
        "left as it is"
    );
    // A marker that is not 4 bytes is refused too; an older ledger without one is marked.
    marker(dir.path(), Some(b"x"));
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::NotALedger(_))
    ));
    raw_layout(dir.path(), |meta, _| {
        meta.remove(b"layout").unwrap();
    });
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stream_head("scratch-1").unwrap(), Some(0));
    store.close();
    drop(store);
    assert_eq!(
        marker(dir.path(), None),
        (Some(current.to_be_bytes().to_vec()), 1)
    );
}

/// A stream's head is read from its last stream-index entry (since layout 2). A ledger
/// written in layout 1 also kept a head key per stream (`H` stream); opening it marks it
/// with this layout, then drops them, whatever they say (here stale and wrong), and
/// expected revisions, reads and `verify` go by the index.
#[test]
fn head_keys_of_layout_1_ledgers_are_dropped_and_heads_come_from_the_index() {
    use contimg::events::store::sled::LAYOUT;
    let dir = stopped_ledger(&[("product-a", 5), ("product-ab", 1)]);
    assert_eq!(
        sled_keys(dir.path(), None),
        (LAYOUT, vec![]),
        "no head keys"
    );
    // What layout 1 wrote, but wrong: heads the log does not have.
    let stale = vec![
        (b"Hnever-written".to_vec(), 0u64.to_be_bytes().to_vec()),
        (b"Hproduct-a".to_vec(), 7u64.to_be_bytes().to_vec()),
        (b"Hproduct-ab".to_vec(), 3u64.to_be_bytes().to_vec()),
    ];
    assert_eq!(sled_keys(dir.path(), Some((1, &stale))), (1, stale.clone()));
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stream_head("product-a").unwrap(), Some(4));
    assert_eq!(store.stream_head("product-ab").unwrap(), Some(0));
    assert_eq!(store.stream_head("never-written").unwrap(), None);
    // The expected revision is checked against the index's head, not the stale key.
    let wrong = store.append_blocking("product-a", ExpectedRevision::Exact(7), vec![ev(20)]);
    assert!(
        matches!(
            wrong,
            Err(StoreError::WrongExpectedVersion {
                current: Some(4),
                ..
            })
        ),
        "{wrong:?}"
    );
    let next = store
        .append_blocking("product-a", ExpectedRevision::Exact(4), vec![ev(21)])
        .unwrap();
    assert_eq!(next.next_expected_version, 5);
    store
        .append_blocking("never-written", ExpectedRevision::NoStream, vec![ev(22)])
        .unwrap();
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    store.close();
    drop(store);
    assert_eq!(
        sled_keys(dir.path(), None),
        (LAYOUT, vec![]),
        "marked, heads dropped"
    );
}

/// `contimg ledger-layout --to 1` puts a ledger back in layout 1 for a binary from before layout 2
/// (a rollback): the id index from the log, a head key per stream holding its last
/// revision, then the marker. The next open by this build brings it to its layout again,
/// and nothing is lost either way.
#[test]
fn a_ledger_goes_back_to_layout_1_and_forward_again() {
    use contimg::events::store::sled::{LAYOUT, LayoutChange, to_layout};
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        to_layout(empty.path(), Some(1)).unwrap(),
        None,
        "an empty folder holds no ledger"
    );
    let dir = stopped_ledger(&[("product-a", 3), ("product-b", 1), ("product-c", 2)]);
    let store = Store::open(dir.path()).unwrap();
    assert!(
        matches!(
            to_layout(dir.path(), Some(1)),
            Err(StoreError::Locked { .. })
        ),
        "not while a store holds the folder"
    );
    store.close();
    drop(store);
    let shown = LayoutChange {
        from: LAYOUT,
        to: LAYOUT,
        heads_written: 0,
        ids_written: 0,
        ids_dropped: 0,
    };
    assert_eq!(to_layout(dir.path(), None).unwrap(), Some(shown));
    assert!(matches!(
        to_layout(dir.path(), Some(LAYOUT + 1)),
        Err(StoreError::InvalidInput(_))
    ));
    assert_eq!(
        to_layout(dir.path(), Some(1)).unwrap(),
        Some(LayoutChange {
            from: LAYOUT,
            to: 1,
            heads_written: 3,
            ids_written: 6,
            ids_dropped: 0,
        })
    );
    assert_eq!(id_keys(dir.path()), 6);
    let head = |rev: u64| rev.to_be_bytes().to_vec();
    assert_eq!(
        sled_keys(dir.path(), None),
        (
            1,
            vec![
                (b"Hproduct-a".to_vec(), head(2)),
                (b"Hproduct-b".to_vec(), head(0)),
                (b"Hproduct-c".to_vec(), head(1)),
            ]
        ),
        "what layout 1 kept"
    );
    // The tools that only read leave it in layout 1: they read it as their own (the stream
    // index is the same), `verify` checks its head keys and id index too, and nothing is
    // appended.
    let reading =
        Store::open_to_read(dir.path(), contimg::events::store::SCAN_CACHE_BYTES).unwrap();
    assert_eq!(reading.stream_head("product-a").unwrap(), Some(2));
    let report = contimg::events::verify::verify(&reading, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert!(matches!(
        reading.append_blocking("product-b", ExpectedRevision::Exact(0), vec![ev(7)]),
        Err(StoreError::InvalidInput(_))
    ));
    reading.close();
    drop(reading);
    let (layout, heads) = sled_keys(dir.path(), None);
    assert_eq!((layout, heads.len()), (1, 3), "left as it was");
    // A wrong head key is reported by `verify` on such a ledger.
    let wrong = vec![(b"Hproduct-b".to_vec(), head(5))];
    sled_keys(dir.path(), Some((1, &wrong)));
    verify_to_read_reports(dir.path(), "head of product-b");
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.stream_head("product-a").unwrap(), Some(2));
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, 6);
    store.close();
    drop(store);
    assert_eq!(
        (sled_keys(dir.path(), None), id_keys(dir.path())),
        ((LAYOUT, vec![]), 0),
        "forward again"
    );
}

/// A crash in the middle of `ledger-layout --to 1`, after the id and head keys and before
/// the marker, leaves a ledger marked with this layout that has both: older builds refuse
/// it (the marker says so), and the next open of it, to read or to write, drops the keys
/// (nothing reads them), so `verify` finds nothing of unknown kind.
#[test]
fn keys_left_under_this_layouts_marker_are_dropped_at_the_next_open() {
    use contimg::events::store::sled::{LAYOUT, to_layout};
    let dir = stopped_ledger(&[("product-a", 3)]);
    to_layout(dir.path(), Some(1)).unwrap();
    let left = vec![(b"Hproduct-a".to_vec(), 2u64.to_be_bytes().to_vec())];
    assert_eq!(
        sled_keys(dir.path(), Some((LAYOUT, &vec![]))),
        (LAYOUT, left)
    );
    assert_eq!(id_keys(dir.path()), 3);
    let reading =
        Store::open_to_read(dir.path(), contimg::events::store::SCAN_CACHE_BYTES).unwrap();
    assert_eq!(reading.stream_head("product-a").unwrap(), Some(2));
    let report = contimg::events::verify::verify(&reading, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    reading.close();
    drop(reading);
    assert_eq!(
        (sled_keys(dir.path(), None), id_keys(dir.path())),
        ((LAYOUT, vec![]), 0)
    );
}

/// Layouts 3 to 5 keep no id index of short streams: idempotency finds an id in its
/// stream through the stream index and the log, also for a repeat of events committed
/// before the ledger changed layout, read again after a reopen (the writer's own dropping
/// and indexing of streams is tested in `sled/ids.rs` and `sled/mod.rs`). A ledger taken back to layout 2 gets its id index from the log, entry
/// for entry (`verify` checks it), and loses it again when this build opens it to write.
#[test]
fn idempotency_holds_across_layout_changes_without_an_id_index() {
    use contimg::events::store::sled::{LAYOUT, to_layout};
    assert_eq!(LAYOUT, 5);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = vec![ev(1), ev(2), ev(3)];
    let at = store
        .append_blocking("product-x", ExpectedRevision::NoStream, first.clone())
        .unwrap();
    for i in 0..40 {
        store
            .append_blocking(&format!("product-y{i}"), ExpectedRevision::Any, vec![ev(i)])
            .unwrap();
    }
    store.close();
    drop(store);
    assert_eq!(id_keys(dir.path()), 0, "no id index");
    let back = to_layout(dir.path(), Some(2)).unwrap().unwrap();
    assert_eq!((back.to, back.ids_written, back.heads_written), (2, 43, 0));
    assert_eq!(id_keys(dir.path()), 43);
    let reading =
        Store::open_to_read(dir.path(), contimg::events::store::SCAN_CACHE_BYTES).unwrap();
    let report = contimg::events::verify::verify(&reading, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    reading.close();
    drop(reading);
    // A wrong id index entry is what `verify` reports on a layout 2 ledger.
    raw_layout(dir.path(), |_, tree| {
        let k = tree.scan_prefix([b'I']).keys().next().unwrap().unwrap();
        tree.insert(k, &[0xFFu8; 16]).unwrap();
    });
    verify_to_read_reports(dir.path(), "id index");
    // This build opens it to write: marked with this layout, the id index dropped, and every repeat is
    // still answered from the log.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.as_sled().unwrap().layout(), LAYOUT);
    let again = store
        .append_blocking("product-x", ExpectedRevision::Any, first.clone())
        .unwrap();
    assert_eq!(again, at, "a repeat writes nothing");
    let partial = store.append_blocking(
        "product-x",
        ExpectedRevision::Any,
        vec![first[1].clone(), ev(9)],
    );
    assert!(
        matches!(partial, Err(StoreError::WrongExpectedVersion { .. })),
        "{partial:?}"
    );
    let tail = store
        .append_blocking("product-x", ExpectedRevision::Any, first[1..].to_vec())
        .unwrap();
    assert_eq!(tail, at, "the last two again, at their place");
    assert_eq!(store.event_count(), 43);
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    store.close();
    drop(store);
    assert_eq!(id_keys(dir.path()), 0);
}

/// `verify` finds an id twice in one stream on a ledger with no id index (written here
/// past the store, as a damaged or hand-edited log would have it), and not an id shared
/// by two streams, which is allowed.
#[test]
fn verify_finds_an_id_twice_in_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let shared = uuid::Uuid::now_v7();
    let record = |stream: &str, revision: u64, position: u64, id: uuid::Uuid| RecordedEvent {
        event_id: id,
        stream_id: stream.into(),
        revision,
        position,
        event_type: "Noted".into(),
        event_version: 1,
        data: b"{}".to_vec(),
        metadata: b"{}".to_vec(),
        created_micros: 1_700_000_000_000_000 + position as i64,
        checksum: 0,
    };
    store
        .import_blocking(vec![
            record("scratch-a", 0, 0, shared),
            record("scratch-b", 0, 1, shared),
        ])
        .unwrap();
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "one id in two streams: {:?}", report.problems);
    store.close();
    drop(store);
    // The record at position 1 rewritten to repeat position 0's id in scratch-a, with its
    // stream index entry: a chunk of its own, as the store reads any chunk.
    raw_layout(dir.path(), |_, tree| {
        let mut bad = record("scratch-a", 1, 1, shared);
        let encoded = bad.encode();
        let mut chunk = vec![0xC1u8];
        chunk.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        chunk.extend_from_slice(&encoded);
        let first = tree.scan_prefix([b'L']).keys().next().unwrap().unwrap();
        let v = tree.get(&first).unwrap().unwrap();
        let len = u32::from_le_bytes(v[1..5].try_into().unwrap()) as usize;
        tree.insert(&first, &v[..5 + len]).unwrap();
        tree.insert([&[b'L'][..], &1u64.to_be_bytes()].concat(), chunk)
            .unwrap();
        tree.remove([&b"Sscratch-b\0"[..], &0u64.to_be_bytes()].concat())
            .unwrap();
        tree.insert(
            [&b"Sscratch-a\0"[..], &1u64.to_be_bytes()].concat(),
            &1u64.to_be_bytes(),
        )
        .unwrap();
    });
    let store = Store::open(dir.path()).unwrap();
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("is in scratch-a twice") && p.position == Some(1)),
        "{:?}",
        report.problems
    );
    store.close();
}

/// Going back to layout 1 and forward again past the 10,000 keys a batch of either holds:
/// every stream gets its head key, and every one is dropped again.
#[test]
fn layout_changes_cover_more_streams_than_one_batch() {
    use contimg::events::store::sled::to_layout;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let streams = 10_001u64;
    let records = (0..streams)
        .map(|i| RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: format!("scratch-{i:05}"),
            revision: 0,
            position: i,
            event_type: "Noted".into(),
            event_version: 1,
            data: b"{}".to_vec(),
            metadata: b"{}".to_vec(),
            created_micros: 1_700_000_000_000_000 + i as i64,
            checksum: 0,
        })
        .collect();
    store.import_blocking(records).unwrap();
    store.close();
    drop(store);
    let back = to_layout(dir.path(), Some(1)).unwrap().unwrap();
    assert_eq!(back.heads_written, streams);
    let (layout, heads) = sled_keys(dir.path(), None);
    assert_eq!((layout, heads.len() as u64), (1, streams));
    assert_eq!(heads.last().unwrap().0, b"Hscratch-10000".to_vec());
    let store = Store::open(dir.path()).unwrap();
    store
        .append_blocking("scratch-10000", ExpectedRevision::Exact(0), vec![ev(1)])
        .unwrap();
    store.close();
    drop(store);
    assert_eq!(
        sled_keys(dir.path(), None),
        (contimg::events::store::sled::LAYOUT, vec![])
    );
}

/// The sled database of a stopped ledger folder. sled lets go of its file lock a moment
/// after the last handle drops (its flusher thread exits on its own), as the store's own
/// open knows: wait for it.
fn open_raw_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir.join("log")) {
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
}

/// Keys and values of a sled tree.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A stopped sled ledger as its layout concerns it, after `edit` ran on its `meta` and
/// `ledger` trees: the raw layout marker, the head keys (`H`) and the number of log chunks
/// (`L`).
fn raw_layout(
    dir: &std::path::Path,
    edit: impl FnOnce(&sled::Tree, &sled::Tree),
) -> (Option<Vec<u8>>, Pairs, usize) {
    let db = open_raw_sled(dir);
    let meta = db.open_tree("meta").unwrap();
    let tree = db.open_tree("ledger").unwrap();
    edit(&meta, &tree);
    db.flush().unwrap();
    let marker = meta.get(b"layout").unwrap().map(|v| v.to_vec());
    let heads = tree
        .scan_prefix([b'H'])
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect();
    let logged = tree.scan_prefix([b'L']).count();
    (marker, heads, logged)
}

/// `verify` of a stopped sled ledger, opened to read (so left in its layout), reports a
/// problem whose message holds `needle`.
fn verify_to_read_reports(dir: &std::path::Path, needle: &str) {
    let reading = Store::open_to_read(dir, contimg::events::store::SCAN_CACHE_BYTES).unwrap();
    let report = contimg::events::verify::verify(&reading, |_| {}).unwrap();
    assert!(
        report.problems.iter().any(|p| p.message.contains(needle)),
        "{:?}",
        report.problems
    );
    reading.close();
}

/// The number of id index keys (`I`, layouts 1 and 2) of a stopped sled ledger.
fn id_keys(dir: &std::path::Path) -> usize {
    let db = open_raw_sled(dir);
    let n = db.open_tree("ledger").unwrap().scan_prefix([b'I']).count();
    drop(db);
    n
}

/// A stopped sled ledger's layout and its head keys (`H`), after setting the layout and
/// adding keys when `set` says so.
fn sled_keys(dir: &std::path::Path, set: Option<(u32, &Pairs)>) -> (u32, Pairs) {
    let (marker, heads, _) = raw_layout(dir, |meta, tree| {
        if let Some((layout, add)) = set {
            meta.insert(b"layout", &layout.to_be_bytes()).unwrap();
            for (k, v) in add {
                tree.insert(k, v.as_slice()).unwrap();
            }
        }
    });
    let marker: [u8; 4] = marker.expect("a marker").try_into().expect("4 bytes");
    (u32::from_be_bytes(marker), heads)
}

/// A stopped ledger holding, in each named stream, that many events (revisions from 0),
/// one commit each.
fn stopped_ledger(streams: &[(&str, u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for &(stream, n) in streams {
        for i in 0..n {
            store
                .append_blocking(stream, ExpectedRevision::Any, vec![ev(i)])
                .unwrap();
        }
    }
    store.close();
    drop(store);
    dir
}

fn bad_appends_are_refused_before_writing(l: &Ledgers) {
    let (_, store) = l.fresh();
    let e = ev(1);
    for (stream, events) in [
        ("", vec![ev(1)]),
        ("$all", vec![ev(1)]),
        ("a/b", vec![ev(1)]),
        ("ok", vec![]),
        ("ok", vec![e.clone(), e.clone()]),
        (
            "ok",
            vec![ProposedEvent::new(
                "Big",
                1,
                vec![b' '; contimg::events::store::MAX_PAYLOAD_BYTES + 1],
            )],
        ),
    ] {
        let r = store.append_blocking(stream, ExpectedRevision::Any, events);
        assert!(
            matches!(r, Err(StoreError::InvalidInput(_))),
            "{stream:?}: {r:?}"
        );
    }
    assert_eq!(store.event_count(), 0);
}

async fn subscription_switches_from_history_to_live_without_gap_or_duplicate(l: &Ledgers) {
    let (_, store) = l.fresh();
    for i in 0..500 {
        store
            .append("scratch-s", ExpectedRevision::Any, vec![ev(i)])
            .await
            .unwrap();
    }
    let mut sub = store.subscribe_all(Some(99));
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 500..1500 {
                store
                    .append("scratch-s", ExpectedRevision::Any, vec![ev(i)])
                    .await
                    .unwrap();
            }
        })
    };
    // A subscriber that never reads must not hold the writer back.
    let _idle = store.subscribe_all(None);
    let mut seen = Vec::new();
    while seen.len() < 1400 {
        seen.push(sub.next().await.unwrap().position);
    }
    writer.await.unwrap();
    assert_eq!(seen, (100..1500).collect::<Vec<_>>());
}

fn verify_names_the_first_corrupt_position(l: &Ledgers) {
    let (loc, store) = l.fresh();
    for i in 0..20 {
        store
            .append_blocking("scratch-v", ExpectedRevision::Any, vec![ev(i)])
            .unwrap();
    }
    store.close();
    drop(store);
    l.damage(&loc, 7, 12);
    let store = l.open(&loc);
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(!report.ok());
    assert_eq!(
        report.first_bad_position(),
        Some(7),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.position == Some(12) && p.message.contains("gap")),
        "{:?}",
        report.problems
    );
}

/// A replay (`for_each_from`, read on a thread of its own in batches of 2,048, four
/// batches waiting at most) visits every event from its start once, in order, across
/// batches, a last batch that is full included; an error from the visitor stops it there
/// and is what it returns, while the reader waits on a full channel.
fn replay_visits_every_event_once_in_order_and_stops_at_an_error(l: &Ledgers) {
    let (_, store) = l.fresh();
    // Seven batches: more than the channel holds and the reader has in hand.
    const N: u32 = 14_000;
    for first in (0..N).step_by(500) {
        store
            .append_blocking(
                &format!("scratch-{}", first % 3),
                ExpectedRevision::Any,
                (first..first + 500).map(ev).collect(),
            )
            .unwrap();
    }
    let replay = |from: u64| {
        let mut seen = Vec::new();
        let n = store
            .for_each_from(from, |e| {
                seen.push((e.position, e.data));
                Ok(())
            })
            .unwrap();
        assert_eq!(n as usize, seen.len());
        seen
    };
    let all = replay(0);
    let expected: Vec<(u64, Vec<u8>)> = (0..N)
        .map(|i| (u64::from(i), format!("{{\"n\":{i}}}").into_bytes()))
        .collect();
    assert!(
        all == expected,
        "a replay from 0 gives every event once, in order"
    );
    assert!(replay(4_321) == expected[4_321..], "from the middle");
    let two_batches = N as usize - 2 * 2_048;
    assert!(
        replay(two_batches as u64) == expected[two_batches..],
        "two full batches"
    );
    assert!(replay(u64::from(N)).is_empty(), "from the end");
    let mut visited = 0;
    let stopped = store.for_each_from(0, |e| {
        visited += 1;
        if e.position == 2_500 {
            return Err(StoreError::InvalidInput("stop here".into()));
        }
        Ok(())
    });
    assert!(
        matches!(&stopped, Err(StoreError::InvalidInput(m)) if m == "stop here"),
        "{stopped:?}"
    );
    assert_eq!(visited, 2_501);
}

fn large_commits_split_into_chunks_and_read_back_in_both_directions(l: &Ledgers) {
    let (loc, store) = l.fresh();
    // 5 events of ~40 KiB in one append: more than one log chunk.
    let big = |i: u32| {
        ProposedEvent::new(
            "Big",
            1,
            format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(40_000)).into_bytes(),
        )
    };
    store
        .append_blocking("scratch-a", ExpectedRevision::Any, vec![ev(0)])
        .unwrap();
    store
        .append_blocking(
            "scratch-big",
            ExpectedRevision::NoStream,
            (1..6).map(big).collect(),
        )
        .unwrap();
    store
        .append_blocking("scratch-a", ExpectedRevision::Any, vec![ev(6)])
        .unwrap();
    let forward: Vec<u64> = store
        .read_all(None, Direction::Forward, 100)
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(forward, (0..7).collect::<Vec<_>>());
    let backward: Vec<u64> = store
        .read_all(Some(4), Direction::Backward, 3)
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(backward, vec![4, 3, 2]);
    for p in 0..7 {
        assert_eq!(store.get(p).unwrap().position, p);
    }
    let page: Vec<u64> = store
        .read_all(Some(3), Direction::Forward, 2)
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(page, vec![3, 4]);
    let big_stream = store
        .read_stream("scratch-big", Some(2), Direction::Backward, 10)
        .unwrap();
    assert_eq!(
        big_stream.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![2, 1, 0]
    );
    let report = contimg::events::verify::verify(&store, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.events, 7);
    store.close();
    drop(store);
    // Reopened, the log continues after the last chunk.
    let store = l.open(&loc);
    let r = store
        .append_blocking("scratch-a", ExpectedRevision::Any, vec![ev(7)])
        .unwrap();
    assert_eq!(r.position, 7);
}

/// Snapshots keep their checkpoint with them, and a later one replaces the earlier, a
/// large one as a small one.
fn snapshots_keep_their_checkpoint(l: &Ledgers) {
    let (loc, store) = l.fresh();
    assert_eq!(store.load_snapshot("publish").unwrap(), None);
    store.save_snapshot("publish", None, b"empty").unwrap();
    assert_eq!(
        store.load_snapshot("publish").unwrap(),
        Some((None, b"empty".to_vec()))
    );
    // A large one (many parts where the backend stores it in parts), then a smaller one:
    // what is loaded is exactly the last saved, never a tail of the larger.
    let large: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
    store.save_snapshot("publish", Some(40), &large).unwrap();
    assert_eq!(
        store.load_snapshot("publish").unwrap(),
        Some((Some(40), large.clone()))
    );
    store.save_snapshot("publish", Some(41), b"later").unwrap();
    store
        .save_snapshot("other", Some(7), &large[..20_000])
        .unwrap();
    store.close();
    drop(store);
    let store = l.open(&loc);
    assert_eq!(
        store.load_snapshot("publish").unwrap(),
        Some((Some(41), b"later".to_vec()))
    );
    assert_eq!(
        store.load_snapshot("other").unwrap(),
        Some((Some(7), large[..20_000].to_vec()))
    );
}

/// An import writes records exactly as given; one out of place writes nothing.
fn import_keeps_records_exactly_and_refuses_a_bad_one_whole(l: &Ledgers) {
    let (_, source) = l.fresh();
    append_round_robin(&source, 0..30, 3);
    let records = source.read_all(None, Direction::Forward, 100).unwrap();
    let (_, target) = l.fresh();
    target.import_blocking(records[..10].to_vec()).unwrap();
    // A gap (position 11 before 10) is refused, and nothing of it is written.
    let bad = vec![records[11].clone(), records[10].clone()];
    assert!(matches!(
        target.import_blocking(bad),
        Err(StoreError::InvalidInput(_))
    ));
    assert_eq!(target.event_count(), 10);
    target.import_blocking(records[10..].to_vec()).unwrap();
    let copied = target.read_all(None, Direction::Forward, 100).unwrap();
    assert_eq!(copied, records);
    let report = contimg::events::verify::verify(&target, |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// One body of tests, for a backend.
macro_rules! contract {
    ($name:ident, $make:expr $(, #[$attr:meta])*) => {
        mod $name {
            use super::*;

            $(#[$attr])*
            #[test]
            fn append_and_read_match_the_model() {
                super::append_and_read_match_the_model(&$make);
            }

            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sixty_four_racing_exact_appenders_never_share_a_revision() {
                super::sixty_four_racing_exact_appenders_never_share_a_revision(&$make).await;
            }

            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_any_appends_are_all_kept_once() {
                super::concurrent_any_appends_are_all_kept_once(&$make).await;
            }

            $(#[$attr])*
            #[test]
            fn partial_overlap_of_committed_ids_is_a_conflict_and_writes_nothing() {
                super::partial_overlap_of_committed_ids_is_a_conflict_and_writes_nothing(&$make);
            }

            $(#[$attr])*
            #[test]
            fn idempotency_survives_a_reopen() {
                super::idempotency_survives_a_reopen(&$make);
            }

            $(#[$attr])*
            #[test]
            fn bad_appends_are_refused_before_writing() {
                super::bad_appends_are_refused_before_writing(&$make);
            }

            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn subscription_switches_from_history_to_live_without_gap_or_duplicate() {
                super::subscription_switches_from_history_to_live_without_gap_or_duplicate(&$make)
                    .await;
            }

            $(#[$attr])*
            #[test]
            fn verify_names_the_first_corrupt_position() {
                super::verify_names_the_first_corrupt_position(&$make);
            }

            $(#[$attr])*
            #[test]
            fn large_commits_split_into_chunks_and_read_back_in_both_directions() {
                super::large_commits_split_into_chunks_and_read_back_in_both_directions(&$make);
            }

            $(#[$attr])*
            #[test]
            fn replay_visits_every_event_once_in_order_and_stops_at_an_error() {
                super::replay_visits_every_event_once_in_order_and_stops_at_an_error(&$make);
            }

            $(#[$attr])*
            #[test]
            fn snapshots_keep_their_checkpoint() {
                super::snapshots_keep_their_checkpoint(&$make);
            }

            $(#[$attr])*
            #[test]
            fn import_keeps_records_exactly_and_refuses_a_bad_one_whole() {
                super::import_keeps_records_exactly_and_refuses_a_bad_one_whole(&$make);
            }
        }
    };
}

contract!(on_sled, Ledgers::sled());
contract!(
    on_postgres,
    Ledgers::postgres(),
    #[ignore = "needs PostgreSQL 15 (apt-get install postgresql); run with --ignored"]
);
