//! The API's one error type. Every error answers JSON `{"detail": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::events::StoreError;
use crate::events::error::current_to_wire;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, bad id, bad parameter).
    #[error("{0}")]
    BadRequest(String),
    /// 422: well-formed but refused (unknown event type, payload that does not decode).
    #[error("{0}")]
    Unprocessable(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409 with `ES-CurrentVersion`: an optimistic-concurrency conflict.
    #[error("{detail}")]
    WrongExpectedVersion {
        detail: String,
        expected: i64,
        current: i64,
    },
    /// 409: another kind of conflict (a publish in progress, different content).
    #[error("{0}")]
    Conflict(String),
    /// 401: a token is configured and the request lacks it.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 403: refused whoever asks (a write the API keeps to a command, a cross-site
    /// request, a `Host` that is not this server's).
    #[error("{0}")]
    Forbidden(String),
    /// 408: the request body did not arrive in time.
    #[error("{0}")]
    Timeout(String),
    /// 413: the request body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: a mutating request without `Content-Type: application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503 with `Retry-After`: a bounded resource (as-of replays) is all in use.
    #[error("{0}")]
    Busy(String),
    /// 500 with the error: an operation ran and failed (a publish attempt); the failure is
    /// recorded and the text is the client's to see.
    #[error("{0}")]
    Failed(String),
    /// 507: the ledger's file system is under its reserve; nothing was written.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 503: the ledger cannot make writes durable now (a failed flush, until a restart).
    #[error("{0}")]
    StorageUnavailable(String),
    /// 503: a publish command on a server that does not lead a shared ledger.
    #[error("{0}")]
    NotLeader(String),
    /// 503: the server is shutting down.
    #[error("the server is shutting down")]
    Unavailable,
    /// 500: logged once here; the client gets a generic message.
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::WrongExpectedVersion { .. } => {
                let StoreError::WrongExpectedVersion {
                    expected, current, ..
                } = &e
                else {
                    unreachable!()
                };
                ApiError::WrongExpectedVersion {
                    expected: expected.to_wire(),
                    current: current_to_wire(*current),
                    detail: e.to_string(),
                }
            }
            StoreError::StreamNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::InvalidInput(m) => ApiError::BadRequest(m),
            StoreError::Closed => ApiError::Unavailable,
            StoreError::NoSpace { .. } => ApiError::InsufficientStorage(e.to_string()),
            StoreError::NotDurable { .. }
            | StoreError::Poisoned
            | StoreError::Database { .. }
            | StoreError::Unavailable(_) => {
                ApiError::StorageUnavailable(crate::events::error::chain(&e))
            }
            other => ApiError::Internal(crate::events::error::chain(&other)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::WrongExpectedVersion { .. } | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unavailable | ApiError::StorageUnavailable(_) | ApiError::NotLeader(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        match self {
            ApiError::WrongExpectedVersion {
                detail,
                expected,
                current,
            } => {
                let mut resp = (
                    status,
                    Json(json!({"detail": detail, "expected": expected, "current": current})),
                )
                    .into_response();
                resp.headers_mut()
                    .insert("ES-CurrentVersion", HeaderValue::from(current));
                resp
            }
            ApiError::Busy(detail) => {
                let mut resp = (status, Json(json!({"detail": detail}))).into_response();
                resp.headers_mut()
                    .insert("Retry-After", HeaderValue::from_static("1"));
                resp
            }
            other => (status, Json(json!({"detail": other.to_string()}))).into_response(),
        }
    }
}

/// Gives every error response a JSON `{"detail"}` body, including the ones axum makes
/// itself (413 for a body over the limit, 405, extractor rejections), whose text it keeps.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = (status, Json(json!({"detail": detail}))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}
