//! HTTP serving for kvroute's agent and gateway, with the limits a server that anyone on the
//! network can reach needs (`axum::serve` sets none of them):
//!
//! - **Header read timeout**: a request's headers must arrive whole within
//!   [`Limits::header_read_timeout`], and a connection must send its first byte within it.
//!   The same clock runs while a keep-alive connection waits for its next request, so it is
//!   also the idle timeout. A client that sends half a header and then nothing (slowloris)
//!   holds its socket for that long, not forever.
//! - **Body read timeout**: a request body must arrive whole within
//!   [`Limits::body_read_timeout`] of its first poll; a handler reading it then gets an error.
//! - **Connection cap**: beyond [`Limits::max_connections`] open connections, a new one is
//!   answered `503` with `Retry-After` and closed (load shedding, before any parsing).
//! - **HTTP/2**: at most [`Limits::max_concurrent_streams`] streams per connection, keep-alive
//!   pings to find dead peers.
//! - **Graceful drain**: when the shutdown future resolves the listener stops accepting, idle
//!   connections close, and [`serve`] returns once every open request has finished (bound it
//!   with a timeout: a stream runs as long as its generation).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// The limits [`serve`] enforces. [`Limits::default`] suits a public endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// First byte, each request's headers, and the wait for the next request on a keep-alive
    /// connection, each within this.
    pub header_read_timeout: Duration,
    /// A request body, whole, within this of the first read of it.
    pub body_read_timeout: Duration,
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 8192,
            max_concurrent_streams: 256,
        }
    }
}

/// The answer to a connection over [`Limits::max_connections`].
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 99\r\n\r\n\
{\"error\":{\"message\":\"too many open connections\",\"type\":\"overloaded\",\"code\":\"too_many_connections\"}}";

/// The HTTP/2 connection preface: a connection whose first bytes are a prefix of it may be
/// HTTP/2, which the version detection waits to tell apart.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections open now, shared by the accept loop and each connection's guard.
#[derive(Clone, Default)]
struct OpenCount(Arc<AtomicUsize>);

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenCount {
    /// A guard counting one more connection, unless `max` are open.
    fn try_open(&self, max: usize) -> Option<OpenGuard> {
        let mut n = self.0.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self
                .0
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(OpenGuard(Arc::clone(&self.0))),
                Err(now) => n = now,
            }
        }
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` resolves, then drains (see the
/// crate docs). Returns when every connection has closed; errors only if accepting fails for
/// a reason other than a transient one (out of file descriptors, an aborted handshake).
pub async fn serve<F>(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    let open = OpenCount::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    // Out of descriptors: give open connections a moment to close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(guard) = open.try_open(limits.max_connections) else {
            tokio::spawn(shed(stream));
            continue;
        };
        let app = app.clone();
        let body_timeout = limits.body_read_timeout;
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let req = req.map(|b| axum::body::Body::new(TimedBody::new(b, body_timeout)));
            app.clone().oneshot(req)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _guard = guard;
            // The version detection before hyper's own header timer has no clock: the
            // first bytes must come within the header timeout.
            match tokio::time::timeout(header_timeout, first_bytes(&stream)).await {
                Ok(Ok(true)) => {}
                _ => return,
            }
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors after which the accept loop goes on.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

/// Waits until the connection has sent enough to tell its HTTP version: any byte that breaks
/// the HTTP/2 preface, or the whole preface. `false` when it closed first.
async fn first_bytes(stream: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 24];
    loop {
        stream.readable().await?;
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            return Ok(true);
        }
        // A partial preface: peek sees the same bytes until more come.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Answers a connection over the cap and closes it. What the client sent is read and dropped
/// (for at most a second, 64 KiB) before the close, so the close does not reset the
/// connection and lose the answer on the client's side.
async fn shed(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(SHED_RESPONSE).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut read = 0usize;
        while read < 64 << 10 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The error a request body that took longer than [`Limits::body_read_timeout`] ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within the body read timeout")
    }
}

impl std::error::Error for BodyTimeout {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that fails with [`BodyTimeout`] once `limit` has passed since it was first
/// found not ready. A body that is already whole never starts a timer.
pub struct TimedBody<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            expired: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            this.expired = true;
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
