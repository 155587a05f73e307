//! `GET /api/pipeline`: the pipeline as the log tells it, for the dashboard and for
//! people: observations collecting subbands, groups by stage with the running ones, the
//! last failures, the mosaic windows decided, the files refused at ingest. The server
//! folds the log with the worker's own fold ([`PipelineState`]), whichever process runs
//! the pipeline.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::events::record::format_time;
use crate::pipeline::state::{PipelineState, Stage};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(pipeline))
}

/// At most `n` characters of `s`.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// How many of each list the view holds.
const LIST: usize = 20;

const HOUR: i64 = 3_600_000_000;

/// Publishes and stage durations per hour, kept for the last two days of the log (older
/// hours are dropped as newer ones arrive), from which the view takes the last 24 hours.
#[derive(Debug, Default, Clone)]
pub struct Hourly {
    hours: std::collections::BTreeMap<i64, HourAcc>,
}

#[derive(Debug, Default, Clone)]
struct HourAcc {
    published: u64,
    failed: u64,
    /// Stage -> (sum of durations, runs).
    stages: std::collections::BTreeMap<String, (f64, u64)>,
}

impl Hourly {
    /// Counts one event, by the hour of its commit time.
    pub fn apply(&mut self, e: &crate::events::RecordedEvent) {
        if !crate::events::catalogue::in_its_category(&e.stream_id, &e.event_type) {
            return;
        }
        let hour = e.created_micros.div_euclid(HOUR) * HOUR;
        let acc = || HourAcc::default();
        match e.event_type.as_str() {
            "PublishSucceeded" => self.hours.entry(hour).or_insert_with(acc).published += 1,
            "PublishFailed" => self.hours.entry(hour).or_insert_with(acc).failed += 1,
            "StageCompleted" | "StageFailed" => {
                #[derive(serde::Deserialize)]
                struct Run {
                    stage: String,
                    duration_s: f64,
                }
                if let Ok(r) = serde_json::from_slice::<Run>(&e.data)
                    && r.duration_s.is_finite()
                {
                    let name = Stage::label(Some(&r.stage));
                    let s = self
                        .hours
                        .entry(hour)
                        .or_insert_with(acc)
                        .stages
                        .entry(name)
                        .or_default();
                    s.0 += r.duration_s.max(0.0);
                    s.1 += 1;
                }
            }
            _ => return,
        }
        let keep_from = hour - 48 * HOUR;
        while let Some((&first, _)) = self.hours.first_key_value() {
            if first >= keep_from {
                break;
            }
            self.hours.remove(&first);
        }
    }

    /// The 24 hours up to `now`'s, oldest first; an hour without an event has zero counts
    /// and no durations (`null`), never invented values.
    pub fn last_day(&self, now: i64) -> Vec<HourView> {
        let this = now.div_euclid(HOUR) * HOUR;
        (0..24)
            .rev()
            .map(|k| {
                let hour = this - k * HOUR;
                let acc = self.hours.get(&hour);
                HourView {
                    hour: format_time(crate::events::record::micros_to_datetime(hour)),
                    published: acc.map_or(0, |a| a.published),
                    failed: acc.map_or(0, |a| a.failed),
                    stage_mean_s: Stage::GROUP
                        .iter()
                        .map(|st| {
                            let mean = acc
                                .and_then(|a| a.stages.get(st.name()))
                                .filter(|(_, n)| *n > 0)
                                .map(|(sum, n)| sum / *n as f64);
                            (st.name().to_string(), mean)
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// One hour of the last day.
#[derive(Serialize, ToSchema)]
pub struct HourView {
    /// Its start (RFC 3339).
    pub hour: String,
    pub published: u64,
    pub failed: u64,
    /// Mean duration of the stage runs that ended in it, by stage; `null` without any.
    pub stage_mean_s: std::collections::BTreeMap<String, Option<f64>>,
}

#[derive(Serialize, ToSchema)]
pub struct Collecting {
    pub obs_time: String,
    pub subbands: usize,
    pub of: u8,
    /// Since its first file was accepted.
    pub waiting_s: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Running {
    pub group: String,
    pub attempt: u32,
    pub since: String,
    pub age_s: f64,
    /// Who runs it (`host:pid:instance`), when recorded.
    pub worker: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StageView {
    pub stage: String,
    /// Groups whose next stage this is and that no attempt runs.
    pub waiting: usize,
    pub running: Vec<Running>,
    /// Groups that gave up at this stage.
    pub given_up: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Failure {
    pub group: String,
    pub stage: String,
    pub attempts: u32,
    pub error: String,
    /// The last lines of its stderr, when it wrote any.
    pub stderr_tail: Option<String>,
    /// When the next attempt may start; `null` when given up.
    pub next_retry_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MosaicView {
    pub mosaic_id: String,
    pub members: Vec<String>,
    /// `null` when created; the safeguard that refused it otherwise.
    pub refused_by: Option<String>,
    /// Why, and the member at fault when one is.
    pub reason: Option<String>,
    pub member_at_fault: Option<String>,
    pub built: bool,
}

#[derive(Serialize, ToSchema)]
pub struct RefusedFile {
    pub path: String,
    pub reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct PipelineView {
    /// The log position this view is folded to (`null` before any event).
    pub position: Option<u64>,
    pub groups: usize,
    pub imaged: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub collecting: Vec<Collecting>,
    pub stages: Vec<StageView>,
    /// Groups whose stage failed and has not completed since, latest observation first.
    pub recent_failures: Vec<Failure>,
    /// The most recent mosaic windows decided, newest first.
    pub mosaics: Vec<MosaicView>,
    /// Files refused at ingest (at most 20, newest first).
    pub refused_files: Vec<RefusedFile>,
    /// The last 24 hours, oldest first.
    pub hourly: Vec<HourView>,
}

/// The view of `s` at `now` (microseconds), for a pipeline of `subbands` per observation.
pub fn view(
    s: &PipelineState,
    hourly: &Hourly,
    now: chrono::DateTime<chrono::Utc>,
    subbands: u8,
) -> PipelineView {
    let secs =
        |t: chrono::DateTime<chrono::Utc>| ((now - t).num_milliseconds().max(0)) as f64 / 1e3;
    // The newest observations first.
    let collecting = s
        .pending
        .iter()
        .rev()
        .map(|(obs, p)| Collecting {
            obs_time: obs.clone(),
            subbands: p.subbands.len(),
            of: subbands,
            waiting_s: secs(p.first_seen),
        })
        .take(LIST)
        .collect();
    let stages = Stage::GROUP
        .iter()
        .map(|stage| {
            let mut running = Vec::new();
            let (mut waiting, mut given_up) = (0, 0);
            for g in s.groups.values() {
                let p = g.stage(*stage);
                if let Some((attempt, since, worker)) = &p.running {
                    running.push(Running {
                        group: g.id.clone(),
                        attempt: *attempt,
                        since: format_time(*since),
                        age_s: secs(*since),
                        worker: worker.clone(),
                    });
                } else if p.given_up {
                    given_up += 1;
                } else if g.next_stage() == Some(*stage) {
                    waiting += 1;
                }
            }
            running.truncate(LIST);
            StageView {
                stage: stage.name().to_string(),
                waiting,
                running,
                given_up,
            }
        })
        .collect();
    let mut recent_failures: Vec<Failure> = s
        .groups
        .values()
        .rev()
        .flat_map(|g| {
            Stage::GROUP.iter().filter_map(move |stage| {
                let p = g.stage(*stage);
                // A stage that failed and then completed is no failure now.
                p.last_error
                    .as_ref()
                    .filter(|_| p.completed.is_none())
                    .map(|e| Failure {
                        group: g.id.clone(),
                        stage: stage.name().to_string(),
                        attempts: p.attempts,
                        error: cut(e, 2000),
                        stderr_tail: p.last_stderr.as_deref().map(|t| cut(t, 2000)),
                        next_retry_at: p.next_retry_at.map(format_time),
                    })
            })
        })
        .take(LIST)
        .collect();
    recent_failures.truncate(LIST);
    let mosaics = s
        .mosaic_order
        .iter()
        .rev()
        .filter_map(|id| s.mosaics.get(id))
        .take(LIST)
        .map(|m| MosaicView {
            mosaic_id: m.id.clone(),
            members: m.members.iter().take(LIST).cloned().collect(),
            refused_by: m.rejected.clone(),
            reason: m.rejected_reason.as_deref().map(|r| cut(r, 500)),
            member_at_fault: m.rejected_member.clone(),
            built: m.build.completed.is_some(),
        })
        .collect();
    let mut refused: Vec<RefusedFile> = s
        .files
        .iter()
        .filter_map(|(path, r)| {
            r.as_ref().err().map(|reason| RefusedFile {
                path: path.clone(),
                reason: cut(reason, 500),
            })
        })
        .collect();
    // File names begin with the observation time: the newest first.
    refused.sort_by(|a, b| b.path.cmp(&a.path));
    refused.truncate(LIST);
    PipelineView {
        position: s.next_position.checked_sub(1),
        groups: s.groups.len(),
        imaged: s.groups.values().filter(|g| g.imaged()).count(),
        failed: s.groups.values().filter(|g| g.failed()).count(),
        timed_out: s.timed_out(),
        collecting,
        stages,
        recent_failures,
        mosaics,
        refused_files: refused,
        hourly: hourly.last_day(now.timestamp_micros()),
    }
}

/// The pipeline as the log tells it.
#[utoipa::path(
    get,
    path = "/api/pipeline",
    tag = "monitoring",
    responses((status = 200, description = "The pipeline's state", body = PipelineView))
)]
async fn pipeline(State(state): State<AppState>) -> Json<PipelineView> {
    let now = chrono::Utc::now();
    let subbands = state.subbands;
    let fold = state
        .pipeline_view
        .read()
        .unwrap_or_else(|e| e.into_inner());
    let hourly = state.hourly.read().unwrap_or_else(|e| e.into_inner());
    Json(view(&fold, &hourly, now, subbands))
}
