//! `GET /api/status`: health, version and the ledger's position.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;
use crate::events::record::format_time;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/status", get(status))
}

#[derive(Serialize)]
struct LedgerStatus {
    events: u64,
    position: Option<u64>,
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    service: &'static str,
    version: &'static str,
    uptime_s: f64,
    timestamp: String,
    ledger: LedgerStatus,
}

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
    })
}
