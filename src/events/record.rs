//! The record envelope: what one stored event looks like, and its on-disk codec.
//!
//! On disk a record is `[format: u8][crc32 of body: u32 LE][body]`, the body being the
//! bincode encoding of [`RecordV1`]. The checksum covers every field, position included,
//! so a record copied to the wrong place fails verification. Payloads (`data`,
//! `metadata`) are JSON bytes kept opaque here: bincode structs hold no `serde_json::Value`
//! and no `skip_serializing_if`, both of which encode and then fail to decode.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
#[cfg(test)]
use serde::Deserialize;
use serde::Serialize;
use uuid::Uuid;

/// Format byte of the only envelope version so far. A new layout gets a new byte and a
/// decoder beside this one; stored bytes are never rewritten.
pub const FORMAT_V1: u8 = 1;

/// One committed event, as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    /// 0-based number of the event in its stream.
    pub revision: u64,
    /// 0-based global position in commit order, gapless.
    pub position: u64,
    pub event_type: String,
    pub event_version: u32,
    /// JSON bytes.
    pub data: Vec<u8>,
    /// JSON bytes (correlation id, causation id, actor, host).
    pub metadata: Vec<u8>,
    /// Commit time, microseconds since the Unix epoch (UTC), monotonic with position.
    pub created_micros: i64,
    /// CRC-32 of the encoded body.
    pub checksum: u32,
}

/// An event offered for appending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposedEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: u32,
    pub data: Vec<u8>,
    pub metadata: Vec<u8>,
}

impl ProposedEvent {
    /// A proposed event with a fresh v7 id.
    pub fn new(event_type: impl Into<String>, event_version: u32, data: Vec<u8>) -> Self {
        ProposedEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            event_version,
            data,
            metadata: b"{}".to_vec(),
        }
    }

    pub fn with_metadata(mut self, metadata: Vec<u8>) -> Self {
        self.metadata = metadata;
        self
    }
}

/// The body as bincode sees it, borrowed both ways: bincode encodes it from the record's
/// own fields, and [`RecordV1::read`] reads it in place, so neither copies a payload. Field
/// order is the stored contract. bincode's own reading (the `Deserialize` derive) serves
/// only as the test's oracle for the reader.
#[derive(Serialize)]
#[cfg_attr(test, derive(Deserialize, Debug, PartialEq))]
struct RecordV1<'a> {
    event_id: [u8; 16],
    #[serde(borrow)]
    stream_id: &'a str,
    revision: u64,
    position: u64,
    #[serde(borrow)]
    event_type: &'a str,
    event_version: u32,
    // serde_bytes: the same bytes on disk as a sequence of u8 (a varint length, then one
    // byte each), read and written in one copy instead of one visitor call per byte.
    #[serde(borrow, with = "serde_bytes")]
    data: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    metadata: &'a [u8],
    created_micros: i64,
}

impl<'a> RecordV1<'a> {
    /// The body read in place, field by field, exactly as bincode's standard configuration
    /// (`config()`) reads it: 16 bytes of id; strings and byte strings as a length and
    /// their bytes; integers as bincode's variable-length integers (zigzag for `i64`).
    /// By hand because bincode's serde path visits each of the id's bytes and each field
    /// through several calls, and checks every name as UTF-8 in full where a word-wide
    /// ASCII check settles almost all: with the checksum, 1,157 instructions a record
    /// before, 839 now (callgrind, `docs/benchmarks.md`). Bytes past the body are ignored,
    /// as bincode ignores them. A test holds this reader to bincode's on random and
    /// damaged bodies.
    fn read(body: &'a [u8]) -> Result<RecordV1<'a>, DecodeError> {
        let mut r = BodyReader(body);
        Ok(RecordV1 {
            event_id: r.take(16, "event id")?.try_into().expect("16 bytes"),
            stream_id: r.str("stream id")?,
            revision: r.varint(U64_TAG, "revision")?,
            position: r.varint(U64_TAG, "position")?,
            event_type: r.str("event type")?,
            event_version: r.varint(U32_TAG, "event version")? as u32,
            data: r.bytes("data")?,
            metadata: r.bytes("metadata")?,
            created_micros: {
                let n = r.varint(U64_TAG, "commit time")?;
                // Zigzag: even numbers are the non-negative ones.
                if n % 2 == 0 {
                    (n / 2) as i64
                } else {
                    !(n / 2) as i64
                }
            },
        })
    }
}

/// The largest tag of bincode's variable-length integers a `u32` may carry (the next
/// four bytes hold it).
const U32_TAG: u8 = 252;
/// The largest tag a `u64` (or a length) may carry (the next eight bytes hold it).
const U64_TAG: u8 = 253;

/// The unread rest of a record's body.
struct BodyReader<'a>(&'a [u8]);

impl<'a> BodyReader<'a> {
    #[inline]
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        match self.0.split_at_checked(n) {
            Some((head, rest)) => {
                self.0 = rest;
                Ok(head)
            }
            None => Err(self.ends(n, what)),
        }
    }

    #[cold]
    fn ends(&self, n: usize, what: &str) -> DecodeError {
        DecodeError::Body(format!(
            "the body ends inside its {what}: {n} bytes wanted, {} left",
            self.0.len()
        ))
    }

    /// A variable-length integer: below 251 the byte itself; 251, 252 and 253 are followed
    /// by 2, 4 and 8 bytes little-endian. A tag above `max_tag` is refused, as bincode
    /// refuses a wider integer than the field's.
    #[inline]
    fn varint(&mut self, max_tag: u8, what: &str) -> Result<u64, DecodeError> {
        let tag = self.take(1, what)?[0];
        let width = match tag {
            0..=250 => return Ok(u64::from(tag)),
            _ if tag > max_tag => {
                return Err(DecodeError::Body(format!(
                    "its {what} has integer tag {tag}, wider than the field"
                )));
            }
            251 => 2,
            252 => 4,
            253 => 8,
            // A 16-byte integer (254) or a reserved tag: no field of a record holds one.
            _ => {
                return Err(DecodeError::Body(format!(
                    "its {what} has integer tag {tag}"
                )));
            }
        };
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(self.take(width, what)?);
        Ok(u64::from_le_bytes(le))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(U64_TAG, what)?;
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::Body(format!("its {what} is {len} bytes long")))?;
        self.take(len, what)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let bytes = self.bytes(what)?;
        // Names are almost always ASCII, checked a word at a time; anything else gets the
        // full UTF-8 check.
        if bytes.is_ascii() {
            // SAFETY: ASCII is UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        std::str::from_utf8(bytes)
            .map_err(|e| DecodeError::Body(format!("its {what} is not UTF-8: {e}")))
    }
}

/// A stored record read in place, without copying its strings and payloads: for folds
/// over millions of events that look at most of them only to skip them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub event_id: Uuid,
    pub stream_id: &'a str,
    pub revision: u64,
    pub position: u64,
    pub event_type: &'a str,
    pub event_version: u32,
    pub data: &'a [u8],
    pub metadata: &'a [u8],
    pub created_micros: i64,
}

impl<'a> RecordRef<'a> {
    /// Commit time.
    pub fn created(&self) -> DateTime<Utc> {
        micros_to_datetime(self.created_micros)
    }

    /// The stream's category: the part before the first `-`.
    pub fn category(&self) -> &'a str {
        category_of(self.stream_id)
    }

    /// Decodes stored bytes in place, checking the checksum.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Self::decode_with_checksum(bytes).map(|(r, _)| r)
    }

    /// The record and its stored checksum.
    fn decode_with_checksum(bytes: &'a [u8]) -> Result<(Self, u32), DecodeError> {
        let checksum = check_header(bytes)?;
        let b = RecordV1::read(&bytes[5..])?;
        let r = RecordRef {
            event_id: Uuid::from_bytes(b.event_id),
            stream_id: b.stream_id,
            revision: b.revision,
            position: b.position,
            event_type: b.event_type,
            event_version: b.event_version,
            data: b.data,
            metadata: b.metadata,
            created_micros: b.created_micros,
        };
        Ok((r, checksum))
    }
}

/// Format byte and checksum; returns the stored checksum.
fn check_header(bytes: &[u8]) -> Result<u32, DecodeError> {
    if bytes.len() < 5 {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if bytes[0] != FORMAT_V1 {
        return Err(DecodeError::UnknownFormat(bytes[0]));
    }
    let stored = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&bytes[5..]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok(stored)
}

/// Why stored bytes could not be turned back into a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("undecodable body: {0}")]
    Body(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

#[cfg(test)]
impl RecordedEvent {
    /// A `Noted` event with an empty payload, for tests that write records past the store.
    pub(crate) fn noted(
        stream: &str,
        revision: u64,
        position: u64,
        id: Uuid,
        created_micros: i64,
    ) -> RecordedEvent {
        RecordedEvent {
            event_id: id,
            stream_id: stream.into(),
            revision,
            position,
            event_type: "Noted".into(),
            event_version: 1,
            data: b"{}".to_vec(),
            metadata: b"{}".to_vec(),
            created_micros,
            checksum: 0,
        }
    }
}

impl RecordedEvent {
    /// Encodes the record and fills in its checksum.
    pub fn encode(&mut self) -> Vec<u8> {
        let body = RecordV1 {
            event_id: *self.event_id.as_bytes(),
            stream_id: &self.stream_id,
            revision: self.revision,
            position: self.position,
            event_type: &self.event_type,
            event_version: self.event_version,
            data: &self.data,
            metadata: &self.metadata,
            created_micros: self.created_micros,
        };
        let mut out = Vec::with_capacity(64 + self.data.len() + self.metadata.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&[0; 4]);
        bincode::serde::encode_into_std_write(&body, &mut out, config())
            .expect("encoding into a Vec cannot fail");
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        self.checksum = crc;
        out
    }

    /// Decodes stored bytes, checking the checksum.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (r, checksum) = RecordRef::decode_with_checksum(bytes)?;
        Ok(RecordedEvent {
            event_id: r.event_id,
            stream_id: r.stream_id.to_string(),
            revision: r.revision,
            position: r.position,
            event_type: r.event_type.to_string(),
            event_version: r.event_version,
            data: r.data.to_vec(),
            metadata: r.metadata.to_vec(),
            created_micros: r.created_micros,
            checksum,
        })
    }

    pub fn created(&self) -> DateTime<Utc> {
        micros_to_datetime(self.created_micros)
    }

    /// The record as a borrowed view, as if read in place.
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            event_id: self.event_id,
            stream_id: &self.stream_id,
            revision: self.revision,
            position: self.position,
            event_type: &self.event_type,
            event_version: self.event_version,
            data: &self.data,
            metadata: &self.metadata,
            created_micros: self.created_micros,
        }
    }

    /// Commit time as RFC 3339 with microseconds and `Z`.
    pub fn created_rfc3339(&self) -> String {
        format_time(self.created())
    }

    /// The stream's category: the part before the first `-`.
    pub fn category(&self) -> &str {
        category_of(&self.stream_id)
    }
}

pub fn micros_to_datetime(micros: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// UTC time as RFC 3339 with microseconds and a `Z` suffix.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `group-2026-11-30T10:00:00` has category `group`; a name without `-` is its own category.
pub fn category_of(stream_id: &str) -> &str {
    first_dash(stream_id).map_or(stream_id, |i| &stream_id[..i])
}

/// `product-img_1` names the entity `img_1`; a name without `-` names none (`""`).
pub fn entity_of(stream_id: &str) -> &str {
    first_dash(stream_id).map_or("", |i| &stream_id[i + 1..])
}

/// Where the first `-` is. Categories are short words, so a plain loop finds it in a few
/// steps, where `split_once` set up a vectorised search for each of the millions of
/// names a fold splits (4% of the fold's instructions, `docs/benchmarks.md`).
#[inline]
fn first_dash(name: &str) -> Option<usize> {
    name.bytes().position(|b| b == b'-')
}

/// Checks a stream name from a client: not empty, at most 200 characters, not starting
/// with `$` (reserved), no `/`, no control character.
pub fn validate_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("stream name is empty".into());
    }
    if name.chars().count() > 200 {
        return Err("stream name is longer than 200 characters".into());
    }
    if name.starts_with('$') {
        return Err(format!(
            "stream name {name:?} starts with '$', which is reserved"
        ));
    }
    if name.contains('/') {
        return Err(format!("stream name {name:?} contains '/'"));
    }
    if name.chars().any(char::is_control) {
        return Err("stream name contains a control character".into());
    }
    if name.chars().any(is_format_char) {
        return Err(format!(
            "stream name {:?} contains an invisible formatting character (bidi or zero-width)",
            name.escape_unicode().to_string()
        ));
    }
    if name.trim() != name {
        return Err(format!(
            "stream name {name:?} starts or ends with white space"
        ));
    }
    Ok(())
}

/// Longest event type, in characters.
pub const MAX_EVENT_TYPE: usize = 200;

/// Event types: 1 to [`MAX_EVENT_TYPE`] characters, no control or invisible formatting
/// character, no white space around them (a type is a name people read and match on).
pub fn validate_event_type(t: &str) -> Result<(), String> {
    if t.is_empty() || t.chars().count() > MAX_EVENT_TYPE {
        return Err(format!(
            "event type must be 1 to {MAX_EVENT_TYPE} characters"
        ));
    }
    if t.chars().any(|c| c.is_control() || is_format_char(c)) {
        return Err(format!(
            "event type {:?} contains a control or invisible formatting character",
            t.escape_debug().to_string()
        ));
    }
    if t.trim() != t {
        return Err(format!("event type {t:?} starts or ends with white space"));
    }
    Ok(())
}

/// Unicode's format characters (category Cf): bidi controls, zero-width joiners and
/// spaces, the byte-order mark and their kin. They make two names that look the same
/// differ, or reorder what a terminal shows.
pub fn is_format_char(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// How deeply a JSON text nests arrays and objects (strings are skipped, escapes
/// included). Linear, and never recursive, so it is safe on hostile input.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::now_v7(),
            stream_id: "product-abc".into(),
            revision: 3,
            position: 42,
            event_type: "PublishStarted".into(),
            event_version: 1,
            data: br#"{"attempt":1}"#.to_vec(),
            metadata: b"{}".to_vec(),
            created_micros: 1_764_000_000_000_000,
            checksum: 0,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut r = sample();
        let bytes = r.encode();
        assert_eq!(RecordedEvent::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn a_record_read_in_place_has_the_same_fields() {
        let mut r = sample();
        let bytes = r.encode();
        let v = RecordRef::decode(&bytes).unwrap();
        assert_eq!(v.event_id, r.event_id);
        assert_eq!(v.stream_id, r.stream_id);
        assert_eq!((v.revision, v.position), (r.revision, r.position));
        assert_eq!((v.event_type, v.event_version), (r.event_type.as_str(), 1));
        assert_eq!(v.data, &r.data[..]);
        assert_eq!(v.metadata, &r.metadata[..]);
        assert_eq!(v.created_micros, r.created_micros);
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            RecordRef::decode(&bad),
            Err(DecodeError::Checksum { .. })
        ));
    }

    /// Records written before `data` and `metadata` were declared as bytes encoded them as
    /// sequences of u8; bincode lays both out alike, so those records still decode.
    #[test]
    fn byte_fields_keep_the_sequence_layout() {
        #[derive(Serialize)]
        struct AsSequences {
            event_id: [u8; 16],
            stream_id: String,
            revision: u64,
            position: u64,
            event_type: String,
            event_version: u32,
            data: Vec<u8>,
            metadata: Vec<u8>,
            created_micros: i64,
        }
        let mut r = sample();
        let new = r.encode();
        let old_body = bincode::serde::encode_to_vec(
            AsSequences {
                event_id: *r.event_id.as_bytes(),
                stream_id: r.stream_id.clone(),
                revision: r.revision,
                position: r.position,
                event_type: r.event_type.clone(),
                event_version: r.event_version,
                data: r.data.clone(),
                metadata: r.metadata.clone(),
                created_micros: r.created_micros,
            },
            config(),
        )
        .unwrap();
        assert_eq!(&new[5..], &old_body[..]);
    }

    /// bincode's own reading of a body: the oracle for [`RecordV1::read`].
    fn bincode_read(body: &[u8]) -> Option<RecordV1<'_>> {
        bincode::serde::borrow_decode_from_slice::<RecordV1<'_>, _>(body, config())
            .ok()
            .map(|(b, _)| b)
    }

    /// Random records, with integers and lengths on each side of every width bincode
    /// switches at, read by hand and by bincode: the same fields. Then the same bodies cut
    /// short, with bytes changed, and with bytes added: where bincode reads a record the
    /// hand reader reads the same one, and where bincode refuses, so does it.
    #[test]
    fn the_body_is_read_by_hand_exactly_as_bincode_reads_it() {
        use rand::Rng;
        let (mut rng, seed) = crate::test_rng();
        let edges: [u64; 10] = [
            0,
            250,
            251,
            u16::MAX as u64,
            u16::MAX as u64 + 1,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            i64::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ];
        let int = |rng: &mut rand::rngs::StdRng| -> u64 {
            if rng.gen_bool(0.5) {
                edges[rng.gen_range(0..edges.len())]
            } else {
                rng.r#gen::<u64>() >> rng.gen_range(0..64)
            }
        };
        let lens = [0usize, 1, 250, 251, 300, 70_000];
        let (mut read, mut refused) = (0, 0);
        for _ in 0..300 {
            let text = |rng: &mut rand::rngs::StdRng| -> String {
                let n = lens[rng.gen_range(0..lens.len())].min(400);
                (0..n)
                    .map(|_| ['a', 'é', '-', '\u{1F4E1}'][rng.gen_range(0..4)])
                    .collect()
            };
            let bytes = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
                let n = lens[rng.gen_range(0..lens.len())];
                (0..n).map(|_| rng.r#gen()).collect()
            };
            let mut r = RecordedEvent {
                event_id: Uuid::from_bytes(rng.r#gen()),
                stream_id: text(&mut rng),
                revision: int(&mut rng),
                position: int(&mut rng),
                event_type: text(&mut rng),
                event_version: int(&mut rng) as u32,
                data: bytes(&mut rng),
                metadata: bytes(&mut rng),
                created_micros: int(&mut rng) as i64,
                checksum: 0,
            };
            let stored = r.encode();
            let body = &stored[5..];
            let by_hand = RecordV1::read(body).expect("a record just encoded");
            let oracle = bincode_read(body).expect("bincode reads it");
            assert_eq!(by_hand, oracle, "seed {seed}: read differently");
            assert_eq!(RecordRef::decode(&stored).unwrap(), r.view(), "seed {seed}");
            // Damaged bodies: cut, changed, lengthened.
            for _ in 0..20 {
                let mut bad = body.to_vec();
                match rng.gen_range(0..3) {
                    0 => bad.truncate(rng.gen_range(0..bad.len())),
                    1 => {
                        // Mostly in the header fields, where the integers and lengths are.
                        let at = rng.gen_range(0..bad.len().min(64));
                        bad[at] =
                            [250u8, 251, 252, 253, 254, 255, rng.r#gen()][rng.gen_range(0..7)];
                    }
                    _ => bad.extend((0..rng.gen_range(1..9)).map(|_| rng.r#gen::<u8>())),
                }
                match (RecordV1::read(&bad), bincode_read(&bad)) {
                    (Ok(a), Some(b)) => {
                        assert_eq!(a, b, "seed {seed}: read differently");
                        read += 1;
                    }
                    (Err(_), None) => refused += 1,
                    (a, b) => panic!(
                        "seed {seed}: by hand {:?}, bincode {}",
                        a.map(|_| "read"),
                        if b.is_some() { "read" } else { "refused" }
                    ),
                }
            }
        }
        // Both kinds of damage were met (a changed byte that leaves a readable record, a
        // cut that does not).
        assert!(read > 0 && refused > 0, "read {read}, refused {refused}");
        // Integers wider than their fields: a u32 given eight bytes, a u64 sixteen, a
        // reserved tag. Both refuse each; the same body with fitting widths reads.
        let body = |version: &[u8], revision: &[u8]| -> Vec<u8> {
            let mut b = vec![7u8; 16];
            b.extend([1, b's']);
            b.extend(revision);
            b.push(0);
            b.extend([1, b't']);
            b.extend(version);
            b.extend([0, 0, 0]);
            b
        };
        let fits = body(&[252, 1, 0, 0, 0], &[253, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(RecordV1::read(&fits).unwrap(), bincode_read(&fits).unwrap());
        assert_eq!(RecordV1::read(&fits).unwrap().event_version, 1);
        for wide in [
            body(&[253, 1, 0, 0, 0, 0, 0, 0, 0], &[0]),
            body(&[1], &[254, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            body(&[1], &[255, 1, 0, 0, 0, 0, 0, 0, 0]),
        ] {
            assert!(RecordV1::read(&wide).is_err());
            assert!(bincode_read(&wide).is_none());
        }
    }

    #[test]
    fn a_flipped_bit_is_a_checksum_error() {
        let mut r = sample();
        let mut bytes = r.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            RecordedEvent::decode(&bytes),
            Err(DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn stream_names() {
        assert!(validate_stream_name("product-a..b.fits").is_ok());
        assert!(validate_stream_name("").is_err());
        assert!(validate_stream_name("$all").is_err());
        assert!(validate_stream_name("a/b").is_err());
        assert!(validate_stream_name("a\nb").is_err());
        for bad in ["a\u{202E}b", "a\u{200B}", "\u{FEFF}x", " x", "x ", "x\t"] {
            assert!(validate_stream_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_stream_name("scratch-é1").is_ok());
        assert!(validate_event_type("Noted").is_ok());
        for bad in ["", "a\nb", "a\u{7}", "x\u{200D}y", " Noted", "Noted "] {
            assert!(validate_event_type(bad).is_err(), "{bad:?}");
        }
        assert!(validate_event_type(&"x".repeat(MAX_EVENT_TYPE + 1)).is_err());
        assert_eq!(json_depth(br#"{"a":[1,{"b":"]]]{{{"}],"c":"\\\""}"#), 3);
        assert_eq!(json_depth(&[b'['; 200]), 200);
        assert_eq!(json_depth(b"12"), 0);
        assert!(validate_stream_name(&"x".repeat(201)).is_err());
        assert!(validate_stream_name(&"x".repeat(200)).is_ok());
        assert_eq!(category_of("group-2026-11-30"), "group");
        assert_eq!(category_of("plain"), "plain");
        assert_eq!(category_of("é-x"), "é");
        assert_eq!(category_of("-x"), "");
        assert_eq!(entity_of("product-img_1"), "img_1");
        assert_eq!(entity_of("group-2026-11-30"), "2026-11-30");
        assert_eq!(entity_of("plain"), "");
        assert_eq!(entity_of("x-"), "");
        assert_eq!(entity_of("é-ü"), "ü");
    }
}
