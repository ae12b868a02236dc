//! A scripted stand-in for `kvroute-agent`: a real tonic `Agent` capacity server and a real axum
//! OpenAI-ish HTTP server on loopback, over a simulated KV pool.
//!
//! Each request takes `blocks(prompt + max_tokens)` blocks for its lifetime (sized exactly as the
//! gateway sizes it, without a tokenizer) and streams `max_tokens` chunks with a delay each; a
//! request that finds no room counts a preemption, so tests can check that the gateway never
//! over-admits. Tests script it: pause reports, take the capacity service down, cut streams after
//! N chunks, change the epoch. Shared by the gateway tests and the `stub_agent` example.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use kvroute_gateway::prompt::{self, Endpoint, ReserveOutput};
use kvroute_gateway::types::AgentEndpoint;
use kvroute_proto::v1::block_event::Kind;
use kvroute_proto::{
    Agent, AgentServer, BlockEvent, CapacityReport, GetCapacityRequest, WatchCapacityRequest,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// How the stub behaves.
#[derive(Debug, Clone)]
pub struct StubConfig {
    pub agent_id: String,
    pub model: String,
    pub block_size: u32,
    pub total_blocks: u64,
    pub max_model_len: u32,
    /// Delay before each streamed token.
    pub token_delay: Duration,
    /// Heartbeat period of capacity streams.
    pub heartbeat: Duration,
}

impl Default for StubConfig {
    fn default() -> Self {
        Self {
            agent_id: "stub".into(),
            model: "default".into(),
            block_size: 16,
            total_blocks: 1000,
            max_model_len: 8192,
            token_delay: Duration::from_millis(2),
            heartbeat: Duration::from_millis(200),
        }
    }
}

/// The stub's mutable state.
#[derive(Debug, Default)]
pub struct Inner {
    pub epoch: u64,
    pub free: u64,
    pub received: u64,
    pub running: u32,
    pub completed: u64,
    pub preemptions: u64,
    pub cached: Vec<u64>,
    /// Capacity streams send nothing (a stalled agent).
    pub reports_paused: bool,
    /// Capacity service refuses and ends streams (agent's gRPC down).
    pub grpc_down: bool,
    /// Streams are cut (connection dropped) after this many chunks.
    pub fail_after_chunks: Option<usize>,
    /// Requests answered.
    pub served: u64,
}

pub struct StubState {
    pub cfg: StubConfig,
    pub inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl StubState {
    pub fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let r = f(&mut self.inner.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
        r
    }

    fn report(&self, seq: u64, snapshot: bool) -> CapacityReport {
        let i = self.inner.lock().unwrap();
        CapacityReport {
            agent_id: self.cfg.agent_id.clone(),
            epoch: i.epoch,
            sequence: seq,
            model: self.cfg.model.clone(),
            block_size: self.cfg.block_size,
            total_blocks: self.cfg.total_blocks,
            free_blocks: i.free,
            cached_evictable_blocks: 0,
            running_requests: i.running,
            waiting_requests: 0,
            requests_received: i.received,
            preemptions: i.preemptions,
            max_model_len: self.cfg.max_model_len,
            snapshot,
            events: if snapshot {
                vec![BlockEvent {
                    kind: Kind::Stored as i32,
                    block_hashes: i.cached.clone(),
                    ..BlockEvent::default()
                }]
            } else {
                Vec::new()
            },
            ..CapacityReport::default()
        }
    }
}

/// A running stub agent.
pub struct StubAgent {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub state: Arc<StubState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StubAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StubAgent {
    pub async fn start(cfg: StubConfig) -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(cfg, http, grpc).await
    }

    pub async fn start_on(cfg: StubConfig, http: TcpListener, grpc: TcpListener) -> Self {
        let (changed, _) = watch::channel(0);
        let state = Arc::new(StubState {
            inner: Mutex::new(Inner {
                epoch: 1,
                free: cfg.total_blocks,
                ..Inner::default()
            }),
            cfg,
            changed,
        });
        let http_addr = http.local_addr().unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat))
            .route("/health", get(|| async { "ok" }))
            .route("/ready", get(|| async { "ready" }))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(&state));
        let t1 = tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        });
        let svc = AgentServer::new(Capacity(Arc::clone(&state)));
        let t2 = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
                .await;
        });
        StubAgent {
            http: http_addr,
            grpc: grpc_addr,
            state,
            tasks: vec![t1, t2],
        }
    }

    pub fn endpoint(&self) -> AgentEndpoint {
        AgentEndpoint {
            http: self.http.to_string(),
            grpc: format!("http://{}", self.grpc),
        }
    }
}

struct Capacity(Arc<StubState>);

type ReportStream = Pin<Box<dyn Stream<Item = Result<CapacityReport, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Capacity {
    type WatchCapacityStream = ReportStream;

    async fn watch_capacity(
        &self,
        _req: tonic::Request<WatchCapacityRequest>,
    ) -> Result<tonic::Response<ReportStream>, tonic::Status> {
        if self.0.inner.lock().unwrap().grpc_down {
            return Err(tonic::Status::unavailable("stub: capacity service down"));
        }
        let (tx, rx) = mpsc::channel(16);
        let state = Arc::clone(&self.0);
        let mut changed = state.changed.subscribe();
        tokio::spawn(async move {
            let mut seq = 1;
            let mut epoch = state.inner.lock().unwrap().epoch;
            if tx.send(Ok(state.report(seq, true))).await.is_err() {
                return;
            }
            loop {
                let _ = tokio::time::timeout(state.cfg.heartbeat, changed.changed()).await;
                let (paused, down, now_epoch) = {
                    let i = state.inner.lock().unwrap();
                    (i.reports_paused, i.grpc_down, i.epoch)
                };
                if down {
                    let _ = tx
                        .send(Err(tonic::Status::unavailable("stub: going down")))
                        .await;
                    return;
                }
                if paused {
                    continue;
                }
                seq += 1;
                let snapshot = now_epoch != epoch;
                epoch = now_epoch;
                if tx.send(Ok(state.report(seq, snapshot))).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_capacity(
        &self,
        _req: tonic::Request<GetCapacityRequest>,
    ) -> Result<tonic::Response<CapacityReport>, tonic::Status> {
        Ok(tonic::Response::new(self.0.report(0, false)))
    }
}

/// Returns a request's blocks to the pool when it ends (completed or aborted by the client).
struct Lease {
    state: Arc<StubState>,
    blocks: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let blocks = self.blocks;
        self.state.with(|i| {
            i.free += blocks;
            i.running -= 1;
            i.completed += 1;
        });
    }
}

fn openai_error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

async fn completions(State(s): State<Arc<StubState>>, body: Bytes) -> Response {
    serve(s, Endpoint::Completions, body).await
}

async fn chat(State(s): State<Arc<StubState>>, body: Bytes) -> Response {
    serve(s, Endpoint::ChatCompletions, body).await
}

async fn serve(s: Arc<StubState>, ep: Endpoint, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return openai_error(StatusCode::BAD_REQUEST, "invalid JSON");
    };
    let plan = match prompt::plan(ep, &v, None, ReserveOutput::Full) {
        Ok(p) => p,
        Err(e) => return openai_error(StatusCode::BAD_REQUEST, &e.message),
    };
    let bs = u64::from(s.cfg.block_size);
    let need = (plan.prompt_tokens + plan.output_tokens).div_ceil(bs);
    let allocated = s.with(|i| {
        i.received += 1;
        i.running += 1;
        if need > i.free {
            i.preemptions += 1;
            0
        } else {
            i.free -= need;
            need
        }
    });
    let lease = Lease {
        state: Arc::clone(&s),
        blocks: allocated,
    };
    let n = plan.output_tokens as usize;
    let stream = v.get("stream").and_then(|x| x.as_bool()).unwrap_or(false);
    let delay = s.cfg.token_delay;
    let fail_after = s.inner.lock().unwrap().fail_after_chunks;
    let chat = ep == Endpoint::ChatCompletions;
    if !stream {
        tokio::time::sleep(delay * n as u32).await;
        s.with(|i| i.served += 1);
        drop(lease);
        let text: String = (0..n).map(|i| format!("t{i} ")).collect();
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return axum::Json(serde_json::json!({
            "id": "cmpl-stub", "object": if chat {"chat.completion"} else {"text_completion"},
            "created": 0, "model": s.cfg.model, "choices": [choice],
            "usage": {"prompt_tokens": plan.prompt_tokens, "completion_tokens": n, "total_tokens": plan.prompt_tokens + n as u64}
        }))
        .into_response();
    }
    let model = s.cfg.model.clone();
    let body = async_stream(
        move |tx: mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
            let _lease = lease;
            for i in 0..n {
                tokio::time::sleep(delay).await;
                if fail_after == Some(i) {
                    let _ = tx
                        .send(Err(std::io::Error::other("stub: agent died")))
                        .await;
                    return;
                }
                let choice = if chat {
                    serde_json::json!({"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null})
                } else {
                    serde_json::json!({"index": 0, "text": format!("t{i} "), "finish_reason": null})
                };
                let chunk = serde_json::json!({"id": "cmpl-stub", "object": if chat {"chat.completion.chunk"} else {"text_completion"}, "created": 0, "model": model, "choices": [choice]});
                if tx
                    .send(Ok(Bytes::from(format!("data: {chunk}\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            s.with(|i| i.served += 1);
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap()
}

/// A body fed by a task; the task sees the channel close when the client goes away.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(f(tx));
    Body::from_stream(ReceiverStream::new(rx))
}

async fn metrics(State(s): State<Arc<StubState>>) -> String {
    let i = s.inner.lock().unwrap();
    format!(
        "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions {}\n",
        i.preemptions
    )
}
