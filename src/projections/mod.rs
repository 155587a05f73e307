//! Read models folded from the event log, and the engine that keeps them current.
//!
//! The engine loads the last snapshot (stored with its checkpoint by the store, read as
//! it is decoded), catches up from the checkpoint through a catch-up subscription, and
//! then follows the log live. `rebuild` replays from position 0 into a fresh model and
//! swaps it in; [`fold_as_of`] folds up to any position or time for as-of questions
//! (`fold.rs`: the whole-log fold, with reader and decoder threads ahead of it).
//! Projections never append to the log.
//!
//! The snapshot is saved under `publish-v1` by the store with its checkpoint: the 8-byte
//! fingerprint `PublishSnapshot::format()` (derived from the type, so a change of its
//! fields changes it), then the bincode encoding. It is used only when the fingerprint
//! matches, the checkpoint inside it agrees with the stored one and lies within the
//! durable log; otherwise the model is replayed from position 0. A loaded snapshot is
//! re-indexed for the current `max_attempts`. Readers take the model under a std
//! `RwLock`, never held across an `.await`; code that appended and wants to read its write
//! calls `wait_for(position)`. A rebuild folds the log outside the lock, then under the
//! write lock folds what arrived meanwhile and swaps the new model in.
//!
//! Tunable numbers: a snapshot is saved after 100,000 events folded
//! (`SNAPSHOT_EVERY_EVENTS`), or once 300 s have passed since the last and something
//! changed (`SNAPSHOT_EVERY`, checked as events arrive); also at shutdown (unless the saved
//! one is current), after a rebuild, and after an open that caught up 100,000 events or
//! more. While following, only the encoding holds the model still; the bytes are written
//! by a blocking task while folding goes on, and the next such save waits until it is
//! done. Saves take turns at the store; a snapshot of a model a rebuild has replaced is
//! not written, nor one no newer than the stored snapshot of the same model. A failed
//! subscription is retried after 1 s. In `fold.rs`, one reader and two decoder threads
//! feed the fold in batches of 2,048 events; in `publish.rs`, the model keeps the first
//! 1,000 parked events (all are counted); in `status.rs`, a product counts as stuck after
//! 24 h in staging or 30 min publishing (the defaults of `StuckRule`; the second is
//! `[publish] stuck_publishing_min`).

pub mod activity;
pub mod alerts;
mod fold;
pub mod metrics;
pub mod product;
pub mod publish;
pub mod status;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::events::{Store, StoreError};
pub use fold::{AsOf, Decoded, FoldItem, FoldSource, fold_as_of, fold_source};
use publish::{PublishModel, PublishSnapshot};

const SNAPSHOT_NAME: &str = "publish-v1";
/// Save a snapshot after this many events...
const SNAPSHOT_EVERY_EVENTS: u64 = 100_000;
/// ...or this long after the last one, when anything changed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);

/// Completes once a shutdown watch turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

struct Shared {
    model: RwLock<PublishModel>,
    /// The snapshot last saved or loaded: the model's generation and its checkpoint
    /// (`None`: there is none). Held while a snapshot is written, so saves take turns and
    /// this always names what the store holds. Never taken under the model's lock.
    saved: std::sync::Mutex<Option<(u64, Option<u64>)>>,
    /// Bytes of the last snapshot encoded (0: none yet), to size the next one's buffer.
    encoded_len: std::sync::atomic::AtomicUsize,
    /// The model's generation: a rebuild that swaps a new model in adds one, under the
    /// model's write lock. A snapshot is written only if its encoding's generation is
    /// still the model's: a snapshot of a model swapped out is never written over the
    /// one its rebuild saves.
    generation: std::sync::atomic::AtomicU64,
    store: Store,
    max_attempts: u32,
    checkpoint_tx: watch::Sender<Option<u64>>,
}

/// A mutex's value, even after a thread panicked holding it (each value here is whole
/// after every change).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A snapshot encoded from the model, not yet written.
struct Encoded {
    /// The model's generation when it was encoded.
    generation: u64,
    checkpoint: Option<u64>,
    bytes: Vec<u8>,
    encode_ms: u64,
}

/// The live publish read model. Cheap to clone.
#[derive(Clone)]
pub struct Projections {
    shared: Arc<Shared>,
}

impl Projections {
    /// Loads the last snapshot (or starts empty) and catches up synchronously, so that the
    /// model is current when this returns.
    pub fn open(store: &Store, max_attempts: u32) -> Result<Projections, StoreError> {
        let started = Instant::now();
        let mut loaded = None;
        let mut model = match store.open_snapshot(SNAPSHOT_NAME)? {
            None => PublishModel::new(max_attempts),
            Some(mut r) => match PublishSnapshot::read(&mut r) {
                Ok(None) => {
                    tracing::warn!(
                        "the projection snapshot was written in another format; replaying from the start"
                    );
                    PublishModel::new(max_attempts)
                }
                Ok(Some(snap))
                    if snap.tail.last_position == r.checkpoint
                        && r.checkpoint.is_none_or(|c| c < store.event_count()) =>
                {
                    loaded = Some(r.checkpoint);
                    PublishModel::from_snapshot(snap, max_attempts)
                }
                Ok(Some(_)) => {
                    tracing::warn!(
                        "projection snapshot unusable (its checkpoint disagrees with the log); replaying from the start"
                    );
                    PublishModel::new(max_attempts)
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(error = %e, "projection snapshot unusable; replaying from the start");
                    PublishModel::new(max_attempts)
                }
                Err(e) => return Err(e.into()),
            },
        };
        let snapshot_ms = started.elapsed().as_millis() as u64;
        let from = model.last_position().map_or(0, |p| p + 1);
        // Read and decoded on threads of their own ahead of the fold, as `audit` does: the
        // server answers only once this is done.
        let mut caught_up = 0u64;
        // Without a snapshot the whole log is folded: its indexes are ordered once, at the
        // end. A snapshot's are built as it loads, and its catch-up is short.
        if loaded.is_none() {
            model.defer_indexes();
        }
        fold::fold_source(
            fold::FoldSource::Store(store.clone(), from),
            |e, decoded| {
                model.apply_decoded(e, decoded);
                caught_up += 1;
                true
            },
        )?;
        model.index_all();
        tracing::info!(
            from,
            caught_up,
            products = model.product_count(),
            snapshot_ms,
            ms = started.elapsed().as_millis() as u64,
            "projections ready"
        );
        let (checkpoint_tx, _) = watch::channel(model.last_position());
        let projections = Projections {
            shared: Arc::new(Shared {
                model: RwLock::new(model),
                saved: std::sync::Mutex::new(loaded.map(|c| (0, c))),
                encoded_len: std::sync::atomic::AtomicUsize::new(0),
                generation: std::sync::atomic::AtomicU64::new(0),
                store: store.clone(),
                max_attempts,
                checkpoint_tx,
            }),
        };
        if caught_up >= SNAPSHOT_EVERY_EVENTS {
            // A long catch-up is worth keeping: the next start begins from here. Saved
            // beside the serving (the model is current already); a save that fails is
            // tried again at the next shutdown.
            let p = projections.clone();
            std::thread::Builder::new()
                .name("contimg-snapshot".into())
                .spawn(move || {
                    if let Err(e) = p.save_snapshot() {
                        tracing::warn!(error = %e, "saving the projection snapshot after the catch-up");
                    }
                })
                ?;
        }
        Ok(projections)
    }

    /// Reads the model under its lock. std RwLock: never held across an `.await`.
    pub fn read<R>(&self, f: impl FnOnce(&PublishModel) -> R) -> R {
        f(&self.shared.model.read().expect("projection lock"))
    }

    pub fn max_attempts(&self) -> u32 {
        self.shared.max_attempts
    }

    /// Position of the last event folded in.
    pub fn checkpoint(&self) -> Option<u64> {
        *self.shared.checkpoint_tx.borrow()
    }

    /// Durable events not yet folded in.
    pub fn lag(&self) -> u64 {
        let folded = self.checkpoint().map_or(0, |c| c + 1);
        self.shared.store.event_count().saturating_sub(folded)
    }

    /// Waits until the model has folded `position` (or `timeout` passes).
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.checkpoint_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some_and(|c| c >= position)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A receiver that changes whenever events are folded in.
    pub fn watch(&self) -> watch::Receiver<Option<u64>> {
        self.shared.checkpoint_tx.subscribe()
    }

    /// Follows the log until `shutdown` turns true, saving snapshots as it goes and once
    /// more at the end.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut sub = self.shared.store.subscribe_all(self.checkpoint());
        let mut since_snapshot = 0u64;
        let mut last_snapshot = Instant::now();
        // A snapshot being written: encoded here (the model cannot change meanwhile),
        // then written by a blocking task while this one goes on folding.
        let mut writing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = crate::projections::stopped(&mut shutdown) => break,
                next = sub.next() => match next {
                    Ok(event) => {
                        let checkpoint = {
                            let mut model = self.shared.model.write().expect("projection lock");
                            // A rebuild may have swapped in a model that is already past this.
                            if model.last_position().is_none_or(|p| p < event.position) {
                                model.apply(&event);
                            }
                            model.last_position()
                        };
                        self.shared.checkpoint_tx.send_replace(checkpoint);
                        since_snapshot += 1;
                    }
                    Err(StoreError::Closed) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "projection subscription failed; resubscribing");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        sub = self.shared.store.subscribe_all(self.checkpoint());
                    }
                },
            }
            if (since_snapshot >= SNAPSHOT_EVERY_EVENTS
                || (since_snapshot > 0 && last_snapshot.elapsed() >= SNAPSHOT_EVERY))
                && writing.as_ref().is_none_or(|w| w.is_finished())
            {
                // Finished: its outcome is ready.
                if let Some(Some(Err(e))) = writing.take().map(futures::FutureExt::now_or_never) {
                    tracing::error!(error = %e, "the task writing a projection snapshot failed");
                }
                let encoded = self.encode_snapshot();
                let p = self.clone();
                writing = Some(tokio::task::spawn_blocking(move || {
                    if let Err(e) = p.write_snapshot(encoded) {
                        tracing::warn!(error = %e, "saving the projection snapshot failed");
                    }
                }));
                since_snapshot = 0;
                last_snapshot = Instant::now();
            }
        }
        if let Some(w) = writing
            && let Err(e) = w.await
        {
            tracing::error!(error = %e, "the task writing a projection snapshot failed");
        }
        // Leave a snapshot of the final state unless the saved one already is (of this
        // model: a rebuild whose own save failed is saved here).
        let current = (
            self.shared
                .generation
                .load(std::sync::atomic::Ordering::Acquire),
            self.checkpoint(),
        );
        let saved = *lock(&self.shared.saved);
        if saved != Some(current) {
            self.save_snapshot_logged();
        }
    }

    fn save_snapshot_logged(&self) {
        if let Err(e) = self.save_snapshot() {
            tracing::warn!(error = %e, "saving the projection snapshot failed");
        }
    }

    /// Writes the model and its checkpoint to the store (which keeps the two together),
    /// unless what the store holds is already as new (see [`Self::write_snapshot`]).
    pub fn save_snapshot(&self) -> Result<(), StoreError> {
        self.write_snapshot(self.encode_snapshot())
    }

    /// The model encoded as a snapshot, under its read lock: folding waits meanwhile.
    fn encode_snapshot(&self) -> Encoded {
        use std::sync::atomic::Ordering::Relaxed;
        let started = Instant::now();
        let (generation, checkpoint, bytes) = self.read(|m| {
            // Room for the whole at once, from the last snapshot's size or about 256 bytes
            // a product: growing by doubling would copy and touch twice the bytes (at a
            // million products the model is held still for that time). Room not written
            // to is never touched.
            let last = self.shared.encoded_len.load(Relaxed);
            let room = (last + last / 8).max(m.product_count().saturating_mul(256));
            let mut bytes = Vec::with_capacity(room.min(u32::MAX as usize));
            bytes.extend_from_slice(&PublishSnapshot::format());
            m.encode_snapshot(&mut bytes);
            // Under the read lock: a swap, which holds the write lock, is before or after.
            let generation = self
                .shared
                .generation
                .load(std::sync::atomic::Ordering::Acquire);
            (generation, m.last_position(), bytes)
        });
        self.shared.encoded_len.store(bytes.len(), Relaxed);
        Encoded {
            generation,
            checkpoint,
            bytes,
            encode_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Writes an encoded snapshot to the store, outside the model's lock, and logs it.
    /// Saves take turns. Not written: one of a model a rebuild has replaced since, and
    /// one no newer than the snapshot the store holds of the same model (saves of one
    /// model may finish in another order than they began).
    fn write_snapshot(&self, e: Encoded) -> Result<(), StoreError> {
        let mut saved = lock(&self.shared.saved);
        if self
            .shared
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
            != e.generation
        {
            tracing::info!("a snapshot of a model a rebuild replaced was not written");
            return Ok(());
        }
        if saved.is_some_and(|(g, c)| g == e.generation && c >= e.checkpoint) {
            return Ok(());
        }
        let started = Instant::now();
        self.shared
            .store
            .save_snapshot(SNAPSHOT_NAME, e.checkpoint, &e.bytes)?;
        *saved = Some((e.generation, e.checkpoint));
        drop(saved);
        tracing::info!(
            checkpoint = e.checkpoint,
            bytes = e.bytes.len(),
            encode_ms = e.encode_ms,
            write_ms = started.elapsed().as_millis() as u64,
            "projection snapshot saved"
        );
        Ok(())
    }

    /// Replays the whole log into a fresh model, catches it up, and swaps it in. Returns
    /// the number of events replayed. Blocking: call from a blocking thread.
    pub fn rebuild(&self) -> Result<u64, StoreError> {
        let store = &self.shared.store;
        let (mut fresh, _, _) = fold_as_of(
            FoldSource::Store(store.clone(), 0),
            AsOf::End,
            self.shared.max_attempts,
        )?;
        let mut model = self.shared.model.write().expect("projection lock");
        // Fold whatever arrived during the replay, so the swap loses nothing.
        let from = fresh.last_position().map_or(0, |p| p + 1);
        store.for_each_from(from, |e| {
            fresh.apply(&e);
            Ok(())
        })?;
        let folded = fresh.last_position().map_or(0, |p| p + 1);
        *model = fresh;
        // Under the write lock: every encoding sees the new model with the new number. A
        // snapshot of the old one being written finishes first (this one's save waits its
        // turn), one not yet written never is.
        self.shared
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        drop(model);
        if let Some(p) = folded.checked_sub(1) {
            self.shared.checkpoint_tx.send_if_modified(|c| {
                let newer = c.is_none_or(|c| c < p);
                if newer {
                    *c = Some(p);
                }
                newer
            });
        }
        self.save_snapshot()?;
        Ok(folded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::catalogue::{DomainEvent, EventMetadata, ProductRegistered, PublishStarted};
    use crate::events::{ExpectedRevision, ProposedEvent, RecordedEvent};

    /// `n` records, every third one a product registration, the rest other streams.
    fn records(n: u64) -> Vec<RecordedEvent> {
        (0..n)
            .map(|p| {
                let (stream, ty, data) = if p % 3 == 0 {
                    let r = ProductRegistered {
                        data_id: format!("p{p}"),
                        data_type: "image".into(),
                        stage_path: format!("/s/p{p}.fits"),
                        checksum: None,
                        size_bytes: None,
                        qa_status: None,
                        validation_status: None,
                        auto_publish: true,
                        metadata: Default::default(),
                    };
                    (
                        format!("product-p{p}"),
                        ProductRegistered::TYPE,
                        serde_json::to_vec(&r).unwrap(),
                    )
                } else {
                    (format!("scratch-{p}"), "Noted", b"{}".to_vec())
                };
                RecordedEvent {
                    event_id: uuid::Uuid::now_v7(),
                    stream_id: stream,
                    revision: 0,
                    position: p,
                    event_type: ty.into(),
                    event_version: 1,
                    data,
                    metadata: b"{}".to_vec(),
                    created_micros: 1_000 + p as i64,
                    checksum: 0,
                }
            })
            .collect()
    }

    fn source(events: Vec<Result<RecordedEvent, StoreError>>) -> FoldSource {
        FoldSource::Records(Box::new(events.into_iter()))
    }

    #[test]
    fn every_event_arrives_once_in_order_across_batch_boundaries() {
        for n in [0, 1, 2047, 2048, 2049, 4096, 10_000] {
            let mut seen = Vec::new();
            fold_source(source(records(n).into_iter().map(Ok).collect()), |e, d| {
                assert_eq!(d.as_ref().unwrap().is_some(), e.position % 3 == 0);
                seen.push(e.position);
                true
            })
            .unwrap();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn the_fold_can_stop_early_and_an_error_ends_it() {
        let mut seen = 0;
        fold_source(
            source(records(9_000).into_iter().map(Ok).collect()),
            |e, _| {
                seen += 1;
                e.position < 5_000
            },
        )
        .unwrap();
        assert_eq!(seen, 5_001);

        let mut items: Vec<Result<RecordedEvent, StoreError>> =
            records(6_000).into_iter().map(Ok).collect();
        items[3_000] = Err(StoreError::Corrupt {
            position: 3_000,
            reason: "bad checksum".into(),
        });
        let mut last = None;
        let r = fold_source(source(items), |e, _| {
            last = Some(e.position);
            true
        });
        assert!(
            matches!(
                r,
                Err(StoreError::Corrupt {
                    position: 3_000,
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(last, Some(2_999), "nothing after the error is folded");
    }

    /// The fast path (records read in place from a ledger) folds to the same model as
    /// decoding whole records one by one, parked events included.
    #[test]
    fn a_ledger_folds_the_same_in_place_as_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = EventMetadata::actor("test");
        for r in records(3_000).into_iter().filter(|r| r.position % 3 == 0) {
            let e = ProposedEvent::new(r.event_type, 1, r.data).with_metadata(b"{}".to_vec());
            store
                .append_blocking(&r.stream_id, ExpectedRevision::NoStream, vec![e])
                .unwrap();
        }
        // Parked: a publish before any registration, and a payload that does not decode.
        let early = PublishStarted {
            attempt: 1,
            destination: "/p/x".into(),
            trigger: "auto".into(),
        };
        store
            .append_blocking(
                "product-early",
                ExpectedRevision::Any,
                vec![early.to_proposed(&meta)],
            )
            .unwrap();
        let bad = ProposedEvent::new(PublishStarted::TYPE, 1, b"{\"attempt\":\"x\"}".to_vec());
        store
            // The API's catalogue check would refuse it; the store itself takes it, as an
            // import of old history would.
            .append_blocking("product-p0", ExpectedRevision::Any, vec![bad])
            .unwrap();
        let (fast, _, _) = fold_as_of(FoldSource::Store(store.clone(), 0), AsOf::End, 3).unwrap();
        let mut slow = PublishModel::new(3);
        for e in store.events_from(0) {
            slow.apply(&e.unwrap());
        }
        assert_eq!(fast, slow);
        let (parked, total) = fast.parked();
        assert_eq!(total, 2);
        assert_eq!(parked[0].event_type, PublishStarted::TYPE);
        store.close();
    }

    /// Registers product `id` (staged at `/s/id`) in `store`.
    fn register(store: &Store, id: &str) {
        let r = ProductRegistered {
            data_id: id.into(),
            data_type: "image".into(),
            stage_path: format!("/s/{id}"),
            checksum: None,
            size_bytes: None,
            qa_status: None,
            validation_status: None,
            auto_publish: false,
            metadata: Default::default(),
        };
        store
            .append_blocking(
                &format!("product-{id}"),
                ExpectedRevision::NoStream,
                vec![r.to_proposed(&EventMetadata::actor("test"))],
            )
            .unwrap();
    }

    #[test]
    fn a_snapshot_of_another_format_is_replayed_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        register(&store, "p");
        // A snapshot that claims the checkpoint but was written in some other format.
        let mut foreign = vec![0u8; 8];
        foreign.extend_from_slice(&[7u8; 40]);
        store
            .save_snapshot(SNAPSHOT_NAME, Some(0), &foreign)
            .unwrap();
        let p = Projections::open(&store, 3).unwrap();
        assert_eq!(p.read(|m| m.product_count()), 1, "replayed from the log");
        // Its own snapshot round-trips.
        p.save_snapshot().unwrap();
        let (_, bytes) = store.load_snapshot(SNAPSHOT_NAME).unwrap().unwrap();
        assert!(bytes.starts_with(&PublishSnapshot::format()));
        let again = Projections::open(&store, 3).unwrap();
        assert_eq!(again.read(|m| m.product_count()), 1);
        store.close();
    }

    /// A snapshot encoded before a rebuild swapped the model out is not written over the
    /// one the rebuild saved (it is written beside the folding, and may finish later),
    /// even when it claims a later checkpoint; nor is one of the same model no newer than
    /// the one the store holds.
    #[test]
    fn a_snapshot_of_a_model_a_rebuild_replaced_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        register(&store, "p");
        let again = Projections::open(&store, 3).unwrap();
        let before = again.encode_snapshot();
        register(&store, "q");
        assert_eq!(again.rebuild().unwrap(), 2);
        let stored = || store.load_snapshot(SNAPSHOT_NAME).unwrap().unwrap();
        let rebuilt = stored();
        assert_eq!(rebuilt.0, Some(1));
        // Of the replaced model, even claiming a later checkpoint: not written.
        let claims_later = Encoded {
            checkpoint: Some(9),
            ..before
        };
        again.write_snapshot(claims_later).unwrap();
        assert_eq!(stored(), rebuilt, "the rebuild's snapshot stays");
        // Of this model but older than the stored one: not written either.
        let older = Encoded {
            checkpoint: Some(0),
            ..again.encode_snapshot()
        };
        again.write_snapshot(older).unwrap();
        assert_eq!(stored(), rebuilt);
        store.close();
    }
}
