//! The HTTP face: axum routers, one per resource, merged in [`app`]; the server loop
//! [`run`] takes its shutdown signal as a parameter so tests can pass their own.
//! Only this module knows HTTP.

pub mod dashboard;
pub mod error;
pub mod guard;
pub mod metrics;
pub mod monitoring;
pub mod openapi;
pub mod params;
pub mod pipeline;
pub mod products;
pub mod server;
pub mod status;
pub mod streams;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use tokio::net::TcpListener;

use crate::events::{Ledger, Store};
use crate::pipeline::publish::{PublishConfig, Publisher};
use crate::projections::Projections;
use crate::projections::alerts::AlertThresholds;
use error::ApiError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub projections: Projections,
    pub publisher: Publisher,
    pub started: Instant,
    /// When set, mutating endpoints require `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
    pub thresholds: Arc<AlertThresholds>,
    pub http: Arc<metrics::HttpMetrics>,
    pub auto_publish: bool,
    pub limits: Arc<HttpLimits>,
    /// One permit per as-of replay allowed to run at once (each folds the log so far).
    pub replays: Arc<tokio::sync::Semaphore>,
    /// The pipeline fold's parked-event count, when the pipeline runs in this process.
    pub pipeline_parked: Arc<std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>>,
    /// Whether this server leads the ledger now: runs the automatic publisher and takes
    /// publish commands. Always, on a sled folder; on PostgreSQL, while it holds the
    /// ledger's advisory lock (one server of those sharing the database).
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// What the pipeline and the publisher have done, counted from the log (`/metrics`).
    pub activity: crate::projections::activity::Activity,
    /// The pipeline as the log tells it (`/api/pipeline`): the worker's own fold,
    /// followed here with the activity counters.
    pub pipeline_view: Arc<std::sync::RwLock<crate::pipeline::state::PipelineState>>,
    /// Publishes and stage durations per hour, for the dashboard's charts.
    pub hourly: Arc<std::sync::RwLock<pipeline::Hourly>>,
    pub subbands: u8,
    /// The JSON of each failed row served, until its product changes.
    pub failed_rows: Arc<monitoring::RowCache>,
}

/// Bounds on what clients can hold: time, connections, replays; and the names the server
/// answers to while no token is set.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest wait for a request's complete headers (also bounds idle keep-alive).
    pub header_timeout: Duration,
    /// Longest wait for a request's complete body.
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests and a publish in progress may run after SIGTERM.
    pub shutdown_deadline: Duration,
    /// Longest a response write may wait on a client that does not read.
    pub write_timeout: Duration,
    /// As-of replays (`?as_of=`, `?position=`) running at once; more answer 503.
    pub max_as_of_replays: usize,
    /// Host names answered besides IP addresses and `localhost` while no token is set.
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_deadline: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_as_of_replays: 2,
            allowed_hosts: Vec::new(),
        }
    }
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub token: Option<String>,
    pub publish: PublishConfig,
    pub thresholds: AlertThresholds,
    /// Run the automatic publisher (on unless an operator holds it).
    pub auto_publish: bool,
    pub http: HttpLimits,
    /// Subbands per observation (`[ingest] subbands`), for the pipeline view.
    pub subbands: u8,
}

impl ServerConfig {
    /// Stage and products roots under the data folder, defaults elsewhere.
    pub fn under(data_dir: &std::path::Path) -> Self {
        ServerConfig {
            token: None,
            publish: PublishConfig::new(data_dir.join("stage"), data_dir.join("products")),
            thresholds: AlertThresholds::default(),
            auto_publish: true,
            http: HttpLimits::default(),
            subbands: 16,
        }
    }
}

impl AppState {
    /// Loads the read model, settles publishes a crash cut short, and is ready to serve.
    pub async fn open(store: Store, config: ServerConfig) -> Result<Self, anyhow::Error> {
        let max_attempts = config.publish.max_attempts;
        let projections = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let opened = Projections::open(&store, max_attempts);
                // The replay's batches and buffers are free now; the server may start idle.
                crate::memory::return_freed();
                opened
            })
            .await??
        };
        let publisher = Publisher::new(
            Ledger::Local(store.clone()),
            projections.clone(),
            config.publish,
        )?;
        // Recovery appends; the follower started by `run` folds what it wrote. On a shared
        // ledger only the leader recovers, when it takes the lead (`run`).
        if !store.is_shared() {
            let recovered = publisher.recover().await?;
            if recovered > 0 {
                tracing::warn!(recovered, "settled publishes interrupted by a crash");
            }
        }
        Ok(AppState {
            projections,
            publisher,
            started: Instant::now(),
            token: config.token.filter(|t| !t.is_empty()).map(Arc::from),
            thresholds: Arc::new(config.thresholds),
            http: Arc::new(metrics::HttpMetrics::default()),
            auto_publish: config.auto_publish,
            replays: Arc::new(tokio::sync::Semaphore::new(
                config.http.max_as_of_replays.max(1),
            )),
            limits: Arc::new(config.http),
            pipeline_parked: Arc::default(),
            leading: Arc::new(std::sync::atomic::AtomicBool::new(!store.is_shared())),
            activity: Default::default(),
            pipeline_view: Arc::default(),
            hourly: Arc::default(),
            subbands: config.subbands,
            failed_rows: Arc::default(),
            store,
        })
    }

    /// Refuses a publish command on a server that does not lead a shared ledger: only the
    /// leader moves files, so that its recovery never meets another server's move.
    pub fn require_leader(&self) -> Result<(), ApiError> {
        if self.leading.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        Err(ApiError::NotLeader(
            "this server does not lead the shared ledger; publishing runs on the server \
             that does (see /api/status on each), or here once it takes the lead"
                .into(),
        ))
    }

    /// Checks the bearer token of a mutating request.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The whole application.
pub fn app(state: AppState) -> Router {
    let (routes, _) = openapi::routes().split_for_parts();
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Follows the log from its start with the activity counters and the pipeline view,
/// until the server stops.
/// A failed read is retried from where the count stands, after a second.
async fn count_activity(
    store: Store,
    activity: crate::projections::activity::Activity,
    view: Arc<std::sync::RwLock<crate::pipeline::state::PipelineState>>,
    hourly: Arc<std::sync::RwLock<pipeline::Hourly>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let mut sub = store.subscribe_all(activity.next_position().checked_sub(1));
        let mut counted = 0u64;
        loop {
            tokio::select! {
                next = sub.next() => match next {
                    Ok(e) => {
                        activity.apply(&e);
                        view.write()
                            .unwrap_or_else(|p| p.into_inner())
                            .apply(&e.view());
                        hourly
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .apply(&e);
                        counted += 1;
                        // A long history is read without waiting: let others run.
                        if counted.is_multiple_of(1024) {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(crate::events::StoreError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "activity counters: reading the log failed; retrying");
                        break;
                    }
                },
                _ = crate::projections::stopped(&mut stop) => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = crate::projections::stopped(&mut stop) => return,
        }
    }
}

/// The leader's duties, while this server leads: on a shared ledger, settle the publishes
/// a crash cut short (once the read model has caught up with the log), then run the
/// automatic publisher until the lead is lost or the server stops. On a sled folder the
/// lead is held from the start and recovery ran before serving.
async fn lead(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    use std::sync::atomic::Ordering;
    let mut leader = state.store.leadership();
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                r = leader.changed() => if r.is_err() { return },
                _ = crate::projections::stopped(&mut stop) => return,
            }
        }
        if state.store.is_shared() {
            // Moves cut short when an earlier lead was lost may run again.
            state.publisher.resume();
            // What the previous leader left must be in the read model before recovery
            // looks for publishes in progress.
            let target = state.store.event_count();
            let mut changes = state.projections.watch();
            while state.projections.checkpoint().map_or(0, |c| c + 1) < target {
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = crate::projections::stopped(&mut stop) => return,
                }
            }
            if !*leader.borrow() {
                continue;
            }
            match state.publisher.recover().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(n, "the new leader settled publishes cut short"),
                Err(e) => {
                    tracing::error!(error = %e, "recovery on taking the lead failed; trying again in 5 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                        _ = crate::projections::stopped(&mut stop) => return,
                    }
                }
            }
            if !*leader.borrow() {
                continue;
            }
        }
        state.leading.store(true, Ordering::Release);
        let (halt_tx, halt_rx) = tokio::sync::watch::channel(false);
        let auto = state
            .auto_publish
            .then(|| tokio::spawn(state.publisher.clone().run_auto(halt_rx)));
        // A lead that cannot change (a sled folder's, whose watch has no sender) is held
        // until the server stops.
        let lost = async {
            while *leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let stopping = tokio::select! {
            _ = lost => false,
            _ = crate::projections::stopped(&mut stop) => true,
        };
        if !stopping {
            // Lost: refuse publish commands at once and cut every move in flight short
            // (each is recorded as interrupted), so that the new leader's recovery meets
            // no move of ours still running.
            state.leading.store(false, Ordering::Release);
            state.publisher.interrupt();
        }
        let _ = halt_tx.send(true);
        if let Some(a) = auto {
            let _ = a.await;
        }
        if stopping {
            return;
        }
        tracing::warn!("lost the ledger's lead; the automatic publisher stopped");
    }
}

/// Serves until `shutdown` completes, with the read model following the log and the
/// automatic publisher running. Then a publish in progress is cut short (recorded as
/// interrupted and retried after the restart), in-flight requests get
/// `shutdown_deadline` to finish, the publisher and the follower stop, a snapshot is
/// saved and the store closed, so every append that was taken is made durable and
/// acknowledged first. A stalled client or publish cannot hold the stop up past the
/// deadline.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The publisher stops at the signal; the read model follows the log until the
    // publisher is done, so its last outcomes are folded and nobody waits on a stopped fold.
    let (stop_pub_tx, stop_pub_rx) = tokio::sync::watch::channel(false);
    let (stop_fold_tx, stop_fold_rx) = tokio::sync::watch::channel(false);
    let counting = tokio::spawn(count_activity(
        state.store.clone(),
        state.activity.clone(),
        state.pipeline_view.clone(),
        state.hourly.clone(),
        stop_fold_rx.clone(),
    ));
    let follower = tokio::spawn(state.projections.clone().run(stop_fold_rx.clone()));
    // Memory freed since the start (the activity counters' first pass over the log, a
    // snapshot) goes back to the system even while no request comes.
    let mut stop_returning = stop_fold_rx;
    let returning = tokio::spawn(async move {
        let every = crate::memory::RETURN_EVERY;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let _ = tokio::task::spawn_blocking(crate::memory::return_freed).await;
                }
                _ = crate::projections::stopped(&mut stop_returning) => return,
            }
        }
    });
    let publisher = Some(tokio::spawn(lead(state.clone(), stop_pub_rx)));
    let store = state.store.clone();
    let limits = server::ConnLimits {
        header_timeout: state.limits.header_timeout,
        max_connections: state.limits.max_connections,
        shutdown_deadline: state.limits.shutdown_deadline,
        write_timeout: state.limits.write_timeout,
    };
    let deadline = state.limits.shutdown_deadline;
    let moves = state.publisher.clone();
    let stopping = stop_pub_tx.clone();
    // One deadline, counted from the signal, for the requests and the publish in flight.
    let signalled = Arc::new(std::sync::OnceLock::<Instant>::new());
    let signal_time = signalled.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = signal_time.set(Instant::now());
        let _ = stopping.send(true);
        moves.interrupt();
    };
    server::serve(listener, app(state), limits, shutdown).await;
    let _ = stop_pub_tx.send(true);
    let left = deadline.saturating_sub(signalled.get().map_or(Duration::ZERO, |t| t.elapsed()));
    if let Some(p) = publisher
        && tokio::time::timeout(left, p).await.is_err()
    {
        tracing::warn!(
            "a publish was still running at the shutdown deadline; recovery settles it at the next start"
        );
    }
    let _ = stop_fold_tx.send(true);
    let _ = follower.await;
    let _ = counting.await;
    let _ = returning.await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(std::io::Error::other)?;
    Ok(())
}
