//! `GET /api/metrics/system` (JSON) and `GET /metrics` (Prometheus text), and the
//! middleware that counts requests and their latencies by route.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ApiError;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: String,
}

fn http_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Request counts and latencies by method, route template and status.
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    durations: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(http_histogram),
        }
    }
}

impl HttpMetrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let labels = HttpLabels {
            method: method.to_string(),
            route: route.to_string(),
            status: status.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(seconds);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "contimg_http_requests",
            "HTTP requests by method, route and status",
            self.requests.clone(),
        );
        r.register_with_unit(
            "contimg_http_request_duration",
            "HTTP request latency",
            Unit::Seconds,
            self.durations.clone(),
        );
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
async fn prometheus(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let now = chrono::Utc::now().timestamp_micros();
    let s = state.projections.read(|m| publish_status(m, now));
    let mut r = Registry::default();
    let count = |r: &mut Registry, name: &str, help: &str, value: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        r.register(name, help, g);
    };
    count(
        &mut r,
        "contimg_products_published",
        "Products published",
        s.total_published,
    );
    count(
        &mut r,
        "contimg_products_staging",
        "Products in staging",
        s.total_staging,
    );
    count(
        &mut r,
        "contimg_products_publishing",
        "Products being published",
        s.total_publishing,
    );
    count(
        &mut r,
        "contimg_publish_failed",
        "Products in staging after a failed publish",
        s.failed_publishes,
    );
    count(
        &mut r,
        "contimg_publish_max_attempts_exceeded",
        "Products that need an operator",
        s.max_attempts_exceeded,
    );
    let rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    rate.set(s.success_rate_percent);
    r.register(
        "contimg_publish_success_rate_percent",
        "Published over published plus failed (100 while there is neither)",
        rate,
    );
    count(
        &mut r,
        "contimg_publish_failures_24h",
        "Publish failures in the last 24 hours",
        s.recent_failures_24h,
    );
    count(
        &mut r,
        "contimg_publish_failures_1h",
        "Publish failures in the last hour",
        s.recent_failures_1h,
    );
    let oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    oldest.set(s.oldest_staging_hours.unwrap_or(0.0) * 3600.0);
    r.register_with_unit(
        "contimg_staging_oldest",
        "Age of the oldest product in staging (0 when none)",
        Unit::Seconds,
        oldest,
    );
    let position = Gauge::<i64>::default();
    position.set(state.store.last_position().map_or(-1, |p| p as i64));
    r.register(
        "contimg_ledger_position",
        "Last durable ledger position (-1 when empty)",
        position,
    );
    count(
        &mut r,
        "contimg_ledger_events",
        "Durable events in the ledger",
        state.store.event_count(),
    );
    count(
        &mut r,
        "contimg_projection_lag_events",
        "Durable events not yet folded into the read model",
        state.projections.lag(),
    );
    count(
        &mut r,
        "contimg_projection_parked_events",
        "Product events the read model could not fold (kept aside)",
        state.projections.read(|m| m.parked().1),
    );
    if let Some(c) = state.pipeline_parked.get() {
        count(
            &mut r,
            "contimg_pipeline_parked_events",
            "Pipeline events the worker's fold could not take (kept aside)",
            c.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    count(
        &mut r,
        "contimg_activity_lag_events",
        "Durable events not yet counted by the activity counters",
        state
            .store
            .event_count()
            .saturating_sub(state.activity.next_position()),
    );
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(
        state.leading.load(std::sync::atomic::Ordering::Acquire),
    ));
    r.register(
        "contimg_leader",
        "1 while this server leads the ledger (runs the publisher), else 0",
        leader,
    );
    state.activity.register(&mut r);
    let timings = state.store.timings();
    r.register_with_unit(
        "contimg_append_duration",
        "Append latency, from submission to the durable answer",
        Unit::Seconds,
        timings.append_seconds.clone(),
    );
    r.register_with_unit(
        "contimg_sync_duration",
        "Durability step of each group commit (flush and fdatasync, or COMMIT)",
        Unit::Seconds,
        timings.sync_seconds.clone(),
    );
    state.http.register(&mut r);
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        return ApiError::Internal(format!("encoding the metrics: {e}")).into_response();
    }
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response()
    } else {
        (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            to_prometheus_text(&out),
        )
            .into_response()
    }
}

/// The same exposition in Prometheus' text format 0.0.4, for scrapers and tools that do
/// not ask for OpenMetrics (`promtool check metrics` among them): a counter family is
/// named by its `_total` samples, and there is no `# UNIT` or `# EOF` line.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                // OpenMetrics' `unknown` is the text format's `untyped`.
                let tail = if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                out.push_str(prefix);
                out.push_str(&name);
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
