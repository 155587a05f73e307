//! `GET /api/status`: health, version, the ledger's position, the read model's lag, the
//! automatic publisher and free space per root.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::events::record::format_time;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(status))
}

#[derive(Serialize, ToSchema)]
struct LedgerStatus {
    events: u64,
    position: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct ProjectionStatus {
    checkpoint: Option<u64>,
    lag_events: u64,
    /// Product events the read model could not fold (kept aside, counted).
    parked_events: u64,
}

#[derive(Serialize, ToSchema)]
struct PipelineStatus {
    /// Pipeline events the worker's fold could not take; `null` when the pipeline runs
    /// in another process.
    parked_events: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct Status {
    #[schema(value_type = String)]
    status: &'static str,
    #[schema(value_type = String)]
    service: &'static str,
    #[schema(value_type = String)]
    version: &'static str,
    uptime_s: f64,
    timestamp: String,
    ledger: LedgerStatus,
    projection: ProjectionStatus,
    pipeline: PipelineStatus,
    auto_publish: bool,
    /// Where the ledger lives: a folder, or a PostgreSQL URL without its password.
    ledger_location: String,
    /// Whether this server leads the ledger (runs the automatic publisher and takes
    /// publish commands); on a shared PostgreSQL ledger, one server does.
    leader: bool,
    /// Free bytes of the file system under each root (`null` when unreadable).
    #[schema(value_type = std::collections::BTreeMap<String, Option<u64>>)]
    disk_free_bytes: std::collections::BTreeMap<&'static str, Option<u64>>,
}

/// Health, version, the ledger's position, the read model's lag, free space.
#[utoipa::path(
    get,
    path = "/api/status",
    operation_id = "service_status",
    tag = "service",
    responses((status = 200, description = "The service's status", body = Status))
)]
async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(Status {
        status: "ok",
        service: "contimg",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs_f64(),
        timestamp: format_time(chrono::Utc::now()),
        ledger: LedgerStatus {
            events: state.store.event_count(),
            position: state.store.last_position(),
        },
        projection: ProjectionStatus {
            checkpoint: state.projections.checkpoint(),
            lag_events: state.projections.lag(),
            parked_events: state.projections.read(|m| m.parked().1),
        },
        pipeline: PipelineStatus {
            parked_events: state
                .pipeline_parked
                .get()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed)),
        },
        auto_publish: state.auto_publish,
        ledger_location: state.store.describe(),
        leader: state.leading.load(std::sync::atomic::Ordering::Acquire),
        disk_free_bytes: [
            ("data", state.store.dir()),
            ("stage", state.publisher.config().stage_root.as_path()),
            ("products", state.publisher.config().products_root.as_path()),
        ]
        .into_iter()
        .map(|(name, path)| (name, crate::disk::space(path).map(|(free, _)| free)))
        .collect(),
    })
}
