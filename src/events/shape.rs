//! What a well-formed log looks like, record by record: positions gapless and in order,
//! each stream's revisions consecutive from 0, event ids unique within a stream, commit
//! times never going back. One checker, used by the store's import, `contimg import`'s
//! first pass over a file, and `contimg verify`.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::error::StoreError;
use super::record::RecordedEvent;

/// A record out of shape, with the position it sits at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("position {found} where {expected} was expected")]
    Position { expected: u64, found: u64 },
    #[error("record at position {position} has revision {found} in {stream}, expected {expected}")]
    Revision {
        position: u64,
        stream: String,
        found: u64,
        expected: u64,
    },
    #[error("record at position {position} was created before the one before it")]
    TimeGoesBack { position: u64 },
    #[error("record at position {position}: event id {id} already in {stream}")]
    DuplicateId {
        position: u64,
        stream: String,
        id: Uuid,
    },
}

impl ShapeError {
    pub fn position(&self) -> u64 {
        match self {
            ShapeError::Position { found, .. } => *found,
            ShapeError::Revision { position, .. }
            | ShapeError::TimeGoesBack { position }
            | ShapeError::DuplicateId { position, .. } => *position,
        }
    }
}

/// What was in the log before the records being checked (a store being imported into);
/// [`Empty`] for a log that starts with them.
pub trait Before {
    /// The last revision of `stream`, if it has one.
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError>;
    /// Whether `id` is already committed in `stream`.
    fn has_id(&mut self, stream: &str, id: Uuid) -> Result<bool, StoreError>;
}

/// Nothing before.
pub struct Empty;

impl Before for Empty {
    fn head(&mut self, _: &str) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    fn has_id(&mut self, _: &str, _: Uuid) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// The checker. It always takes the record as the new truth, even when it reports a
/// fault, so a caller that lists faults (verify) reports each one once and goes on.
pub struct LogShape {
    next: u64,
    created: i64,
    heads: HashMap<String, u64>,
    /// `None`: ids are not checked here (verify checks them through the id index).
    ids: Option<HashSet<(String, Uuid)>>,
}

impl LogShape {
    /// A log whose next record is at `next_position`, committed no earlier than
    /// `last_created`; `check_ids` keeps every id seen, to refuse a repeat.
    pub fn after(next_position: u64, last_created: i64, check_ids: bool) -> Self {
        LogShape {
            next: next_position,
            created: last_created,
            heads: HashMap::new(),
            ids: check_ids.then(HashSet::new),
        }
    }

    /// A log from position 0.
    pub fn from_start(check_ids: bool) -> Self {
        Self::after(0, i64::MIN, check_ids)
    }

    /// Position the next record must have.
    pub fn next_position(&self) -> u64 {
        self.next
    }

    /// Checks the next record. `Err(StoreError)` only when `before` cannot answer.
    pub fn check(
        &mut self,
        r: &RecordedEvent,
        before: &mut impl Before,
    ) -> Result<Result<(), ShapeError>, StoreError> {
        let mut fault = None;
        if r.position != self.next {
            fault = Some(ShapeError::Position {
                expected: self.next,
                found: r.position,
            });
        }
        let head = match self.heads.get(r.stream_id.as_str()) {
            Some(h) => Some(*h),
            None => before.head(&r.stream_id)?,
        };
        let expected = head.map_or(0, |h| h + 1);
        if fault.is_none() && r.revision != expected {
            fault = Some(ShapeError::Revision {
                position: r.position,
                stream: r.stream_id.clone(),
                found: r.revision,
                expected,
            });
        }
        if fault.is_none() && r.created_micros < self.created {
            fault = Some(ShapeError::TimeGoesBack {
                position: r.position,
            });
        }
        if let Some(ids) = &mut self.ids {
            let repeat = !ids.insert((r.stream_id.clone(), r.event_id))
                || before.has_id(&r.stream_id, r.event_id)?;
            if fault.is_none() && repeat {
                fault = Some(ShapeError::DuplicateId {
                    position: r.position,
                    stream: r.stream_id.clone(),
                    id: r.event_id,
                });
            }
        }
        self.next = r.position + 1;
        self.created = self.created.max(r.created_micros);
        self.heads.insert(r.stream_id.clone(), r.revision);
        Ok(fault.map_or(Ok(()), Err))
    }

    /// Every stream seen, with its last revision.
    pub fn heads(&self) -> &HashMap<String, u64> {
        &self.heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stream: &str, revision: u64, position: u64, created: i64, id: u128) -> RecordedEvent {
        RecordedEvent::noted(stream, revision, position, Uuid::from_u128(id), created)
    }

    #[test]
    fn a_sound_log_passes_and_each_fault_is_named_once() {
        let mut s = LogShape::from_start(true);
        let ok = [
            rec("a-1", 0, 0, 10, 1),
            rec("b-1", 0, 1, 10, 2),
            rec("a-1", 1, 2, 11, 3),
        ];
        for r in &ok {
            assert_eq!(s.check(r, &mut Empty).unwrap(), Ok(()));
        }
        let faults = [
            (rec("a-1", 2, 4, 12, 4), "position 4 where 3"),
            (rec("a-1", 5, 5, 12, 5), "revision 5 in a-1, expected 3"),
            (rec("b-1", 1, 6, 1, 6), "created before"),
            (rec("b-1", 2, 7, 13, 6), "already in b-1"),
        ];
        for (r, want) in &faults {
            let e = s.check(r, &mut Empty).unwrap().unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(e.position(), r.position);
        }
        // The checker took each record as the truth: the next one in line passes.
        assert_eq!(
            s.check(&rec("b-1", 3, 8, 14, 9), &mut Empty).unwrap(),
            Ok(())
        );
        assert_eq!(s.heads()["a-1"], 5);
    }

    #[test]
    fn what_came_before_counts() {
        struct Store;
        impl Before for Store {
            fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
                Ok((stream == "a-1").then_some(4))
            }
            fn has_id(&mut self, _: &str, id: Uuid) -> Result<bool, StoreError> {
                Ok(id == Uuid::from_u128(7))
            }
        }
        let mut s = LogShape::after(10, 100, true);
        assert_eq!(
            s.check(&rec("a-1", 5, 10, 100, 1), &mut Store).unwrap(),
            Ok(())
        );
        let e = s
            .check(&rec("a-1", 6, 11, 100, 7), &mut Store)
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ShapeError::DuplicateId { .. }), "{e}");
    }
}
