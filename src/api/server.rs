//! The HTTP/1.1 connection loop under the router, with the bounds `axum::serve` lacks: a
//! time limit on reading each request's headers (an idle keep-alive connection included),
//! a bound on open connections, and a deadline on the graceful shutdown after which the
//! connections still open are dropped. Errors hyper answers itself before the router
//! runs (400 malformed, 414 URI too long, 431 headers too large) get a JSON `{"detail"}`
//! body like every other error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

/// The largest request head read before answering 431.
pub const MAX_HEAD_BYTES: usize = 96 * 1024;

/// The connection loop's bounds.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Longest wait for a request's complete headers (also bounds idle keep-alive).
    pub header_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long in-flight requests may run after the shutdown signal.
    pub shutdown_deadline: Duration,
    /// Longest a write may wait on a client that does not read; the connection is then
    /// closed (a client that never reads cannot hold a slot).
    pub write_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open connections
/// finish their requests for at most `shutdown_deadline` and drops the rest.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, never spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            // A request head (line and headers) must fit in 96 KiB: room for a 64 KiB URI
            // (hyper's own limit, answered 414), and 431 beyond.
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(
                TokioIo::new(JsonErrors::new(stream, limits.write_timeout)),
                TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_deadline) => {
            tracing::warn!(open = conns.len(), "connections still open at the shutdown deadline; closing them");
        }
    }
    conns.shutdown().await;
}

/// A connection whose writes are watched: for hyper's own error answers (a 4xx or 5xx
/// head with `content-length: 0` and no `content-type`; the router's errors always carry
/// JSON), rewritten to carry a JSON `{"detail"}` body; and for a client that stops
/// reading, whose connection is closed once a write has waited `write_timeout`. Vectored
/// writes are declined so hyper hands over each head in one buffer.
struct JsonErrors<T> {
    io: T,
    pending: Vec<u8>,
    sent: usize,
    write_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> JsonErrors<T> {
    fn new(io: T, write_timeout: Duration) -> Self {
        JsonErrors {
            io,
            pending: Vec::new(),
            sent: 0,
            write_timeout,
            stall: None,
        }
    }

    /// Called when a write could not proceed: an error once it has waited too long.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.write_timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// `poll_write` of the connection, with the stall watch.
    fn write_watched(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watched(cx, r)
    }

    /// A write or flush that made no progress starts (or goes on with) the stall clock;
    /// one that did stops it.
    fn watched<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match r {
            Poll::Pending => match self.stalled(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            ready => {
                self.stall = None;
                ready
            }
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.pending.len() {
            let (pending, sent) = (std::mem::take(&mut self.pending), self.sent);
            let r = self.write_watched(cx, &pending[sent..]);
            self.pending = pending;
            let n = ready!(r)?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if let Some(rewritten) = json_error_head(buf) {
            this.pending = rewritten;
            // Written as far as the caller knows; what is left goes out on the next
            // write, flush or shutdown.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        this.write_watched(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.watched(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// The JSON twin of a bodiless error head written by hyper, or `None` for anything else.
fn json_error_head(buf: &[u8]) -> Option<Vec<u8>> {
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_len != buf.len() || !(buf.starts_with(b"HTTP/1.1 ") || buf.starts_with(b"HTTP/1.0 ")) {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    let status_line = head.lines().next()?;
    let code: u16 = status_line.get(9..12)?.parse().ok()?;
    if !(400..600).contains(&code) {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    if lower.contains("\r\ncontent-type:") {
        return None;
    }
    let at = lower.find("\r\ncontent-length: 0\r\n")? + 2;
    let detail = match code {
        400 => "the request could not be read as HTTP/1.1",
        414 => "the request's URI is too long",
        431 => "the request's headers are too large",
        _ => status_line.get(13..).unwrap_or("error"),
    };
    let body = serde_json::json!({ "detail": detail }).to_string();
    let mut out = Vec::with_capacity(buf.len() + body.len() + 48);
    out.extend_from_slice(&buf[..at]);
    out.extend_from_slice(
        format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&buf[at + "content-length: 0\r\n".len()..]);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::json_error_head;

    #[test]
    fn hyper_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Fri, 04 Dec 2026 10:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(json_error_head(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.contains("content-type: application/json"), "{h}");
        assert!(
            h.contains(&format!("content-length: {}", body.len())),
            "{h}"
        );
        assert!(h.contains("date: "), "{h}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["detail"], "the request's headers are too large");
    }

    #[test]
    fn other_writes_pass_untouched() {
        for w in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"{\"detail\":\"x\"}",
        ] {
            assert!(json_error_head(w).is_none(), "{}", String::from_utf8_lossy(w));
        }
    }
}
