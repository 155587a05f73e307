//! One ledger interface, two implementations: the local store (this process owns the
//! folder) and a client of a running server's HTTP face. The pipeline and the tools are
//! written against [`Ledger`], so a stream worker on another machine appends through the
//! API server with the same optimistic concurrency as a local one.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::{ExpectedRevision, StoreError};
use super::jsonl::WireEvent;
use super::record::{ProposedEvent, RecordedEvent};
use super::store::{AppendResult, Direction, Store};

#[derive(Clone, Debug)]
pub enum Ledger {
    Local(Store),
    Remote(RemoteLedger),
}

impl Ledger {
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<AppendResult, StoreError> {
        match self {
            Ledger::Local(s) => s.append(stream, expected, events).await,
            Ledger::Remote(r) => r.append(stream, expected, events).await,
        }
    }

    pub async fn read_stream(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        match self {
            Ledger::Local(s) => s.read_stream(stream, from, direction, limit),
            Ledger::Remote(r) => r.read_stream(stream, from, direction, limit).await,
        }
    }

    /// A page of `$all` and the position to read next (`None` at the end).
    pub async fn read_all(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<(Vec<RecordedEvent>, Option<u64>), StoreError> {
        match self {
            Ledger::Local(s) => {
                let events = s.read_all(from, direction, limit)?;
                let next = next_after(&events, direction, limit, s.event_count());
                Ok((events, next))
            }
            Ledger::Remote(r) => r.read_all(from, direction, limit).await,
        }
    }
}

/// Where a `$all` page leaves off: the following position, `None` when nothing follows.
pub fn next_after(
    events: &[RecordedEvent],
    direction: Direction,
    limit: usize,
    count: u64,
) -> Option<u64> {
    let last = events.last()?;
    match direction {
        Direction::Forward if last.position + 1 < count => Some(last.position + 1),
        Direction::Backward if last.position > 0 && events.len() >= limit => {
            Some(last.position - 1)
        }
        _ => None,
    }
}

/// A client of `contimg serve`'s ledger endpoints.
#[derive(Clone, Debug)]
pub struct RemoteLedger {
    base: reqwest::Url,
    client: reqwest::Client,
    token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingEvent<'a> {
    event_id: uuid::Uuid,
    event_type: &'a str,
    event_version: u32,
    data: &'a RawValue,
    metadata: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppendReply {
    next_expected_version: u64,
    position: u64,
}

#[derive(Deserialize)]
struct ErrorReply {
    detail: String,
    #[serde(default)]
    current: Option<i64>,
}

#[derive(Deserialize)]
struct EventsReply {
    events: Vec<WireEvent>,
    #[serde(default)]
    next: Option<u64>,
}

impl RemoteLedger {
    pub fn new(url: &str, token: Option<String>) -> Result<Self, StoreError> {
        let base = reqwest::Url::parse(url)
            .map_err(|e| StoreError::InvalidInput(format!("bad ledger URL {url:?}: {e}")))?;
        if base.cannot_be_a_base() {
            return Err(StoreError::InvalidInput(format!("bad ledger URL {url:?}")));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| StoreError::Unreachable {
                url: url.to_string(),
                source,
            })?;
        Ok(RemoteLedger {
            base,
            client,
            token,
        })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            let mut p = url.path_segments_mut().expect("checked in new");
            p.pop_if_empty();
            for s in segments {
                p.push(s);
            }
        }
        url
    }

    fn unreachable(&self, source: reqwest::Error) -> StoreError {
        StoreError::Unreachable {
            url: self.base.to_string(),
            source,
        }
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<AppendResult, StoreError> {
        let raw: Vec<(Box<RawValue>, Box<RawValue>)> = events
            .iter()
            .map(|e| {
                (
                    super::jsonl::raw_json(&e.data),
                    super::jsonl::raw_json(&e.metadata),
                )
            })
            .collect();
        let body: Vec<OutgoingEvent> = events
            .iter()
            .zip(&raw)
            .map(|(e, (d, m))| OutgoingEvent {
                event_id: e.event_id,
                event_type: &e.event_type,
                event_version: e.event_version,
                data: d,
                metadata: m,
            })
            .collect();
        let resp = self
            .authed(self.client.post(self.url(&["api", "streams", stream])))
            .header("ES-ExpectedVersion", expected.to_wire().to_string())
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if status.is_success() {
            let r: AppendReply = resp.json().await.map_err(|e| self.unreachable(e))?;
            return Ok(AppendResult {
                next_expected_version: r.next_expected_version,
                position: r.position,
            });
        }
        let err: Option<ErrorReply> = resp.json().await.ok();
        let detail = err.as_ref().map(|e| e.detail.clone()).unwrap_or_default();
        Err(match status.as_u16() {
            409 => StoreError::WrongExpectedVersion {
                stream: stream.to_string(),
                expected,
                current: err
                    .and_then(|e| e.current)
                    .and_then(|c| u64::try_from(c).ok()),
            },
            400 | 422 => StoreError::InvalidInput(detail),
            503 => StoreError::Closed,
            code => StoreError::Server {
                status: code,
                detail,
            },
        })
    }

    /// POSTs a JSON command to one of the server's endpoints (below `api/`) and answers
    /// its status and the `detail` of an error. The ledger knows no commands; the layer
    /// that owns one names its path.
    pub async fn post_command(
        &self,
        segments: &[&str],
        body: &impl Serialize,
    ) -> Result<(u16, String), StoreError> {
        let mut path = vec!["api"];
        path.extend_from_slice(segments);
        let resp = self
            .authed(self.client.post(self.url(&path)))
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let detail = if resp.status().is_success() {
            String::new()
        } else {
            resp.json::<ErrorReply>()
                .await
                .map(|e| e.detail)
                .unwrap_or_default()
        };
        Ok((status, detail))
    }

    async fn get_events(
        &self,
        url: reqwest::Url,
        stream: Option<&str>,
    ) -> Result<EventsReply, StoreError> {
        let resp = self
            .authed(self.client.get(url))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if status.as_u16() == 404
            && let Some(s) = stream
        {
            return Err(StoreError::StreamNotFound(s.to_string()));
        }
        if !status.is_success() {
            let detail = resp
                .json::<ErrorReply>()
                .await
                .map(|e| e.detail)
                .unwrap_or_default();
            return Err(StoreError::Server {
                status: status.as_u16(),
                detail,
            });
        }
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    fn query(url: &mut reqwest::Url, from: Option<u64>, direction: Direction, limit: usize) {
        let mut q = url.query_pairs_mut();
        if let Some(f) = from {
            q.append_pair("from", &f.to_string());
        }
        q.append_pair("limit", &limit.to_string());
        q.append_pair(
            "direction",
            match direction {
                Direction::Forward => "forward",
                Direction::Backward => "backward",
            },
        );
    }

    pub async fn read_stream(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut url = self.url(&["api", "streams", stream]);
        Self::query(&mut url, from, direction, limit);
        let reply = self.get_events(url, Some(stream)).await?;
        to_records(reply.events)
    }

    pub async fn read_all(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<(Vec<RecordedEvent>, Option<u64>), StoreError> {
        let mut url = self.url(&["api", "events"]);
        Self::query(&mut url, from, direction, limit);
        let reply = self.get_events(url, None).await?;
        Ok((to_records(reply.events)?, reply.next))
    }
}

fn to_records(events: Vec<WireEvent>) -> Result<Vec<RecordedEvent>, StoreError> {
    events
        .into_iter()
        .map(|w| {
            w.into_record().map_err(|e| StoreError::Server {
                status: 200,
                detail: format!("an event in the answer does not decode: {e}"),
            })
        })
        .collect()
}
