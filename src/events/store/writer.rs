//! The writer thread: takes every queued append and import, decides each (expected
//! revision, idempotency, the log's shape), stages the accepted ones in one sled batch
//! (events in chunks, stream heads, both indexes) and applies it, then hands the batch to
//! the syncer with the answers it owes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::*;

/// Planned writes of one group commit.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) batch: sled::Batch,
    /// Encoded records of the chunk being filled, and the position of its first one.
    pub(super) chunk: Vec<Vec<u8>>,
    pub(super) chunk_start: u64,
    pub(super) chunk_bytes: usize,
    pub(super) head_overlay: HashMap<String, u64>,
    pub(super) id_overlay: HashMap<(String, Uuid), (u64, u64)>,
    pub(super) written: usize,
}

/// Owns appends. Runs on its own thread because sled and fdatasync block.
pub(super) struct Writer {
    pub(super) tree: sled::Tree,
    pub(super) next_position: u64,
    pub(super) last_created: i64,
    pub(super) poisoned: Arc<AtomicBool>,
    pub(super) reserve: Reserve,
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

/// One applied batch waiting to be made durable, with the answers it owes.
pub(super) struct Ticket {
    /// The log's next position once this batch is in.
    pub(super) end: u64,
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

    /// Turns a success into `err()`: the batch it belongs to never became durable.
    pub(super) fn fail(self, err: impl Fn() -> StoreError) {
        match self {
            Reply::Append(tx, r) => drop(tx.send(r.and_then(|_| Err(err())))),
            Reply::Import(tx, r) => drop(tx.send(r.and_then(|_| Err(err())))),
        }
    }
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriterMsg>, syncer: Syncer) {
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

    pub(super) fn commit_batch(&mut self, batch: Vec<WriterMsg>, queue: &SyncQueue) {
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
        if let Some((free, reserve)) = self.reserve.short() {
            for msg in batch {
                let e = || StoreError::NoSpace {
                    path: self.reserve.dir.clone(),
                    free,
                    reserve,
                };
                match msg {
                    WriterMsg::Append(r) => drop(r.reply.send(Err(e()))),
                    WriterMsg::Import(r) => drop(r.reply.send(Err(e()))),
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

    pub(super) fn head(&self, plan: &Plan, stream: &str) -> Result<Option<u64>, StoreError> {
        if let Some(&r) = plan.head_overlay.get(stream) {
            return Ok(Some(r));
        }
        self.tree
            .get(keys::head(stream))?
            .map(|v| be_u64(&v, "stream head"))
            .transpose()
    }

    pub(super) fn find_id(
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

    pub(super) fn plan_append(
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

    pub(super) fn plan_import(
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

    pub(super) fn stage_record(&mut self, record: &mut RecordedEvent, plan: &mut Plan) {
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
    pub(super) fn seal_chunk(&mut self) {
        if !self.chunk.is_empty() {
            self.batch
                .insert(&keys::log(self.chunk_start), chunk::encode(&self.chunk));
            self.chunk.clear();
            self.chunk_bytes = 0;
        }
    }
}

pub(super) fn msg_len(m: &WriterMsg) -> usize {
    match m {
        WriterMsg::Append(r) => r.events.len(),
        WriterMsg::Import(r) => r.records.len(),
    }
}
