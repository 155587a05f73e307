//! The API's contract in OpenAPI 3.1, generated from the handlers and their types.
//!
//! Every route is registered through `utoipa_axum::routes!`, which adds the handler to the
//! router and its `#[utoipa::path]` description to the document in one step, so a route
//! cannot be served without being described. The refusals every route can give (the
//! guard's, hyper's, the shutdown's) are added to each operation here, in one place.
//! `GET /api/openapi.json` serves the document; `docs/openapi.json` is a copy that a test
//! keeps equal to it (`contimg openapi` prints it).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{HttpMethod, OpenApi as Document, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// Every error's body.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: errors are written by `ApiError`
pub struct ErrorBody {
    /// What was wrong, for a person.
    detail: String,
}

/// A 409's body. An optimistic-concurrency conflict on an append also gives the revision
/// that was expected and the stream's current one (`-1`: no stream), the latter in the
/// `ES-CurrentVersion` header too.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only
pub struct ConflictBody {
    detail: String,
    expected: Option<i64>,
    current: Option<i64>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "contimg",
        description = "The DSA-110 continuum imaging pipeline's product ledger: the event log, \
            the products and their publishing, the monitoring views of the old endpoints.",
        license(name = "MIT", identifier = "MIT"),
    ),
    components(schemas(ErrorBody, ConflictBody)),
    tags(
        (name = "ledger", description = "Streams and the `$all` log"),
        (name = "products", description = "Register, finalize, publish, read"),
        (name = "monitoring", description = "The old monitoring endpoints, and what they lacked"),
        (name = "service", description = "Health, figures, the page, this document"),
    )
)]
struct ApiDoc;

/// Answers every operation can give besides its own, and the bearer token of the
/// mutating ones.
struct Refusals;

/// (status, description), for every operation.
const EVERY_OPERATION: &[(&str, &str)] = &[
    (
        "400",
        "A malformed request: a bad parameter, path or header",
    ),
    (
        "403",
        "Refused whoever asks: a `Host` that is not this server's (without a token), a \
         cross-site `Origin` or `Sec-Fetch-Site`",
    ),
    ("414", "The request target is too long"),
    ("431", "The request's header is too large"),
    (
        "503",
        "The server is shutting down, or a bounded resource is in use (with `Retry-After`)",
    ),
];

/// (status, description), for the operations that change something.
const MUTATING: &[(&str, &str)] = &[
    (
        "401",
        "A token is configured and the request lacks it, or gives another",
    ),
    ("408", "The request body did not arrive in time"),
    ("413", "The request body is over the limit"),
    ("415", "A body that is not `Content-Type: application/json`"),
    (
        "507",
        "The ledger's file system is under its reserve; nothing was written",
    ),
];

impl Modify for Refusals {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for item in doc.paths.paths.values_mut() {
            for (method, op) in [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Post, &mut item.post),
            ] {
                let Some(op) = op else { continue };
                let mut add = EVERY_OPERATION.to_vec();
                if method == HttpMethod::Post {
                    add.extend_from_slice(MUTATING);
                    op.security = Some(vec![
                        utoipa::openapi::security::SecurityRequirement::new(
                            "bearer",
                            Vec::<String>::new(),
                        ),
                        // Without a configured token, none is needed.
                        utoipa::openapi::security::SecurityRequirement::default(),
                    ]);
                }
                for (status, description) in add {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(
                                        "application/json",
                                        utoipa::openapi::ContentBuilder::new()
                                            .schema(Some(RefOr::Ref(
                                                utoipa::openapi::Ref::from_schema_name("ErrorBody"),
                                            )))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

/// Every route of the API with its description.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(super::streams::router())
        .merge(super::status::router())
        .merge(super::products::router())
        .merge(super::monitoring::router())
        .merge(super::pipeline::router())
        .merge(super::metrics::router())
        .merge(super::dashboard::router())
        .routes(routes!(document))
}

/// The description of the whole API, with the refusals added to every operation.
pub fn spec() -> Document {
    let mut doc = routes().into_openapi();
    Refusals.modify(&mut doc);
    doc
}

/// The document as served and kept in `docs/openapi.json`: pretty JSON, one newline.
pub fn spec_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut s = spec()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"detail\": \"the description failed: {e}\"}}"));
        s.push('\n');
        s
    })
}

/// This API's description, in OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], spec_json())
}
