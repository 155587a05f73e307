//! `GET /api/metrics/system` (JSON) and `GET /metrics` (Prometheus text), and the
//! middleware that counts requests and their latencies by route.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::monitoring::publish_status;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(system))
        .routes(routes!(prometheus))
}

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Default)]
struct RouteStats {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Request counts and latencies. std Mutex: held for a few additions, never across an
/// `.await`.
#[derive(Default)]
pub struct HttpMetrics {
    routes: Mutex<BTreeMap<(String, String, u16), RouteStats>>,
}

impl HttpMetrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().expect("metrics lock");
        let s = routes
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum += seconds;
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                s.buckets[i] += 1;
            }
        }
    }

    fn render(&self, out: &mut String) {
        let routes = self.routes.lock().expect("metrics lock");
        out.push_str(
            "# HELP contimg_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE contimg_http_requests_total counter\n");
        for ((m, r, s), st) in routes.iter() {
            let _ = writeln!(
                out,
                "contimg_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {}",
                st.count
            );
        }
        out.push_str("# HELP contimg_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE contimg_http_request_duration_seconds histogram\n");
        for ((m, r, s), st) in routes.iter() {
            let labels = format!("method=\"{m}\",route=\"{r}\",status=\"{s}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "contimg_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    st.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "contimg_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                st.count
            );
            let _ = writeln!(
                out,
                "contimg_http_request_duration_seconds_sum{{{labels}}} {}",
                st.sum
            );
            let _ = writeln!(
                out,
                "contimg_http_request_duration_seconds_count{{{labels}}} {}",
                st.count
            );
        }
    }
}

/// Counts every request under its route template (never the raw path, which would let
/// clients grow the label set without bound).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method()).to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let resp = next.run(req).await;
    state.http.record(
        &method,
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}

/// A method as a metrics label: the standard ones by name, anything a client invents as
/// `other` (labels are a bounded set).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[derive(Serialize, ToSchema)]
struct Disk {
    path: String,
    free_bytes: Option<u64>,
    total_bytes: Option<u64>,
}

fn disk(path: &Path) -> Disk {
    let (free, total) = crate::disk::space(path).map_or((None, None), |(f, t)| (Some(f), Some(t)));
    Disk {
        path: path.display().to_string(),
        free_bytes: free,
        total_bytes: total,
    }
}

#[derive(Serialize, ToSchema)]
struct LedgerFigures {
    events: u64,
    position: Option<u64>,
    size_on_disk_bytes: u64,
    durable_commits: u64,
}

#[derive(Serialize, ToSchema)]
struct ProjectionFigures {
    checkpoint: Option<u64>,
    lag_events: u64,
    products: usize,
    parked_events: u64,
}

#[derive(Serialize, ToSchema)]
struct System {
    /// `ok`, or `degraded` while the read model lags 10,000 events or more.
    #[schema(value_type = String)]
    health: &'static str,
    #[schema(value_type = String)]
    version: &'static str,
    uptime_s: f64,
    ledger: LedgerFigures,
    projection: ProjectionFigures,
    #[schema(value_type = BTreeMap<String, Disk>)]
    disk: BTreeMap<&'static str, Disk>,
    publish_moves: u64,
}

/// The service's figures as JSON: the ledger, the read model, free space per root.
#[utoipa::path(
    get,
    path = "/api/metrics/system",
    tag = "service",
    responses((status = 200, description = "The figures", body = System))
)]
async fn system(State(state): State<AppState>) -> Json<System> {
    let lag = state.projections.lag();
    let (products, parked) = state
        .projections
        .read(|m| (m.product_count(), m.parked().1));
    let cfg = state.publisher.config();
    let mut disks = BTreeMap::new();
    disks.insert("data", disk(state.store.dir()));
    disks.insert("stage", disk(&cfg.stage_root));
    disks.insert("products", disk(&cfg.products_root));
    Json(System {
        health: if lag < 10_000 { "ok" } else { "degraded" },
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: state.started.elapsed().as_secs_f64(),
        ledger: LedgerFigures {
            events: state.store.event_count(),
            position: state.store.last_position(),
            size_on_disk_bytes: state.store.size_on_disk(),
            durable_commits: state.store.sync_count(),
        },
        projection: ProjectionFigures {
            checkpoint: state.projections.checkpoint(),
            lag_events: lag,
            products,
            parked_events: parked,
        },
        disk: disks,
        publish_moves: state.publisher.moves(),
    })
}

/// The figures in Prometheus' text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String))
)]
async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    let now = chrono::Utc::now().timestamp_micros();
    let s = state.projections.read(|m| publish_status(m, now));
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "contimg_products_published",
        "Products published.",
        s.total_published as f64,
    );
    gauge(
        "contimg_products_staging",
        "Products in staging.",
        s.total_staging as f64,
    );
    gauge(
        "contimg_products_publishing",
        "Products being published.",
        s.total_publishing as f64,
    );
    gauge(
        "contimg_publish_failed",
        "Products in staging after a failed publish.",
        s.failed_publishes as f64,
    );
    gauge(
        "contimg_publish_max_attempts_exceeded",
        "Products that need an operator.",
        s.max_attempts_exceeded as f64,
    );
    gauge(
        "contimg_publish_success_rate_percent",
        "Published over published plus failed.",
        s.success_rate_percent,
    );
    gauge(
        "contimg_publish_failures_24h",
        "Publish failures in the last 24 hours.",
        s.recent_failures_24h as f64,
    );
    gauge(
        "contimg_publish_failures_1h",
        "Publish failures in the last hour.",
        s.recent_failures_1h as f64,
    );
    gauge(
        "contimg_ledger_position",
        "Last durable ledger position (-1 when empty).",
        state.store.last_position().map_or(-1.0, |p| p as f64),
    );
    gauge(
        "contimg_ledger_events",
        "Durable events in the ledger.",
        state.store.event_count() as f64,
    );
    gauge(
        "contimg_projection_lag_events",
        "Durable events not yet folded into the read model.",
        state.projections.lag() as f64,
    );
    gauge(
        "contimg_projection_parked_events",
        "Product events the read model could not fold (kept aside).",
        state.projections.read(|m| m.parked().1) as f64,
    );
    if let Some(c) = state.pipeline_parked.get() {
        gauge(
            "contimg_pipeline_parked_events",
            "Pipeline events the worker's fold could not take (kept aside).",
            c.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    state.http.render(&mut out);
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
