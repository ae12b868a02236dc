//! Shared helpers: an agent on 127.0.0.1 with the fake backend (real HTTP and gRPC servers),
//! and a small HTTP/1.1 client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kvroute_agent::backend::fake::{FakeBackend, FakeConfig};
use kvroute_agent::backend::InferenceBackend;
use kvroute_agent::gpu::GpuMonitor;
use kvroute_agent::server::{serve, ServeError, ServeEvent, ServeOptions};
use kvroute_agent::state::AgentState;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Guards against a hang: a broken agent fails the test instead of blocking it forever.
pub const GUARD: Duration = Duration::from_secs(60);

pub struct TestAgent {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub backend: Arc<FakeBackend>,
    pub state: Arc<AgentState>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), ServeError>>>,
}

pub async fn start(cfg: FakeConfig) -> TestAgent {
    start_with(cfg, 4 << 20, Duration::from_secs(30)).await
}

pub async fn start_with(cfg: FakeConfig, max_body: usize, drain: Duration) -> TestAgent {
    start_full(cfg, max_body, drain, 256).await
}

/// An agent that streams capacity to at most `max_subscribers` at once.
#[allow(dead_code)]
pub async fn start_limited(cfg: FakeConfig, max_subscribers: usize) -> TestAgent {
    start_full(cfg, 4 << 20, Duration::from_secs(30), max_subscribers).await
}

async fn start_full(
    cfg: FakeConfig,
    max_body: usize,
    drain: Duration,
    max_subscribers: usize,
) -> TestAgent {
    let backend = FakeBackend::start(cfg);
    let state = AgentState::new("test-agent".into(), max_body, GpuMonitor::absent());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addr_tx, addr_rx) = oneshot::channel();
    let b: Arc<dyn InferenceBackend> = backend.clone();
    let opts = ServeOptions {
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: "127.0.0.1:0".parse().unwrap(),
        drain_timeout: drain,
        http_limits: kvroute_serve::Limits::default(),
        max_capacity_subscribers: max_subscribers,
    };
    let st = state.clone();
    let task = tokio::spawn(async move {
        serve(
            st,
            opts,
            move || Ok(b),
            async move {
                let _ = stop_rx.await;
            },
            {
                let mut addr_tx = Some(addr_tx);
                move |ev| {
                    if let (ServeEvent::Bound(a), Some(tx)) = (ev, addr_tx.take()) {
                        let _ = tx.send(a);
                    }
                }
            },
        )
        .await
    });
    let addrs = addr_rx.await.unwrap();
    while !state.is_ready() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    TestAgent {
        http: addrs.http,
        grpc: addrs.grpc,
        backend,
        state,
        stop: Some(stop_tx),
        task: Some(task),
    }
}

impl TestAgent {
    /// Sends the shutdown signal (like SIGTERM).
    pub fn signal_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.signal_shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(GUARD, task).await.unwrap().unwrap()
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// Opens one HTTP/1.1 connection and sends one request; the response body is not read yet.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Response<Incoming> {
    send_with(addr, method, path, &[], body).await
}

/// [`send`] with extra request headers.
pub async fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// One request, whole body read.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Vec<u8>) {
    let resp = tokio::time::timeout(GUARD, send(addr, method, path, body))
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (StatusCode, Value) {
    let (s, b) = call(addr, "POST", path, Some(serde_json::to_vec(body).unwrap())).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

/// Reads server-sent events from a response until `[DONE]` or the end of the body; returns the
/// parsed `data:` payloads (the `[DONE]` marker as the string "[DONE]").
pub async fn read_sse(resp: Response<Incoming>) -> Vec<Value> {
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            buf.push_str(std::str::from_utf8(d).unwrap());
        }
        while let Some(i) = buf.find("\n\n") {
            let ev: String = buf.drain(..i + 2).collect();
            let data = ev.trim().strip_prefix("data: ").unwrap().to_string();
            if data == "[DONE]" {
                out.push(Value::String(data));
            } else {
                out.push(serde_json::from_str(&data).unwrap());
            }
        }
    }
    assert!(buf.trim().is_empty(), "trailing bytes: {buf:?}");
    out
}

/// The fake model's greedy output for a prompt of `prompt_len` tokens.
pub fn fake_text(prompt_len: usize, n: usize) -> String {
    (0..n)
        .map(|i| {
            char::from_u32(kvroute_agent::backend::fake::fake_next_token(prompt_len, i)).unwrap()
        })
        .collect()
}
