//! `GET /`: the operators' dashboard, one self-contained page (inline CSS and JS, no
//! network beyond this server) that polls the monitoring endpoints every 10 s, retries
//! failed publishes, and shows a product's timeline. When a call answers 401 it opens a
//! form for the bearer token (never a blocking dialog) and keeps it in sessionStorage.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// The page, compiled into the binary.
pub const PAGE: &str = include_str!("dashboard.html");

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(page))
}

/// The operators' dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "service",
    responses((status = 200, description = "One self-contained HTML page", content_type = "text/html", body = String))
)]
async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing but this server: no other origin for scripts, styles or requests.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
}
