//! One product's state, folded from its stream. The publisher decides from it; the
//! publish read model keeps one per product. Same fold, so the two never disagree.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::events::RecordedEvent;
use crate::events::catalogue::{
    DomainEvent, ProductFinalized, ProductRegistered, PublishFailed, PublishStarted,
    PublishSucceeded, RetryRequested,
};
use crate::events::record::RecordRef;

/// Longest error text kept, in characters.
pub const MAX_ERROR_CHARS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProductStatus {
    Staging,
    Publishing,
    Published,
}

impl ProductStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductStatus::Staging => "staging",
            ProductStatus::Publishing => "publishing",
            ProductStatus::Published => "published",
        }
    }
}

/// A product fact, decoded. `S` holds the text of the three facts every product has:
/// owned (the default), or borrowed from a payload read in place
/// ([`ProductFact::decode_view`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ProductEvent<S = String> {
    Registered(ProductRegistered<S>),
    Finalized(ProductFinalized),
    PublishStarted(PublishStarted<S>),
    PublishSucceeded(PublishSucceeded<S>),
    PublishFailed(PublishFailed),
    RetryRequested(RetryRequested),
}

fn decode<T: DomainEvent>(r: &RecordRef<'_>) -> Result<T, String> {
    crate::events::catalogue::decode_payload(r.data)
        .map_err(|e| format!("{} v{} does not decode: {e}", r.event_type, r.event_version))
}

impl<'a> ProductEvent<&'a str> {
    /// A product fact whose payload is plain, its text borrowed from the record; `None`
    /// for any other record (a payload that is not plain, or not a product fact), which
    /// [`ProductEvent::decode_view`] then reads as it reads every payload (so a payload
    /// that is not plain, such as one with an escaped character or with metadata, is
    /// scanned twice). Only where the plain readers answer, so what it gives is what the
    /// owned decoding gives.
    pub(crate) fn plain(r: &RecordRef<'a>) -> Option<Self> {
        if r.category() != ProductRegistered::CATEGORY {
            return None;
        }
        let text = std::str::from_utf8(r.data).ok()?;
        Some(match r.event_type {
            ProductRegistered::TYPE => ProductEvent::Registered(ProductRegistered::plain(text)?),
            PublishStarted::TYPE => ProductEvent::PublishStarted(PublishStarted::plain(text)?),
            PublishSucceeded::TYPE => {
                ProductEvent::PublishSucceeded(PublishSucceeded::plain(text)?)
            }
            ProductFinalized::TYPE => ProductEvent::Finalized(ProductFinalized::read_plain(text)?),
            PublishFailed::TYPE => ProductEvent::PublishFailed(PublishFailed::read_plain(text)?),
            RetryRequested::TYPE => ProductEvent::RetryRequested(RetryRequested::read_plain(text)?),
            _ => return None,
        })
    }
}

impl ProductEvent {
    /// `Ok(None)` for events that are not product facts; `Err` for a product fact whose
    /// payload does not decode (a poison event, parked by the projection).
    pub fn decode(r: &RecordedEvent) -> Result<Option<ProductEvent>, String> {
        Self::decode_view(&r.view())
    }

    /// The stored type name of this fact.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProductEvent::Registered(_) => ProductRegistered::TYPE,
            ProductEvent::Finalized(_) => ProductFinalized::TYPE,
            ProductEvent::PublishStarted(_) => PublishStarted::TYPE,
            ProductEvent::PublishSucceeded(_) => PublishSucceeded::TYPE,
            ProductEvent::PublishFailed(_) => PublishFailed::TYPE,
            ProductEvent::RetryRequested(_) => RetryRequested::TYPE,
        }
    }

    /// [`ProductEvent::decode`] of a record read in place.
    pub fn decode_view(r: &RecordRef<'_>) -> Result<Option<ProductEvent>, String> {
        if r.category() != ProductRegistered::CATEGORY {
            return Ok(None);
        }
        Ok(Some(match r.event_type {
            ProductRegistered::TYPE => ProductEvent::Registered(decode(r)?),
            ProductFinalized::TYPE => ProductEvent::Finalized(decode(r)?),
            PublishStarted::TYPE => ProductEvent::PublishStarted(decode(r)?),
            PublishSucceeded::TYPE => ProductEvent::PublishSucceeded(decode(r)?),
            PublishFailed::TYPE => ProductEvent::PublishFailed(decode(r)?),
            RetryRequested::TYPE => ProductEvent::RetryRequested(decode(r)?),
            other => return Err(format!("unknown product event type {other}")),
        }))
    }
}

/// A product fact in the form a product's state keeps it: words interned, the checksum
/// read, the error cut to [`MAX_ERROR_CHARS`], the retry time parsed, a path's last `/`
/// found, a registration made into the product's first state. Made from a
/// [`ProductEvent`] by a pure mapping ([`ProductFact::new`]), so a fold makes it on its
/// decoder threads and the fold's own thread only applies it
/// ([`ProductState::apply_fact`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ProductFact {
    /// The product as its registration starts it.
    Registered(Box<ProductState>),
    Finalized {
        qa_status: Option<Word>,
        validation_status: Option<Word>,
    },
    PublishStarted(Target),
    PublishSucceeded(Target),
    PublishFailed {
        attempt: u32,
        failure: Box<LastFailure>,
    },
    RetryRequested,
}

/// A destination or published path as recorded, with where its file name starts (a
/// [`Place::Beside`] keeps the folder before it).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Byte offset of the last `/`.
    slash: Option<usize>,
    path: Box<str>,
}

/// Where a path's last `/` is. File names are short, so a plain loop from the end finds it
/// in a few steps, where `rfind` set up a vectorised search for each of the millions of
/// paths a fold reads.
#[inline]
fn last_slash(path: &str) -> Option<usize> {
    path.bytes().rposition(|b| b == b'/')
}

impl Target {
    fn new<S: Text>(path: S) -> Target {
        Target {
            slash: last_slash(path.as_ref()),
            path: path.into(),
        }
    }
}

/// The text of a [`ProductEvent`]: owned, or borrowed from a payload. A state keeps what
/// it needs of it as `Box<str>` (moved from a `String`, copied from a `&str`).
pub trait Text: AsRef<str> + Into<Box<str>> + Into<String> {}
impl<S: AsRef<str> + Into<Box<str>> + Into<String>> Text for S {}

impl ProductFact {
    /// `e` in the state's form; a registration starts the product filed under `id`,
    /// created at `at` (the commit time), at `revision`.
    pub fn new<S: Text>(e: ProductEvent<S>, id: &str, at: i64, revision: u64) -> ProductFact {
        match e {
            ProductEvent::Registered(r) => ProductFact::Registered(Box::new(ProductState {
                data_id: Arc::from(id),
                data_type: Word::new(r.data_type.as_ref()),
                stage_path: r.stage_path.into(),
                checksum: r.checksum.as_ref().map(|c| Checksum::new(c.as_ref())),
                size_bytes: r.size_bytes,
                qa_status: r.qa_status.as_ref().map(|w| Word::new(w.as_ref())),
                validation_status: r.validation_status.as_ref().map(|w| Word::new(w.as_ref())),
                metadata: (!r.metadata.is_empty()).then(|| {
                    Box::new(
                        r.metadata
                            .into_iter()
                            .map(|(k, v)| (k.into(), v.into()))
                            .collect(),
                    )
                }),
                auto_publish: r.auto_publish,
                status: ProductStatus::Staging,
                publish_attempts: 0,
                total_attempts: 0,
                created_at: at,
                started_at: 0,
                succeeded_at: 0,
                destination: None,
                published_path: None,
                failure: None,
                revision,
            })),
            ProductEvent::Finalized(f) => ProductFact::Finalized {
                qa_status: f.qa_status.as_deref().map(Word::new),
                validation_status: f.validation_status.as_deref().map(Word::new),
            },
            ProductEvent::PublishStarted(s) => {
                ProductFact::PublishStarted(Target::new(s.destination))
            }
            ProductEvent::PublishSucceeded(s) => {
                ProductFact::PublishSucceeded(Target::new(s.published_path))
            }
            ProductEvent::PublishFailed(f) => ProductFact::PublishFailed {
                attempt: f.attempt,
                failure: Box::new(LastFailure {
                    error: truncate_error(&f.error).into_boxed_str(),
                    retryable: f.retryable,
                    // Set when the fact is applied: the commit time is the record's.
                    at: 0,
                    next_retry_at: parse_time(&f.next_retry_at),
                }),
            },
            ProductEvent::RetryRequested(_) => ProductFact::RetryRequested,
        }
    }

    /// [`ProductEvent::decode_view`], in the state's form: the stream names the product (a
    /// payload that says otherwise does not get to file it under another id).
    /// A plain payload (almost every one) is read in place: the strings the state does
    /// not keep (the id the stream already names, words already interned, a checksum's
    /// digits) are never copied out.
    pub fn decode_view(r: &RecordRef<'_>) -> Result<Option<ProductFact>, String> {
        let id = crate::events::record::entity_of(r.stream_id);
        let (at, revision) = (r.created_micros, r.revision);
        if let Some(e) = ProductEvent::plain(r) {
            return Ok(Some(ProductFact::new(e, id, at, revision)));
        }
        Ok(ProductEvent::decode_view(r)?.map(|e| ProductFact::new(e, id, at, revision)))
    }

    /// The stored type name of this fact.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProductFact::Registered(_) => ProductRegistered::TYPE,
            ProductFact::Finalized { .. } => ProductFinalized::TYPE,
            ProductFact::PublishStarted(_) => PublishStarted::TYPE,
            ProductFact::PublishSucceeded(_) => PublishSucceeded::TYPE,
            ProductFact::PublishFailed { .. } => PublishFailed::TYPE,
            ProductFact::RetryRequested => RetryRequested::TYPE,
        }
    }
}

/// A short word many products share: a data type, a QA or a validation verdict, or the
/// folder a product was published to. Each distinct word is kept once for the life of the
/// process and named by a number, so a million products hold a million 4-byte numbers,
/// not a million strings. The table grows with the distinct words the log holds (each
/// came with an event, and a replay meets them all again), as other projections grow with
/// history; it never stands one word for another.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Word(NonZeroU32);

struct Words {
    texts: Vec<&'static str>,
    /// Randomly seeded: the words come from clients.
    numbers: HashMap<&'static str, NonZeroU32, foldhash::fast::RandomState>,
}

static WORDS: std::sync::LazyLock<RwLock<Words>> = std::sync::LazyLock::new(|| {
    RwLock::new(Words {
        texts: Vec::new(),
        numbers: HashMap::default(),
    })
});

/// Most words a thread keeps a copy of (see [`Word::new`]).
const LOCAL_WORDS: usize = 4096;

thread_local! {
    /// The words this thread has met, looked up without the shared table's lock: a fold's
    /// decoder threads intern several words per product, and each shared read writes the
    /// lock's counter, a cache line the two threads then pass back and forth. The texts
    /// are the shared table's; past [`LOCAL_WORDS`] a thread asks the shared table.
    static LOCAL: std::cell::RefCell<HashMap<&'static str, Word, foldhash::fast::RandomState>> =
        std::cell::RefCell::new(HashMap::default());
}

impl Word {
    pub fn new(s: &str) -> Word {
        // `try_with`: a thread's copy may be gone while the thread ends; the shared
        // table still answers.
        if let Some(w) = LOCAL
            .try_with(|local| local.borrow().get(s).copied())
            .ok()
            .flatten()
        {
            return w;
        }
        let (word, text) = Self::shared(s);
        let _ = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            if local.len() < LOCAL_WORDS {
                local.insert(text, word);
            }
        });
        word
    }

    /// The word for `s` in the shared table, added if new, with its kept text.
    fn shared(s: &str) -> (Word, &'static str) {
        {
            let words = WORDS.read().unwrap_or_else(|e| e.into_inner());
            if let Some((&text, &n)) = words.numbers.get_key_value(s) {
                return (Word(n), text);
            }
        }
        let mut words = WORDS.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&text, &n)) = words.numbers.get_key_value(s) {
            return (Word(n), text);
        }
        // Kept for the life of the process, once per distinct word.
        let text: &'static str = Box::leak(Box::from(s));
        words.texts.push(text);
        let n = u32::try_from(words.texts.len())
            .ok()
            .and_then(NonZeroU32::new)
            .expect("fewer than 2^32 distinct words: each is kept in memory, which runs out first");
        words.numbers.insert(text, n);
        (Word(n), text)
    }

    pub fn as_str(self) -> &'static str {
        WORDS.read().unwrap_or_else(|e| e.into_inner()).texts[self.0.get() as usize - 1]
    }
}

impl std::ops::Deref for Word {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Word {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Serialize for Word {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Word, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Word::new(&s))
    }
}

/// A path a product went to: most often its staged file's name in a folder shared by
/// every product of its type (kept as that folder's [`Word`]), else the whole text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Place {
    /// `folder/name`, where `name` is the staged path's file name.
    Beside(Word),
    /// Rare, so behind one pointer: the place takes 16 bytes, not 24.
    #[allow(clippy::rc_buffer)]
    Whole(Arc<String>),
}

impl Place {
    /// The last part of a staged path: what a path `Beside` its folder ends in.
    fn name(stage_path: &str) -> &str {
        last_slash(stage_path).map_or(stage_path, |i| &stage_path[i + 1..])
    }

    fn new(target: Target, stage_path: &str) -> Place {
        if let Some(slash) = target.slash {
            let (dir, name) = (&target.path[..slash], &target.path[slash + 1..]);
            // Only a folder kept as a word is interned: the table keeps what it holds.
            if name == Self::name(stage_path) && !name.is_empty() {
                return Place::Beside(Word::new(dir));
            }
        }
        Place::Whole(Arc::new(String::from(target.path)))
    }

    fn text(&self, stage_path: &str) -> String {
        match self {
            Place::Beside(dir) => format!("{dir}/{}", Self::name(stage_path)),
            Place::Whole(t) => t.as_str().to_string(),
        }
    }
}

/// A recorded checksum: the 32 bytes of a bare 64-digit lowercase hex digest (what the
/// publisher records for a file), or any other text as it was written. Either gives back
/// the exact text recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Checksum {
    Hex([u8; 32]),
    Text(Box<str>),
}

impl Checksum {
    /// A bare 64-digit lowercase hex digest as its 32 bytes; any other text kept as it is.
    pub fn new(s: &str) -> Checksum {
        /// Each byte's value as a lowercase hex digit, or 0xFF: one load a digit.
        const DIGIT: [u8; 256] = {
            let mut t = [0xFF; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        if s.len() == 64 {
            // 32 pairs of digits, nothing left over.
            let (pairs, _) = s.as_bytes().as_chunks::<2>();
            let mut out = [0u8; 32];
            let mut bad = 0u8;
            for (o, [h, l]) in out.iter_mut().zip(pairs) {
                let (h, l) = (DIGIT[*h as usize], DIGIT[*l as usize]);
                bad |= h | l;
                *o = h << 4 | (l & 15);
            }
            // Every digit is below 16: no 0xFF met.
            if bad < 16 {
                return Checksum::Hex(out);
            }
        }
        Checksum::Text(Box::from(s))
    }

    /// The text as recorded.
    pub fn text(&self) -> String {
        match self {
            Checksum::Hex(b) => {
                const DIGITS: &[u8; 16] = b"0123456789abcdef";
                let mut s = String::with_capacity(64);
                for x in b {
                    s.push(DIGITS[(x >> 4) as usize] as char);
                    s.push(DIGITS[(x & 15) as usize] as char);
                }
                s
            }
            Checksum::Text(t) => t.to_string(),
        }
    }
}

/// The last failed attempt; kept apart, since most products never fail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastFailure {
    /// At most [`MAX_ERROR_CHARS`] characters.
    pub error: Box<str>,
    pub retryable: bool,
    /// Commit time of the `PublishFailed`.
    pub at: i64,
    /// When the automatic publisher may try again; cleared by the next start, success or
    /// operator retry.
    pub next_retry_at: Option<i64>,
}

/// Everything known about one product, kept compact: a server holds one per product.
/// Times are the commit times of the events (microseconds since the epoch), so a replay
/// gives the same state every time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductState {
    /// Shared with the read model's indexes.
    pub data_id: Arc<str>,
    pub data_type: Word,
    pub stage_path: Box<str>,
    pub checksum: Option<Checksum>,
    pub size_bytes: Option<u64>,
    pub qa_status: Option<Word>,
    pub validation_status: Option<Word>,
    /// `None` when empty (most products): 8 bytes a product rather than an empty map's 24.
    #[allow(clippy::box_collection)]
    metadata: Option<Box<BTreeMap<String, String>>>,
    pub auto_publish: bool,
    pub status: ProductStatus,
    /// Automatic attempts since the last operator retry.
    pub publish_attempts: u32,
    /// Every attempt ever; never decreases.
    pub total_attempts: u32,
    /// Commit time of the registration: when the product was created and staged.
    pub created_at: i64,
    /// Commit time of the running publish's `PublishStarted`, read while the status is
    /// publishing ([`ProductState::publishing_since`]): 8 bytes, not an `Option`'s 16.
    started_at: i64,
    /// Commit time of the last `PublishSucceeded`, read once there is a published path
    /// ([`ProductState::published_at`]); the two are set together and never cleared.
    succeeded_at: i64,
    /// Where the running or last publish was headed ([`ProductState::destination`]).
    destination: Option<Place>,
    /// Where it was published ([`ProductState::published_path`]).
    published_path: Option<Place>,
    pub failure: Option<Box<LastFailure>>,
    /// Revision of the stream's last event.
    pub revision: u64,
}

/// Data types whose QA must have passed before an automatic publish.
pub const QA_GATED: &[&str] = &[
    "image",
    "images",
    "mosaic",
    "mosaics",
    "calib_ms",
    "caltable",
    "caltables",
];

pub fn truncate_error(e: &str) -> String {
    // No more bytes than the limit means no more characters: copied whole, not a
    // character at a time.
    if e.len() <= MAX_ERROR_CHARS {
        return e.to_owned();
    }
    e.chars().take(MAX_ERROR_CHARS).collect()
}

fn parse_time(s: &Option<String>) -> Option<i64> {
    s.as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros())
}

impl ProductState {
    /// State after the first event of the stream, filed under the id its payload names;
    /// `None` unless it is a registration.
    pub fn start(e: ProductEvent, at: i64, revision: u64) -> Option<ProductState> {
        let ProductEvent::Registered(r) = &e else {
            return None;
        };
        let id = r.data_id.clone();
        match ProductFact::new(e, &id, at, revision) {
            ProductFact::Registered(state) => Some(*state),
            _ => None,
        }
    }

    /// Folds one later event in. Cannot fail: decoding already happened.
    pub fn apply(&mut self, e: ProductEvent, at: i64, revision: u64) {
        let fact = ProductFact::new(e, &self.data_id, at, revision);
        self.apply_fact(fact, at, revision)
    }

    /// [`ProductState::apply`] of a fact: the one place where a fact changes a product.
    pub fn apply_fact(&mut self, e: ProductFact, at: i64, revision: u64) {
        self.revision = revision;
        match e {
            ProductFact::Registered(_) => {}
            ProductFact::Finalized {
                qa_status,
                validation_status,
            } => {
                if qa_status.is_some() {
                    self.qa_status = qa_status;
                }
                if validation_status.is_some() {
                    self.validation_status = validation_status;
                }
            }
            ProductFact::PublishStarted(target) => {
                self.status = ProductStatus::Publishing;
                self.started_at = at;
                self.total_attempts += 1;
                self.destination = Some(Place::new(target, &self.stage_path));
                self.clear_retry();
            }
            ProductFact::PublishSucceeded(target) => {
                self.status = ProductStatus::Published;
                self.succeeded_at = at;
                self.published_path = Some(Place::new(target, &self.stage_path));
                self.clear_retry();
            }
            ProductFact::PublishFailed {
                attempt,
                mut failure,
            } => {
                self.status = ProductStatus::Staging;
                self.publish_attempts = self.publish_attempts.max(attempt);
                failure.at = at;
                self.failure = Some(failure);
            }
            ProductFact::RetryRequested => {
                self.publish_attempts = 0;
                self.clear_retry();
            }
        }
    }

    /// When the running publish started; `None` unless publishing.
    pub fn publishing_since(&self) -> Option<i64> {
        (self.status == ProductStatus::Publishing).then_some(self.started_at)
    }

    /// When the product was last published; `None` if never.
    pub fn published_at(&self) -> Option<i64> {
        self.published_path.is_some().then_some(self.succeeded_at)
    }

    /// Where the running or last publish was headed.
    pub fn destination(&self) -> Option<String> {
        self.destination.as_ref().map(|p| p.text(&self.stage_path))
    }

    pub fn published_path(&self) -> Option<String> {
        self.published_path
            .as_ref()
            .map(|p| p.text(&self.stage_path))
    }

    fn clear_retry(&mut self) {
        if let Some(f) = &mut self.failure {
            f.next_retry_at = None;
        }
    }

    /// When the product was staged: its registration (the same as `created_at`).
    pub fn staged_at(&self) -> i64 {
        self.created_at
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.as_deref().unwrap_or(&EMPTY)
    }

    pub fn checksum_text(&self) -> Option<String> {
        self.checksum.as_ref().map(Checksum::text)
    }

    pub fn last_error(&self) -> Option<&str> {
        self.failure.as_ref().map(|f| &*f.error)
    }

    pub fn last_error_retryable(&self) -> bool {
        self.failure.as_ref().is_some_and(|f| f.retryable)
    }

    pub fn last_failure_at(&self) -> Option<i64> {
        self.failure.as_ref().map(|f| f.at)
    }

    pub fn next_retry_at(&self) -> Option<i64> {
        self.failure.as_ref().and_then(|f| f.next_retry_at)
    }

    /// Folds a whole stream read from the ledger.
    pub fn from_events(events: &[RecordedEvent]) -> Result<Option<ProductState>, String> {
        let mut state: Option<ProductState> = None;
        for r in events {
            let Some(e) = ProductEvent::decode(r)? else {
                continue;
            };
            match &mut state {
                None => state = ProductState::start(e, r.created_micros, r.revision),
                Some(s) => s.apply(e, r.created_micros, r.revision),
            }
        }
        Ok(state)
    }

    /// Validated, QA passed where the type needs it, and automatic publishing on.
    pub fn eligible_for_auto_publish(&self) -> bool {
        /// The words the rule names, interned once: a word's number stands for its text,
        /// so comparing numbers is comparing texts.
        struct Rule {
            validated: Word,
            passed: Word,
            gated: Vec<Word>,
        }
        static RULE: std::sync::LazyLock<Rule> = std::sync::LazyLock::new(|| Rule {
            validated: Word::new("validated"),
            passed: Word::new("passed"),
            gated: QA_GATED.iter().map(|t| Word::new(t)).collect(),
        });
        let rule = &*RULE;
        self.auto_publish
            && self.validation_status == Some(rule.validated)
            && (!rule.gated.contains(&self.data_type) || self.qa_status == Some(rule.passed))
    }

    /// Failed at least once and back in staging.
    pub fn is_failed(&self) -> bool {
        self.status == ProductStatus::Staging && self.publish_attempts > 0
    }

    pub fn attempts_exhausted(&self, max_attempts: u32) -> bool {
        self.is_failed() && self.publish_attempts >= max_attempts
    }

    /// When the automatic publisher should next try this product, if ever.
    pub fn auto_due_at(&self, max_attempts: u32) -> Option<i64> {
        if self.status != ProductStatus::Staging || !self.eligible_for_auto_publish() {
            return None;
        }
        if self.publish_attempts == 0 {
            // Never tried since registration or since an operator's retry.
            return Some(self.last_failure_at().unwrap_or(self.created_at));
        }
        if self.last_error_retryable() && self.publish_attempts < max_attempts {
            return self.next_retry_at();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server keeps one state per product: its size is part of the memory per product
    /// (`docs/benchmarks.md`), and a field that grows it should be a choice, not an accident.
    #[test]
    fn a_product_state_fits_in_192_bytes() {
        assert!(
            std::mem::size_of::<ProductState>() <= 192,
            "{} bytes",
            std::mem::size_of::<ProductState>()
        );
        assert_eq!(std::mem::size_of::<Option<Place>>(), 16);
    }

    /// A payload decodes from its text, escapes and characters of several bytes alike; one
    /// that is not UTF-8 (a damaged ledger, or one written by another tool) is a poison
    /// event with its reason, not a panic, even when the bad byte is in a field the event
    /// does not have.
    #[test]
    fn a_payload_decodes_from_its_text_and_bad_bytes_are_refused() {
        let event = |data: &[u8]| RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: "product-p".into(),
            revision: 1,
            position: 1,
            event_type: PublishStarted::TYPE.into(),
            event_version: 1,
            data: data.to_vec(),
            metadata: b"{}".to_vec(),
            created_micros: 0,
            checksum: 0,
        };
        // A JSON escape and a character of two bytes.
        let good = [
            br#"{"attempt":2,"destination":"/p/caf\u00e9 "#.as_slice(),
            "é".as_bytes(),
            br#".fits","trigger":"auto"}"#,
        ]
        .concat();
        match ProductEvent::decode(&event(&good)) {
            Ok(Some(ProductEvent::PublishStarted(s))) => {
                assert_eq!((s.attempt, &*s.destination), (2, "/p/café é.fits"));
            }
            other => panic!("{other:?}"),
        }
        let bad = [
            br#"{"attempt":2,"destination":"/p/"#.as_slice(),
            &[0xFF],
            br#".fits","trigger":"auto"}"#,
        ]
        .concat();
        let unknown = [
            br#"{"attempt":2,"destination":"/p/x.fits","trigger":"auto","note":""#.as_slice(),
            &[0xFF],
            br#""}"#,
        ]
        .concat();
        for bytes in [bad, unknown] {
            let reason = ProductEvent::decode(&event(&bytes)).expect_err("not UTF-8");
            assert!(
                reason.starts_with("PublishStarted v1 does not decode:")
                    && reason.contains("utf-8"),
                "{reason}"
            );
        }
    }

    /// A word is one number for one text on every thread: each thread's copy of the table
    /// is filled from the shared one, never numbered on its own.
    #[test]
    fn a_word_is_the_same_number_on_every_thread() {
        let text = "a word met on two threads";
        let here = Word::new(text);
        let there = std::thread::spawn(move || (Word::new(text), Word::new("its neighbour")))
            .join()
            .expect("the thread runs");
        assert_eq!(there.0, here);
        assert_eq!(Word::new(text), here, "this thread's copy answers the same");
        assert_eq!(here.as_str(), text);
        assert_ne!(there.1, here);
        assert_eq!(Word::new("its neighbour"), there.1);
    }

    #[test]
    fn an_error_is_cut_to_its_characters_not_its_bytes() {
        let cut = |e: &str| e.chars().take(MAX_ERROR_CHARS).collect::<String>();
        for n in [0, 1, 249, 250, 251, 499, 500, 501, 1000] {
            for unit in ["x", "é", "日", "𝄞"] {
                let e = unit.repeat(n);
                assert_eq!(truncate_error(&e), cut(&e), "{n} of {unit:?}");
                assert!(truncate_error(&e).chars().count() <= MAX_ERROR_CHARS);
            }
        }
        // The whole of a short one; exactly the limit of a long one.
        assert_eq!(truncate_error("disk full"), "disk full");
        assert_eq!(
            truncate_error(&"é".repeat(600)).chars().count(),
            MAX_ERROR_CHARS
        );
    }

    /// A checksum gives back exactly the text recorded: a bare lowercase digest is kept as
    /// its 32 bytes, anything else (upper case, a prefix, another length) as text.
    #[test]
    fn a_checksum_gives_back_the_text_recorded() {
        let digest = blake3::hash(b"x").to_hex().to_string();
        let c = Checksum::new(&digest);
        assert!(matches!(c, Checksum::Hex(_)));
        assert_eq!(c.text(), digest);
        for other in [
            digest.to_uppercase(),
            format!("tree:{digest}"),
            digest[..62].to_string(),
            format!("{}g", &digest[..63]),
            String::new(),
        ] {
            let c = Checksum::new(&other);
            assert!(matches!(c, Checksum::Text(_)), "{other:?}");
            assert_eq!(c.text(), other);
        }
        // Every digit, and every place a non-digit can stand (the bytes either side of
        // each digit range among them); 64 bytes of two-byte characters too.
        let all = "0123456789abcdef".repeat(4);
        assert!(matches!(Checksum::new(&all), Checksum::Hex(_)));
        assert_eq!(Checksum::new(&all).text(), all);
        for i in 0..64 {
            for c in ['/', ':', '`', 'g', 'A', 'F', '\0'] {
                let mut t = all.clone().into_bytes();
                t[i] = c as u8;
                let t = String::from_utf8(t).unwrap();
                let k = Checksum::new(&t);
                assert!(matches!(k, Checksum::Text(_)), "{t:?}");
                assert_eq!(k.text(), t);
            }
        }
        assert!(matches!(Checksum::new(&"é".repeat(32)), Checksum::Text(_)));
    }

    /// Products of one type share its word; a path beside the staged file's name keeps
    /// only its folder's word, any other path its whole text; and both give back exactly
    /// the text recorded, also after an encoding and decoding.
    #[test]
    fn words_and_places_give_back_the_text_recorded() {
        assert_eq!(Word::new("image"), Word::new("image"));
        assert_ne!(Word::new("image"), Word::new("mosaic"));
        assert_eq!(Word::new("image"), *"image");
        let registered = |stage_path: &str| {
            ProductEvent::Registered(ProductRegistered {
                data_id: "a".into(),
                data_type: "image".into(),
                stage_path: stage_path.into(),
                checksum: None,
                size_bytes: None,
                qa_status: None,
                validation_status: None,
                auto_publish: true,
                metadata: Default::default(),
            })
        };
        let cases = [
            ("/stage/a.fits", "/p/images/a.fits", true),
            ("/stage/a.fits", "/p/images/b.fits", false),
            ("/stage/a.fits", "a.fits", false),
            ("/stage/dir/", "/p/images/", false),
            ("a.fits", "/p/a.fits", true),
            ("/stage/a.fits", "/p/images/a.fits/", false),
            ("/stage/é/ü.fits", "/p/ï/ü.fits", true),
            ("ü.fits", "/p/ü.fits/x", false),
        ];
        for (stage, dest, beside) in cases {
            let mut s = ProductState::start(registered(stage), 1, 0).unwrap();
            s.apply(
                ProductEvent::PublishStarted(PublishStarted {
                    attempt: 1,
                    destination: dest.into(),
                    trigger: "auto".into(),
                }),
                2,
                1,
            );
            s.apply(
                ProductEvent::PublishSucceeded(PublishSucceeded {
                    published_path: dest.into(),
                    checksum: None,
                    duration_ms: 1,
                    recovered: false,
                }),
                3,
                2,
            );
            assert_eq!(
                matches!(s.published_path, Some(Place::Beside(_))),
                beside,
                "{stage} -> {dest}"
            );
            let bytes = bincode::serde::encode_to_vec(&s, bincode::config::standard()).unwrap();
            let (back, _): (ProductState, usize) =
                bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
            for state in [&s, &back] {
                assert_eq!(state.destination().as_deref(), Some(dest));
                assert_eq!(state.published_path().as_deref(), Some(dest));
                assert_eq!(state.data_type, *"image");
            }
            assert_eq!(back, s);
        }
    }
}
