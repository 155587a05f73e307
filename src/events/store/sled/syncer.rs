//! The syncer thread: makes everything the writer applied durable (sled's flush, then
//! `fdatasync` of the data file and fsyncs of new blob files) and only then answers the
//! callers and moves the durable head that readers see.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::*;

/// Applied batches on their way to the disk. The writer pushes; the syncer drains
/// everything queued, makes it durable with one flush and one fdatasync, then answers.
/// While the syncer waits on the disk the writer applies the next batches, so the size of
/// a group commit follows the load by itself.
#[derive(Default)]
pub(super) struct SyncQueue {
    pub(super) state: Mutex<(VecDeque<Ticket>, bool)>,
    pub(super) ready: Condvar,
}

impl SyncQueue {
    pub(super) fn push(&self, ticket: Ticket) {
        self.state.lock().expect("sync queue").0.push_back(ticket);
        self.ready.notify_one();
    }

    pub(super) fn close(&self) {
        self.state.lock().expect("sync queue").1 = true;
        self.ready.notify_one();
    }

    /// Everything queued, waiting for some; `None` once closed and empty.
    pub(super) fn take(&self) -> Option<Vec<Ticket>> {
        let mut state = self.state.lock().expect("sync queue");
        loop {
            if !state.0.is_empty() {
                return Some(state.0.drain(..).collect());
            }
            if state.1 {
                return None;
            }
            state = self.ready.wait(state).expect("sync queue");
        }
    }
}

pub(super) struct Syncer {
    pub(super) db: sled::Db,
    pub(super) data_file: File,
    pub(super) blobs_dir: PathBuf,
    /// Blob files already synced (sled names each blob once).
    pub(super) synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
    pub(super) queue: Arc<SyncQueue>,
    pub(super) inner: std::sync::Weak<Inner>,
    pub(super) poisoned: Arc<AtomicBool>,
    /// Durations of each flush and `fdatasync`.
    pub(super) sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Syncer {
    pub(super) fn run(self) {
        while let Some(tickets) = self.queue.take() {
            let end = tickets.last().map_or(0, |t| t.end);
            if self.poisoned.load(Ordering::Acquire) {
                tickets
                    .into_iter()
                    .flat_map(|t| t.replies)
                    .for_each(|r| r.fail(|| StoreError::Poisoned));
                continue;
            }
            let started = std::time::Instant::now();
            let synced = self.sync();
            self.sync_seconds.observe(started.elapsed().as_secs_f64());
            match synced {
                Ok(()) => {
                    if let Some(inner) = self.inner.upgrade() {
                        inner.syncs.fetch_add(1, Ordering::Relaxed);
                        inner.durable.store(end, Ordering::Release);
                        inner.head_tx.send_replace(end);
                    }
                    tickets
                        .into_iter()
                        .flat_map(|t| t.replies)
                        .for_each(Reply::send);
                }
                Err(e) => {
                    self.poisoned.store(true, Ordering::Release);
                    tracing::error!(error = %crate::events::error::chain(&e), "making appends durable failed; refusing appends until restart");
                    // Each caller gets the cause (io::Error is not Clone: same kind and text).
                    let (step, kind, text) = match &e {
                        StoreError::NotDurable { step, source } => {
                            (step.clone(), source.kind(), source.to_string())
                        }
                        other => (
                            "sync".to_string(),
                            std::io::ErrorKind::Other,
                            crate::events::error::chain(other),
                        ),
                    };
                    tickets.into_iter().flat_map(|t| t.replies).for_each(|r| {
                        r.fail(|| StoreError::NotDurable {
                            step: step.clone(),
                            source: std::io::Error::new(kind, text.clone()),
                        })
                    });
                }
            }
        }
    }

    pub(super) fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| StoreError::NotDurable {
            step: "flush".into(),
            source: match e {
                sled::Error::Io(io) => io,
                other => std::io::Error::other(other.to_string()),
            },
        })?;
        // sled's flush ends in sync_file_range, which leaves the disk's write cache alone.
        self.data_file
            .sync_data()
            .map_err(|source| StoreError::NotDurable {
                step: "fdatasync of the data file".into(),
                source,
            })?;
        self.sync_blobs()
    }

    /// sled writes a page larger than its blob threshold (about 128 KiB: a big merged
    /// leaf) to a file of its own under `blobs/` and never syncs it. Sync the ones that
    /// appeared since the last round, and the folder, so an acknowledged batch cannot
    /// live only in the page cache.
    pub(super) fn sync_blobs(&self) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(&self.blobs_dir) else {
            return Ok(()); // no blob written yet
        };
        let mut synced = self.synced_blobs.lock().expect("blob set");
        let mut any = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if synced.contains(&name) {
                continue;
            }
            if let Ok(f) = File::open(entry.path()) {
                f.sync_all().map_err(|source| StoreError::NotDurable {
                    step: format!("fsync of sled blob {}", entry.path().display()),
                    source,
                })?;
            }
            synced.insert(name);
            any = true;
        }
        if any {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }
}
