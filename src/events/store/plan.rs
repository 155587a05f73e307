//! How a group commit is decided, the same for every backend: for each queued append, the
//! expected revision and idempotency by (stream, event id) against what is committed plus
//! what this commit has already taken; for each import, the log's shape. Accepted events
//! get their revisions, positions and commit time here. Pure but for the lookups of
//! [`Index`], which a backend answers from its storage; writing the decided records is the
//! backend's.

use std::collections::HashMap;

use uuid::Uuid;

use super::super::error::{ExpectedRevision, StoreError};
use super::super::record::{ProposedEvent, RecordedEvent, validate_stream_name};
use super::super::shape::{Before, LogShape};
use super::AppendResult;

/// What is committed: the backend's answers to the two questions a decision asks.
pub trait Index {
    /// The last committed revision of `stream`.
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError>;
    /// Where `id` is committed in `stream`: (revision, position).
    fn find_id(&mut self, stream: &str, id: Uuid) -> Result<Option<(u64, u64)>, StoreError>;
}

/// One commit's decided records, in position order, each with its encoding, and what
/// they change: stream heads and ids, seen by the later requests of the same commit.
#[derive(Default)]
pub struct Plan {
    pub records: Vec<(RecordedEvent, Vec<u8>)>,
    pub heads: HashMap<String, u64>,
    ids: HashMap<(String, Uuid), (u64, u64)>,
}

/// The log's end as the commit starts: the next position and the last commit time (commit
/// times never go back).
#[derive(Debug, Clone, Copy)]
pub struct Planner {
    pub next_position: u64,
    pub last_created: i64,
}

/// An index seen through a commit's own decisions.
struct Overlaid<'a, I: Index> {
    plan: &'a Plan,
    index: &'a mut I,
}

impl<I: Index> Overlaid<'_, I> {
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
        match self.plan.heads.get(stream) {
            Some(&r) => Ok(Some(r)),
            None => self.index.head(stream),
        }
    }

    fn find_id(&mut self, stream: &str, id: Uuid) -> Result<Option<(u64, u64)>, StoreError> {
        match self.plan.ids.get(&(stream.to_string(), id)) {
            Some(&hit) => Ok(Some(hit)),
            None => self.index.find_id(stream, id),
        }
    }
}

impl<I: Index> Before for Overlaid<'_, I> {
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
        Overlaid::head(self, stream)
    }
    fn has_id(&mut self, stream: &str, id: Uuid) -> Result<bool, StoreError> {
        Ok(self.find_id(stream, id)?.is_some())
    }
}

impl Planner {
    /// Decides one append against `index` and what `plan` already holds; an accepted one
    /// is added to `plan`. `now` is the clock's time in microseconds.
    pub fn append(
        &mut self,
        stream: &str,
        expected: ExpectedRevision,
        events: &[ProposedEvent],
        plan: &mut Plan,
        index: &mut impl Index,
        now: i64,
    ) -> Result<AppendResult, StoreError> {
        let mut seen = Overlaid { plan, index };
        let current = seen.head(stream)?;
        let wrong = || StoreError::WrongExpectedVersion {
            stream: stream.to_string(),
            expected,
            current,
        };
        // Idempotency: the same ids, already committed at consecutive revisions.
        if let Some((r0, _)) = seen.find_id(stream, events[0].event_id)? {
            let mut last_position = 0;
            for (i, e) in events.iter().enumerate() {
                match seen.find_id(stream, e.event_id)? {
                    Some((r, p)) if r == r0 + i as u64 => last_position = p,
                    _ => return Err(wrong()),
                }
            }
            let admitted = match expected {
                ExpectedRevision::Any | ExpectedRevision::StreamExists => true,
                ExpectedRevision::NoStream => r0 == 0,
                ExpectedRevision::Exact(n) => n.checked_add(1) == Some(r0),
            };
            if !admitted {
                return Err(wrong());
            }
            return Ok(AppendResult {
                next_expected_version: r0 + events.len() as u64 - 1,
                position: last_position,
            });
        }
        for e in &events[1..] {
            if seen.find_id(stream, e.event_id)?.is_some() {
                return Err(wrong());
            }
        }
        if !expected.admits(current) {
            return Err(wrong());
        }
        let now = now.max(self.last_created);
        let mut revision = current.map_or(0, |c| c + 1);
        for e in events {
            self.stage(
                RecordedEvent {
                    event_id: e.event_id,
                    stream_id: stream.to_string(),
                    revision,
                    position: self.next_position,
                    event_type: e.event_type.clone(),
                    event_version: e.event_version,
                    data: e.data.clone(),
                    metadata: e.metadata.clone(),
                    created_micros: now,
                    checksum: 0,
                },
                plan,
            );
            revision += 1;
        }
        self.last_created = now;
        Ok(AppendResult {
            next_expected_version: revision - 1,
            position: self.next_position - 1,
        })
    }

    /// Decides an import: every record must come next in the log and in its stream, with a
    /// new id and a time no earlier than the last. All or nothing.
    pub fn import(
        &mut self,
        records: &[RecordedEvent],
        plan: &mut Plan,
        index: &mut impl Index,
    ) -> Result<(), StoreError> {
        // Check everything before staging anything: a bad import writes nothing.
        let mut shape = LogShape::after(self.next_position, self.last_created, true);
        let mut before = Overlaid { plan, index };
        let mut created = self.last_created;
        for r in records {
            validate_stream_name(&r.stream_id).map_err(StoreError::InvalidInput)?;
            shape
                .check(r, &mut before)?
                .map_err(|e| StoreError::InvalidInput(e.to_string()))?;
            created = created.max(r.created_micros);
        }
        for r in records {
            self.stage(r.clone(), plan);
        }
        self.last_created = created;
        Ok(())
    }

    fn stage(&mut self, mut record: RecordedEvent, plan: &mut Plan) {
        let encoded = record.encode();
        plan.heads.insert(record.stream_id.clone(), record.revision);
        plan.ids.insert(
            (record.stream_id.clone(), record.event_id),
            (record.revision, record.position),
        );
        self.next_position = record.position + 1;
        plan.records.push((record, encoded));
    }
}
