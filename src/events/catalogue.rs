//! The catalogue of domain events: one type per fact, each with its stream category, type
//! name and version. `docs/events.md` describes every type; keep the two in step.
//!
//! Payloads are stored as JSON. Schemas evolve by adding fields with `#[serde(default)]`
//! or by a new version with an upcaster applied on read; stored bytes are never rewritten.
//! Streams of the domain categories (`ingest`, `group`, `mosaic`, `product`) accept only
//! the types listed here whose payload decodes; other categories accept any type, as
//! EventStoreDB does.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::flat_json::{self, read_object};
use super::record::{ProposedEvent, category_of};

/// A fact of the domain.
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// Stored `event_type`.
    const TYPE: &'static str;
    /// Current schema version.
    const VERSION: u32;
    /// Stream category this fact lives in.
    const CATEGORY: &'static str;

    /// A proposed event with a fresh v7 id and the given metadata.
    fn to_proposed(&self, metadata: &EventMetadata) -> ProposedEvent {
        ProposedEvent::new(
            Self::TYPE,
            Self::VERSION,
            serde_json::to_vec(self).expect("domain events serialize"),
        )
        .with_metadata(serde_json::to_vec(metadata).expect("metadata serializes"))
    }

    /// This payload read in place when it has the plain form [`flat_json`] reads; `None`
    /// leaves it to serde_json. Where it answers it must give what serde_json gives (the
    /// tests hold each type that has one to that, serde_json as the oracle). Written for
    /// the product facts, which a fold reads millions of.
    fn read_plain(_text: &str) -> Option<Self> {
        None
    }
}

/// Who caused an event and why: stored as the record's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    #[serde(default, rename = "correlationId")]
    pub correlation_id: Option<String>,
    #[serde(default, rename = "causationId")]
    pub causation_id: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

impl EventMetadata {
    pub fn actor(actor: impl Into<String>) -> Self {
        EventMetadata {
            actor: Some(actor.into()),
            host: hostname(),
            ..Default::default()
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

macro_rules! domain_event {
    ($ty:ident, $name:literal, $version:literal, $category:literal) => {
        impl DomainEvent for $ty {
            const TYPE: &'static str = $name;
            const VERSION: u32 = $version;
            const CATEGORY: &'static str = $category;
        }
    };
    // A type with a plain reader: the reader restates the fields' names, kinds and serde
    // defaults, so a change to the struct's fields or attributes is made there too, and
    // in the field table of the test that holds it to serde_json (the tests below).
    ($ty:ident, $name:literal, $version:literal, $category:literal, plain: $read:expr) => {
        impl DomainEvent for $ty {
            const TYPE: &'static str = $name;
            const VERSION: u32 = $version;
            const CATEGORY: &'static str = $category;

            fn read_plain(text: &str) -> Option<Self> {
                $read(text)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// ingest-<YYYY-MM-DD>: facts about raw subband files.

/// A subband file passed its checks and joined its observation's set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubbandFileAccepted {
    pub path: String,
    /// Observation time from the name, `YYYY-MM-DDTHH:MM:SS`.
    pub obs_time: String,
    /// 0..=15.
    pub subband: u8,
    pub size_bytes: u64,
    /// The observation this file joined: the name time of the set's first file (subbands
    /// within the grouping tolerance of it belong together). Recorded so that a replay
    /// rebuilds the same sets whatever the configuration says today.
    #[serde(default)]
    pub group_obs_time: Option<String>,
    /// What the file's UVH5 header says (absent in events written before ingest read
    /// headers).
    #[serde(default)]
    pub header: Option<SubbandHeader>,
}
domain_event!(SubbandFileAccepted, "SubbandFileAccepted", 1, "ingest");

/// A subband file's UVH5 header, as ingest read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubbandHeader {
    /// Start of the first integration and end of the last, UTC (`...T10:00:00.000Z`).
    pub start: String,
    pub end: String,
    /// Lowest and highest channel, Hz.
    pub freq_lo_hz: f64,
    pub freq_hi_hz: f64,
    /// Pointing (or phase-centre) declination, degrees, when the file gives one.
    pub dec_deg: Option<f64>,
    pub nbls: u64,
    pub ntimes: u64,
    pub nfreqs: u64,
    pub npols: u64,
    pub telescope: String,
    /// Written by contimg's simulator, not a correlator.
    #[serde(default)]
    pub simulated: bool,
}

/// A file in the incoming folder was refused; it blocks nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubbandFileRejected {
    pub path: String,
    pub reason: String,
}
domain_event!(SubbandFileRejected, "SubbandFileRejected", 1, "ingest");

/// An observation's subbands did not all arrive before the timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestGroupTimedOut {
    pub obs_time: String,
    pub present: Vec<u8>,
    pub missing: Vec<u8>,
    pub waited_s: f64,
}
domain_event!(IngestGroupTimedOut, "IngestGroupTimedOut", 1, "ingest");

/// An observation's subbands would form a group under an id the ledger already holds with
/// other members (safeguard 1 at group formation): refused and recorded; the existing
/// group is not touched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRejected {
    pub obs_time: String,
    pub group_id: String,
    pub files: Vec<String>,
    pub reason: String,
}
domain_event!(GroupRejected, "GroupRejected", 1, "ingest");

// ---------------------------------------------------------------------------------------
// group-<group_id>: one 5-minute observation, from its subbands to its image.

/// All 16 subbands of an observation arrived: the group exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupFormed {
    pub group_id: String,
    pub obs_time: String,
    pub files: Vec<String>,
    #[serde(default)]
    pub dec_deg: Option<f64>,
}
domain_event!(GroupFormed, "GroupFormed", 1, "group");

/// A stage began: convert, calibrate or image in a `group-` stream, mosaic in a `mosaic-`
/// stream. Appended with `Exact(revision)`, so of two workers one runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStarted {
    pub stage: String,
    pub attempt: u32,
    #[serde(default)]
    pub command: Option<String>,
    /// The worker process running it, `host:pid:instance`: at start, a worker settles as
    /// interrupted only the stages of workers on its host that are no longer alive.
    #[serde(default)]
    pub worker: Option<String>,
}
domain_event!(StageStarted, "StageStarted", 1, "group");

/// A stage finished and wrote its outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageCompleted {
    pub stage: String,
    pub attempt: u32,
    pub duration_s: f64,
    #[serde(default)]
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub outputs: Vec<String>,
}
domain_event!(StageCompleted, "StageCompleted", 1, "group");

/// A stage failed: non-zero exit, timeout, or missing output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageFailed {
    pub stage: String,
    pub attempt: u32,
    pub duration_s: f64,
    #[serde(default)]
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// Last lines of the command's stderr (at most 2,000 characters).
    #[serde(default)]
    pub stderr_tail: String,
    pub error: String,
    /// When the next attempt is due (RFC 3339), `None` when no attempt is left.
    #[serde(default)]
    pub next_retry_at: Option<String>,
}
domain_event!(StageFailed, "StageFailed", 1, "group");

// ---------------------------------------------------------------------------------------
// mosaic-<mosaic_id>: a mosaic group of consecutive tiles.

/// A mosaic group passed the five safeguards; its id is derived from its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MosaicGroupCreated {
    pub mosaic_id: String,
    /// Member observation group ids, in time order.
    pub members: Vec<String>,
    pub first_obs_time: String,
    pub last_obs_time: String,
}
domain_event!(MosaicGroupCreated, "MosaicGroupCreated", 1, "mosaic");

/// A mosaic group was refused by a safeguard; nothing was overwritten.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MosaicGroupRejected {
    pub mosaic_id: String,
    /// `id_collision`, `time_span`, `ms_stage`, `calibration_tables` or `images`.
    pub safeguard: String,
    /// The member at fault, when one is.
    #[serde(default)]
    pub member: Option<String>,
    pub reason: String,
    #[serde(default)]
    pub members: Vec<String>,
}
domain_event!(MosaicGroupRejected, "MosaicGroupRejected", 1, "mosaic");

// ---------------------------------------------------------------------------------------
// product-<data_id>: a staged product and its publication.

/// A product was written to the stage root. `S` is how its text is held: owned (the
/// default), or borrowed from the payload when a fold reads it in place
/// ([`ProductRegistered::plain`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "S: Deserialize<'de> + Ord"))]
pub struct ProductRegistered<S = String> {
    pub data_id: S,
    pub data_type: S,
    pub stage_path: S,
    /// BLAKE3 of the staged file (or of a folder's files in name order), hex.
    #[serde(default)]
    pub checksum: Option<S>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub qa_status: Option<S>,
    #[serde(default)]
    pub validation_status: Option<S>,
    #[serde(default = "default_true")]
    pub auto_publish: bool,
    /// Free-form string pairs from the producer.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<S, S>,
}
domain_event!(ProductRegistered, "ProductRegistered", 1, "product", plain: ProductRegistered::plain);

impl<'a, S: From<&'a str> + Ord> ProductRegistered<S> {
    /// The plain reader ([`DomainEvent::read_plain`]), its strings held as `S`: owned, or
    /// borrowed from `text`.
    pub fn plain(text: &'a str) -> Option<Self> {
        let [id, ty, path, sum, size, qa, validation, auto, meta] = read_object(
            text,
            &[
                "data_id",
                "data_type",
                "stage_path",
                "checksum",
                "size_bytes",
                "qa_status",
                "validation_status",
                "auto_publish",
                "metadata",
            ],
        )?;
        Some(ProductRegistered {
            data_id: flat_json::text(id)?,
            data_type: flat_json::text(ty)?,
            stage_path: flat_json::text(path)?,
            checksum: flat_json::opt_text(sum)?,
            size_bytes: flat_json::opt_uint(size)?,
            qa_status: flat_json::opt_text(qa)?,
            validation_status: flat_json::opt_text(validation)?,
            auto_publish: flat_json::flag_or(auto, default_true())?,
            metadata: flat_json::empty_map(meta)?,
        })
    }
}

fn default_true() -> bool {
    true
}

/// QA and validation verdicts were set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductFinalized {
    #[serde(default)]
    pub qa_status: Option<String>,
    #[serde(default)]
    pub validation_status: Option<String>,
}
domain_event!(ProductFinalized, "ProductFinalized", 1, "product", plain: |text| {
    let [qa, validation] = read_object(text, &["qa_status", "validation_status"])?;
    Some(ProductFinalized {
        qa_status: flat_json::opt_text(qa)?,
        validation_status: flat_json::opt_text(validation)?,
    })
});

/// A publisher took the product's lock (appended with `Exact(revision)`). `S` as in
/// [`ProductRegistered`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishStarted<S = String> {
    /// Automatic attempt number since the last operator retry, this one included.
    pub attempt: u32,
    pub destination: S,
    /// `auto`, `manual` or `retry`.
    pub trigger: S,
}
domain_event!(PublishStarted, "PublishStarted", 1, "product", plain: PublishStarted::plain);

impl<'a, S: From<&'a str>> PublishStarted<S> {
    /// The plain reader, its strings held as `S` (see [`ProductRegistered::plain`]).
    pub fn plain(text: &'a str) -> Option<Self> {
        let [attempt, destination, trigger] =
            read_object(text, &["attempt", "destination", "trigger"])?;
        Some(PublishStarted {
            attempt: flat_json::uint32(attempt)?,
            destination: flat_json::text(destination)?,
            trigger: flat_json::text(trigger)?,
        })
    }
}

/// The file is in the products root and verified. `S` as in [`ProductRegistered`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishSucceeded<S = String> {
    pub published_path: S,
    #[serde(default)]
    pub checksum: Option<S>,
    #[serde(default)]
    pub duration_ms: u64,
    /// True when recovery at start-up found the move complete.
    #[serde(default)]
    pub recovered: bool,
}
domain_event!(PublishSucceeded, "PublishSucceeded", 1, "product", plain: PublishSucceeded::plain);

impl<'a, S: From<&'a str>> PublishSucceeded<S> {
    /// The plain reader, its strings held as `S` (see [`ProductRegistered::plain`]).
    pub fn plain(text: &'a str) -> Option<Self> {
        let [path, sum, duration, recovered] = read_object(
            text,
            &["published_path", "checksum", "duration_ms", "recovered"],
        )?;
        Some(PublishSucceeded {
            published_path: flat_json::text(path)?,
            checksum: flat_json::opt_text(sum)?,
            duration_ms: flat_json::uint_or(duration, 0)?,
            recovered: flat_json::flag_or(recovered, false)?,
        })
    }
}

/// A publish attempt failed; the product is back in staging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishFailed {
    pub attempt: u32,
    /// At most 500 characters.
    pub error: String,
    pub retryable: bool,
    /// True when recovery at start-up found the attempt cut short by a crash.
    #[serde(default)]
    pub interrupted: bool,
    /// When the next automatic attempt is due (RFC 3339); `None` when none is.
    #[serde(default)]
    pub next_retry_at: Option<String>,
}
domain_event!(PublishFailed, "PublishFailed", 1, "product", plain: |text| {
    let [attempt, error, retryable, interrupted, next] = read_object(
        text,
        &["attempt", "error", "retryable", "interrupted", "next_retry_at"],
    )?;
    Some(PublishFailed {
        attempt: flat_json::uint32(attempt)?,
        error: flat_json::text(error)?,
        retryable: flat_json::flag(retryable)?,
        interrupted: flat_json::flag_or(interrupted, false)?,
        next_retry_at: flat_json::opt_text(next)?,
    })
});

/// An operator asked for another try: the automatic attempt count starts again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRequested {
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}
domain_event!(RetryRequested, "RetryRequested", 1, "product", plain: |text| {
    let [actor, reason] = read_object(text, &["actor", "reason"])?;
    Some(RetryRequested {
        actor: flat_json::opt_text(actor)?,
        reason: flat_json::opt_text(reason)?,
    })
});

/// Why an event was refused by the catalogue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogueError {
    #[error("event type {event_type:?} is not known in category {category:?}")]
    UnknownType {
        category: String,
        event_type: String,
    },
    #[error("payload of {event_type} v{version} does not decode: {reason}")]
    BadPayload {
        event_type: String,
        version: u32,
        reason: String,
    },
    #[error("{event_type} has no version {version}; the current one is {current}")]
    UnknownVersion {
        event_type: String,
        version: u32,
        current: u32,
    },
}

/// A stream's name, `category-id`, built by the one constructor of its category (the
/// ledger's API takes it as a `&str` through `Deref`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    /// `ingest-<YYYY-MM-DD>`: the subband files of one observing day.
    pub fn ingest(date: chrono::NaiveDate) -> Self {
        StreamName(format!("ingest-{}", date.format("%Y-%m-%d")))
    }
    /// `group-<group_id>`: one observation's group and its stages.
    pub fn group(group_id: &str) -> Self {
        StreamName(format!("group-{group_id}"))
    }
    /// `mosaic-<mosaic_id>`: a mosaic group's decision and its build.
    pub fn mosaic(mosaic_id: &str) -> Self {
        StreamName(format!("mosaic-{mosaic_id}"))
    }
    /// `product-<data_id>`: a staged product's publish lifecycle.
    pub fn product(id: &DataId) -> Self {
        StreamName(format!("product-{}", id.as_str()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The id part of `name` when it is a stream of `category` with an id.
    pub fn id_in<'a>(name: &'a str, category: &str) -> Option<&'a str> {
        name.strip_prefix(category)?
            .strip_prefix('-')
            .filter(|id| !id.is_empty())
    }
}

impl std::ops::Deref for StreamName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A product's id (`data_id`), checked: 1 to [`DataId::MAX`] letters, digits and
/// `._:+-`, not `.` or `..` (which would name a folder rather than a product), so that
/// `product-<data_id>` stays within a stream name's 200 characters. A product id and a
/// stream name are different types.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataId(String);

impl DataId {
    pub const MAX: usize = 192;

    /// The id, or the input (cut to 210 characters) when it breaks the rule.
    pub fn parse(id: &str) -> Result<DataId, String> {
        let ok = !id.is_empty()
            && id.chars().count() <= Self::MAX
            && id != "."
            && id != ".."
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:+-".contains(c));
        if ok {
            Ok(DataId(id.to_string()))
        } else {
            Err(id.chars().take(210).collect())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DataId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The domain categories: streams in these only take catalogue events.
pub const DOMAIN_CATEGORIES: &[&str] = &["ingest", "group", "mosaic", "product"];

/// Categories written only by their commands (the publish lifecycle, by the publisher),
/// never by a raw append from outside the process that owns the ledger.
pub const COMMAND_ONLY_CATEGORIES: &[&str] = &["product"];

/// Whether an append of `event_type` to `stream` is one only the commands may make: a
/// stream of a command-only category, or an event type of one, in whatever stream.
/// The events of a move of files: on a shared ledger only the current leader may append
/// them, and the store refuses them from a server whose lead has passed to another.
pub const LEADER_ONLY_TYPES: &[&str] = &["PublishStarted", "PublishSucceeded", "PublishFailed"];

pub fn leader_only(event_type: &str) -> bool {
    LEADER_ONLY_TYPES.contains(&event_type)
}

/// Whether `event_type` is a catalogue type of `stream`'s category: what the counters of
/// the pipeline and the publisher count, so that a look-alike event in another stream
/// (`scratch-*` takes any payload) counts for nothing.
pub fn in_its_category(stream: &str, event_type: &str) -> bool {
    let category = category_of(stream);
    entries()
        .iter()
        .any(|e| e.name == event_type && e.category == category)
}

pub fn command_only(stream: &str, event_type: &str) -> bool {
    COMMAND_ONLY_CATEGORIES.contains(&category_of(stream))
        || entries()
            .iter()
            .any(|e| e.name == event_type && COMMAND_ONLY_CATEGORIES.contains(&e.category))
}

/// A payload as its type: checked to be UTF-8 once, whole, then read in place if it is
/// plain ([`DomainEvent::read_plain`]), else parsed as text by serde_json. Parsed
/// from bytes, serde_json checks each string and key on its own, in many short calls (with
/// its string parsing, 11.6% of a 10 M-event audit's samples; 5.3% since), and not at all
/// in a field it ignores. The append's check and the folds both read payloads here, so
/// they agree on which payloads decode.
pub fn decode_payload<T: DomainEvent>(bytes: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    if let Some(plain) = T::read_plain(text) {
        return Ok(plain);
    }
    serde_json::from_str(text).map_err(|e| e.to_string())
}

struct Entry {
    category: &'static str,
    name: &'static str,
    version: u32,
    check: fn(&[u8]) -> Result<(), String>,
}

fn entry<T: DomainEvent>() -> Entry {
    entry_in::<T>(T::CATEGORY)
}

/// A type that is also stored in a second category (the stage events in `mosaic-`).
fn entry_in<T: DomainEvent>(category: &'static str) -> Entry {
    Entry {
        category,
        name: T::TYPE,
        version: T::VERSION,
        check: |bytes| decode_payload::<T>(bytes).map(|_| ()),
    }
}

fn entries() -> [Entry; 19] {
    [
        entry::<SubbandFileAccepted>(),
        entry::<SubbandFileRejected>(),
        entry::<IngestGroupTimedOut>(),
        entry::<GroupRejected>(),
        entry::<GroupFormed>(),
        entry::<StageStarted>(),
        entry::<StageCompleted>(),
        entry::<StageFailed>(),
        entry::<MosaicGroupCreated>(),
        entry::<MosaicGroupRejected>(),
        entry_in::<StageStarted>("mosaic"),
        entry_in::<StageCompleted>("mosaic"),
        entry_in::<StageFailed>("mosaic"),
        entry::<ProductRegistered>(),
        entry::<ProductFinalized>(),
        entry::<PublishStarted>(),
        entry::<PublishSucceeded>(),
        entry::<PublishFailed>(),
        entry::<RetryRequested>(),
    ]
}

/// `(category, type, version)` of every catalogue event.
pub fn list() -> Vec<(&'static str, &'static str, u32)> {
    entries()
        .iter()
        .map(|e| (e.category, e.name, e.version))
        .collect()
}

/// Checks an event bound for `stream` and returns the version to store. In a domain
/// category the type must be in the catalogue and the payload must decode; `version`
/// (when the client gives one) must be a version the catalogue knows. Elsewhere any type
/// goes, at the version given or 1.
pub fn check(
    stream: &str,
    event_type: &str,
    version: Option<u32>,
    data: &[u8],
) -> Result<u32, CatalogueError> {
    let category = category_of(stream);
    if !DOMAIN_CATEGORIES.contains(&category) {
        return Ok(version.unwrap_or(1));
    }
    let entries = entries();
    let Some(e) = entries
        .iter()
        .find(|e| e.category == category && e.name == event_type)
    else {
        return Err(CatalogueError::UnknownType {
            category: category.to_string(),
            event_type: event_type.to_string(),
        });
    };
    if !data.trim_ascii_start().starts_with(b"{") {
        return Err(CatalogueError::BadPayload {
            event_type: event_type.to_string(),
            version: version.unwrap_or(e.version),
            reason: "the payload must be a JSON object".into(),
        });
    }
    let version = version.unwrap_or(e.version);
    if version != e.version {
        return Err(CatalogueError::UnknownVersion {
            event_type: event_type.to_string(),
            version,
            current: e.version,
        });
    }
    (e.check)(data).map_err(|reason| CatalogueError::BadPayload {
        event_type: event_type.to_string(),
        version,
        reason,
    })?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_streams_take_only_catalogue_events_that_decode() {
        let ok = br#"{"attempt":1,"destination":"/p/x","trigger":"auto"}"#;
        assert_eq!(check("product-x", "PublishStarted", None, ok), Ok(1));
        assert!(matches!(
            check("product-x", "Nonsense", None, b"{}"),
            Err(CatalogueError::UnknownType { .. })
        ));
        assert!(matches!(
            check("product-x", "PublishStarted", None, br#"{"attempt":"one"}"#),
            Err(CatalogueError::BadPayload { .. })
        ));
        assert!(matches!(
            check("product-x", "PublishStarted", Some(9), ok),
            Err(CatalogueError::UnknownVersion { .. })
        ));
        // A type of another category is unknown here.
        assert!(check("group-x", "PublishStarted", None, ok).is_err());
    }

    #[test]
    fn other_categories_take_anything() {
        assert_eq!(check("scratch-1", "Whatever", None, b"{}"), Ok(1));
        assert_eq!(check("scratch-1", "Whatever", Some(3), b"{}"), Ok(3));
    }

    #[test]
    fn every_type_is_listed_once_per_category() {
        let l = list();
        let mut pairs: Vec<_> = l.iter().map(|(c, n, _)| (*c, *n)).collect();
        pairs.sort();
        pairs.dedup();
        assert_eq!(pairs.len(), l.len());
        let mut names: Vec<_> = l.iter().map(|(_, n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 16);
    }

    #[test]
    fn stage_events_live_in_group_and_mosaic_streams() {
        let started = br#"{"stage":"mosaic","attempt":1}"#;
        assert!(check("mosaic-x", "StageStarted", None, started).is_ok());
        assert!(check("group-x", "StageStarted", None, started).is_ok());
        assert!(check("product-x", "StageStarted", None, started).is_err());
    }

    /// What a field holds, for the payload generator below.
    #[derive(Clone, Copy)]
    enum Kind {
        Str,
        OptStr,
        U32,
        U64,
        OptU64,
        Bool,
        Map,
    }

    /// One payload text for a type with `fields` (name, kind, required), and whether it is
    /// written the plain way (every required field there and of its kind, strings without
    /// escapes, nothing added, cut or changed), which the plain reader must then read.
    fn payload(rng: &mut rand::rngs::StdRng, fields: &[(&str, Kind, bool)]) -> (Vec<u8>, bool) {
        use rand::Rng;
        use rand::seq::SliceRandom;
        type R = rand::rngs::StdRng;
        const ODD: &[&str] = &[
            "-1",
            "-0",
            "01",
            "1.0",
            "1e3",
            "2E1",
            "0.5",
            "10}",
            "tru",
            "truex",
            "nul",
            "nullx",
            "[]",
            "[1]",
            "[\"a\"]",
            "{\"k\":\"v\"}",
            "{\"k\":1}",
            "true",
            "false",
            "null",
            "{}",
            "0",
            "4294967296",
            "18446744073709551616",
            "\"x\"",
            "\"a\\u0062\"",
            "\"\\u00e9\"",
            "\"\u{1F}\"",
            "\"\"",
            "{",
            "\"open",
        ];
        // The first four need no escape; the rest either side of the bytes a string must
        // escape, and characters whose UTF-8 bytes lie near those.
        const CHARS: &[char] = &[
            'a',
            '/',
            '\u{E9}',
            '\u{1F4E1}',
            '"',
            '\\',
            '\n',
            '\u{1}',
            '\u{1F}',
            ' ',
            '!',
            '#',
            '[',
            ']',
            '\u{7F}',
            '\u{A2}',
            '\u{DC}',
            '\u{2028}',
            '\u{10FFFF}',
        ];
        let edges = [
            0u64,
            1,
            9,
            10,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ];
        let mut plain = true;
        // JSON's whitespace, and rarely a character JSON does not take as whitespace.
        let ws = |rng: &mut R, plain: &mut bool| {
            if rng.gen_bool(0.01) {
                *plain = false;
                return *["\u{C}", "\u{B}", "\u{A0}", "\u{FEFF}"]
                    .choose(rng)
                    .unwrap();
            }
            *["", "", "", " ", "\n", "\t", "\r\n  "].choose(rng).unwrap()
        };
        let string = |rng: &mut R, plain: &mut bool| {
            let n = rng.gen_range(0..40);
            // Most strings need no escape; some may.
            let pool = if rng.gen_bool(0.8) { 4 } else { CHARS.len() };
            let s: String = (0..n).map(|_| CHARS[rng.gen_range(0..pool)]).collect();
            *plain &= !s.contains(|c: char| c == '"' || c == '\\' || c < ' ');
            serde_json::to_string(&s).unwrap()
        };
        let value = |rng: &mut R, kind: Kind, plain: &mut bool| -> String {
            let int = |rng: &mut R, max: u64, plain: &mut bool| {
                let n = if rng.gen_bool(0.5) {
                    edges[rng.gen_range(0..edges.len())]
                } else {
                    rng.r#gen::<u64>() >> rng.gen_range(0..64)
                };
                *plain &= n <= max;
                n.to_string()
            };
            if rng.gen_bool(0.04) {
                *plain = false;
                return ODD[rng.gen_range(0..ODD.len())].to_string();
            }
            match kind {
                Kind::Str => string(rng, plain),
                Kind::OptStr if rng.gen_bool(0.3) => "null".into(),
                Kind::OptStr => string(rng, plain),
                Kind::U32 => int(rng, u64::from(u32::MAX), plain),
                Kind::OptU64 if rng.gen_bool(0.3) => "null".into(),
                Kind::U64 | Kind::OptU64 => int(rng, u64::MAX, plain),
                Kind::Bool => rng.gen_bool(0.5).to_string(),
                Kind::Map => {
                    let m = *["{}", "{ }", "{\"k\":\"v\"}"].choose(rng).unwrap();
                    *plain &= m != "{\"k\":\"v\"}";
                    m.to_string()
                }
            }
        };
        let mut entries: Vec<(String, String)> = Vec::new();
        for &(name, kind, required) in fields {
            if rng.gen_bool(if required { 0.05 } else { 0.3 }) {
                plain &= !required;
                continue;
            }
            let v = value(rng, kind, &mut plain);
            entries.push((name.to_string(), v));
        }
        if rng.gen_bool(0.1) {
            // A key added: another of the type's (repeated), or one near a name.
            plain = false;
            let (name, kind, _) = fields[rng.gen_range(0..fields.len())];
            let mut first = name.chars();
            let c = first.next().unwrap();
            let key = match rng.gen_range(0..7) {
                0 => name.to_string(),
                1 => name[..name.len() - 1].to_string(),
                2 => format!("{name}x"),
                3 => String::new(),
                4 => name.to_uppercase(),
                5 => format!("\\u{:04x}{}", c as u32, first.as_str()),
                _ => "unknown".to_string(),
            };
            let v = value(rng, kind, &mut plain);
            let at = rng.gen_range(0..=entries.len());
            entries.insert(at, (key, v));
        }
        if rng.gen_bool(0.2) {
            // Out of order: still read here, by name.
            entries.shuffle(rng);
        }
        let mut text = ws(rng, &mut plain).to_string();
        // serde also reads a struct from an array of its fields; the plain reader does not.
        let (open, close) = if rng.gen_bool(0.03) {
            plain = false;
            ("[", "]")
        } else {
            ("{", "}")
        };
        text += open;
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 {
                text += ws(rng, &mut plain);
                text += ",";
            }
            text += ws(rng, &mut plain);
            if open == "[" {
                text += v;
                continue;
            }
            text += &format!("\"{k}\"");
            text += ws(rng, &mut plain);
            text += ":";
            text += ws(rng, &mut plain);
            text += v;
        }
        text += ws(rng, &mut plain);
        text += close;
        text += ws(rng, &mut plain);
        let mut bytes = text.into_bytes();
        if rng.gen_bool(0.2) {
            plain = false;
            for _ in 0..rng.gen_range(1..=3) {
                let at = rng.gen_range(0..=bytes.len());
                match rng.gen_range(0..3) {
                    0 => bytes.truncate(at),
                    1 => bytes.insert(at, *b",}\"\\x 0{[\xC3\x1F".choose(rng).unwrap()),
                    _ if at < bytes.len() => bytes[at] = rng.r#gen(),
                    _ => bytes.push(rng.r#gen()),
                }
            }
        }
        (bytes, plain)
    }

    /// The read model's reading of a product fact in place (its text borrowed from the
    /// payload, `ProductFact::decode_view`) gives what the owned reading gives, fact or
    /// refusal, and it reads in place every payload the plain reader answers (`plain`).
    /// The same payload in another category, or under a type no product fact has, is
    /// read alike by both too.
    fn same_fact(event_type: &str, bytes: &[u8], plain: bool) {
        use crate::projections::product::{ProductEvent, ProductFact};
        let shown = String::from_utf8_lossy(bytes);
        for (stream, ty) in [
            ("product-p1", event_type),
            ("group-p1", event_type),
            ("product-p1", "ProductRenamed"),
        ] {
            let mut e = crate::events::RecordedEvent::noted(
                stream,
                3,
                9,
                uuid::Uuid::nil(),
                1_700_000_000_000_000,
            );
            e.event_type = ty.to_string();
            e.data = bytes.to_vec();
            let r = e.view();
            let owned = ProductEvent::decode_view(&r)
                .map(|o| o.map(|f| ProductFact::new(f, "p1", r.created_micros, r.revision)));
            assert_eq!(ProductFact::decode_view(&r), owned, "{stream} {ty} {shown}");
            let in_place = ProductEvent::plain(&r).is_some();
            let expected = plain && stream == "product-p1" && ty == event_type;
            assert_eq!(in_place, expected, "read in place: {stream} {ty} {shown}");
        }
    }

    /// Holds `T`'s plain reader to serde_json on random payloads: where it answers, serde
    /// reads the same value; on a payload written the plain way, it answers. Returns how
    /// many it answered and how many serde_json read.
    fn hold_to_serde<T: DomainEvent + PartialEq + std::fmt::Debug>(
        rng: &mut rand::rngs::StdRng,
        fields: &[(&str, Kind, bool)],
    ) -> (usize, usize) {
        let (mut answered, mut read) = (0, 0);
        for _ in 0..4000 {
            let (bytes, plain) = payload(rng, fields);
            // serde_json as `decode_payload` calls it: from bytes, serde_json would not
            // check the UTF-8 of strings in keys it ignores.
            let by_serde = std::str::from_utf8(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<T>(t).map_err(|e| e.to_string()));
            let by_hand = std::str::from_utf8(&bytes).ok().and_then(T::read_plain);
            let shown = String::from_utf8_lossy(&bytes);
            if let Some(v) = &by_hand {
                assert_eq!(by_serde.as_ref().ok(), Some(v), "{} {shown}", T::TYPE);
                answered += 1;
            }
            if plain {
                assert!(by_hand.is_some(), "{} read by serde only: {shown}", T::TYPE);
            }
            assert_eq!(
                decode_payload::<T>(&bytes).ok().as_ref(),
                by_serde.as_ref().ok()
            );
            same_fact(T::TYPE, &bytes, by_hand.is_some());
            read += usize::from(by_serde.is_ok());
        }
        (answered, read)
    }

    #[test]
    fn product_payloads_read_in_place_exactly_as_serde_json_reads_them() {
        use Kind::*;
        let rng = &mut crate::test_rng().0;
        let counts = [
            hold_to_serde::<ProductRegistered>(
                rng,
                &[
                    ("data_id", Str, true),
                    ("data_type", Str, true),
                    ("stage_path", Str, true),
                    ("checksum", OptStr, false),
                    ("size_bytes", OptU64, false),
                    ("qa_status", OptStr, false),
                    ("validation_status", OptStr, false),
                    ("auto_publish", Bool, false),
                    ("metadata", Map, false),
                ],
            ),
            hold_to_serde::<ProductFinalized>(
                rng,
                &[
                    ("qa_status", OptStr, false),
                    ("validation_status", OptStr, false),
                ],
            ),
            hold_to_serde::<PublishStarted>(
                rng,
                &[
                    ("attempt", U32, true),
                    ("destination", Str, true),
                    ("trigger", Str, true),
                ],
            ),
            hold_to_serde::<PublishSucceeded>(
                rng,
                &[
                    ("published_path", Str, true),
                    ("checksum", OptStr, false),
                    ("duration_ms", U64, false),
                    ("recovered", Bool, false),
                ],
            ),
            hold_to_serde::<PublishFailed>(
                rng,
                &[
                    ("attempt", U32, true),
                    ("error", Str, true),
                    ("retryable", Bool, true),
                    ("interrupted", Bool, false),
                    ("next_retry_at", OptStr, false),
                ],
            ),
            hold_to_serde::<RetryRequested>(
                rng,
                &[("actor", OptStr, false), ("reason", OptStr, false)],
            ),
        ];
        eprintln!("answered in place, read by serde_json, of 4000 each: {counts:?}");
        for (answered, read) in counts {
            // Every path is taken: payloads read in place, some left to serde_json, some
            // refused by it.
            assert!(
                answered >= 200 && read > answered && read < 4000,
                "{counts:?}"
            );
        }
    }
}
