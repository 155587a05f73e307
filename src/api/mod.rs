//! The HTTP face: axum routers, one per resource, merged in [`app`]; the server loop
//! [`run`] takes its shutdown signal as a parameter so tests can pass their own.
//! Only this module knows HTTP.

pub mod error;
pub mod params;
pub mod status;
pub mod streams;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use tokio::net::TcpListener;

use crate::events::Store;
use error::ApiError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub started: Instant,
    /// When set, mutating endpoints require `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
}

impl AppState {
    pub fn new(store: Store, token: Option<String>) -> Self {
        AppState {
            store,
            started: Instant::now(),
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
        }
    }

    /// Checks the bearer token of a mutating request.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
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
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `shutdown` completes, then lets in-flight requests finish and closes the
/// store, so every append that was taken is made durable and acknowledged first.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let store = state.store.clone();
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(std::io::Error::other)?;
    result
}
