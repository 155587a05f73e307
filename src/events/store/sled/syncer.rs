//! A round's durability: everything the writer applied is made durable (sled's flush,
//! then `fdatasync` of the data file and fsyncs of new blob files), and only then are its
//! callers answered and the durable head that readers see moved. It runs on the writer's
//! thread, between one round and the next (`writer.rs`).

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;

pub(super) struct Syncer {
    pub(super) db: sled::Db,
    pub(super) data_file: File,
    pub(super) blobs_dir: PathBuf,
    /// Blob files already synced (sled names each blob once).
    pub(super) synced_blobs: HashSet<std::ffi::OsString>,
    pub(super) inner: std::sync::Weak<Inner>,
    pub(super) poisoned: Arc<AtomicBool>,
    /// Durations of each flush and `fdatasync`.
    pub(super) sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Syncer {
    /// Makes a round durable when it wrote anything, then answers its callers: with their
    /// results once it is durable, with the cause when it cannot be made so. Returns how
    /// long the flush and `fdatasync` took (`None` when nothing was written: every
    /// earlier round is durable already, and so is what the store recovered at its open).
    pub(super) fn settle(&mut self, ticket: Ticket) -> Option<Duration> {
        if !ticket.wrote {
            ticket.replies.into_iter().for_each(Reply::send);
            return None;
        }
        let started = Instant::now();
        let synced = self.sync();
        let took = started.elapsed();
        self.sync_seconds.observe(took.as_secs_f64());
        match synced {
            Ok(()) => {
                if let Some(inner) = self.inner.upgrade() {
                    inner.syncs.fetch_add(1, Ordering::Relaxed);
                    inner.durable.store(ticket.end, Ordering::Release);
                    inner.head_tx.send_replace(ticket.end);
                }
                ticket.replies.into_iter().for_each(Reply::send);
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
                ticket.replies.into_iter().for_each(|r| {
                    r.fail(|| StoreError::NotDurable {
                        step: step.clone(),
                        source: std::io::Error::new(kind, text.clone()),
                    })
                });
            }
        }
        Some(took)
    }

    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn sync_blobs(&mut self) -> Result<(), StoreError> {
        let Ok(entries) = std::fs::read_dir(&self.blobs_dir) else {
            return Ok(()); // no blob written yet
        };
        let mut any = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if self.synced_blobs.contains(&name) {
                continue;
            }
            if let Ok(f) = File::open(entry.path()) {
                f.sync_all().map_err(|source| StoreError::NotDurable {
                    step: format!("fsync of sled blob {}", entry.path().display()),
                    source,
                })?;
            }
            self.synced_blobs.insert(name);
            any = true;
        }
        if any {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }
}
