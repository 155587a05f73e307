//! Catch-up subscriptions to `$all`.

use std::collections::VecDeque;

use tokio::sync::watch;

use super::*;

/// A catch-up subscription. History is read from the store page by page; once caught up
/// it waits on the durable-head watch, which the writer only ever overwrites, so a slow
/// subscriber costs the writer nothing and loses nothing (it re-reads from the store).
pub struct Subscription {
    pub(super) store: Store,
    pub(super) next: u64,
    pub(super) head: watch::Receiver<u64>,
    pub(super) buf: VecDeque<RecordedEvent>,
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
                // The head says these positions are readable: an empty page or a gap is a
                // fault to report, never to skip or to spin on.
                for (i, e) in page.iter().enumerate() {
                    if e.position != self.next + i as u64 {
                        return Err(StoreError::Corrupt {
                            position: self.next + i as u64,
                            reason: "missing from the log".into(),
                        });
                    }
                }
                let Some(last) = page.last() else {
                    return Err(StoreError::Corrupt {
                        position: self.next,
                        reason: "missing from the log".into(),
                    });
                };
                self.next = last.position + 1;
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
