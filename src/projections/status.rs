//! The views operators read, computed from the publish read model: the status of the old
//! monitoring endpoint and the rows of its failed list. The server, `contimg monitor`,
//! `contimg audit` and `contimg report` all use these, so a figure is computed once.

use serde::Serialize;

use super::alerts::AlertInputs;
use super::product::ProductState;
use super::publish::{MICROS_PER_HOUR, PublishModel};
use crate::events::record::format_time;

/// The publish status, as the old endpoint answered it, plus new fields beside.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
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

/// Default age past which a product still `publishing` counts as stuck (`[publish]
/// stuck_publishing_min`): no publish takes that long unless its process died.
pub const DEFAULT_STUCK_PUBLISHING_MIN: f64 = 30.0;

/// Default age past which a product in staging counts as stuck, in hours.
pub const DEFAULT_STUCK_STAGING_HOURS: f64 = 24.0;

/// Hours from `since` to `now` (microseconds), never negative, rounded to hundredths: how
/// every age an operator reads is written.
pub fn hours_between(since: i64, now: i64) -> f64 {
    ((now - since).max(0) as f64 / MICROS_PER_HOUR as f64 * 100.0).round() / 100.0
}

/// When a product counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StuckRule {
    /// In staging for longer than this.
    pub staging_hours: f64,
    /// In publishing for longer than this.
    pub publishing_min: f64,
}

impl Default for StuckRule {
    fn default() -> Self {
        StuckRule {
            staging_hours: DEFAULT_STUCK_STAGING_HOURS,
            publishing_min: DEFAULT_STUCK_PUBLISHING_MIN,
        }
    }
}

/// A stuck product.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct StuckRow {
    pub data_id: String,
    pub data_type: String,
    #[schema(value_type = String)]
    pub status: &'static str,
    pub stage_path: String,
    /// Since when (Unix seconds): staged, or the publish started.
    pub since: f64,
    pub hours: f64,
    pub publish_attempts: u32,
}

/// The products stuck at `now` under `rule`, at most `limit` of each kind, oldest first.
/// The server's stuck list and the weekly report both come from here.
pub fn stuck(
    m: &PublishModel,
    now: i64,
    rule: &StuckRule,
    limit: usize,
) -> (Vec<StuckRow>, Vec<StuckRow>) {
    let row = |p: &ProductState, since: i64| StuckRow {
        data_id: p.data_id.to_string(),
        data_type: p.data_type.to_string(),
        status: p.status.as_str(),
        stage_path: p.stage_path.to_string(),
        since: since as f64 / 1e6,
        hours: hours_between(since, now),
        publish_attempts: p.publish_attempts,
    };
    let staging_cutoff = now - (rule.staging_hours * MICROS_PER_HOUR as f64) as i64;
    let publishing_cutoff = now - (rule.publishing_min * 60e6) as i64;
    (
        m.stuck_staging(staging_cutoff)
            .into_iter()
            .take(limit)
            .map(|p| row(p, p.staged_at()))
            .collect(),
        m.stuck_publishing(publishing_cutoff)
            .into_iter()
            .take(limit)
            .map(|p| row(p, p.publishing_since().unwrap_or(now)))
            .collect(),
    )
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
        oldest_staging_hours: m
            .oldest_staging()
            .map(|p| hours_between(p.staged_at(), now)),
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

/// One row of the failed list, with the old field names.
#[derive(Serialize, utoipa::ToSchema)]
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
            data_id: p.data_id.to_string(),
            data_type: p.data_type.to_string(),
            stage_path: p.stage_path.to_string(),
            publish_attempts: p.publish_attempts,
            publish_error: p.last_error().map(str::to_string),
            staged_at: p.staged_at() as f64 / 1e6,
            created_at: p.created_at as f64 / 1e6,
            total_attempts: p.total_attempts,
            last_failed_at: p.last_failure_at().map(|t| t as f64 / 1e6),
            next_retry_at: p
                .next_retry_at()
                .map(|t| format_time(crate::events::record::micros_to_datetime(t))),
            retryable: p.last_error_retryable(),
        }
    }
}
