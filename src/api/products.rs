//! Products: register, finalize, publish, read state and history.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
use super::params::{self, Params};
use super::streams::EventsPage;
use crate::events::StoreError;
use crate::events::jsonl::WireEvent;
use crate::events::record::micros_to_datetime;
use crate::pipeline::publish::{PublishError, Registration, Trigger};
use crate::projections::product::ProductState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(product))
        .routes(routes!(history))
        .routes(routes!(finalize))
        .routes(routes!(publish))
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::NotFound(_) => ApiError::NotFound(e.to_string()),
            PublishError::AlreadyPublished(_) | PublishError::Invalid(_) => {
                ApiError::BadRequest(e.to_string())
            }
            PublishError::InProgress(_) | PublishError::Conflict(_) => {
                ApiError::Conflict(e.to_string())
            }
            PublishError::Failed { error, .. } => ApiError::Failed(error),
            PublishError::Store(s) => s.into(),
        }
    }
}

fn secs(micros: i64) -> f64 {
    micros as f64 / 1e6
}

fn iso(micros: Option<i64>) -> Option<String> {
    micros.map(|m| crate::events::record::format_time(micros_to_datetime(m)))
}

/// A product as clients see it. Times are Unix seconds (as the old API had them), with
/// RFC 3339 twins for people.
#[derive(Serialize, ToSchema)]
pub struct ProductView {
    pub data_id: String,
    pub data_type: String,
    /// `staging`, `publishing`, `published` or `failed`.
    #[schema(value_type = String)]
    pub status: &'static str,
    pub stage_path: String,
    pub published_path: Option<String>,
    pub checksum: Option<String>,
    pub size_bytes: Option<u64>,
    pub qa_status: Option<String>,
    pub validation_status: Option<String>,
    pub auto_publish: bool,
    pub publish_attempts: u32,
    pub total_attempts: u32,
    pub max_attempts_exceeded: bool,
    pub publish_error: Option<String>,
    pub created_at: f64,
    pub staged_at: f64,
    pub last_failed_at: Option<f64>,
    pub published_at: Option<f64>,
    pub next_retry_at: Option<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub revision: u64,
}

impl ProductView {
    pub fn new(p: &ProductState, max_attempts: u32) -> Self {
        ProductView {
            data_id: p.data_id.to_string(),
            data_type: p.data_type.to_string(),
            status: p.status.as_str(),
            stage_path: p.stage_path.to_string(),
            published_path: p.published_path(),
            checksum: p.checksum_text(),
            size_bytes: p.size_bytes,
            qa_status: p.qa_status.as_deref().map(str::to_string),
            validation_status: p.validation_status.as_deref().map(str::to_string),
            auto_publish: p.auto_publish,
            publish_attempts: p.publish_attempts,
            total_attempts: p.total_attempts,
            max_attempts_exceeded: p.attempts_exhausted(max_attempts),
            publish_error: p.last_error().map(str::to_string),
            created_at: secs(p.created_at),
            staged_at: secs(p.staged_at()),
            last_failed_at: p.last_failure_at().map(secs),
            published_at: p.published_at().map(secs),
            next_retry_at: iso(p.next_retry_at()),
            metadata: p.metadata().clone(),
            revision: p.revision,
        }
    }
}

/// The body of `POST /api/products`, as clients send it. `metadata` values may be any
/// JSON; strings are kept as they are, anything else as its JSON text.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    data_id: String,
    data_type: String,
    stage_path: String,
    #[serde(default)]
    qa_status: Option<String>,
    #[serde(default)]
    validation_status: Option<String>,
    #[serde(default)]
    auto_publish: Option<bool>,
    #[serde(default)]
    #[schema(value_type = Option<std::collections::BTreeMap<String, serde_json::Value>>)]
    metadata: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

impl From<RegisterBody> for Registration {
    fn from(b: RegisterBody) -> Self {
        Registration {
            data_id: b.data_id,
            data_type: b.data_type,
            stage_path: b.stage_path,
            qa_status: b.qa_status,
            validation_status: b.validation_status,
            auto_publish: b.auto_publish.unwrap_or(true),
            metadata: b
                .metadata
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    let s = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, s)
                })
                .collect(),
        }
    }
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Unprocessable(format!("invalid JSON body: {e}")))
}

/// Registers a staged product (idempotent: the same registration again answers 200).
#[utoipa::path(
    post,
    path = "/api/products",
    tag = "products",
    request_body(content = RegisterBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered", body = ProductView),
        (status = 200, description = "Already registered with the same fields", body = ProductView),
        (status = 409, description = "Registered with other fields, or overlapping another unpublished product", body = super::openapi::ConflictBody),
        (status = 422, description = "A body that does not decode", body = super::openapi::ErrorBody),
    )
)]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<ProductView>), ApiError> {
    state.authorize(&headers)?;
    let req: RegisterBody = json_body(&body)?;
    let (product, created) = state.publisher.register(req.into()).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(ProductView::new(
            &product,
            state.publisher.config().max_attempts,
        )),
    ))
}

/// A product's current state.
#[utoipa::path(
    get,
    path = "/api/products/{id}",
    tag = "products",
    params(("id" = String, Path, description = "The product's data id")),
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 404, description = "No such product", body = super::openapi::ErrorBody),
    )
)]
async fn product(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ProductView>, ApiError> {
    let p = state.publisher.load(&id).await?;
    Ok(Json(ProductView::new(
        &p,
        state.publisher.config().max_attempts,
    )))
}

/// A product's events, oldest first by default.
#[utoipa::path(
    get,
    path = "/api/products/{id}/history",
    tag = "products",
    params(("id" = String, Path, description = "The product's data id"), super::params::PageParams),
    responses(
        (status = 200, description = "A page of the product's events", body = EventsPage),
        (status = 404, description = "No such product", body = super::openapi::ErrorBody),
    )
)]
async fn history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(p): Query<Params>,
) -> Result<Json<EventsPage>, ApiError> {
    let data_id =
        crate::pipeline::paths::data_id(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let from = params::opt_u64(&p, "from")?;
    let limit = params::limit(&p, 1000)?;
    let direction = params::direction(&p)?;
    let events = state
        .store
        .read_stream(
            &crate::events::catalogue::StreamName::product(&data_id),
            from,
            direction,
            limit,
        )
        .map_err(|e| match e {
            StoreError::StreamNotFound(_) => ApiError::NotFound(format!("product {id} not found")),
            other => other.into(),
        })?;
    Ok(Json(EventsPage {
        events: events.iter().map(WireEvent::from).collect(),
    }))
}

/// The QA and validation verdicts (at least one).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FinalizeBody {
    #[serde(default)]
    qa_status: Option<String>,
    #[serde(default)]
    validation_status: Option<String>,
}

/// Records QA and validation verdicts.
#[utoipa::path(
    post,
    path = "/api/products/{id}/finalize",
    tag = "products",
    params(("id" = String, Path, description = "The product's data id")),
    request_body(content = FinalizeBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The product after the verdicts", body = ProductView),
        (status = 404, description = "No such product", body = super::openapi::ErrorBody),
        (status = 409, description = "A publish is in progress", body = super::openapi::ConflictBody),
        (status = 422, description = "A body that does not decode, or holds no verdict", body = super::openapi::ErrorBody),
    )
)]
async fn finalize(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ProductView>, ApiError> {
    state.authorize(&headers)?;
    let b: FinalizeBody = json_body(&body)?;
    if b.qa_status.is_none() && b.validation_status.is_none() {
        return Err(ApiError::Unprocessable(
            "give qa_status, validation_status or both".into(),
        ));
    }
    let p = state
        .publisher
        .finalize(&id, b.qa_status, b.validation_status)
        .await?;
    Ok(Json(ProductView::new(
        &p,
        state.publisher.config().max_attempts,
    )))
}

#[derive(Serialize, ToSchema)]
pub struct PublishReply {
    pub data_id: String,
    pub published: bool,
    #[schema(value_type = String)]
    pub status: &'static str,
    pub published_path: String,
}

/// Publishes a product now: moves it from the stage root to the products root.
#[utoipa::path(
    post,
    path = "/api/products/{id}/publish",
    tag = "products",
    params(("id" = String, Path, description = "The product's data id")),
    responses(
        (status = 200, description = "Published", body = PublishReply),
        (status = 404, description = "No such product", body = super::openapi::ErrorBody),
        (status = 409, description = "A publish is in progress, or the product conflicts with another", body = super::openapi::ConflictBody),
        (status = 500, description = "The publish ran and failed; the failure is recorded", body = super::openapi::ErrorBody),
    )
)]
async fn publish(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PublishReply>, ApiError> {
    state.authorize(&headers)?;
    state.require_leader()?;
    let o = state.publisher.publish(&id, Trigger::Manual).await?;
    Ok(Json(PublishReply {
        data_id: o.data_id,
        published: true,
        status: "published",
        published_path: o.published_path,
    }))
}
