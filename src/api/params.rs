//! Query parameters, parsed by hand so that every bad value gets a JSON 400 naming it.

use std::collections::HashMap;

use super::error::ApiError;
use crate::events::Direction;

/// The largest `limit` any endpoint takes.
pub const MAX_LIMIT: usize = 10_000;

pub type Params = HashMap<String, String>;

pub fn opt_u64(p: &Params, name: &str) -> Result<Option<u64>, ApiError> {
    match p.get(name).map(|s| s.trim()) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
            ApiError::BadRequest(format!(
                "{name} must be a non-negative whole number, not {s:?}"
            ))
        }),
    }
}

/// `limit`, defaulting to `default`, between 1 and [`MAX_LIMIT`].
pub fn limit(p: &Params, default: usize) -> Result<usize, ApiError> {
    match opt_u64(p, "limit")? {
        None => Ok(default),
        Some(0) => Err(ApiError::BadRequest("limit must be at least 1".into())),
        Some(n) if n > MAX_LIMIT as u64 => Err(ApiError::BadRequest(format!(
            "limit {n} is too large; at most {MAX_LIMIT}"
        ))),
        Some(n) => Ok(n as usize),
    }
}

pub fn direction(p: &Params) -> Result<Direction, ApiError> {
    match p.get("direction").map(|s| s.as_str()) {
        None | Some("") | Some("forward") | Some("forwards") => Ok(Direction::Forward),
        Some("backward") | Some("backwards") => Ok(Direction::Backward),
        Some(other) => Err(ApiError::BadRequest(format!(
            "direction must be forward or backward, not {other:?}"
        ))),
    }
}

/// The query parameters of a page of events, as the OpenAPI description gives them (read
/// by [`opt_u64`], [`limit`] and [`direction`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // a description only
pub struct PageParams {
    /// The first revision (of a stream) or position (of `$all`) to read; the start or the
    /// end by default, by direction.
    from: Option<u64>,
    /// At most this many events (1 to 10,000; 100 by default, 1,000 for a product's
    /// history).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
    #[param(inline)]
    direction: Option<DirectionName>,
}

/// The order of a page.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // a description only
pub enum DirectionName {
    Forward,
    Forwards,
    Backward,
    Backwards,
}

/// A question about the past: the read model as it stood at a time or after a position.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // a description only
pub struct AsOfParams {
    /// An RFC 3339 time; not with `position`.
    #[param(format = DateTime)]
    as_of: Option<String>,
    /// A `$all` position; not with `as_of`.
    position: Option<u64>,
}
