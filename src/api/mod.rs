//! The HTTP face: axum routers, one per resource, merged in [`app`]; the server loop
//! [`run`] takes its shutdown signal as a parameter so tests can pass their own.
//! Only this module knows HTTP.

pub mod dashboard;
pub mod error;
pub mod metrics;
pub mod monitoring;
pub mod params;
pub mod products;
pub mod status;
pub mod streams;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

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
}

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub token: Option<String>,
    pub publish: PublishConfig,
    pub thresholds: AlertThresholds,
    /// Run the automatic publisher (on unless an operator holds it).
    pub auto_publish: bool,
}

impl ServerConfig {
    /// Stage and products roots under the data folder, defaults elsewhere.
    pub fn under(data_dir: &std::path::Path) -> Self {
        ServerConfig {
            token: None,
            publish: PublishConfig::new(data_dir.join("stage"), data_dir.join("products")),
            thresholds: AlertThresholds::default(),
            auto_publish: true,
        }
    }
}

impl AppState {
    /// Loads the read model, settles publishes a crash cut short, and is ready to serve.
    pub async fn open(store: Store, config: ServerConfig) -> Result<Self, anyhow::Error> {
        let max_attempts = config.publish.max_attempts;
        let projections = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || Projections::open(&store, max_attempts)).await??
        };
        let publisher = Publisher::new(
            Ledger::Local(store.clone()),
            projections.clone(),
            config.publish,
        )?;
        // Recovery appends; the follower started by `run` folds what it wrote.
        let recovered = publisher.recover().await?;
        if recovered > 0 {
            tracing::warn!(recovered, "settled publishes interrupted by a crash");
        }
        Ok(AppState {
            store,
            projections,
            publisher,
            started: Instant::now(),
            token: config.token.filter(|t| !t.is_empty()).map(Arc::from),
            thresholds: Arc::new(config.thresholds),
            http: Arc::new(metrics::HttpMetrics::default()),
            auto_publish: config.auto_publish,
        })
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
    Router::new()
        .merge(streams::router())
        .merge(status::router())
        .merge(products::router())
        .merge(monitoring::router())
        .merge(metrics::router())
        .merge(dashboard::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Serves until `shutdown` completes, with the read model following the log and the
/// automatic publisher running; then lets in-flight requests finish, stops both, saves a
/// snapshot, and closes the store, so every append that was taken is made durable and
/// acknowledged first.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(state.projections.clone().run(stop_rx.clone()));
    let publisher = state
        .auto_publish
        .then(|| tokio::spawn(state.publisher.clone().run_auto(stop_rx)));
    let store = state.store.clone();
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    if let Some(p) = publisher {
        let _ = p.await;
    }
    let _ = follower.await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(std::io::Error::other)?;
    result
}
