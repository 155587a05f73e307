//! The publish read model: per-product state, counters, the failed set, stuck lists, the
//! automatic publisher's due set and failure times. Every index is kept up to date on each
//! event (or, in a fold of a whole log, built once at its end), so a status read is O(1),
//! a failed page O(limit) and a stuck list O(result), whatever the length of history.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::product::{Checksum, ProductEvent, ProductFact, ProductState, ProductStatus};
use crate::events::RecordedEvent;
use crate::events::catalogue::{
    ProductRegistered, PublishFailed, PublishStarted, PublishSucceeded,
};
use crate::events::store::{SnapshotReader, damaged_snapshot};

pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// An event that could not be folded: kept aside with its reason, never fatal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    pub position: u64,
    pub stream_id: String,
    pub event_type: String,
    pub reason: String,
}

/// Most parked events kept in full (the count goes on).
const MAX_PARKED_KEPT: usize = 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub published: u64,
    pub staging: u64,
    pub publishing: u64,
    /// In staging after at least one failed attempt.
    pub failed: u64,
    /// Failed with `publish_attempts >= max_attempts`.
    pub max_attempts_exceeded: u64,
}

/// Index entries one product contributes; recomputed around every event it receives.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Entries {
    failed: Option<(u32, i64)>,
    staging_since: Option<i64>,
    publishing_since: Option<i64>,
    due_at: Option<i64>,
}

/// The entries of the four ordered indexes, as [`PublishModel::index_all`] gathers them.
#[derive(Default)]
struct Found {
    failed: Vec<(u32, i64, Id)>,
    staging: Vec<(i64, Id)>,
    publishing: Vec<(i64, Id)>,
    due: Vec<(i64, Id)>,
}

/// A failed product's key in the failed index: most attempts first, then oldest failure.
fn failed_key(id: &Id, (attempts, at): (u32, i64)) -> (u32, i64, Id) {
    (u32::MAX - attempts, at, id.clone())
}

/// What is persisted in a snapshot; the indexes are rebuilt from it on load. Encoded
/// with bincode's standard configuration after the 8 bytes of [`Self::format`]; read back
/// by [`Self::read`], segment by segment as the store yields them.
#[derive(Serialize)]
pub struct PublishSnapshot {
    pub max_attempts: u32,
    /// Boxed as the model keeps them, so a load moves each state in without a copy.
    pub products: Segments,
    pub tail: SnapshotTail<'static>,
}

/// What a snapshot holds after its products (bincode writes a nested struct's fields in
/// place, so this is the same encoding as the fields themselves). Borrowed when the model
/// encodes itself, owned when a snapshot is read.
#[derive(Serialize, Deserialize)]
pub struct SnapshotTail<'a> {
    pub failure_times: std::borrow::Cow<'a, [i64]>,
    pub parked: std::borrow::Cow<'a, [Parked]>,
    pub parked_total: u64,
    pub last_position: Option<u64>,
    pub last_time: i64,
}

impl PublishSnapshot {
    /// The snapshot's format, derived from the type itself: the first bytes of the BLAKE3
    /// of a sample with every field (and every optional field of a product) filled in,
    /// encoded as snapshots are. Adding, removing, reordering or retyping a field changes
    /// it, so a snapshot written by another version is replayed from the log instead of
    /// being misread.
    pub fn format() -> [u8; 8] {
        static FORMAT: std::sync::OnceLock<[u8; 8]> = std::sync::OnceLock::new();
        *FORMAT.get_or_init(|| {
            let registered = ProductRegistered {
                data_id: "i".into(),
                data_type: "t".into(),
                stage_path: "s".into(),
                checksum: Some("c".into()),
                size_bytes: Some(1),
                qa_status: Some("q".into()),
                validation_status: Some("v".into()),
                auto_publish: true,
                metadata: [("k".to_string(), "v".to_string())].into_iter().collect(),
            };
            let mut product = ProductState::start(ProductEvent::Registered(registered), 5, 0)
                .expect("a registration starts a product");
            // A destination beside the staged name, and a published path that is not.
            let started = PublishStarted {
                attempt: 1,
                destination: "d/s".into(),
                trigger: "auto".into(),
            };
            product.apply(ProductEvent::PublishStarted(started.clone()), 6, 1);
            product.apply(
                ProductEvent::PublishSucceeded(PublishSucceeded {
                    published_path: "p".into(),
                    checksum: None,
                    duration_ms: 1,
                    recovered: false,
                }),
                7,
                2,
            );
            product.apply(ProductEvent::PublishStarted(started.clone()), 8, 3);
            product.apply(
                ProductEvent::PublishFailed(PublishFailed {
                    attempt: 2,
                    error: "e".into(),
                    retryable: true,
                    interrupted: false,
                    next_retry_at: Some("2026-01-01T00:00:00Z".into()),
                }),
                9,
                4,
            );
            product.apply(ProductEvent::PublishStarted(started.clone()), 10, 5);
            product.checksum = Some(Checksum::Hex([0; 32]));
            // Every optional field filled in, the failure's retry time included.
            product.failure.as_mut().expect("failed once").next_retry_at = Some(11);
            assert!(product.publishing_since().is_some() && product.published_at().is_some());
            // A second product for the other variants: a checksum kept as text, a
            // destination kept whole and a published path beside the staged name.
            let mut other = product.clone();
            other.checksum = Some(Checksum::Text("c".into()));
            other.apply(
                ProductEvent::PublishStarted(PublishStarted {
                    destination: "d".into(),
                    ..started
                }),
                12,
                6,
            );
            other.apply(
                ProductEvent::PublishSucceeded(PublishSucceeded {
                    published_path: "p/s".into(),
                    checksum: None,
                    duration_ms: 1,
                    recovered: false,
                }),
                13,
                7,
            );
            let sample = PublishSnapshot {
                max_attempts: 3,
                products: Segments(vec![Box::new(product), Box::new(other)]),
                tail: SnapshotTail {
                    failure_times: vec![11].into(),
                    parked: vec![Parked {
                        position: 12,
                        stream_id: "product-i".into(),
                        event_type: "x".into(),
                        reason: "r".into(),
                    }]
                    .into(),
                    parked_total: 13,
                    last_position: Some(14),
                    last_time: 15,
                },
            };
            let bytes = bincode::serde::encode_to_vec(&sample, bincode::config::standard())
                .expect("encoding into a Vec cannot fail");
            let mut h = blake3::Hasher::new();
            h.update(std::any::type_name::<PublishSnapshot>().as_bytes());
            h.update(&bytes);
            let mut out = [0u8; 8];
            out.copy_from_slice(&h.finalize().as_bytes()[..8]);
            out
        })
    }
}

/// Products a snapshot segment holds: enough that a million products make about sixty
/// segments, few enough that two threads share the decoding evenly.
const SEGMENT_PRODUCTS: usize = 16_384;

/// The products of a snapshot, encoded as a sequence of byte strings, each the encoding
/// of up to [`SEGMENT_PRODUCTS`] states: a load reads each segment as the store yields it
/// and decodes segments side by side (most of a start from a snapshot is allocating and
/// filling the states), never holding the whole snapshot's bytes (on sled).
pub struct Segments(pub Vec<Box<ProductState>>);

impl Segments {
    /// Serializes `products` as segments: what [`Segments`] holds, written from wherever
    /// the states are.
    fn serialize_from<'a, S: serde::Serializer>(
        products: impl ExactSizeIterator<Item = &'a ProductState>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        struct Bytes<'b>(&'b [u8]);
        impl Serialize for Bytes<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        let mut seq = s.serialize_seq(Some(products.len().div_ceil(SEGMENT_PRODUCTS)))?;
        let mut segment = Vec::with_capacity(SEGMENT_PRODUCTS);
        let mut bytes = Vec::new();
        let mut products = products.peekable();
        while products.peek().is_some() {
            segment.clear();
            segment.extend(products.by_ref().take(SEGMENT_PRODUCTS));
            bytes.clear();
            bincode::serde::encode_into_std_write(
                &segment,
                &mut bytes,
                bincode::config::standard(),
            )
            .map_err(S::Error::custom)?;
            seq.serialize_element(&Bytes(&bytes))?;
        }
        seq.end()
    }
}

impl Serialize for Segments {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Self::serialize_from(self.0.iter().map(|p| &**p), s)
    }
}

impl PublishSnapshot {
    /// Reads a snapshot as [`PublishModel::encode_snapshot`] wrote it, from the store's
    /// reader: `None` when it begins with another [`Self::format`]. Segments are decoded
    /// by a helper thread while this one reads the next (and by this one when the helper
    /// is busy), in buffers used again, so a load from sled touches the states' memory and
    /// a few segments', not the snapshot's size besides. Segment counts and lengths are
    /// held to what the store says is left, and each segment must be used up exactly
    /// ([`decode_whole`]). A damaged snapshot fails with `InvalidData`.
    pub fn read(r: &mut SnapshotReader) -> std::io::Result<Option<PublishSnapshot>> {
        let mut format = [0u8; 8];
        if r.remaining() < 8 {
            return Ok(None);
        }
        r.read_exact(&mut format)?;
        if format != Self::format() {
            return Ok(None);
        }
        let max_attempts: u32 = decode_from(r)?;
        let products = Segments::read(r)?;
        let mut rest = Vec::with_capacity(r.remaining().min(1 << 20) as usize);
        r.read_to_end(&mut rest)?;
        let tail = decode_whole::<SnapshotTail<'static>>(&rest)?;
        Ok(Some(PublishSnapshot {
            max_attempts,
            products,
            tail,
        }))
    }
}

/// A value that must use up `bytes` exactly (a damaged count inside would otherwise
/// decode fewer states and leave the rest unread), with strings held to 1 GiB: bincode
/// allocates a string before it reads it, and a damaged length must not abort the
/// process. A panic while decoding is a damaged snapshot too: the log is replayed.
fn decode_whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::io::Result<T> {
    let config = bincode::config::standard().with_limit::<{ 1 << 30 }>();
    let decoded =
        std::panic::catch_unwind(|| bincode::serde::decode_from_slice::<T, _>(bytes, config))
            .map_err(|_| damaged_snapshot("decoding it panicked"))?;
    match decoded {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(damaged_snapshot(format_args!(
            "{} bytes left over of {}",
            bytes.len() - used,
            bytes.len()
        ))),
        Err(e) => Err(damaged_snapshot(e)),
    }
}

/// One value of bincode's standard encoding (an integer here), read from the snapshot.
fn decode_from<T: bincode::Decode<()>>(r: &mut SnapshotReader) -> std::io::Result<T> {
    bincode::decode_from_std_read(r, bincode::config::standard()).map_err(|e| match e {
        bincode::error::DecodeError::Io { inner, .. }
            if inner.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            inner
        }
        other => damaged_snapshot(other),
    })
}

impl Segments {
    fn read(r: &mut SnapshotReader) -> std::io::Result<Segments> {
        use std::sync::mpsc;
        let count: u64 = decode_from(r)?;
        // Each segment takes one byte at least.
        if count > r.remaining() {
            return Err(damaged_snapshot(format_args!("{count} segments")));
        }
        // Boxed as the model keeps them: a load moves each state in without a copy.
        #[allow(clippy::vec_box)]
        fn decode(bytes: &[u8]) -> std::io::Result<Vec<Box<ProductState>>> {
            decode_whole(bytes)
        }
        type Decoded = Vec<(u64, Vec<Box<ProductState>>)>;
        // One segment waits for the helper thread at most: when it has no room, this
        // thread decodes the segment it has just read itself. Two threads, as the states
        // of a fold are allocated (a third would keep an allocator heap of its own).
        let (to_helper, queue) = mpsc::sync_channel::<(u64, Vec<u8>)>(1);
        let (give_back, returned) = mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| {
            // The helper owns the queue: were it to stop, the queue would close and the
            // reading below decode everything itself.
            let helper = scope.spawn(move || {
                let mut out: Decoded = Vec::new();
                let mut failed = None;
                for (i, bytes) in queue {
                    if failed.is_none() {
                        match decode(&bytes) {
                            Ok(products) => out.push((i, products)),
                            Err(e) => failed = Some(e),
                        }
                    }
                    let _ = give_back.send(bytes);
                }
                failed.map_or(Ok(out), Err)
            });
            let mut decoded: Decoded = Vec::new();
            let mut spare = Vec::new();
            let read = (|| {
                for i in 0..count {
                    let len: u64 = decode_from(r)?;
                    if len > r.remaining() {
                        return Err(damaged_snapshot(format_args!("a segment of {len} bytes")));
                    }
                    let mut bytes = returned
                        .try_recv()
                        .unwrap_or_else(|_| std::mem::take(&mut spare));
                    bytes.clear();
                    bytes.reserve(len.min(64 << 20) as usize);
                    r.by_ref().take(len).read_to_end(&mut bytes)?;
                    match to_helper.try_send((i, bytes)) {
                        Ok(()) => {}
                        Err(mpsc::TrySendError::Full((i, bytes)))
                        | Err(mpsc::TrySendError::Disconnected((i, bytes))) => {
                            decoded.push((i, decode(&bytes)?));
                            spare = bytes;
                        }
                    }
                }
                Ok(())
            })();
            drop(to_helper);
            let mut failed = read.err();
            match helper.join() {
                Ok(Ok(part)) => decoded.extend(part),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => {
                    failed = failed.or(Some(damaged_snapshot(
                        "the thread decoding segments stopped",
                    )))
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if decoded.len() as u64 != count {
                return Err(damaged_snapshot("segments missing"));
            }
            decoded.sort_unstable_by_key(|(i, _)| *i);
            let mut products = Vec::with_capacity(decoded.iter().map(|(_, p)| p.len()).sum());
            for (_, p) in decoded {
                products.extend(p);
            }
            Ok(Segments(products))
        })
    }
}

/// A product id shared by the map and every index (a reference count, not a copy).
type Id = Arc<str>;

/// The products, each filed under its own `data_id`: a slot of the table holds the box's
/// pointer alone (8 bytes, where a map kept a 16-byte key beside it: 32 MB at a million
/// products, whose table has two million slots). Boxed, so that growing the table moves
/// pointers rather than whole states; hashed with foldhash (randomly seeded, several
/// times faster than SipHash on short ids).
#[derive(Clone, Default)]
struct Products {
    table: hashbrown::HashTable<Box<ProductState>>,
    hasher: foldhash::fast::RandomState,
}

impl Products {
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn get(&self, id: &str) -> Option<&ProductState> {
        self.table
            .find(self.hash(id), |p| &*p.data_id == id)
            .map(|p| &**p)
    }

    /// A product to change. Its `data_id`, under which it is filed, must stay as it is.
    fn get_mut(&mut self, id: &str) -> Option<&mut ProductState> {
        let hash = self.hash(id);
        self.table
            .find_mut(hash, |p| &*p.data_id == id)
            .map(|p| &mut **p)
    }

    /// Files a product under its id, in place of one filed there before.
    fn insert(&mut self, p: Box<ProductState>) {
        let hasher = &self.hasher;
        match self.table.entry(
            hasher.hash_one(&*p.data_id),
            |q| q.data_id == p.data_id,
            |q| hasher.hash_one(&*q.data_id),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = p,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(p);
            }
        }
    }

    fn reserve(&mut self, additional: usize) {
        let hasher = &self.hasher;
        self.table
            .reserve(additional, |p| hasher.hash_one(&*p.data_id));
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn values(&self) -> impl ExactSizeIterator<Item = &ProductState> {
        self.table.iter().map(|p| &**p)
    }
}

/// The same products, in whatever order.
impl PartialEq for Products {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.values().all(|p| other.get(&p.data_id) == Some(p))
    }
}

impl std::fmt::Debug for Products {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values()).finish()
    }
}

/// Equality is of the whole model, every index and counter included ("a rebuild equals
/// the live model" means all of it).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishModel {
    max_attempts: u32,
    products: Products,
    counts: Counts,
    /// (u32::MAX - attempts, last failure time, id): most attempts first, then oldest.
    failed: BTreeSet<(u32, i64, Id)>,
    staging_by_age: BTreeSet<(i64, Id)>,
    publishing_by_age: BTreeSet<(i64, Id)>,
    /// When the automatic publisher should act on each product.
    due: BTreeSet<(i64, Id)>,
    /// Commit times of every `PublishFailed`, in order.
    failure_times: Vec<i64>,
    parked: Vec<Parked>,
    parked_total: u64,
    last_position: Option<u64>,
    /// Commit time of the last event folded.
    last_time: i64,
    /// False while a bulk fold leaves the ordered indexes above empty
    /// ([`PublishModel::defer_indexes`]); [`PublishModel::index_all`] builds them.
    indexed: bool,
}

impl PublishModel {
    pub fn new(max_attempts: u32) -> Self {
        PublishModel {
            max_attempts,
            products: Products::default(),
            counts: Counts::default(),
            failed: BTreeSet::new(),
            staging_by_age: BTreeSet::new(),
            publishing_by_age: BTreeSet::new(),
            due: BTreeSet::new(),
            failure_times: Vec::new(),
            parked: Vec::new(),
            parked_total: 0,
            last_position: None,
            last_time: i64::MIN,
            indexed: true,
        }
    }

    /// Leaves the ordered indexes (failed, staging, publishing, due) empty while products
    /// are folded in, until [`PublishModel::index_all`] builds them in one pass: for a fold
    /// of a whole log, where keeping them in order event by event (a B-tree insert and
    /// remove as each product moves) was over half of the fold's own thread. The counts
    /// are kept as usual. Queries of the indexes must wait for `index_all` (debug builds
    /// assert it).
    pub(crate) fn defer_indexes(&mut self) {
        if self.indexed {
            self.indexed = false;
            self.failed.clear();
            self.staging_by_age.clear();
            self.publishing_by_age.clear();
            self.due.clear();
        }
    }

    /// Builds the ordered indexes from every product's standing, after
    /// [`PublishModel::defer_indexes`]; nothing to do otherwise. The entries are those
    /// [`PublishModel::reindex`] keeps event by event: each comes from the same
    /// `standing` and the same keys.
    ///
    /// Reading every state is most of the work (each one a miss of the processor's
    /// caches: 0.4 s for three million products here), and nothing else runs meanwhile,
    /// so a second thread reads every other product. Where the system gives no thread,
    /// this one reads them all.
    pub(crate) fn index_all(&mut self) {
        if self.indexed {
            return;
        }
        self.indexed = true;
        let (products, max) = (&self.products, self.max_attempts);
        let entries = move |part: usize, parts: usize| {
            let mut found = Found::default();
            for p in products.values().skip(part).step_by(parts) {
                let (e, _) = Self::standing(p, max);
                let id = &p.data_id;
                found.failed.extend(e.failed.map(|f| failed_key(id, f)));
                found
                    .staging
                    .extend(e.staging_since.map(|at| (at, id.clone())));
                found
                    .publishing
                    .extend(e.publishing_since.map(|at| (at, id.clone())));
                found.due.extend(e.due_at.map(|at| (at, id.clone())));
            }
            found
        };
        let found = std::thread::scope(|scope| {
            match std::thread::Builder::new().spawn_scoped(scope, move || entries(1, 2)) {
                Ok(other) => {
                    let mut found = entries(0, 2);
                    // A panic there is one here: no index is built from half the products.
                    let theirs = other
                        .join()
                        .unwrap_or_else(|e| std::panic::resume_unwind(e));
                    found.failed.extend(theirs.failed);
                    found.staging.extend(theirs.staging);
                    found.publishing.extend(theirs.publishing);
                    found.due.extend(theirs.due);
                    found
                }
                Err(_) => entries(0, 1),
            }
        });
        // Collected from a sorted vector, a B-tree is built leaf by leaf.
        fn sorted<T: Ord>(mut v: Vec<T>) -> BTreeSet<T> {
            v.sort_unstable();
            v.into_iter().collect()
        }
        self.failed = sorted(found.failed);
        self.staging_by_age = sorted(found.staging);
        self.publishing_by_age = sorted(found.publishing);
        self.due = sorted(found.due);
    }

    /// Room for `products` more products without growing the map on the way.
    pub fn reserve(&mut self, products: usize) {
        self.products.reserve(products);
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Position of the last event folded.
    pub fn last_position(&self) -> Option<u64> {
        self.last_position
    }

    pub fn last_time(&self) -> i64 {
        self.last_time
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    pub fn product(&self, id: &str) -> Option<&ProductState> {
        self.products.get(id)
    }

    pub fn product_count(&self) -> usize {
        self.products.len()
    }

    pub fn parked(&self) -> (&[Parked], u64) {
        (&self.parked, self.parked_total)
    }

    /// Where a product stands: its index entries, and which counters it is in (status,
    /// failed, attempts exhausted).
    fn standing(p: &ProductState, max_attempts: u32) -> (Entries, (ProductStatus, bool, bool)) {
        let entries = Entries {
            failed: p.is_failed().then(|| {
                (
                    p.publish_attempts,
                    p.last_failure_at().unwrap_or(p.created_at),
                )
            }),
            staging_since: (p.status == ProductStatus::Staging).then_some(p.created_at),
            publishing_since: p.publishing_since(),
            due_at: p.auto_due_at(max_attempts),
        };
        let flags = (p.status, p.is_failed(), p.attempts_exhausted(max_attempts));
        (entries, flags)
    }

    /// Files a product the model does not hold yet.
    fn add(&mut self, p: Box<ProductState>) {
        let (entries, flags) = Self::standing(&p, self.max_attempts);
        self.count(flags, 1);
        self.reindex(&p.data_id, Entries::default(), entries);
        self.products.insert(p);
    }

    fn count(&mut self, (status, failed, exhausted): (ProductStatus, bool, bool), sign: i64) {
        let bump = |c: &mut u64| {
            *c = if sign > 0 {
                *c + 1
            } else {
                c.saturating_sub(1)
            };
        };
        match status {
            ProductStatus::Staging => bump(&mut self.counts.staging),
            ProductStatus::Publishing => bump(&mut self.counts.publishing),
            ProductStatus::Published => bump(&mut self.counts.published),
        }
        if failed {
            bump(&mut self.counts.failed);
        }
        if exhausted {
            bump(&mut self.counts.max_attempts_exceeded);
        }
    }

    /// Moves a product's index entries from `before` to `after`, touching only the
    /// indexes whose entry changed; nothing while the indexes are deferred
    /// ([`PublishModel::defer_indexes`]).
    fn reindex(&mut self, id: &Id, before: Entries, after: Entries) {
        if !self.indexed {
            return;
        }
        if before.failed != after.failed {
            if let Some(f) = before.failed {
                self.failed.remove(&failed_key(id, f));
            }
            if let Some(f) = after.failed {
                self.failed.insert(failed_key(id, f));
            }
        }
        fn swap(set: &mut BTreeSet<(i64, Id)>, id: &Id, before: Option<i64>, after: Option<i64>) {
            if before != after {
                if let Some(at) = before {
                    set.remove(&(at, id.clone()));
                }
                if let Some(at) = after {
                    set.insert((at, id.clone()));
                }
            }
        }
        swap(
            &mut self.staging_by_age,
            id,
            before.staging_since,
            after.staging_since,
        );
        swap(
            &mut self.publishing_by_age,
            id,
            before.publishing_since,
            after.publishing_since,
        );
        swap(&mut self.due, id, before.due_at, after.due_at);
    }

    fn park(&mut self, r: &RecordedEvent, event_type: &str, reason: String) {
        tracing::warn!(position = r.position, stream = %r.stream_id, %reason, "parked a poison event");
        self.parked_total += 1;
        if self.parked.len() < MAX_PARKED_KEPT {
            self.parked.push(Parked {
                position: r.position,
                stream_id: r.stream_id.clone(),
                event_type: event_type.to_string(),
                reason,
            });
        }
    }

    /// Folds one event. Never fails: an event that cannot be folded is parked.
    pub fn apply(&mut self, r: &RecordedEvent) {
        self.apply_decoded(r, ProductFact::decode_view(&r.view()));
    }

    /// Folds one event whose product fact was decoded already (perhaps on another thread,
    /// see `projections::fold_source`); `r.data` is not read again.
    pub fn apply_decoded(&mut self, r: &RecordedEvent, decoded: super::fold::Decoded) {
        self.last_position = Some(r.position);
        self.last_time = self.last_time.max(r.created_micros);
        let event = match decoded {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(reason) => return self.park(r, &r.event_type, reason),
        };
        if matches!(event, ProductFact::PublishFailed { .. }) {
            self.failure_times.push(r.created_micros);
        }
        let id = crate::events::record::entity_of(&r.stream_id);
        let max = self.max_attempts;
        if let Some(p) = self.products.get_mut(id) {
            let (before, before_flags) = Self::standing(p, max);
            p.apply_fact(event, r.created_micros, r.revision);
            let (after, after_flags) = Self::standing(p, max);
            // The key is needed only while the indexes are kept event by event.
            let key = self.indexed.then(|| p.data_id.clone());
            self.count(before_flags, -1);
            self.count(after_flags, 1);
            if let Some(key) = key {
                self.reindex(&key, before, after);
            }
        } else {
            match event {
                // Filed under the stream's id (`ProductFact::decode_view`).
                ProductFact::Registered(p) => self.add(p),
                other => {
                    let ty = other.type_name();
                    self.park(r, ty, format!("{ty} before ProductRegistered"));
                }
            }
        }
    }

    /// `round(published / (published + failed) * 100, 2)`, 100 when nothing counts.
    pub fn success_rate_percent(&self) -> f64 {
        let (p, f) = (self.counts.published as f64, self.counts.failed as f64);
        if p + f == 0.0 {
            100.0
        } else {
            (p / (p + f) * 10000.0).round() / 100.0
        }
    }

    /// Failures whose commit time lies in `(now - window, now]`.
    pub fn failures_within(&self, now: i64, window: i64) -> u64 {
        let lo = self.failure_times.partition_point(|&t| t <= now - window);
        let hi = self.failure_times.partition_point(|&t| t <= now);
        (hi - lo) as u64
    }

    /// The failed set, most attempts first then oldest failure; `max_attempts` keeps only
    /// products with fewer attempts than it. O(limit) without the filter.
    pub fn failed(&self, max_attempts: Option<u32>, limit: usize) -> Vec<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.failed
            .iter()
            .filter(|(inv, _, _)| max_attempts.is_none_or(|m| u32::MAX - inv < m))
            .take(limit)
            .filter_map(|(_, _, id)| self.products.get(id))
            .collect()
    }

    /// Products in staging since before `cutoff`, oldest first.
    pub fn stuck_staging(&self, cutoff: i64) -> Vec<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.staging_by_age
            .iter()
            .take_while(|(at, _)| *at < cutoff)
            .filter_map(|(_, id)| self.products.get(id))
            .collect()
    }

    /// Products publishing since before `cutoff`, oldest first.
    pub fn stuck_publishing(&self, cutoff: i64) -> Vec<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.publishing_by_age
            .iter()
            .take_while(|(at, _)| *at < cutoff)
            .filter_map(|(_, id)| self.products.get(id))
            .collect()
    }

    /// The oldest product in staging, if any.
    pub fn oldest_staging(&self) -> Option<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.staging_by_age
            .first()
            .and_then(|(_, id)| self.products.get(id))
    }

    /// Ids the automatic publisher should try at `now`, soonest first.
    pub fn due(&self, now: i64, limit: usize) -> Vec<String> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .map(|(_, id)| id.to_string())
            .collect()
    }

    /// A product not yet published, other than `except`, staged at `path`, inside it, or
    /// holding it: publishing either would carry the other's files away.
    pub fn unpublished_overlapping(&self, path: &str, except: &str) -> Option<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.staging_by_age
            .iter()
            .chain(self.publishing_by_age.iter())
            .filter_map(|(_, id)| self.products.get(id))
            .find(|p| &*p.data_id != except && paths_overlap(&p.stage_path, path))
    }

    /// Every product currently publishing (crash recovery).
    pub fn publishing(&self) -> Vec<&ProductState> {
        debug_assert!(self.indexed, "the indexes are deferred");
        self.publishing_by_age
            .iter()
            .filter_map(|(_, id)| self.products.get(id))
            .collect()
    }

    /// The snapshot as an owned value: what [`Self::encode_snapshot`] must encode the same
    /// (its test compares the two).
    #[cfg(test)]
    fn snapshot(&self) -> PublishSnapshot {
        let tail = self.tail();
        PublishSnapshot {
            max_attempts: self.max_attempts,
            products: Segments(
                self.products
                    .values()
                    .map(|p| Box::new(p.clone()))
                    .collect(),
            ),
            tail: SnapshotTail {
                failure_times: tail.failure_times.into_owned().into(),
                parked: tail.parked.into_owned().into(),
                ..tail
            },
        }
    }

    /// What a snapshot holds after the products, borrowed from the model.
    fn tail(&self) -> SnapshotTail<'_> {
        SnapshotTail {
            failure_times: (&self.failure_times[..]).into(),
            parked: (&self.parked[..]).into(),
            parked_total: self.parked_total,
            last_position: self.last_position,
            last_time: self.last_time,
        }
    }

    /// Encodes the model as a [`PublishSnapshot`] would be (the same bytes), straight from
    /// the model: no copy of a million product states on the way.
    pub fn encode_snapshot(&self, out: &mut Vec<u8>) {
        struct ProductsView<'a>(&'a Products);
        impl Serialize for ProductsView<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                Segments::serialize_from(self.0.values(), s)
            }
        }
        #[derive(Serialize)]
        struct View<'a> {
            max_attempts: u32,
            products: ProductsView<'a>,
            tail: SnapshotTail<'a>,
        }
        let view = View {
            max_attempts: self.max_attempts,
            products: ProductsView(&self.products),
            tail: self.tail(),
        };
        bincode::serde::encode_into_std_write(view, out, bincode::config::standard())
            .expect("encoding into a Vec cannot fail");
    }

    /// The model a snapshot holds, indexed for `max_attempts` (which may differ from the
    /// one the snapshot was taken with).
    pub fn from_snapshot(s: PublishSnapshot, max_attempts: u32) -> Self {
        let mut m = PublishModel::new(max_attempts);
        m.reserve(s.products.0.len());
        m.defer_indexes();
        for p in s.products.0 {
            m.add(p);
        }
        m.index_all();
        m.failure_times = s.tail.failure_times.into_owned();
        m.parked = s.tail.parked.into_owned();
        m.parked_total = s.tail.parked_total;
        m.last_position = s.tail.last_position;
        m.last_time = s.tail.last_time;
        m
    }
}

/// Whether two staged paths share files: the same path, or one a folder holding the other.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let inside =
        |a: &str, b: &str| a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'/';
    a == b || inside(a, b) || inside(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::catalogue::{
        DomainEvent, EventMetadata, ProductRegistered, PublishFailed, PublishStarted,
        PublishSucceeded, RetryRequested,
    };

    const T0: i64 = 1_796_000_000_000_000;
    const SEC: i64 = 1_000_000;

    /// The log being given, one event at a time, with positions and revisions kept.
    struct Given {
        model: PublishModel,
        next: u64,
        heads: std::collections::HashMap<String, u64>,
    }

    impl Given {
        fn new() -> Self {
            Given {
                model: PublishModel::new(3),
                next: 0,
                heads: std::collections::HashMap::new(),
            }
        }

        fn event<E: DomainEvent>(&mut self, id: &str, e: E, at: i64) -> &mut Self {
            let stream = format!("product-{id}");
            let revision = self.heads.get(&stream).map_or(0, |h| h + 1);
            self.heads.insert(stream.clone(), revision);
            let p = e.to_proposed(&EventMetadata::actor("test"));
            let r = RecordedEvent {
                event_id: p.event_id,
                stream_id: stream,
                revision,
                position: self.next,
                event_type: p.event_type,
                event_version: p.event_version,
                data: p.data,
                metadata: p.metadata,
                created_micros: at,
                checksum: 0,
            };
            self.next += 1;
            self.model.apply(&r);
            self
        }

        fn registered(&mut self, id: &str, at: i64) -> &mut Self {
            let r = ProductRegistered {
                data_id: id.into(),
                data_type: "image".into(),
                stage_path: format!("/stage/{id}.fits"),
                checksum: Some("c".into()),
                size_bytes: Some(1),
                qa_status: Some("passed".into()),
                validation_status: Some("validated".into()),
                auto_publish: true,
                metadata: Default::default(),
            };
            self.event(id, r, at)
        }

        fn attempt(&mut self, id: &str, n: u32, at: i64, next_retry: Option<i64>) -> &mut Self {
            let started = PublishStarted {
                attempt: n,
                destination: "/p".into(),
                trigger: "auto".into(),
            };
            self.event(id, started, at);
            let failed = PublishFailed {
                attempt: n,
                error: "disk full".into(),
                retryable: true,
                interrupted: false,
                next_retry_at: next_retry.map(|t| {
                    crate::events::record::format_time(crate::events::record::micros_to_datetime(t))
                }),
            };
            self.event(id, failed, at)
        }
    }

    fn ids(v: Vec<&ProductState>) -> Vec<&str> {
        v.into_iter().map(|p| &*p.data_id).collect()
    }

    /// The snapshot encoded straight from the model is byte for byte the encoding of
    /// the owned snapshot, and loads back into the same model.
    #[test]
    fn the_borrowed_snapshot_encoding_is_the_owned_one() {
        let mut g = Given::new();
        g.registered("a", T0).registered("b", T0 + SEC);
        g.attempt("b", 1, T0 + 2 * SEC, Some(T0 + 60 * SEC));
        let mut borrowed = Vec::new();
        g.model.encode_snapshot(&mut borrowed);
        let owned =
            bincode::serde::encode_to_vec(g.model.snapshot(), bincode::config::standard()).unwrap();
        assert_eq!(borrowed, owned);
        let back = read_back(&borrowed).unwrap().unwrap();
        let back = PublishModel::from_snapshot(back, 3);
        assert_eq!(ids(back.failed(None, 10)), vec!["b"]);
        assert_eq!(back.product("a"), g.model.product("a"));
        assert_eq!(back.product("b"), g.model.product("b"));
    }

    /// A snapshot of more products than one segment holds decodes (on two threads,
    /// segment by segment) into the same model, every index and counter included.
    #[test]
    fn a_snapshot_of_many_segments_loads_into_the_same_model() {
        let mut g = Given::new();
        let n = 2 * SEGMENT_PRODUCTS + 1_000;
        for i in 0..n {
            g.registered(&format!("p{i}"), T0 + i as i64);
            if i % 7 == 0 {
                g.attempt(
                    &format!("p{i}"),
                    1,
                    T0 + SEC + i as i64,
                    Some(T0 + 60 * SEC),
                );
            }
        }
        let mut bytes = Vec::new();
        g.model.encode_snapshot(&mut bytes);
        let back = read_back(&bytes).unwrap().unwrap();
        assert_eq!(back.products.0.len(), n);
        let back = PublishModel::from_snapshot(back, 3);
        assert_eq!(back, g.model);
        // Damaged, cut short, or longer than its encoding: an error that says so, not a
        // panic, a hang, or a model with products missing.
        let damaged = |bytes: &[u8]| {
            let e = read_back(bytes)
                .err()
                .expect("a damaged snapshot is refused");
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        };
        let mut spoilt = bytes.clone();
        let cut = bytes.len() / 2;
        spoilt[cut..cut + 64].fill(0xFF);
        damaged(&spoilt);
        for cut in [1, 3, bytes.len() / 3, bytes.len() - 1] {
            damaged(&bytes[..cut]);
        }
        // A segment count or length far past what is stored (after `max_attempts`).
        let refused = |bytes: &[u8], why: &str| {
            let e = read_back(bytes)
                .err()
                .expect("a damaged snapshot is refused");
            assert!(e.to_string().contains(why), "{e}");
        };
        let mut huge = bytes[..1].to_vec();
        huge.extend_from_slice(&[253, 0, 0, 0, 0, 0, 0, 0, 64]);
        refused(&huge, "segments");
        let mut huge = bytes[..1].to_vec();
        huge.extend_from_slice(&[1, 253, 0, 0, 0, 0, 0, 0, 0, 64]);
        refused(&huge, "a segment of");
        // The first segment (always the helper thread's) begins after `max_attempts`, the
        // segment count and its length (252: a u32 follows), with its count of states.
        assert_eq!(bytes[2], 252);
        assert_eq!(bytes[7..10], [251, 0, 64], "16,384 states");
        // Damaged inside: refused by the helper thread.
        let mut spoilt = bytes.clone();
        spoilt[20..84].fill(0xFF);
        damaged(&spoilt);
        // A count of states that is too small decodes, but leaves bytes over.
        let mut spoilt = bytes.clone();
        spoilt[9] = 63;
        refused(&spoilt, "left over");
        // A string's length far past the segment, or past 1 GiB, with the segment's
        // own length made to agree: refused, not an allocation that aborts.
        let mut one = Given::new();
        one.registered("x", T0);
        let mut small = Vec::new();
        one.model.encode_snapshot(&mut small);
        let at = small
            .windows(2)
            .position(|w| w == [1, b'x'])
            .expect("the id \"x\", its length first");
        // (1 TiB: were it allocated, the process would abort.)
        let lengths: [&[u8]; 3] = [
            &[252, 1, 0, 0, 64],
            &[252, 255, 255, 255, 255],
            &[253, 0, 0, 0, 0, 0, 1, 0, 0],
        ];
        for len in lengths {
            let mut spoilt = small[..at].to_vec();
            spoilt.extend_from_slice(len);
            spoilt.extend_from_slice(&small[at + 1..]);
            // The segment's length (one byte here, at 2) grows by the bytes added.
            assert!(small[2] < 200);
            spoilt[2] += len.len() as u8 - 1;
            damaged(&spoilt);
        }
        // Another format is no snapshot, not an error.
        let mut other = PublishSnapshot::format();
        other[0] ^= 1;
        assert!(read_back_as(other, &bytes).unwrap().is_none());
    }

    /// The format's fingerprint as snapshots on disk carry it. Change this constant only
    /// when the snapshot's encoding changes on purpose: every snapshot saved before is
    /// then replayed from the log once, at the next start.
    #[test]
    fn the_snapshot_format_is_the_one_snapshots_on_disk_carry() {
        assert_eq!(
            PublishSnapshot::format(),
            [254, 216, 44, 221, 41, 197, 214, 241]
        );
    }

    /// A snapshot's bytes (format first) read back as the store's reader yields them.
    fn read_back(encoded: &[u8]) -> std::io::Result<Option<PublishSnapshot>> {
        read_back_as(PublishSnapshot::format(), encoded)
    }

    fn read_back_as(format: [u8; 8], encoded: &[u8]) -> std::io::Result<Option<PublishSnapshot>> {
        let mut bytes = format.to_vec();
        bytes.extend_from_slice(encoded);
        let len = bytes.len() as u64;
        let mut r = SnapshotReader::new(Some(0), len, Box::new(std::io::Cursor::new(bytes)));
        PublishSnapshot::read(&mut r)
    }

    /// Given products staged, failed once, failed three times and published, then the
    /// counters, the failed list (most attempts first, then oldest), the staging and
    /// publishing indexes and the due set are what those histories say; and they follow a
    /// retry and a success.
    #[test]
    fn every_index_follows_each_event() {
        let mut g = Given::new();
        g.registered("new", T0)
            .registered("once", T0 + SEC)
            .registered("thrice", T0 + 2 * SEC)
            .registered("done", T0 + 3 * SEC);
        g.attempt("once", 1, T0 + 10 * SEC, Some(T0 + 70 * SEC));
        for n in 1..=3 {
            g.attempt(
                "thrice",
                n,
                T0 + (10 + n as i64) * SEC,
                (n < 3).then_some(T0),
            );
        }
        g.event(
            "done",
            PublishStarted {
                attempt: 1,
                destination: "/p".into(),
                trigger: "auto".into(),
            },
            T0 + 20 * SEC,
        );
        let m = &g.model;
        let c = m.counts();
        assert_eq!((c.staging, c.publishing, c.published), (3, 1, 0));
        assert_eq!((c.failed, c.max_attempts_exceeded), (2, 1));
        assert_eq!(ids(m.failed(None, 10)), ["thrice", "once"]);
        assert_eq!(ids(m.failed(Some(3), 10)), ["once"], "below 3 attempts");
        assert_eq!(ids(m.stuck_staging(T0 + 2 * SEC)), ["new", "once"]);
        assert_eq!(ids(m.publishing()), ["done"]);
        assert_eq!(
            m.due(T0 + 69 * SEC, 10),
            ["new"],
            "once waits for its retry time"
        );
        assert_eq!(m.due(T0 + 70 * SEC, 10), ["new", "once"]);
        assert_eq!(m.failures_within(T0 + 20 * SEC, 3_600 * SEC), 4);

        // An operator retry of the exhausted one, and a success.
        g.event(
            "thrice",
            RetryRequested {
                actor: Some("operator".into()),
                reason: None,
            },
            T0 + 30 * SEC,
        );
        g.event(
            "done",
            PublishSucceeded {
                published_path: "/p/done.fits".into(),
                checksum: Some("c".into()),
                duration_ms: 1,
                recovered: false,
            },
            T0 + 31 * SEC,
        );
        let m = &g.model;
        let c = m.counts();
        assert_eq!((c.staging, c.publishing, c.published), (3, 0, 1));
        assert_eq!((c.failed, c.max_attempts_exceeded), (1, 0));
        assert_eq!(ids(m.failed(None, 10)), ["once"]);
        assert!(m.publishing().is_empty());
        assert_eq!(m.due(T0 + 70 * SEC, 10), ["new", "thrice", "once"]);
        assert_eq!(m.success_rate_percent(), 50.0);
    }

    /// The indexes built once after a deferred fold are those kept event by event: on a
    /// random history of registrations, starts, failures (with and without a retry time),
    /// operator retries and successes, compared whole at many points along it.
    #[test]
    fn indexes_built_at_the_end_are_those_kept_event_by_event() {
        use rand::{Rng, SeedableRng};
        let (mut rng, _) = crate::test_rng();
        let (mut kept, mut deferred) = (Given::new(), Given::new());
        deferred.model.defer_indexes();
        let mut attempts = std::collections::HashMap::<String, u32>::new();
        let mut checked = 0;
        for step in 0..3_000i64 {
            let id = format!("p{}", rng.gen_range(0..200));
            let at = T0 + step * SEC + rng.gen_range(-5..5) * SEC;
            let step_seed: u64 = rng.r#gen();
            for g in [&mut kept, &mut deferred] {
                // Both models are given the same event: the step's draws come from one
                // seed, taken before.
                let mut rng = rand::rngs::StdRng::seed_from_u64(step_seed);
                let n = attempts.get(&id).copied().unwrap_or(0);
                match rng.gen_range(0..6) {
                    0 => {
                        g.registered(&id, at);
                    }
                    1 | 2 => {
                        let retry = rng.gen_bool(0.5).then(|| at + rng.gen_range(0..120) * SEC);
                        g.attempt(&id, n + 1, at, retry);
                    }
                    3 => {
                        let started = PublishStarted {
                            attempt: n + 1,
                            destination: format!("/p/{id}.fits"),
                            trigger: "auto".into(),
                        };
                        g.event(&id, started, at);
                    }
                    4 => {
                        let retry = RetryRequested {
                            actor: None,
                            reason: None,
                        };
                        g.event(&id, retry, at);
                    }
                    _ => {
                        let done = PublishSucceeded {
                            published_path: format!("/p/{id}.fits"),
                            checksum: None,
                            duration_ms: 1,
                            recovered: false,
                        };
                        g.event(&id, done, at);
                    }
                }
            }
            *attempts.entry(id).or_default() += 1;
            if step % 97 == 0 {
                let mut built = deferred.model.clone();
                built.index_all();
                assert_eq!(built, kept.model, "after step {step}");
                checked += 1;
            }
        }
        deferred.model.index_all();
        assert_eq!(deferred.model, kept.model);
        let c = kept.model.counts();
        // The history reached every index.
        assert!(
            c.failed > 0 && c.staging > 0 && c.publishing > 0 && c.published > 0,
            "{c:?}"
        );
        assert!(!kept.model.failed(None, 1).is_empty() && checked > 30);
    }
}
