//! Forwards a request to the chosen agent and streams the answer back without buffering.
//!
//! Owns the upstream HTTP client and the response body wrapper. A response body is passed frame
//! by frame; if the upstream fails after the first byte (or goes silent past the idle timeout), an
//! SSE response gets a final `data: {"error":...}` event and ends, so a client never hangs.
//! Dropping the response (the client left) drops the upstream body, which closes the upstream
//! connection and aborts the request on the agent. Routing decisions are not made here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;

use super::metrics::Metrics;

/// The upstream client (pooled HTTP/1 keep-alive connections to agents).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client for talking to agents.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Builds the upstream request for `path` on the agent at `endpoint` (`HOST:PORT`).
///
/// The client's `Authorization` (its API key for this gateway) is never passed on: the agent
/// gets the gateway's shared agent token instead, when there is one.
pub fn upstream_request(
    endpoint: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    agent_token: Option<&str>,
) -> Result<Request<Full<Bytes>>, axum::http::Error> {
    let mut b = Request::post(format!("http://{endpoint}{path}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = agent_token {
        b = b.header(header::AUTHORIZATION, kvroute_contract::token::bearer(t));
    }
    for name in [header::ACCEPT, header::USER_AGENT] {
        if let Some(v) = headers.get(&name) {
            b = b.header(name, v);
        }
    }
    if let Some(v) = headers.get("x-request-id") {
        b = b.header("x-request-id", v);
    }
    b.body(Full::new(body))
}

/// Adds the shared agent token to a request the gateway makes of an agent.
pub fn with_agent_token<B>(mut req: Request<B>, agent_token: Option<&str>) -> Request<B> {
    if let Some(v) = agent_token
        .and_then(|t| axum::http::HeaderValue::from_str(&kvroute_contract::token::bearer(t)).ok())
    {
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    req
}

/// Hop-by-hop headers never forwarded.
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// Turns the agent's response into the client's, streaming its body.
/// When a request was sent and the time to first token the policy predicted for it; at the
/// first data frame the observed time goes to the metrics and to `calibrate`.
pub struct TtftProbe {
    pub sent: std::time::Instant,
    pub predicted_s: f64,
    pub calibrate: Option<Box<dyn FnOnce(Duration) + Send + Sync>>,
}

pub fn relay(
    upstream: Response<Incoming>,
    agent_id: &str,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    ttft: Option<TtftProbe>,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
) -> axum::response::Response {
    let (parts, body) = upstream.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut resp = Response::new(axum::body::Body::new(RelayBody {
        inner: body,
        sse,
        ended: false,
        idle_timeout,
        idle: Box::pin(tokio::time::sleep(idle_timeout)),
        metrics,
        ttft,
        on_end,
    }));
    *resp.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !HOP.contains(&name.as_str()) {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(agent_id) {
        resp.headers_mut().insert("x-kvroute-agent", v);
    }
    resp
}

/// The streamed response body with mid-stream failure handling.
struct RelayBody {
    inner: Incoming,
    sse: bool,
    ended: bool,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    metrics: Arc<Metrics>,
    /// Taken at the first data frame.
    ttft: Option<TtftProbe>,
    /// Called once the agent's response has ended well (not on a failure mid-stream).
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The SSE event that ends a stream whose upstream failed.
pub fn sse_error_event(message: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "api_error",
            "param": null,
            "code": "upstream_failed"
        }
    });
    Bytes::from(format!("data: {body}\n\n"))
}

impl RelayBody {
    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = true;
        self.metrics.count_midstream_failure();
        tracing::warn!(error = %why, sse = self.sse, "upstream failed mid-response");
        if self.sse {
            Poll::Ready(Some(Ok(Frame::data(sse_error_event(&format!(
                "the agent serving this request failed mid-stream: {why}"
            ))))))
        } else {
            Poll::Ready(Some(Err(why.into())))
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    if let Some(p) = self.ttft.take() {
                        let observed = p.sent.elapsed();
                        self.metrics.observe_ttft(p.predicted_s, observed);
                        if let Some(calibrate) = p.calibrate {
                            calibrate(observed);
                        }
                    }
                }
                let deadline = tokio::time::Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(e.to_string()),
            Poll::Ready(None) => {
                self.ended = true;
                if let Some(f) = self.on_end.take() {
                    f();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready() {
                    let t = self.idle_timeout;
                    self.fail(format!("no data from the agent for {t:?}"))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// A plain status with an empty body (used for health endpoints).
pub fn status_only(status: StatusCode) -> axum::response::Response {
    let mut r = axum::response::Response::new(axum::body::Body::empty());
    *r.status_mut() = status;
    r
}
