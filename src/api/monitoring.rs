//! The old monitoring endpoints (same paths, parameters and field names), plus what they
//! lacked: stuck lists, alerts, rebuild.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use super::params::{self, Params};
use crate::events::record::format_time;
use crate::pipeline::publish::Trigger;
use crate::projections::alerts::{self, Alert, AlertInputs, AlertThresholds};
use crate::projections::product::ProductState;
use crate::projections::publish::{MICROS_PER_HOUR, PublishModel};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/monitoring/publish/status", get(status))
        .route("/api/monitoring/publish/failed", get(failed))
        .route("/api/monitoring/publish/stuck", get(stuck))
        .route("/api/monitoring/publish/retry/{data_id}", post(retry))
        .route("/api/monitoring/publish/retry-all", post(retry_all))
        .route("/api/monitoring/alerts", get(alerts_now))
        .route("/api/projections/rebuild", post(rebuild))
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The publish status, as the old endpoint answered it, plus new fields beside.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PublishStatus {
    pub total_published: u64,
    pub total_staging: u64,
    pub total_publishing: u64,
    pub failed_publishes: u64,
    pub max_attempts_exceeded: u64,
    pub success_rate_percent: f64,
    pub recent_failures_24h: u64,
    pub recent_failures_1h: u64,
    pub oldest_staging_hours: Option<f64>,
    pub ledger_position: Option<u64>,
    pub timestamp: String,
}

/// The status the model gives at time `now` (microseconds).
pub fn publish_status(m: &PublishModel, now: i64) -> PublishStatus {
    let c = m.counts();
    PublishStatus {
        total_published: c.published,
        total_staging: c.staging,
        total_publishing: c.publishing,
        failed_publishes: c.failed,
        max_attempts_exceeded: c.max_attempts_exceeded,
        success_rate_percent: m.success_rate_percent(),
        recent_failures_24h: m.failures_within(now, 24 * MICROS_PER_HOUR),
        recent_failures_1h: m.failures_within(now, MICROS_PER_HOUR),
        oldest_staging_hours: m.oldest_staging().map(|p| {
            ((now - p.staged_at).max(0) as f64 / MICROS_PER_HOUR as f64 * 100.0).round() / 100.0
        }),
        ledger_position: m.last_position(),
        timestamp: format_time(crate::events::record::micros_to_datetime(now)),
    }
}

pub fn alert_inputs(s: &PublishStatus) -> AlertInputs {
    AlertInputs {
        success_rate_percent: s.success_rate_percent,
        failed_publishes: s.failed_publishes,
        recent_failures_1h: s.recent_failures_1h,
        oldest_staging_hours: s.oldest_staging_hours,
        max_attempts_exceeded: s.max_attempts_exceeded,
    }
}

async fn status(State(state): State<AppState>) -> Json<PublishStatus> {
    let now = now_micros();
    Json(state.projections.read(|m| publish_status(m, now)))
}

/// One row of the failed list, with the old field names.
#[derive(Serialize)]
pub struct FailedRow {
    pub data_id: String,
    pub data_type: String,
    pub stage_path: String,
    pub publish_attempts: u32,
    pub publish_error: Option<String>,
    pub staged_at: f64,
    pub created_at: f64,
    pub total_attempts: u32,
    pub last_failed_at: Option<f64>,
    pub next_retry_at: Option<String>,
    pub retryable: bool,
}

impl FailedRow {
    pub fn new(p: &ProductState) -> Self {
        FailedRow {
            data_id: p.data_id.clone(),
            data_type: p.data_type.clone(),
            stage_path: p.stage_path.clone(),
            publish_attempts: p.publish_attempts,
            publish_error: p.last_error.clone(),
            staged_at: p.staged_at as f64 / 1e6,
            created_at: p.created_at as f64 / 1e6,
            total_attempts: p.total_attempts,
            last_failed_at: p.last_failure_at.map(|t| t as f64 / 1e6),
            next_retry_at: p
                .next_retry_at
                .map(|t| format_time(crate::events::record::micros_to_datetime(t))),
            retryable: p.last_error_retryable,
        }
    }
}

#[derive(Serialize)]
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

async fn failed(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<FailedList>, ApiError> {
    let limit = params::limit(&p, 50)?;
    let max_attempts = max_attempts_param(&p)?;
    let rows: Vec<FailedRow> = state.projections.read(|m| {
        m.failed(max_attempts, limit)
            .into_iter()
            .map(FailedRow::new)
            .collect()
    });
    Ok(Json(FailedList {
        count: rows.len(),
        failed_publishes: rows,
    }))
}

#[derive(Serialize)]
struct StuckRow {
    data_id: String,
    data_type: String,
    status: &'static str,
    stage_path: String,
    since: f64,
    hours: f64,
    publish_attempts: u32,
}

#[derive(Serialize)]
struct StuckList {
    older_than_hours: f64,
    publishing_older_than_minutes: f64,
    count: usize,
    stuck_staging: Vec<StuckRow>,
    stuck_publishing: Vec<StuckRow>,
}

fn stuck_row(p: &ProductState, since: i64, now: i64) -> StuckRow {
    StuckRow {
        data_id: p.data_id.clone(),
        data_type: p.data_type.clone(),
        status: p.status.as_str(),
        stage_path: p.stage_path.clone(),
        since: since as f64 / 1e6,
        hours: ((now - since) as f64 / MICROS_PER_HOUR as f64 * 100.0).round() / 100.0,
        publish_attempts: p.publish_attempts,
    }
}

async fn stuck(
    State(state): State<AppState>,
    Query(p): Query<Params>,
) -> Result<Json<StuckList>, ApiError> {
    let hours = match p.get("older_than_hours").map(|s| s.trim()) {
        None | Some("") => 24.0,
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
    let publishing_minutes = 30.0;
    let limit = params::limit(&p, 1000)?;
    let now = now_micros();
    let staging_cutoff = now - (hours * MICROS_PER_HOUR as f64) as i64;
    let publishing_cutoff = now - (publishing_minutes * 60e6) as i64;
    let (staging, publishing) = state.projections.read(|m| {
        (
            m.stuck_staging(staging_cutoff)
                .into_iter()
                .take(limit)
                .map(|p| stuck_row(p, p.staged_at, now))
                .collect::<Vec<_>>(),
            m.stuck_publishing(publishing_cutoff)
                .into_iter()
                .take(limit)
                .map(|p| stuck_row(p, p.publishing_since.unwrap_or(now), now))
                .collect::<Vec<_>>(),
        )
    });
    Ok(Json(StuckList {
        older_than_hours: hours,
        publishing_older_than_minutes: publishing_minutes,
        count: staging.len() + publishing.len(),
        stuck_staging: staging,
        stuck_publishing: publishing,
    }))
}

#[derive(Serialize)]
struct AlertsReply {
    count: usize,
    alerts: Vec<Alert>,
    thresholds: AlertThresholds,
    timestamp: String,
}

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

#[derive(Serialize)]
struct RetryReply {
    retried: bool,
    published: bool,
    status: &'static str,
    published_path: String,
}

async fn retry(
    State(state): State<AppState>,
    Path(data_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<RetryReply>, ApiError> {
    state.authorize(&headers)?;
    let o = state.publisher.publish(&data_id, Trigger::Retry).await?;
    Ok(Json(RetryReply {
        retried: true,
        published: true,
        status: "published",
        published_path: o.published_path,
    }))
}

#[derive(Serialize)]
struct RetryAllRow {
    data_id: String,
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct RetryAllReply {
    total_attempted: usize,
    successful: usize,
    failed: usize,
    results: Vec<RetryAllRow>,
}

async fn retry_all(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Result<Json<RetryAllReply>, ApiError> {
    state.authorize(&headers)?;
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

#[derive(Serialize)]
struct RebuildReply {
    rebuilt: bool,
    events: u64,
    seconds: f64,
}

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
