//! The ledger's HTTP face: append to a stream, read a stream, read `$all`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
use super::params::{self, Params};
use crate::events::catalogue;
use crate::events::jsonl::WireEvent;
use crate::events::ledger::next_after;
use crate::events::record::{json_depth, validate_event_type, validate_stream_name};
use crate::events::{ExpectedRevision, ProposedEvent};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(read_stream, append))
        .routes(routes!(read_all))
}

/// An event as a client proposes it.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IncomingEvent {
    /// A UUID, the idempotency key within the stream.
    #[schema(format = Uuid)]
    event_id: String,
    event_type: String,
    /// The payload's schema version (1 when omitted).
    #[serde(default)]
    #[schema(minimum = 1)]
    event_version: Option<u32>,
    /// The payload: any JSON, an object in the domain's streams, where the event type
    /// says what it holds (`docs/events.md`).
    #[schema(value_type = serde_json::Value)]
    data: Box<RawValue>,
    /// A JSON object; `{}` when omitted.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Box<RawValue>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AppendReply {
    next_expected_version: u64,
    position: u64,
}

fn expected_revision(headers: &HeaderMap) -> Result<ExpectedRevision, ApiError> {
    let Some(v) = headers.get("ES-ExpectedVersion") else {
        return Ok(ExpectedRevision::Any);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(ExpectedRevision::from_wire)
        .ok_or_else(|| {
            ApiError::BadRequest(
                "ES-ExpectedVersion must be -2 (any), -1 (no stream), -4 (stream exists) or a revision"
                    .into(),
            )
        })
}

/// Deepest nesting of arrays and objects taken in `data` and `metadata`.
pub const MAX_JSON_DEPTH: usize = 128;

/// The commands that write the publish lifecycle, named in the refusal of a raw append.
const PRODUCT_COMMANDS: &str = "the publish lifecycle is written only by the publisher: \
    register with POST /api/products, then POST /api/products/{id}/finalize, \
    /api/products/{id}/publish or /api/monitoring/publish/retry/{id}";

pub fn refuse_command_only(stream: &str, event_type: Option<&str>) -> Result<(), ApiError> {
    if catalogue::command_only(stream, event_type.unwrap_or("")) {
        let what = match event_type {
            Some(t) => format!("{t} may not be appended to {stream}"),
            None => format!("{stream} takes no raw appends"),
        };
        return Err(ApiError::Forbidden(format!("{what}: {PRODUCT_COMMANDS}")));
    }
    Ok(())
}

/// Turns a client's body into proposed events, refusing the whole batch on any fault.
/// Events of the publish lifecycle are refused whatever the body holds (403): only the
/// product commands write them.
pub fn parse_events(stream: &str, body: &[u8]) -> Result<Vec<ProposedEvent>, ApiError> {
    validate_stream_name(stream).map_err(ApiError::BadRequest)?;
    refuse_command_only(stream, None)?;
    // data and metadata sit two levels down (the array, the event object). Checked
    // before parsing, in one linear pass.
    let depth = json_depth(body);
    if depth > MAX_JSON_DEPTH + 2 {
        return Err(ApiError::BadRequest(format!(
            "the body nests JSON {depth} levels deep; data and metadata may nest at most {MAX_JSON_DEPTH}"
        )));
    }
    let incoming: Vec<IncomingEvent> = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be a JSON array of {{eventId, eventType, data, metadata}}: {e}"
        ))
    })?;
    if incoming.is_empty() {
        return Err(ApiError::BadRequest("the array holds no events".into()));
    }
    incoming
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let event_id = uuid::Uuid::parse_str(&e.event_id).map_err(|_| {
                ApiError::BadRequest(format!("event {i}: eventId {:?} is not a UUID", e.event_id))
            })?;
            validate_event_type(&e.event_type)
                .map_err(|m| ApiError::BadRequest(format!("event {i}: {m}")))?;
            refuse_command_only(stream, Some(&e.event_type))?;
            let data = e.data.get().as_bytes().to_vec();
            if let Some(m) = &e.metadata
                && !m.get().trim_start().starts_with('{')
            {
                return Err(ApiError::BadRequest(format!(
                    "event {i}: metadata must be a JSON object"
                )));
            }
            let version = catalogue::check(stream, &e.event_type, e.event_version, &data)
                .map_err(|err| ApiError::Unprocessable(format!("event {i}: {err}")))?;
            Ok(ProposedEvent {
                event_id,
                event_type: e.event_type,
                event_version: version,
                data,
                metadata: e
                    .metadata
                    .map_or_else(|| b"{}".to_vec(), |m| m.get().as_bytes().to_vec()),
            })
        })
        .collect()
}

/// Appends events to a stream, all or none. Product streams (`product-*`) and the publish
/// lifecycle's event types are refused (403): only the product commands write them.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}",
    tag = "ledger",
    params(
        ("stream" = String, Path, description = "The stream's name"),
        ("ES-ExpectedVersion" = Option<i64>, Header,
            description = "-2 any (default), -1 no stream yet, -4 the stream exists, N its last revision"),
    ),
    request_body(content = Vec<IncomingEvent>, description = "1 to 1,000 events", content_type = "application/json"),
    responses(
        (status = 201, description = "Written (or found written: an idempotent repeat)", body = AppendReply),
        (status = 409, description = "The stream is not at the expected revision; nothing was written",
            body = super::openapi::ConflictBody,
            headers(("ES-CurrentVersion" = i64, description = "The stream's last revision, -1 for none"))),
        (status = 422, description = "An event whose type or payload the catalogue refuses", body = super::openapi::ErrorBody),
    )
)]
async fn append(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<AppendReply>), ApiError> {
    // Refused whoever asks, before the token is even looked at.
    refuse_command_only(&stream, None)?;
    state.authorize(&headers)?;
    let expected = expected_revision(&headers)?;
    let events = parse_events(&stream, &body)?;
    let r = state.store.append(&stream, expected, events).await?;
    Ok((
        StatusCode::CREATED,
        Json(AppendReply {
            next_expected_version: r.next_expected_version,
            position: r.position,
        }),
    ))
}

/// A page of one stream's events.
#[derive(Serialize, ToSchema)]
pub struct EventsPage {
    pub events: Vec<WireEvent>,
}

/// A page of `$all`.
#[derive(Serialize, ToSchema)]
struct AllPage {
    events: Vec<WireEvent>,
    /// Where the next page starts (`from`), or null at the end.
    next: Option<u64>,
}

/// Reads a stream's events by revision.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}",
    tag = "ledger",
    params(("stream" = String, Path, description = "The stream's name"), super::params::PageParams),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 404, description = "No such stream", body = super::openapi::ErrorBody),
    )
)]
async fn read_stream(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(p): Query<Params>,
) -> Result<Json<EventsPage>, ApiError> {
    validate_stream_name(&stream).map_err(ApiError::BadRequest)?;
    let from = params::opt_u64(&p, "from")?;
    let limit = params::limit(&p, 100)?;
    let direction = params::direction(&p)?;
    let store = state.store.clone();
    let events =
        tokio::task::spawn_blocking(move || store.read_stream(&stream, from, direction, limit))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(EventsPage {
        events: events.iter().map(WireEvent::from).collect(),
    }))
}

/// Reads the whole log (`$all`) by position.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "ledger",
    params(super::params::PageParams),
    responses((status = 200, description = "A page of events", body = AllPage))
)]
async fn read_all(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<AllPage>, ApiError> {
    let from = params::opt_u64(&p, "from")?;
    let limit = params::limit(&p, 100)?;
    let direction = params::direction(&p)?;
    let store = state.store.clone();
    let (events, count) = tokio::task::spawn_blocking(move || {
        let count = store.event_count();
        store.read_all(from, direction, limit).map(|e| (e, count))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let next = next_after(&events, direction, limit, count);
    Ok(Json(AllPage {
        events: events.iter().map(WireEvent::from).collect(),
        next,
    }))
}
