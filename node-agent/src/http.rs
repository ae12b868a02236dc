//! The OpenAI-compatible HTTP API (axum on hyper): completions and chat completions (plain and
//! server-sent events), models, the model's tokenizer for gateways, health, readiness, metrics.
//!
//! Every failure is answered with an OpenAI-style error body and the right status; nothing
//! reachable from a request panics. A streaming client that goes away drops its response body,
//! which aborts its request in the engine (its KV blocks are freed). Engine events arrive on the
//! engine's thread and cross into tokio through an unbounded channel per request (bounded in
//! practice by `max_tokens`), so the engine never waits on a client.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvroute_contract::dispatch::{parse_dispatch, DISPATCH_HEADER};
use kvroute_engine::api::{
    EngineEvent, FinishReason, GenerateRequest, Prompt, RequestId, SamplingParams, TokenEvent,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::backend::{Dispatch, InferenceBackend, SubmitError};
use crate::capacity::CapacityHub;
use crate::metrics::{Metrics, Outcome};
use crate::openai::{parse_request, usage_json, ApiError, Endpoint, Input, Request};
use crate::state::{AgentState, InflightGuard, Loaded};

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The router with every endpoint.
pub fn router(state: Arc<AgentState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/kvroute/model", get(model_info))
        .route("/v1/kvroute/hold", post(hold_prefix))
        .route("/v1/kvroute/hold/{id}", axum::routing::delete(release_hold))
        // Everything above needs the shared token when the agent has one; probes and metrics
        // below do not.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refuse_oversized,
        ))
        .with_state(state)
}

/// Most bytes of a body declared longer than the limit that the agent reads and drops before it
/// answers 413.
pub const DRAIN_MAX_BYTES: u64 = 64 << 20;

/// Answers 413 to a request whose declared body is longer than the limit, after reading and
/// dropping that body (up to [`DRAIN_MAX_BYTES`], within the server's body timeout). A server
/// that answers and closes while the client is still uploading resets the connection, and the
/// client never reads the answer: a gateway whose own limit is higher saw a failed upstream and
/// answered 502. Nothing is kept: the body is dropped frame by frame.
async fn refuse_oversized(
    State(state): State<Arc<AgentState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = state.max_body_bytes as u64;
    match declared {
        Some(n) if n > limit => {
            if n <= DRAIN_MAX_BYTES {
                use http_body_util::BodyExt as _;
                let mut body = req.into_body();
                let mut read = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if read > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            }
            fail(&state, ApiError::too_large(state.max_body_bytes))
        }
        _ => next.run(req).await,
    }
}

/// Lets a request through only with the agent's shared token, when it has one.
async fn require_token(
    State(state): State<Arc<AgentState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if state.authorized(header) {
        return next.run(req).await;
    }
    fail(
        &state,
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "This agent needs its shared token: `Authorization: Bearer <token>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        },
    )
}

fn fail(state: &AgentState, e: ApiError) -> Response {
    if let Some(l) = state.loaded() {
        l.metrics.error(e.status.as_u16());
    }
    tracing::debug!(status = e.status.as_u16(), message = %e.message, "request rejected");
    let (no_room, draining) = (e.code == Some("no_room"), e.code == Some("draining"));
    let mut r = e.into_response();
    if no_room {
        r.headers_mut()
            .insert(NO_ROOM_HEADER, axum::http::HeaderValue::from_static("1"));
    }
    if draining {
        r.headers_mut().insert(
            kvroute_contract::dispatch::DRAINING_HEADER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    r
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "No such endpoint.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "Method not allowed on this endpoint.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .into_response()
}

async fn health(State(state): State<Arc<AgentState>>) -> Response {
    match state.lifecycle.failure() {
        Some(reason) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "failed", "reason": reason})),
        )
            .into_response(),
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

async fn ready(State(state): State<Arc<AgentState>>) -> Response {
    if state.lifecycle.is_draining() {
        ApiError::unavailable("The agent is draining.", "draining").into_response()
    } else if state.loaded().is_none() {
        ApiError::unavailable("The model is loading.", "loading").into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    let Some(l) = state.loaded() else {
        return ApiError::unavailable("The model is loading.", "loading").into_response();
    };
    let text = l
        .metrics
        .render(&l.hub.stats(), state.gpu.sample(), state.is_ready());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn loaded(state: &AgentState) -> Result<&Loaded, ApiError> {
    state
        .loaded()
        .ok_or_else(|| ApiError::unavailable("The model is loading.", "loading"))
}

async fn models(State(state): State<Arc<AgentState>>) -> Response {
    match loaded(&state) {
        Err(e) => e.into_response(),
        Ok(l) => {
            let info = l.backend.info();
            Json(json!({
                "object": "list",
                "data": [{
                    "id": info.name,
                    "object": "model",
                    "created": unix_now(),
                    "owned_by": "kvroute",
                    "max_model_len": info.max_model_len,
                }],
            }))
            .into_response()
        }
    }
}

/// The model's tokenizer and chat template, for gateways that tokenize prompts themselves.
async fn model_info(State(state): State<Arc<AgentState>>) -> Response {
    match loaded(&state) {
        Err(e) => e.into_response(),
        Ok(l) => {
            let i = l.backend.info();
            Json(json!({
                "model": i.name,
                "block_size": i.block_size,
                "max_model_len": i.max_model_len,
                "block_bytes": i.block_bytes,
                "tokenizer_json": i.tokenizer_json,
                "chat_template": i.chat_template,
                "bos_token": i.bos_token,
                "eos_token": i.eos_token,
                "add_bos": i.add_bos,
            }))
            .into_response()
        }
    }
}

async fn completions(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = match routed(&headers) {
        Ok(how) => generate(state.clone(), Endpoint::Completions, body, how).await,
        Err(e) => Err(e),
    };
    r.unwrap_or_else(|e| fail(&state, e))
}

async fn chat_completions(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = match routed(&headers) {
        Ok(how) => generate(state.clone(), Endpoint::Chat, body, how).await,
        Err(e) => Err(e),
    };
    r.unwrap_or_else(|e| fail(&state, e))
}

/// The request header naming a prefix hold ([`hold_prefix`]) kept for this request.
pub const HOLD_HEADER: &str = "x-kvroute-hold";

/// The hold a request names, if any.
fn hold_header(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(HOLD_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                format!("The {HOLD_HEADER} header must be a hold id (an unsigned integer)."),
                None,
            )
        })
}

/// What a router's headers ask of a request.
struct Routed {
    hold: Option<u64>,
    dispatch: Option<Dispatch>,
    /// `x-kvroute-require-room: 1`: refuse with 503 `no_room` rather than queue when it does not
    /// fit (see `GenerateRequest::only_with_room`).
    require_room: bool,
}

/// The request header asking the agent to refuse a request it has no room for.
pub const REQUIRE_ROOM_HEADER: &str = "x-kvroute-require-room";

/// The response header on a 503 for a request refused for lack of room.
pub const NO_ROOM_HEADER: &str = "x-kvroute-no-room";

fn routed(headers: &HeaderMap) -> Result<Routed, ApiError> {
    let require_room = match headers.get(REQUIRE_ROOM_HEADER).map(|v| v.to_str()) {
        None => false,
        Some(Ok("1" | "true")) => true,
        Some(Ok("0" | "false")) => false,
        Some(_) => {
            return Err(ApiError::bad_request(
                format!("The {REQUIRE_ROOM_HEADER} header is 1 or 0."),
                None,
            ))
        }
    };
    Ok(Routed {
        hold: hold_header(headers)?,
        dispatch: dispatch_header(headers)?,
        require_room,
    })
}

/// The router's dispatch a request is (`x-kvroute-dispatch: <dispatcher id>:<seq>`), if any.
fn dispatch_header(headers: &HeaderMap) -> Result<Option<Dispatch>, ApiError> {
    let Some(v) = headers.get(DISPATCH_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| {
        ApiError::bad_request(format!("The {DISPATCH_HEADER} header must be text."), None)
    })?;
    let (source, seq) =
        parse_dispatch(text).map_err(|e| ApiError::bad_request(format!("{e}."), None))?;
    Ok(Some(Dispatch {
        source: Arc::from(source),
        seq,
    }))
}

/// A router's dispatch, acknowledged exactly once on its capacity stream: by the engine when it
/// takes the request in (its counters then include it), or on drop, when the agent refused the
/// request before the engine saw it (it takes no room).
struct DispatchAck {
    hub: Arc<CapacityHub>,
    dispatch: Option<Dispatch>,
}

impl Drop for DispatchAck {
    fn drop(&mut self) {
        if let Some(d) = self.dispatch.take() {
            self.hub.ack(d);
        }
    }
}

/// Longest a prefix hold may last.
pub const MAX_HOLD_TTL_MS: u64 = 60_000;

/// `POST /v1/kvroute/hold {"block_hashes": [u64...], "ttl_ms": N, "max_free_blocks": M}`: keeps
/// the leading cached blocks of those chained block hashes from eviction for up to `ttl_ms` (at
/// most 60 s), taking at most M free (evictable) blocks (optional) and only room no live request
/// is promised. A gateway holds the prefix of a request that waits
/// for room here; the request names the hold in `x-kvroute-hold`, which lets it go once the
/// request is admitted. Answers `{"hold_id": N, "blocks": held}` (`blocks` 0: nothing was
/// cached, or no room is free; no hold is kept).
async fn hold_prefix(
    State(state): State<Arc<AgentState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match hold(&state, body).await {
        Ok(r) => r,
        Err(e) => fail(&state, e),
    }
}

async fn hold(
    state: &AgentState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let l = loaded(state)?;
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.max_body_bytes)
        } else {
            ApiError::bad_request(
                format!("Could not read the request body: {}", rej.body_text()),
                None,
            )
        }
    })?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HoldBody {
        block_hashes: Vec<u64>,
        ttl_ms: u64,
        /// Most free (evictable) blocks to take: the room the caller's own reservations leave.
        #[serde(default)]
        max_free_blocks: Option<u64>,
    }
    let b: HoldBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid hold request: {e}"), None))?;
    if b.ttl_ms == 0 || b.ttl_ms > MAX_HOLD_TTL_MS {
        return Err(ApiError::bad_request(
            format!(
                "ttl_ms must be between 1 and {MAX_HOLD_TTL_MS}; got {}",
                b.ttl_ms
            ),
            Some("ttl_ms"),
        ));
    }
    let total = l.hub.stats().total_blocks;
    if b.block_hashes.is_empty() || b.block_hashes.len() as u64 > total {
        return Err(ApiError::bad_request(
            format!(
                "block_hashes must name 1 to {total} blocks (the pool's size); got {}",
                b.block_hashes.len()
            ),
            Some("block_hashes"),
        ));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    l.backend
        .hold_prefix(
            b.block_hashes,
            b.max_free_blocks
                .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            std::time::Duration::from_millis(b.ttl_ms),
            Box::new(move |id, blocks| {
                let _ = tx.send((id, blocks));
            }),
        )
        .map_err(|e| match e {
            SubmitError::Unsupported(m) => ApiError {
                status: StatusCode::NOT_IMPLEMENTED,
                message: m.into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_implemented"),
            },
            _ => ApiError::unavailable("The engine has stopped.", "stopped"),
        })?;
    let (id, blocks) = rx
        .await
        .map_err(|_| ApiError::unavailable("The engine has stopped.", "stopped"))?;
    Ok(Json(json!({"hold_id": id, "blocks": blocks})).into_response())
}

/// `DELETE /v1/kvroute/hold/{id}`: lets a hold go (204 also when it already ended).
async fn release_hold(
    State(state): State<Arc<AgentState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return fail(
            &state,
            ApiError::bad_request("A hold id is an unsigned integer.", None),
        );
    };
    match loaded(&state) {
        Ok(l) => {
            l.backend.release_hold(id);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => fail(&state, e),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn next_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(crate::capacity::new_epoch);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", base & 0xffff_ffff)
}

/// Aborts the engine request when dropped before it finished (client went away).
struct AbortOnDrop {
    backend: Arc<dyn InferenceBackend>,
    id: RequestId,
    finished: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            tracing::debug!(request = self.id, "client went away; aborting");
            self.backend.abort(self.id);
        }
    }
}

/// A submitted request: its events and the guards that abort it and count it in flight.
struct Running {
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    abort: AbortOnDrop,
    _inflight: InflightGuard,
}

async fn generate(
    state: Arc<AgentState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
    how: Routed,
) -> Result<Response, ApiError> {
    let Routed {
        hold,
        dispatch,
        require_room,
    } = how;
    let l = loaded(&state)?;
    // From here on every way out acknowledges the dispatch.
    let mut ack = DispatchAck {
        hub: l.hub.clone(),
        dispatch,
    };
    if state.lifecycle.is_draining() {
        return Err(ApiError::unavailable(
            "The agent is draining and takes no new requests.",
            "draining",
        ));
    }
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.max_body_bytes)
        } else {
            ApiError::bad_request(
                format!("Could not read the request body: {}", rej.body_text()),
                None,
            )
        }
    })?;
    let req = if body.len() <= kvroute_openai::PARSE_INLINE_MAX_BYTES {
        parse_request(&body, endpoint)?
    } else {
        let body = body.clone();
        tokio::task::spawn_blocking(move || parse_request(&body, endpoint))
            .await
            .map_err(|e| ApiError::internal(format!("request parsing failed: {e}")))??
    };
    let info = l.backend.info().clone();
    if req.model != info.name {
        return Err(ApiError::model_not_found(&req.model));
    }
    let inflight = InflightGuard::new(state.clone());
    let arrived = Instant::now();

    // Tokenizing a multi-megabyte prompt is real CPU work: keep it off the async workers.
    let backend = l.backend.clone();
    let input = req.input.clone();
    let prompt = tokio::task::spawn_blocking(move || prompt_tokens(backend.as_ref(), input))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??;

    let prompt_param = match endpoint {
        Endpoint::Completions => "prompt",
        Endpoint::Chat => "messages",
    };
    let prompt_len = prompt.len() as u32;
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "The prompt is empty after tokenizing.",
            Some(prompt_param),
        ));
    }
    if prompt_len >= info.max_model_len {
        return Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {} tokens. However, your prompt has {} tokens, leaving no room for output.",
                info.max_model_len, prompt_len
            ),
            Some(prompt_param),
        )
        .with_code("context_length_exceeded"));
    }
    let room = info.max_model_len - prompt_len;
    let max_tokens = match req.max_tokens {
        Some(m) if m > room => {
            let param = match endpoint {
                Endpoint::Completions => "max_tokens",
                Endpoint::Chat => "max_completion_tokens",
            };
            return Err(ApiError::bad_request(
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} for the completion).",
                    info.max_model_len,
                    u64::from(prompt_len) + u64::from(m),
                    prompt_len,
                    m
                ),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m,
        None => match endpoint {
            Endpoint::Completions => COMPLETIONS_DEFAULT_MAX_TOKENS.min(room),
            Endpoint::Chat => room,
        },
    };

    let gen = GenerateRequest {
        prompt: Prompt::Tokens(prompt),
        params: SamplingParams {
            max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: req.stop.clone(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
        },
        cache_key: req.cache_salt.clone(),
        hold,
        dispatch: ack.dispatch.clone().filter(|_| l.backend.acks_dispatches()),
        only_with_room: require_room,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = metered_sink(l.metrics.clone(), arrived, tx);
    let id = l.backend.submit(gen, sink).map_err(|e| match e {
        SubmitError::InvalidRequest(m) => ApiError::bad_request(m, Some(prompt_param)),
        SubmitError::Overloaded => {
            ApiError::unavailable("The engine's queue is full; retry later.", "overloaded")
        }
        SubmitError::Stopped => ApiError::unavailable("The engine has stopped.", "stopped"),
        SubmitError::Unsupported(m) => ApiError::internal(m),
    })?;
    if l.backend.acks_dispatches() {
        // The engine acknowledges it.
        ack.dispatch = None;
    }
    drop(ack);
    if require_room && l.backend.acks_dispatches() {
        // The engine's verdict comes before any byte of the answer: a refusal is a clean 503
        // the router can send elsewhere. (`Started` is all the answer paths skip.)
        match rx.recv().await {
            Some(EngineEvent::Started { .. }) => {}
            Some(EngineEvent::NoRoom { need, room }) => {
                l.metrics.count_no_room();
                return Err(ApiError::unavailable(
                    format!("No KV room for this request here now: it needs {need} blocks, {room} are free and unpromised; retry on another replica or later."),
                    "no_room",
                ));
            }
            Some(EngineEvent::Error(m)) => {
                return Err(ApiError::internal(format!("generation failed: {m}")))
            }
            _ => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
    tracing::debug!(
        request = id,
        prompt_tokens = prompt_len,
        max_tokens,
        stream = req.stream,
        "submitted"
    );
    let running = Running {
        rx,
        abort: AbortOnDrop {
            backend: l.backend.clone(),
            id,
            finished: false,
        },
        _inflight: inflight,
    };
    let meta = Meta {
        id: next_id(match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }),
        created: unix_now(),
        model: info.name.clone(),
        endpoint,
        logprobs: req.logprobs.is_some(),
        echo: if req.echo {
            Some(echo_text(l.backend.as_ref(), &req.input)?)
        } else {
            None
        },
    };
    if req.stream {
        Ok(stream_response(running, meta, req))
    } else {
        collect_response(running, meta).await
    }
}

fn prompt_tokens(backend: &dyn InferenceBackend, input: Input) -> Result<Vec<u32>, ApiError> {
    match input {
        Input::Tokens(t) => Ok(t),
        Input::Text(t) => backend
            .tokenize(&t, true)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt"))),
        Input::Chat {
            messages,
            add_generation_prompt,
        } => {
            let text = backend
                .render_chat(&messages, add_generation_prompt)
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
            backend
                .tokenize_chat(&text)
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))
        }
    }
}

/// The sink handed to the engine: records latency metrics on the engine thread (where token
/// times are exact) and forwards events into tokio. Returns false once the client is gone.
fn metered_sink(
    metrics: Arc<Metrics>,
    arrived: Instant,
    tx: mpsc::UnboundedSender<EngineEvent>,
) -> kvroute_engine::api::EventSink {
    let mut last: Option<Instant> = None;
    Box::new(move |ev: EngineEvent| {
        match &ev {
            EngineEvent::Token(_) => {
                let now = Instant::now();
                match last {
                    None => metrics.ttft.observe_duration(now - arrived),
                    Some(prev) => metrics.tpot.observe_duration(now - prev),
                }
                last = Some(now);
                metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
            }
            EngineEvent::Finished { reason, usage } => {
                metrics.e2e.observe_duration(arrived.elapsed());
                metrics
                    .prompt_tokens
                    .fetch_add(u64::from(usage.prompt_tokens), Ordering::Relaxed);
                metrics.finished(match reason {
                    FinishReason::Stop => Outcome::Stop,
                    FinishReason::Length => Outcome::Length,
                    FinishReason::Abort => Outcome::Abort,
                });
            }
            EngineEvent::Error(_) => metrics.finished(Outcome::Error),
            EngineEvent::NoRoom { .. } => {}
            EngineEvent::Started { .. } => {}
        }
        tx.send(ev).is_ok()
    })
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    /// The request asked for log-probabilities.
    logprobs: bool,
    /// `echo`: the prompt's text, which the output starts with.
    echo: Option<String>,
}

/// The text of a completions prompt, for `echo`.
fn echo_text(backend: &dyn InferenceBackend, input: &Input) -> Result<String, ApiError> {
    match input {
        Input::Text(t) => Ok(t.clone()),
        Input::Tokens(ids) => backend
            .detokenize(ids)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt"))),
        Input::Chat { .. } => Err(ApiError::bad_request(
            "`echo` is a completions parameter",
            Some("echo"),
        )),
    }
}

/// Log-probabilities of generated tokens, gathered for an OpenAI answer (a whole response, or
/// the tokens of one stream chunk).
#[derive(Default)]
struct Logprobs {
    entries: Vec<LogprobEntry>,
}

/// One generated token's log-probability.
struct LogprobEntry {
    text: String,
    logprob: f32,
    /// The most likely alternatives: (text, log-probability).
    top: Vec<(String, f32)>,
    /// Its byte offset in the output text.
    offset: usize,
}

impl Logprobs {
    fn push(&mut self, backend: &dyn InferenceBackend, t: &TokenEvent, offset: usize) {
        let Some(logprob) = t.logprob else {
            return;
        };
        self.entries.push(LogprobEntry {
            text: backend.detokenize(&[t.token]).unwrap_or_default(),
            logprob,
            top: t
                .top_logprobs
                .iter()
                .map(|a| (a.text.clone(), a.logprob))
                .collect(),
            offset,
        });
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `logprobs` object of a completions choice.
    fn completions_json(&self) -> Value {
        let e = &self.entries;
        let top: Vec<Value> = e
            .iter()
            .map(|e| Value::Object(e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect()))
            .collect();
        json!({
            "tokens": e.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
            "token_logprobs": e.iter().map(|e| e.logprob).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": e.iter().map(|e| e.offset).collect::<Vec<_>>(),
        })
    }

    /// The `logprobs` object of a chat choice.
    fn chat_json(&self) -> Value {
        let one = |t: &str, l: f32| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
        let content: Vec<Value> = self
            .entries
            .iter()
            .map(|e| {
                let mut v = one(&e.text, e.logprob);
                v["top_logprobs"] = e.top.iter().map(|(t, l)| one(t, *l)).collect();
                v
            })
            .collect();
        json!({ "content": content })
    }

    fn json(&self, endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Completions => self.completions_json(),
            Endpoint::Chat => self.chat_json(),
        }
    }
}

async fn collect_response(mut run: Running, meta: Meta) -> Result<Response, ApiError> {
    let mut text = meta.echo.clone().unwrap_or_default();
    let mut logprobs = Logprobs::default();
    loop {
        match run.rx.recv().await {
            Some(EngineEvent::Started { .. }) => {}
            Some(EngineEvent::Token(t)) => {
                if meta.logprobs {
                    logprobs.push(run.abort.backend.as_ref(), &t, text.len());
                }
                text.push_str(&t.text);
            }
            Some(EngineEvent::Finished { reason, usage }) => {
                run.abort.finished = true;
                let usage = usage_json(
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cached_tokens,
                );
                let lp = if meta.logprobs {
                    logprobs.json(meta.endpoint)
                } else {
                    Value::Null
                };
                let body = match meta.endpoint {
                    Endpoint::Completions => json!({
                        "id": meta.id, "object": "text_completion", "created": meta.created,
                        "model": meta.model,
                        "choices": [{"index": 0, "text": text, "logprobs": lp,
                                     "finish_reason": reason.as_openai()}],
                        "usage": usage,
                    }),
                    Endpoint::Chat => json!({
                        "id": meta.id, "object": "chat.completion", "created": meta.created,
                        "model": meta.model,
                        "choices": [{"index": 0,
                                     "message": {"role": "assistant", "content": text},
                                     "logprobs": lp, "finish_reason": reason.as_openai()}],
                        "usage": usage,
                    }),
                };
                return Ok(Json(body).into_response());
            }
            Some(EngineEvent::Error(m)) => {
                run.abort.finished = true;
                return Err(ApiError::internal(format!("generation failed: {m}")));
            }
            Some(EngineEvent::NoRoom { need, room }) => {
                run.abort.finished = true;
                return Err(ApiError::internal(format!(
                    "no room: needs {need} KV blocks, {room} free"
                )));
            }
            None => {
                run.abort.finished = true;
                return Err(ApiError::internal("the engine dropped the request"));
            }
        }
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// State of one SSE response.
struct SseState {
    run: Running,
    meta: Meta,
    include_usage: bool,
    sent_role: bool,
    done: bool,
    /// Log-probabilities of tokens not yet sent (their text was held back).
    pending: Logprobs,
    /// Bytes of text sent so far (the next token's offset).
    sent_bytes: usize,
}

impl SseState {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.meta.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        let mut v = json!({
            "id": self.meta.id, "object": object, "created": self.meta.created,
            "model": self.meta.model, "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// A choice with `text`, carrying the log-probabilities gathered since the last one.
    fn text_choice(&mut self, text: &str, finish: Option<&str>) -> Value {
        let lp = if self.meta.logprobs && !self.pending.is_empty() {
            std::mem::take(&mut self.pending).json(self.meta.endpoint)
        } else {
            Value::Null
        };
        self.sent_bytes += text.len();
        match self.meta.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
            }
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        }
    }

    /// The next bytes of the response, or `None` at the end.
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if self.meta.endpoint == Endpoint::Chat && !self.sent_role {
            self.sent_role = true;
            let c = self.chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": null, "finish_reason": null}),
            );
            return Some(sse(&c));
        }
        if let Some(echo) = self.meta.echo.take() {
            // `echo`: the prompt comes first, as its own chunk.
            let choice = self.text_choice(&echo, None);
            return Some(sse(&self.chunk(choice)));
        }
        loop {
            match self.run.rx.recv().await {
                Some(EngineEvent::Started { .. }) => {}
                Some(EngineEvent::Token(t)) => {
                    if self.meta.logprobs {
                        let offset = self.sent_bytes;
                        self.pending
                            .push(self.run.abort.backend.as_ref(), &t, offset);
                    }
                    if t.text.is_empty() {
                        continue;
                    }
                    let choice = self.text_choice(&t.text, None);
                    let c = self.chunk(choice);
                    return Some(sse(&c));
                }
                Some(EngineEvent::Finished { reason, usage }) => {
                    self.run.abort.finished = true;
                    self.done = true;
                    let choice = self.text_choice("", Some(reason.as_openai()));
                    let mut out = sse(&self.chunk(choice)).to_vec();
                    if self.include_usage {
                        let u = json!({
                            "id": self.meta.id,
                            "object": match self.meta.endpoint {
                                Endpoint::Completions => "text_completion",
                                Endpoint::Chat => "chat.completion.chunk",
                            },
                            "created": self.meta.created, "model": self.meta.model,
                            "choices": [],
                            "usage": usage_json(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
                        });
                        out.extend_from_slice(&sse(&u));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return Some(Bytes::from(out));
                }
                Some(ev @ (EngineEvent::Error(_) | EngineEvent::NoRoom { .. })) => {
                    self.run.abort.finished = true;
                    self.done = true;
                    let m = match ev {
                        EngineEvent::NoRoom { need, room } => {
                            format!("no room: needs {need} KV blocks, {room} free")
                        }
                        EngineEvent::Error(m) => m,
                        _ => String::new(),
                    };
                    let e = ApiError::internal(format!("generation failed: {m}"));
                    let mut out = sse(&e.body()).to_vec();
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return Some(Bytes::from(out));
                }
                None => {
                    self.run.abort.finished = true;
                    self.done = true;
                    let e = ApiError::internal("the engine dropped the request");
                    let mut out = sse(&e.body()).to_vec();
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return Some(Bytes::from(out));
                }
            }
        }
    }
}

fn stream_response(run: Running, meta: Meta, req: Request) -> Response {
    let st = SseState {
        run,
        meta,
        include_usage: req.include_usage,
        sent_role: false,
        done: false,
        pending: Logprobs::default(),
        sent_bytes: 0,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        st.next().await.map(|b| (Ok::<Bytes, Infallible>(b), st))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
