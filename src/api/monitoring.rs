//! The old monitoring endpoints (same paths, parameters and field names), plus what they
//! lacked: stuck lists, alerts, rebuild.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
use super::params::{self, Params};
use crate::pipeline::publish::Trigger;
use crate::projections::alerts::{self, Alert, AlertThresholds};
use crate::projections::product::ProductState;
use crate::projections::publish::PublishModel;
use crate::projections::status::{self, StuckRow, StuckRule};
pub use crate::projections::status::{FailedRow, PublishStatus, alert_inputs, publish_status};
use crate::projections::{AsOf, fold_as_of};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(failed))
        .routes(routes!(stuck))
        .routes(routes!(retry))
        .routes(routes!(retry_all))
        .routes(routes!(alerts_now))
        .routes(routes!(rebuild))
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// `?as_of=TIME` (RFC 3339) or `?position=P`, when the question is about the past.
pub fn as_of_param(p: &Params) -> Result<Option<AsOf>, ApiError> {
    let position = params::opt_u64(p, "position")?;
    let time = match p.get("as_of").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => None,
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| {
                    ApiError::BadRequest(format!("as_of must be an RFC 3339 time, not {t:?}"))
                })?
                .timestamp_micros(),
        ),
    };
    match (position, time) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give as_of or position, not both".into(),
        )),
        (Some(p), None) => Ok(Some(AsOf::Position(p))),
        (None, Some(t)) => Ok(Some(AsOf::Time(t))),
        (None, None) => Ok(None),
    }
}

/// Replays the log up to `as_of` off the async threads; cost grows with the position.
async fn model_as_of(
    state: &AppState,
    as_of: AsOf,
) -> Result<(PublishModel, Option<u64>, i64), ApiError> {
    let store = state.store.clone();
    let max_attempts = state.projections.max_attempts();
    let permit = state.replays.clone().try_acquire_owned().map_err(|_| {
        ApiError::Busy(format!(
            "{} as-of replays are already running; try again shortly",
            state.limits.max_as_of_replays
        ))
    })?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        fold_as_of(
            crate::projections::FoldSource::Store(store, 0),
            as_of,
            max_attempts,
        )
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::from)
}

/// The publish status, as the old endpoint answered it; now or as of a past moment.
#[utoipa::path(
    get,
    path = "/api/monitoring/publish/status",
    operation_id = "publish_status",
    tag = "monitoring",
    params(super::params::AsOfParams),
    responses((status = 200, description = "The publish status", body = PublishStatus))
)]
async fn status(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<PublishStatus>, ApiError> {
    match as_of_param(&p)? {
        None => {
            let now = now_micros();
            Ok(Json(state.projections.read(|m| publish_status(m, now))))
        }
        Some(as_of) => {
            let (model, _, now) = model_as_of(&state, as_of).await?;
            Ok(Json(publish_status(&model, now)))
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct FailedList {
    pub count: usize,
    pub failed_publishes: Vec<FailedRow>,
}

fn max_attempts_param(p: &Params) -> Result<Option<u32>, ApiError> {
    params::opt_u64(p, "max_attempts")?
        .map(|n| {
            u32::try_from(n).map_err(|_| ApiError::BadRequest("max_attempts is too large".into()))
        })
        .transpose()
}

/// Products whose last publish failed, oldest failure first.
#[utoipa::path(
    get,
    path = "/api/monitoring/publish/failed",
    tag = "monitoring",
    params(
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many rows (50 by default)"),
        ("max_attempts" = Option<u32>, Query, description = "Only those with fewer attempts than this"),
        super::params::AsOfParams,
    ),
    responses((status = 200, description = "The failed list", body = FailedList))
)]
async fn failed(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Response, ApiError> {
    let limit = params::limit(&p, 50)?;
    let max_attempts = max_attempts_param(&p)?;
    let body = match as_of_param(&p)? {
        // The live list: each row's JSON is made once per change of its product, the
        // page once per change of the model. Under the model's lock the checkpoint is
        // never ahead of what the model holds, so a kept page is never older than its key.
        None => state.projections.read(|m| {
            let key = (state.projections.checkpoint(), max_attempts, limit);
            state
                .failed_rows
                .page_at(key, || m.failed(max_attempts, limit))
        }),
        Some(as_of) => {
            let (model, _, _) = model_as_of(&state, as_of).await?;
            RowCache::default()
                .page(&model.failed(max_attempts, limit))
                .into()
        }
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// The JSON of failed rows as `GET /api/monitoring/publish/failed` serves them, by
/// product, each kept with the revision of its product's stream it was made from: a
/// product that moves on gets a new row, one that does not is not serialized again.
/// Also keeps the last page served, for as long as the model has not moved on.
#[derive(Default)]
pub struct RowCache {
    rows: std::sync::Mutex<
        std::collections::HashMap<String, (u64, Arc<str>), foldhash::fast::RandomState>,
    >,
    last: std::sync::Mutex<Option<(PageKey, axum::body::Bytes)>>,
}

/// The model's checkpoint, `max_attempts` and `limit` of a page.
type PageKey = (Option<u64>, Option<u32>, usize);

impl RowCache {
    /// The page for `key`: the last one served when the key is the same, else made from
    /// the `products` (and kept).
    pub fn page_at<'a>(
        &self,
        key: PageKey,
        products: impl FnOnce() -> Vec<&'a ProductState>,
    ) -> axum::body::Bytes {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, body)) = last.as_ref()
            && *k == key
        {
            return body.clone();
        }
        let body = axum::body::Bytes::from(self.page(&products()));
        *last = Some((key, body.clone()));
        body
    }

    /// Rows kept at most; past it the cache starts again (rows of products no longer
    /// failed are not looked for one by one).
    const KEPT: usize = 100_000;

    /// The body of a failed list of these products, byte for byte what serializing a
    /// [`FailedList`] of their [`FailedRow`]s gives.
    pub fn page(&self, products: &[&ProductState]) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(48 + products.len() * 384);
        let _ = write!(out, "{{\"count\":{},\"failed_publishes\":[", products.len());
        let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        if rows.len() > Self::KEPT {
            rows.clear();
        }
        for (i, p) in products.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match rows.get(&*p.data_id) {
                Some((revision, json)) if *revision == p.revision => out.push_str(json),
                _ => {
                    let json: Arc<str> = serde_json::to_string(&FailedRow::new(p))
                        .expect("a row serializes")
                        .into();
                    out.push_str(&json);
                    rows.insert(p.data_id.to_string(), (p.revision, json));
                }
            }
        }
        out.push_str("]}");
        out
    }
}

#[derive(Serialize, ToSchema)]
struct StuckList {
    older_than_hours: f64,
    publishing_older_than_minutes: f64,
    count: usize,
    stuck_staging: Vec<StuckRow>,
    stuck_publishing: Vec<StuckRow>,
}

/// Products stuck in staging or in publishing.
#[utoipa::path(
    get,
    path = "/api/monitoring/publish/stuck",
    tag = "monitoring",
    params(
        ("older_than_hours" = Option<f64>, Query, minimum = 0, maximum = 87600, description = "In staging longer than this (24 by default)"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many of each kind (1,000 by default)"),
    ),
    responses((status = 200, description = "The stuck lists", body = StuckList))
)]
async fn stuck(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<StuckList>, ApiError> {
    let hours = match p.get("older_than_hours").map(|s| s.trim()) {
        None | Some("") => status::DEFAULT_STUCK_STAGING_HOURS,
        Some(s) => s
            .parse::<f64>()
            .ok()
            .filter(|h| h.is_finite() && *h >= 0.0 && *h <= 24.0 * 3650.0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "older_than_hours must be a number of hours, not {s:?}"
                ))
            })?,
    };
    let limit = params::limit(&p, 1000)?;
    let rule = StuckRule {
        staging_hours: hours,
        publishing_min: state.publisher.config().stuck_publishing_min,
    };
    let now = now_micros();
    let (staging, publishing) = state
        .projections
        .read(|m| status::stuck(m, now, &rule, limit));
    Ok(Json(StuckList {
        older_than_hours: hours,
        publishing_older_than_minutes: rule.publishing_min,
        count: staging.len() + publishing.len(),
        stuck_staging: staging,
        stuck_publishing: publishing,
    }))
}

#[derive(Serialize, ToSchema)]
struct AlertsReply {
    count: usize,
    alerts: Vec<Alert>,
    thresholds: AlertThresholds,
    timestamp: String,
}

/// The alert rules evaluated now.
#[utoipa::path(
    get,
    path = "/api/monitoring/alerts",
    tag = "monitoring",
    responses((status = 200, description = "The alerts firing now", body = AlertsReply))
)]
async fn alerts_now(State(state): State<AppState>) -> Json<AlertsReply> {
    let now = now_micros();
    let status = state.projections.read(|m| publish_status(m, now));
    let thresholds = state.thresholds.as_ref().clone();
    let alerts = alerts::evaluate(&alert_inputs(&status), &thresholds);
    Json(AlertsReply {
        count: alerts.len(),
        alerts,
        thresholds,
        timestamp: status.timestamp,
    })
}

#[derive(Serialize, ToSchema)]
struct RetryReply {
    retried: bool,
    published: bool,
    #[schema(value_type = String)]
    status: &'static str,
    published_path: String,
}

/// Retries one failed publish now.
#[utoipa::path(
    post,
    path = "/api/monitoring/publish/retry/{data_id}",
    tag = "monitoring",
    params(("data_id" = String, Path, description = "The product's data id")),
    responses(
        (status = 200, description = "Published", body = RetryReply),
        (status = 404, description = "No such product", body = super::openapi::ErrorBody),
        (status = 409, description = "A publish is in progress, or the product conflicts with another", body = super::openapi::ConflictBody),
        (status = 500, description = "The publish ran and failed; the failure is recorded", body = super::openapi::ErrorBody),
    )
)]
async fn retry(
    State(state): State<AppState>,
    Path(data_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<RetryReply>, ApiError> {
    state.authorize(&headers)?;
    state.require_leader()?;
    let o = state.publisher.publish(&data_id, Trigger::Retry).await?;
    Ok(Json(RetryReply {
        retried: true,
        published: true,
        status: "published",
        published_path: o.published_path,
    }))
}

#[derive(Serialize, ToSchema)]
struct RetryAllRow {
    data_id: String,
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct RetryAllReply {
    total_attempted: usize,
    successful: usize,
    failed: usize,
    results: Vec<RetryAllRow>,
}

/// Retries the failed publishes that have attempts left.
#[utoipa::path(
    post,
    path = "/api/monitoring/publish/retry-all",
    tag = "monitoring",
    params(
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 10000, description = "At most this many (10 by default)"),
        ("max_attempts" = Option<u32>, Query, description = "Only those with fewer attempts than this"),
    ),
    responses((status = 200, description = "Each retry's outcome", body = RetryAllReply))
)]
async fn retry_all(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<RetryAllReply>, ApiError> {
    state.authorize(&headers)?;
    state.require_leader()?;
    let limit = params::limit(&p, 10)?;
    let max_attempts = max_attempts_param(&p)?;
    let results = state.publisher.retry_all(max_attempts, limit).await;
    let successful = results.iter().filter(|r| r.success).count();
    Ok(Json(RetryAllReply {
        total_attempted: results.len(),
        successful,
        failed: results.len() - successful,
        results: results
            .into_iter()
            .map(|r| RetryAllRow {
                data_id: r.data_id,
                success: r.success,
                error: r.error,
            })
            .collect(),
    }))
}

#[derive(Serialize, ToSchema)]
struct RebuildReply {
    rebuilt: bool,
    events: u64,
    seconds: f64,
}

/// Rebuilds the read model from the whole log.
#[utoipa::path(
    post,
    path = "/api/projections/rebuild",
    tag = "monitoring",
    responses((status = 200, description = "Rebuilt", body = RebuildReply))
)]
async fn rebuild(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<RebuildReply>, ApiError> {
    state.authorize(&headers)?;
    let projections = state.projections.clone();
    let start = std::time::Instant::now();
    let events = tokio::task::spawn_blocking(move || projections.rebuild())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(RebuildReply {
        rebuilt: true,
        events,
        seconds: start.elapsed().as_secs_f64(),
    }))
}
