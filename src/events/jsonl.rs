//! The wire shape of a recorded event, shared by stream reads over HTTP, `$all` pages,
//! and export files (JSON Lines, one event per line, with EventStoreDB's field names).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::record::RecordedEvent;

/// One event as clients and export files see it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireEvent {
    pub event_id: Uuid,
    pub event_type: String,
    #[serde(default = "one")]
    pub event_version: u32,
    pub stream_id: String,
    pub event_number: u64,
    pub position: u64,
    /// RFC 3339, microseconds, `Z`.
    pub created: String,
    /// Any JSON; an object in the domain's streams.
    #[schema(value_type = serde_json::Value)]
    pub data: Box<RawValue>,
    #[schema(value_type = Object)]
    pub metadata: Box<RawValue>,
}

fn one() -> u32 {
    1
}

/// Payload bytes as raw JSON; bytes that are not JSON (never written by contimg) become a
/// JSON string so that nothing is dropped.
pub fn raw_json(bytes: &[u8]) -> Box<RawValue> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| RawValue::from_string(s.to_string()).ok())
        .unwrap_or_else(|| {
            let s = serde_json::to_string(&String::from_utf8_lossy(bytes)).expect("string");
            RawValue::from_string(s).expect("a JSON string is JSON")
        })
}

impl From<&RecordedEvent> for WireEvent {
    fn from(r: &RecordedEvent) -> Self {
        WireEvent {
            event_id: r.event_id,
            event_type: r.event_type.clone(),
            event_version: r.event_version,
            stream_id: r.stream_id.clone(),
            event_number: r.revision,
            position: r.position,
            created: r.created_rfc3339(),
            data: raw_json(&r.data),
            metadata: raw_json(&r.metadata),
        }
    }
}

impl WireEvent {
    /// Back to a record (checksum recomputed when it is encoded).
    pub fn into_record(self) -> Result<RecordedEvent, String> {
        let created = chrono::DateTime::parse_from_rfc3339(&self.created)
            .map_err(|e| {
                format!(
                    "event {}: bad created time {:?}: {e}",
                    self.event_id, self.created
                )
            })?
            .with_timezone(&chrono::Utc);
        Ok(RecordedEvent {
            event_id: self.event_id,
            stream_id: self.stream_id,
            revision: self.event_number,
            position: self.position,
            event_type: self.event_type,
            event_version: self.event_version,
            data: self.data.get().as_bytes().to_vec(),
            metadata: self.metadata.get().as_bytes().to_vec(),
            created_micros: created.timestamp_micros(),
            checksum: 0,
        })
    }
}

/// The records of an export file, one per non-blank line, in file order, read lazily.
/// Each item is the line number (1-based) and the record, or an error naming the file and
/// the line. The one reader of exports: `import`, `audit` and `report` use it.
pub fn read_export(
    path: &std::path::Path,
) -> Result<
    impl Iterator<Item = Result<(usize, RecordedEvent), super::StoreError>> + use<>,
    super::StoreError,
> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|source| super::StoreError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    // Lines as bytes: a line that is not UTF-8 is an error naming it, like any other bad
    // line, and the lines after it are still read.
    Ok(std::io::BufReader::with_capacity(1 << 20, file)
        .split(b'\n')
        .enumerate()
        .filter_map(move |(i, line)| {
            let line = match line {
                Ok(l) if l.iter().all(u8::is_ascii_whitespace) => return None,
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(super::StoreError::File {
                        path: path.clone(),
                        source: e,
                    }));
                }
            };
            Some(
                serde_json::from_slice::<WireEvent>(&line)
                    .map_err(|e| format!("not an exported event: {e}"))
                    .and_then(WireEvent::into_record)
                    .map(|r| (i + 1, r))
                    .map_err(|e| {
                        super::StoreError::InvalidInput(format!(
                            "{} line {}: {e}",
                            path.display(),
                            i + 1
                        ))
                    }),
            )
        }))
}
