//! The writer thread, in rounds: it takes the queued appends and imports (waiting a
//! little for callers it has just answered: `store::gather`), decides each (expected
//! revision, idempotency, the log's shape), stages the accepted ones in one sled batch
//! (events in chunks, the stream index) and applies it, then makes the round durable and
//! answers (`syncer.rs`) before it takes the next.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::ids::StreamIds;
use super::*;
use crate::events::store::AppendResult;
use crate::events::store::gather::Gather;
use crate::events::store::plan::{Index, Plan, Planner};

/// Owns appends. Runs on its own thread because sled and fdatasync block.
pub(super) struct Writer {
    pub(super) tree: sled::Tree,
    pub(super) planner: Planner,
    pub(super) poisoned: Arc<AtomicBool>,
    pub(super) reserve: Reserve,
    /// The log's last chunk as this writer wrote it: while it is under
    /// `chunk::JOIN_BYTES`, the next commit's records join it (the chunk is written again,
    /// whole, under its key) instead of starting a chunk of their own. So a log of
    /// single-event commits is stored, and replayed, in chunks of a few dozen records, not
    /// one each. `None` after a start or a failed batch: the next commit starts a chunk.
    pub(super) tail: Option<Tail>,
    /// The ids of the streams asked about lately (`ids.rs`): idempotency's lookups.
    pub(super) ids: StreamIds,
}

/// The records of the log's last chunk, and where it starts.
pub(super) struct Tail {
    start: u64,
    records: Vec<Vec<u8>>,
    /// As counted against `chunk::MAX_BYTES`: each record and its 4-byte length.
    bytes: usize,
}

/// The free space a group commit leaves untouched on the ledger's file system. sled
/// cannot recover from a write that runs out of space (it stops, and a restart is
/// needed), so a commit is refused while less than this is free: nothing is written, the
/// refusal says why (HTTP 507), and appends succeed again once space is freed.
pub(super) struct Reserve {
    pub(super) dir: PathBuf,
    pub(super) bytes: Arc<AtomicU64>,
    /// Whether the last commit was refused: the log says when refusing starts and stops,
    /// not at every commit.
    pub(super) refusing: bool,
}

impl Reserve {
    /// `Some((free, reserve))` when a commit must be refused.
    fn short(&mut self) -> Option<(u64, u64)> {
        let reserve = self.bytes.load(Ordering::Relaxed);
        let short = match crate::disk::space(&self.dir) {
            Some((free, _)) if free < reserve => Some((free, reserve)),
            _ => None,
        };
        match (short, self.refusing) {
            (Some((free, reserve)), false) => tracing::error!(
                free, reserve, dir = %self.dir.display(),
                "the ledger's file system is under its reserve; appends are refused until space is freed"
            ),
            (None, true) => {
                tracing::warn!("the ledger's file system has room again; appends resume")
            }
            _ => {}
        }
        self.refusing = short.is_some();
        short
    }
}

/// One decided round, with the answers it owes once it is durable.
pub(super) struct Ticket {
    /// The log's next position once this round is in.
    pub(super) end: u64,
    /// Whether the round applied events to sled. Else every answer rests on durable
    /// events already: the rounds before it were settled, and the store synced what it
    /// recovered at its open. (Streams indexed as the round ends (`ids.rs`) need no sync
    /// of their own: no answer rests on them, and the next sync takes them.)
    pub(super) wrote: bool,
    pub(super) replies: Vec<Reply>,
}

pub(super) enum Reply {
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
    pub(super) fn send(self) {
        match self {
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Import(tx, r) => drop(tx.send(r)),
        }
    }

    /// Answers `err()`, whatever was decided: the round never became durable, and a
    /// refusal in it (a wrong expected revision, say) may rest on an event of the round.
    pub(super) fn fail(self, err: impl Fn() -> StoreError) {
        match self {
            Reply::Append(tx, _) => drop(tx.send(Err(err()))),
            Reply::Import(tx, _) => drop(tx.send(Err(err()))),
        }
    }
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriterMsg>, mut syncer: Syncer) {
        let mut gather = Gather::START;
        // recv() keeps returning queued messages after every sender is gone, so a close
        // still answers everything that was submitted.
        while let Ok(first) = rx.recv() {
            let mut round = self.begin_round();
            // Each request is decided as it is taken, while the round waits for the next.
            let held = take_round(&rx, first, gather, |m| self.decide(&mut round, m));
            let synced = self.apply(round).and_then(|t| syncer.settle(t));
            gather = gather.after(held, synced);
        }
    }

    /// A round's start: whether it must refuse every request, and the commit time its
    /// events get.
    fn begin_round(&mut self) -> Round {
        let refusal = if self.poisoned.load(Ordering::Acquire) {
            // The disk failed under an earlier batch: what is in sled now is unknown.
            Some(Refusal::Closed)
        } else {
            self.reserve
                .short()
                .map(|(free, reserve)| Refusal::NoSpace { free, reserve })
        };
        Round {
            refusal,
            start: self.planner,
            plan: Plan::default(),
            replies: Vec::new(),
            now: now_micros(),
        }
    }

    /// Decides one request into the round (or refuses it with the round's refusal).
    fn decide(&mut self, round: &mut Round, msg: WriterMsg) {
        if let Some(refusal) = &round.refusal {
            msg.refuse(|| match *refusal {
                Refusal::Closed => StoreError::Closed,
                Refusal::NoSpace { free, reserve } => StoreError::NoSpace {
                    path: self.reserve.dir.clone(),
                    free,
                    reserve,
                },
            });
            return;
        }
        let mut index = SledIndex {
            tree: &self.tree,
            ids: &mut self.ids,
        };
        let reply = match msg {
            WriterMsg::Append(req) => {
                let result = self.planner.append(
                    &req.stream,
                    req.expected,
                    &req.events,
                    &mut round.plan,
                    &mut index,
                    round.now,
                );
                Reply::Append(req.reply, result)
            }
            WriterMsg::Import(req) => {
                let result = self
                    .planner
                    .import(&req.records, &mut round.plan, &mut index);
                Reply::Import(req.reply, result)
            }
        };
        round.replies.push(reply);
    }

    /// Applies a decided round in one sled batch (after a batch of its `J` keys, when it
    /// writes to a marked stream). Returns what it owes its callers once durable; `None`
    /// when it has answered them already: the round refused everything, or its batch
    /// failed to apply.
    fn apply(&mut self, round: Round) -> Option<Ticket> {
        let Round {
            refusal,
            start,
            plan,
            replies,
            ..
        } = round;
        if refusal.is_some() {
            return None;
        }
        if !plan.records.is_empty() {
            // Atomic in a crash: events and their index entries land together or not at
            // all. A batch that fails with an error may keep a part (below: the store then
            // refuses appends until a restart). Durability is the syncer's step, next.
            let tail = self.tail.take();
            let streams = plan.heads.keys().map(String::as_str);
            let applied = self
                .ids
                .indexed_among(&self.tree, streams)
                .and_then(|indexed| {
                    // The `J` keys of marked streams' events first, in a batch of their
                    // own: a batch that fails may be applied in part and keep that part
                    // after a restart, so the index may name events that never landed (a
                    // hit is checked against the log: `ids.rs`), never lack one that did.
                    if !indexed.is_empty() {
                        self.tree.apply_batch(id_batch(&plan, &indexed))?;
                    }
                    let (batch, tail) = sled_batch(&plan, tail);
                    self.tree.apply_batch(batch)?;
                    Ok(tail)
                });
            let tail = match applied {
                Ok(tail) => tail,
                Err(e) => {
                    // sled applies a batch key by key in memory: part of it may be in place,
                    // the last chunk among it. What sled holds is unknown, so nothing more is
                    // written until a restart reads the durable state again.
                    tracing::error!(error = %e, "applying a batch failed; its appends and every later one are refused until a restart");
                    self.poisoned.store(true, Ordering::Release);
                    self.planner = start;
                    self.ids.clear();
                    let e = e.to_string();
                    replies.into_iter().for_each(|r| {
                        r.fail(|| StoreError::NotDurable {
                            step: "applying the batch".into(),
                            source: std::io::Error::other(e.clone()),
                        })
                    });
                    return None;
                }
            };
            self.tail = tail;
            self.ids.committed(
                plan.records
                    .iter()
                    .map(|(r, _)| (r.stream_id.as_str(), r.event_id, r.revision, r.position)),
            );
        }
        // Also after a commit that wrote nothing: its lookups may have read streams in.
        if let Err(e) = self.ids.keep_bound(&self.tree) {
            // The round is applied and is answered once durable; the ids' batch may be in
            // part, so nothing more is written until a restart.
            tracing::error!(error = %e, "writing the id index of streams it drops failed; every later append is refused until a restart");
            self.poisoned.store(true, Ordering::Release);
            self.ids.clear();
        }
        Some(Ticket {
            end: self.planner.next_position,
            wrote: !plan.records.is_empty(),
            replies,
        })
    }
}

/// A round being decided.
struct Round {
    /// Set when the round refuses every request.
    refusal: Option<Refusal>,
    /// The planner before the round, restored if its batch fails to apply.
    start: Planner,
    plan: Plan,
    replies: Vec<Reply>,
    /// The round's commit time.
    now: i64,
}

/// Why a round refuses every request.
enum Refusal {
    /// A batch failed to apply or to become durable earlier: until a restart.
    Closed,
    /// The ledger's file system is under its reserve.
    NoSpace { free: u64, reserve: u64 },
}

/// Takes the requests of one round into `take`: `first`, everything queued behind it, and
/// those that join while `gather` says to wait, up to `MAX_COMMIT_EVENTS` events.
/// Returns how many it took.
fn take_round(
    rx: &mpsc::Receiver<WriterMsg>,
    first: WriterMsg,
    gather: Gather,
    mut take: impl FnMut(WriterMsg),
) -> usize {
    let started = Instant::now();
    let mut count = first.len();
    let mut held = 1;
    take(first);
    while count < MAX_COMMIT_EVENTS {
        let next = match rx.try_recv() {
            Ok(m) => m,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => match gather.wait_for_more(held, started.elapsed()) {
                Some(left) => match rx.recv_timeout(left) {
                    Ok(m) => m,
                    Err(_) => break,
                },
                None => break,
            },
        };
        count += next.len();
        held += 1;
        take(next);
    }
    held
}

/// The committed part of the `ledger` tree, as the planner asks it.
struct SledIndex<'a> {
    tree: &'a sled::Tree,
    ids: &'a mut StreamIds,
}

impl Index for SledIndex<'_> {
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
        self.ids.head(self.tree, stream)
    }

    fn find_id(&mut self, stream: &str, id: Uuid) -> Result<Option<(u64, u64)>, StoreError> {
        self.ids.find(self.tree, stream, id)
    }
}

/// The `J` keys of a decided commit's events in `indexed` streams (marked `X`: `ids.rs`).
fn id_batch(plan: &Plan, indexed: &std::collections::HashSet<&str>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (r, _) in &plan.records {
        if indexed.contains(r.stream_id.as_str()) {
            batch.insert(
                keys::indexed_id(&r.stream_id, &r.event_id),
                &keys::id_value(r.revision, r.position),
            );
        }
    }
    batch
}

/// A decided commit as one sled batch: the records in log chunks and the stream index
/// (whose last entry for a stream is its head), one index key an event. The records join `tail` (the
/// log's last chunk) if it is under `chunk::JOIN_BYTES`, filling it while it stays under
/// `chunk::MAX_BYTES`, then fill new chunks the same way; a single larger record gets a
/// chunk of its own. Returns the batch and the log's new last chunk.
fn sled_batch(plan: &Plan, tail: Option<Tail>) -> (sled::Batch, Option<Tail>) {
    use std::borrow::Cow;
    let mut batch = sled::Batch::default();
    let first = plan.records.first().map(|(r, _)| r.position);
    // Only a chunk that ends just before this commit's first record can take it, and only
    // while it is small: joining writes its records again.
    let tail = tail
        .filter(|t| Some(t.start + t.records.len() as u64) == first && t.bytes < chunk::JOIN_BYTES);
    // The chunk being filled: the last one's records (owned) and this commit's (borrowed
    // from the plan; only those of the new last chunk are copied, at the end).
    let (mut start, mut bytes, mut records): (u64, usize, Vec<Cow<'_, [u8]>>) = match tail {
        Some(t) => (
            t.start,
            t.bytes,
            t.records.into_iter().map(Cow::Owned).collect(),
        ),
        None => (0, 0, Vec::new()),
    };
    // Whether the chunk holds records of this commit: the last chunk as stored is not
    // written again when the first record does not fit in it.
    let mut changed = false;
    for (record, encoded) in &plan.records {
        if !records.is_empty() && bytes + encoded.len() + 4 > chunk::MAX_BYTES {
            if changed {
                batch.insert(&keys::log(start), chunk::encode(&records));
            }
            records.clear();
            bytes = 0;
        }
        if records.is_empty() {
            start = record.position;
        }
        bytes += encoded.len() + 4;
        records.push(Cow::Borrowed(encoded));
        changed = true;
        batch.insert(
            keys::index(&record.stream_id, record.revision),
            &record.position.to_be_bytes(),
        );
    }
    if changed {
        batch.insert(&keys::log(start), chunk::encode(&records));
    }
    let tail = (!records.is_empty()).then(|| Tail {
        start,
        bytes,
        records: records.into_iter().map(Cow::into_owned).collect(),
    });
    (batch, tail)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_round_takes_the_callers_that_come_back_while_it_waits() {
        let (tx, rx) = mpsc::channel();
        let msg = || {
            let (reply, _) = oneshot::channel();
            WriterMsg::Import(crate::events::store::ImportRequest {
                records: Vec::new(),
                reply,
            })
        };
        let sender = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                tx.send(msg()).unwrap();
            }
            tx
        });
        let waiting = Gather {
            expect: 4,
            wait: Duration::from_secs(10),
        };
        let mut round = Vec::new();
        let held = take_round(&rx, msg(), waiting, |m| round.push(m));
        assert_eq!(
            (held, round.len()),
            (4, 4),
            "the first and the three that came back"
        );
        let tx = sender.join().unwrap();
        tx.send(msg()).unwrap();
        let mut round = Vec::new();
        let held = take_round(&rx, msg(), Gather::START, |m| round.push(m));
        assert_eq!(
            (held, round.len()),
            (2, 2),
            "what was queued, without waiting for more"
        );
    }

    #[test]
    fn a_round_stops_at_the_commit_limit_and_when_its_wait_is_over() {
        let (tx, rx) = mpsc::channel();
        let append = |n: usize| {
            let (reply, _) = oneshot::channel();
            WriterMsg::Append(crate::events::store::AppendRequest {
                stream: "scratch-limit".into(),
                expected: crate::events::ExpectedRevision::Any,
                events: (0..n)
                    .map(|_| crate::events::ProposedEvent::new("Noted", 1, b"{}".to_vec()))
                    .collect(),
                reply,
            })
        };
        for _ in 0..5 {
            tx.send(append(1000)).unwrap();
        }
        let mut events = 0;
        let held = take_round(&rx, append(1000), Gather::START, |m| events += m.len());
        assert!(events >= MAX_COMMIT_EVENTS, "{events} events");
        assert_eq!((held, events), (5, 5000), "stops once past the limit");
        assert_eq!(
            rx.try_iter().count(),
            1,
            "the rest waits for the next round"
        );
        // Expecting callers that never come: the round goes ahead once its wait is over.
        let waiting = Gather {
            expect: 64,
            wait: Duration::from_millis(20),
        };
        let held = take_round(&rx, append(1), waiting, |_| {});
        assert_eq!(held, 1);
        drop(tx);
    }
}
