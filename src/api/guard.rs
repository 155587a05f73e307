//! What every request passes before a handler sees it: the `Host` check that defeats DNS
//! rebinding while no token is set, the same-origin checks that keep a page of another
//! site from driving the API (`Origin`, `Sec-Fetch-Site`, a JSON `Content-Type`), and the
//! time limit on reading a request body.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, MAX_BODY_BYTES};

pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Err(e) = check_request(&state, &req) {
        return e.into_response();
    }
    // Bodies are buffered only for a change, and only from a client holding the token
    // (when one is set): nobody else makes the server hold 4 MiB per connection.
    let limit = if mutating(req.method()) {
        // The publish lifecycle takes no raw append, whoever asks (before the token).
        if let Some(stream) = req
            .uri()
            .path()
            .strip_prefix("/api/streams/")
            .and_then(percent_decoded)
            && let Err(e) = super::streams::refuse_command_only(&stream, None)
        {
            return e.into_response();
        }
        if let Err(e) = state.authorize(req.headers()) {
            return e.into_response();
        }
        MAX_BODY_BYTES
    } else {
        0
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::TooLarge(format!("the request body is larger than {limit} bytes"))
            .into_response();
    }
    let has_type = req.headers().contains_key(header::CONTENT_TYPE);
    let (parts, body) = req.into_parts();
    // A client that sends half a body is cut off here, not left holding a handler.
    let read =
        tokio::time::timeout(state.limits.body_timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Err(_) => {
            return ApiError::Timeout(format!(
                "the request body did not arrive within {} s",
                state.limits.body_timeout.as_secs_f64()
            ))
            .into_response();
        }
        Ok(Err(e)) if e.to_string().contains("length limit") => {
            return ApiError::TooLarge(format!("the request body is larger than {limit} bytes"))
                .into_response();
        }
        Ok(Err(e)) => {
            return ApiError::BadRequest(format!("reading the request body: {e}")).into_response();
        }
        Ok(Ok(b)) => b,
    };
    if mutating(&parts.method) && !bytes.is_empty() && !has_type {
        return ApiError::UnsupportedMediaType(
            "a request with a body must carry Content-Type: application/json".into(),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A path segment with its `%XX` escapes decoded, as the router decodes it; `None` when
/// it is not UTF-8 or holds a `/`.
fn percent_decoded(segment: &str) -> Option<String> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16)
        {
            out.push(v);
            i += 3;
        } else if b[i] == b'/' {
            return None;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn mutating(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

fn check_request(state: &AppState, req: &Request) -> Result<(), ApiError> {
    // HTTP/1.1 requires Host; an absolute-form target names its host too, and both count.
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if req.version() == axum::http::Version::HTTP_11 && hosts != 1 {
        return Err(ApiError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host header".into(),
        ));
    }
    if state.token.is_none()
        && let Some(authority) = req.uri().authority()
        && !host_allowed(authority.as_str(), &state.limits.allowed_hosts)
    {
        return Err(foreign_host(authority.as_str()));
    }
    check_headers(state, req.method(), req.headers())
}

fn foreign_host(host: &str) -> ApiError {
    ApiError::Forbidden(format!(
        "Host {host:?} is not an address of this server; without a token only IP \
         addresses, localhost and [server] allowed_hosts are answered"
    ))
}

/// The decisions on headers alone: pure, so each rule is tested without a server.
pub fn check_headers(state: &AppState, method: &Method, h: &HeaderMap) -> Result<(), ApiError> {
    let host = header_str(h, header::HOST);
    if state.token.is_none()
        && let Some(host) = host
        && !host_allowed(host, &state.limits.allowed_hosts)
    {
        return Err(foreign_host(host));
    }
    if !mutating(method) {
        return Ok(());
    }
    if let Some(site) = header_str(h, header::HeaderName::from_static("sec-fetch-site"))
        && !matches!(site, "same-origin" | "none")
    {
        return Err(ApiError::Forbidden(format!(
            "a {site} request may not change anything (Sec-Fetch-Site)"
        )));
    }
    if let Some(origin) = header_str(h, header::ORIGIN) {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let same = matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h));
        if !same {
            return Err(ApiError::Forbidden(format!(
                "a request from origin {origin:?} may not change anything here"
            )));
        }
    }
    if let Some(ct) = header_str(h, header::CONTENT_TYPE) {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type must be application/json, not {ct:?}"
            )));
        }
    } else if h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
    {
        return Err(ApiError::UnsupportedMediaType(
            "a request with a body must carry Content-Type: application/json".into(),
        ));
    }
    Ok(())
}

/// An IP address (v4 or bracketed v6), `localhost`, or a configured name, with or
/// without a port. A DNS-rebinding page reaches the server under a name of its own,
/// which none of these is.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim();
    let port_ok = |p: &str| p.is_empty() || p.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, after)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (after.is_empty()
                    || after
                        .strip_prefix(':')
                        .is_some_and(|p| !p.is_empty() && port_ok(p)))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((n, port)) if !port.is_empty() && port_ok(port) => n,
        Some(_) => return false,
        None => host,
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts() {
        let allowed = vec!["contimg.ovro.example".to_string()];
        for ok in [
            "127.0.0.1:8000",
            "127.0.0.1",
            "[::1]:8000",
            "localhost:8000",
            "LOCALHOST",
            "10.1.2.3:80",
            "contimg.ovro.example:8000",
            "contimg.ovro.example",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example:8000",
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8000",
            "[not-an-ip]:80",
            "[::1].evil.example",
            "[::1]evil.example:80",
            "127.0.0.1:80:80",
            "127.0.0.1:99999",
            "localhost:",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }
}
