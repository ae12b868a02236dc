//! The gateway's HTTP server: the OpenAI endpoints (admitted, routed and proxied), `/v1/models`,
//! `/health`, `/ready`, `/metrics` and the dashboard.
//!
//! Owns the request flow: parse → plan (tokens, block hashes) → admit (maybe wait) → forward
//! (retry on another agent if the connection fails before the first byte) → relay. It never
//! decides routing itself (that is `policy`, through `router`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router as HttpRouter;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::auth;
use super::capacity::WatchSettings;
use super::config::{AuthConfig, GatewayConfig};
use super::dashboard::{self, DashboardState};
use super::decisions;
use super::error::Error;
use super::metrics::{self, Metrics};
use super::prompt::{self, Endpoint, ModelCatalog, ModelInfo};
use super::proxy::{self, HttpClient};
use super::quota;
use super::router::{AdmitError, HoldAction, Router};
use super::source::{track_agents, AgentSet, AgentSource, KubernetesAgents, StaticAgents};
use kvroute_contract::dispatch::DISPATCH_HEADER;
use kvroute_routing::PolicyKind;

/// Shared state of a running gateway.
pub struct Gateway {
    pub config: GatewayConfig,
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    catalog: ModelCatalog,
    /// One model-info fetch at a time: a burst on a cold cache must not fetch and parse the
    /// tokenizer once per request.
    catalog_fetch: tokio::sync::Mutex<()>,
    client: HttpClient,
    auth: auth::Auth,
    quotas: Arc<quota::Quotas>,
    /// The dashboard's last 15 minutes.
    history: super::history::History,
    /// The dashboard's last routing decisions.
    decisions: super::decisions::Decisions,
    /// Set by [`RunningGateway::drain`]: `/ready` answers 503 so no new traffic is sent here.
    draining: std::sync::atomic::AtomicBool,
}

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("serve: {0}")]
    Serve(std::io::Error),
    #[error("--kubernetes: no Kubernetes client configuration: {0}")]
    Kubernetes(String),
    #[error("API keys: {0}")]
    Keys(String),
}

/// A gateway started in this process.
pub struct RunningGateway {
    pub addr: SocketAddr,
    /// Where `/metrics` and `/dashboard` are served when not on `addr`.
    pub admin_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every open request finished.
    Complete,
    /// The deadline passed; what was still open was cut.
    TimedOut,
}

impl RunningGateway {
    /// Stops serving (in-flight streams are dropped).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Stops accepting connections, answers `/ready` 503, lets open requests (queued ones and
    /// streams) finish for up to `deadline`, then stops.
    pub async fn drain(mut self, deadline: Duration) -> Result<Drained, ServeError> {
        self.gateway
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(deadline, &mut self.task).await {
            Ok(Ok(r)) => r.map(|()| Drained::Complete),
            Ok(Err(e)) => Err(ServeError::Serve(std::io::Error::other(e.to_string()))),
            Err(_) => {
                self.task.abort();
                Ok(Drained::TimedOut)
            }
        }
    }
}

impl Gateway {
    /// A gateway for `config`; fails when its API key file cannot be read.
    pub fn new(config: GatewayConfig) -> Result<Arc<Self>, ServeError> {
        let decision_log = config.decision_log;
        let auth = match &config.auth {
            AuthConfig::Off => {
                tracing::warn!("API keys are off (--auth off): anyone who reaches this gateway may use it and set its priority and tenant headers");
                auth::Auth::Off
            }
            AuthConfig::Keys(path) => {
                let store = auth::KeyStore::open(path.clone()).map_err(ServeError::Keys)?;
                tracing::info!(file = %path.display(), keys = store.ring().len(), "API keys loaded");
                auth::Auth::Keys(Arc::new(store))
            }
        };
        let metrics = Arc::new(Metrics::new(config.policy.kind.as_str()));
        let router = Arc::new(
            Router::new(config.model_defaults(), config.seed, Arc::clone(&metrics))
                .with_gateway_id(config.gateway_id.clone())
                .with_agent_token(config.agent_token.clone()),
        );
        router.set_prefix_holds(config.prefix_holds);
        router.keep_finished_for(config.keep_finished_for);
        Ok(Arc::new(Self {
            config,
            router,
            metrics,
            catalog: ModelCatalog::default(),
            catalog_fetch: tokio::sync::Mutex::new(()),
            client: proxy::http_client(),
            draining: std::sync::atomic::AtomicBool::new(false),
            auth,
            quotas: Arc::new(quota::Quotas::default()),
            history: super::history::History::default(),
            decisions: super::decisions::Decisions::new(decision_log),
        }))
    }

    /// The model's tokenizer and template, fetched once from an agent serving it.
    async fn model_info(&self, model: &str) -> Option<Arc<ModelInfo>> {
        if let Some(i) = self.catalog.get(model) {
            return Some(i);
        }
        // Single flight: whoever waited here finds what the fetch before it cached.
        let _fetching = self.catalog_fetch.lock().await;
        if let Some(i) = self.catalog.get(model) {
            return Some(i);
        }
        if !self.catalog.should_fetch(model) {
            return None;
        }
        let endpoint = self.router.endpoint_for_model(Some(model))?;
        let fetched = async {
            let req = hyper::Request::get(format!("http://{endpoint}/v1/kvroute/model"))
                .body(http_body_util::Full::new(Bytes::new()))
                .ok()?;
            let req = proxy::with_agent_token(req, self.router.agent_token());
            let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
                .await
                .ok()?
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            // Building the tokenizer takes CPU seconds on a small machine: off the async workers.
            let parsed = tokio::task::spawn_blocking(move || ModelInfo::from_json(&body))
                .await
                .ok()?;
            match parsed {
                Ok(info) => Some(info),
                Err(e) => {
                    tracing::warn!(model, error = %e, "bad model info from agent");
                    None
                }
            }
        }
        .await;
        match fetched {
            Some(info) if info.model == model => {
                tracing::info!(
                    model,
                    tokenizer = info.tokenizer.is_some(),
                    "model info cached"
                );
                Some(self.catalog.insert(info))
            }
            _ => {
                tracing::warn!(model, endpoint = %endpoint, "no model info; sizing prompts by estimate");
                self.catalog.mark_failed(model);
                None
            }
        }
    }

    fn dashboard_state(&self) -> DashboardState {
        DashboardState {
            policy: self.config.policy.kind.as_str(),
            agents: self.router.agents(),
            queue: self.router.queue(),
        }
    }

    /// Who sends a request: its API key (with `--auth required`) and the priority and tenant
    /// headers it may set ([`auth::identify`]).
    fn identify(&self, headers: &HeaderMap) -> Result<auth::Caller, Error> {
        let text = |name: &str| -> Result<Option<&str>, Error> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str().map_err(|_| Error::BadRequest {
                        message: format!("header {name}: not text"),
                        param: None,
                    })
                })
                .transpose()
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty());
        auth::identify(
            &self.auth,
            bearer,
            text("x-kvroute-priority")?,
            text("x-kvroute-tenant")?,
        )
        .map_err(|d| match d {
            auth::Denied::Missing => Error::Unauthorized(
                "No API key provided: send it as `Authorization: Bearer <key>`.".into(),
            ),
            auth::Denied::Unknown => Error::Unauthorized("Incorrect API key provided.".into()),
            auth::Denied::BadHeader(message) => Error::BadRequest {
                message,
                param: None,
            },
        })
    }

    /// A request body's model, the model's info and settings, and its plan (token counts,
    /// block hashes, output reserved). Tokenizing and rendering the chat template take real CPU
    /// for long prompts: they run on a blocking thread, never on the async workers that move
    /// every other request's bytes.
    async fn plan(&self, endpoint: Endpoint, value: serde_json::Value) -> Result<Planned, Error> {
        let model = prompt::model_of(&value).map_err(bad_request)?.to_string();
        let info = self.model_info(&model).await;
        let settings = self.router.settings(&model);
        let (value, plan) = {
            let info = info.clone();
            let reserve = settings.reserve_output;
            tokio::task::spawn_blocking(move || {
                let plan = prompt::plan(endpoint, &value, info.as_deref(), reserve);
                (value, plan)
            })
            .await
            .map_err(|e| Error::Upstream(format!("prompt planning failed: {e}")))?
        };
        let mut plan = plan.map_err(bad_request)?;
        if let Some(n) = settings.default_output_tokens {
            // The model's spec sizes requests that name no max_tokens.
            if ["max_tokens", "max_completion_tokens"]
                .iter()
                .all(|f| value.get(f).is_none_or(serde_json::Value::is_null))
            {
                let max_len = info.as_deref().map_or(0, |i| u64::from(i.max_model_len));
                let room = if max_len > 0 {
                    max_len.saturating_sub(plan.prompt_tokens).max(1)
                } else {
                    n
                };
                plan.output_tokens = match settings.reserve_output {
                    prompt::ReserveOutput::Full => n.min(room),
                    prompt::ReserveOutput::Expected(cap) => n.min(room).min(cap),
                };
            }
        }
        Ok(Planned {
            model,
            info,
            settings,
            plan,
        })
    }

    /// The whole life of one OpenAI request.
    async fn handle(
        self: Arc<Self>,
        endpoint: Endpoint,
        path: &'static str,
        headers: HeaderMap,
        caller: auth::Caller,
        body: Bytes,
    ) -> Result<Response, Error> {
        let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b);
        let value = if body.len() <= kvroute_openai::PARSE_INLINE_MAX_BYTES {
            parse(&body)
        } else {
            let body = body.clone();
            tokio::task::spawn_blocking(move || parse(&body))
                .await
                .map_err(|e| Error::Upstream(format!("request parsing failed: {e}")))?
        }
        .map_err(|e| Error::BadRequest {
            message: format!("request body is not valid JSON: {e}"),
            param: None,
        })?;
        if !value.is_object() {
            return Err(Error::BadRequest {
                message: "request body must be a JSON object".into(),
                param: None,
            });
        }
        // The rules the agent applies, before anything is reserved for the request.
        let checked = kvroute_openai::parse_value(
            &value,
            match endpoint {
                Endpoint::Completions => kvroute_openai::Endpoint::Completions,
                Endpoint::ChatCompletions => kvroute_openai::Endpoint::Chat,
            },
        )?;
        prompt::is_stream(&value).map_err(bad_request)?;
        // Tenants never share cached blocks: the request's cache salt becomes its tenant's (with
        // the client's own salt, if any, folded in), for the agent and for the plan's hashes.
        let (value, body) = if self.config.isolate_tenant_caches {
            let mut value = value;
            let salt = tenant_salt(&caller.tenant, checked.cache_salt.as_deref());
            value["cache_salt"] = serde_json::Value::String(salt);
            let body = Bytes::from(serde_json::to_vec(&value).map_err(|e| Error::BadRequest {
                message: format!("request body: {e}"),
                param: None,
            })?);
            (value, body)
        } else {
            (value, body)
        };
        let Planned {
            model,
            info,
            settings,
            plan,
        } = self.plan(endpoint, value).await?;
        if let (Some(i), Some(m)) = (info.as_deref(), checked.max_tokens) {
            // Tokenized like the agent does: its context check, answered here.
            let max_len = u64::from(i.max_model_len);
            if i.tokenizer.is_some()
                && max_len > 0
                && plan.prompt_tokens < max_len
                && plan.prompt_tokens + u64::from(m) > max_len
            {
                return Err(Error::Invalid {
                    message: format!(
                        "This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).",
                        plan.prompt_tokens + u64::from(m),
                        plan.prompt_tokens
                    ),
                    param: Some(
                        match endpoint {
                            Endpoint::Completions => "max_tokens",
                            Endpoint::ChatCompletions => "max_completion_tokens",
                        }
                        .into(),
                    ),
                    code: Some("context_length_exceeded"),
                });
            }
        }
        // The key's guardrails, charged now; the permit lives as long as the response.
        let permit = match &caller.key_name {
            Some(key) => self
                .quotas
                .admit(
                    key,
                    &caller.limits,
                    plan.prompt_tokens,
                    plan.output_tokens,
                    Instant::now(),
                )
                .map_err(|over| match over {
                    quota::Over::TooLarge { message, param } => Error::KeyLimit {
                        message,
                        param: Some(param),
                        retry_after_s: None,
                    },
                    quota::Over::Busy {
                        message,
                        retry_after_s,
                    } => Error::KeyLimit {
                        message,
                        param: None,
                        retry_after_s: Some(retry_after_s),
                    },
                })?,
            None => None,
        };
        let debug = caller.may_debug
            && headers
                .get(DEBUG_HEADER)
                .is_some_and(|v| v.as_bytes() == b"1");
        let auth::Caller {
            priority, tenant, ..
        } = caller;
        self.metrics
            .add_tenant_tokens(&tenant, plan.prompt_tokens + plan.output_tokens);
        let traced = debug || self.decisions.enabled();
        // Every exit of the routing loop below is this block's value (a refusal is recorded
        // for the dashboard after it).
        let outcome: Result<Response, Error> = async {
            let mut no_room_retries = 0u32;
            let deadline = Instant::now() + settings.queue_timeout;
            let retry_after_s = settings.queue_timeout.as_secs().clamp(1, 30);
            let mut exclude = Vec::new();
            let mut last_error = String::from("no agent tried");
            // KV policies ask the agent to refuse rather than over-fill (another gateway replica
            // may have filled the room this one saw); baselines let the engine queue, as they would.
            // With `--reserve-output expected` the gateway admits on expected output on purpose;
            // the agent's whole-future check would undo that, so it is not asked then.
            let require_room = matches!(settings.policy.kind, PolicyKind::Kv | PolicyKind::KvScore)
                && settings.reserve_output == prompt::ReserveOutput::Full;
            let mut attempt = 0;
            while attempt <= self.config.max_retries {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let mut admitted = match self
                    .router
                    .admit_traced(
                        plan.clone(),
                        exclude.clone(),
                        priority,
                        &tenant,
                        remaining,
                        traced,
                    )
                    .await
                {
                    Ok(a) => a,
                    Err(AdmitError::QueueFull) => {
                        self.metrics.count_queue_full();
                        return Err(Error::QueueFull {
                            retry_after_s: self.router.retry_after_s(&plan).unwrap_or(1),
                        });
                    }
                    Err(AdmitError::Timeout) if attempt > 0 => {
                        return Err(Error::Upstream(last_error));
                    }
                    Err(AdmitError::Timeout) => {
                        self.metrics.count_queue_timeout();
                        return Err(Error::QueueTimeout {
                            retry_after_s: self.router.retry_after_s(&plan).unwrap_or(retry_after_s),
                        });
                    }
                    Err(AdmitError::Reject(r)) => {
                        if attempt > 0 {
                            return Err(Error::Upstream(last_error));
                        }
                        return Err(Error::from_reject(&model, r));
                    }
                };
                // Time since arrival (queue wait and earlier attempts), taken at admission: the
                // agent's answer below may take the whole prefill.
                let waited = settings
                    .queue_timeout
                    .saturating_sub(deadline.saturating_duration_since(Instant::now()));
                let mut req = proxy::upstream_request(
                    &admitted.endpoint,
                    path,
                    &headers,
                    body.clone(),
                    self.router.agent_token(),
                )
                .map_err(|e| Error::Upstream(e.to_string()))?;
                if let Some(id) = admitted.hold {
                    req.headers_mut()
                        .insert(HOLD_HEADER, hyper::header::HeaderValue::from(id));
                }
                // A client's own dispatch header is never passed on: the agent would acknowledge it
                // to whichever gateway it names.
                req.headers_mut().remove(DISPATCH_HEADER);
                req.headers_mut().remove(REQUIRE_ROOM_HEADER);
                if require_room {
                    req.headers_mut().insert(
                        REQUIRE_ROOM_HEADER,
                        hyper::header::HeaderValue::from_static("1"),
                    );
                }
                if let Some(v) = admitted
                    .dispatch_header()
                    .and_then(|v| hyper::header::HeaderValue::from_str(&v).ok())
                {
                    req.headers_mut().insert(DISPATCH_HEADER, v);
                }
                admitted.mark_sent();
                let sent = std::time::Instant::now();
                match self.client.request(req).await {
                    Ok(resp)
                        if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                            && resp
                                .headers()
                                .contains_key(kvroute_contract::dispatch::DRAINING_HEADER) =>
                    {
                        // The agent is going away and took nothing: elsewhere, now (its reports
                        // say so too, so the policy stops picking it).
                        tracing::debug!(agent = %admitted.agent_id, "agent is draining; routing elsewhere");
                        exclude.push(admitted.route.slot);
                        drop(admitted);
                        continue;
                    }
                    Ok(resp)
                        if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                            && resp.headers().contains_key(NO_ROOM_HEADER) =>
                    {
                        // The agent had no room after all (another replica's requests, or a direct
                        // client's, took it). Nothing was sent back yet: route it again once this
                        // gateway's view has caught up (the agent's refusal is acknowledged on its
                        // stream with the room it has now).
                        self.metrics.count_no_room();
                        no_room_retries += 1;
                        tracing::debug!(agent = %admitted.agent_id, "agent had no room; routing again");
                        drop(admitted);
                        tokio::time::sleep(NO_ROOM_PAUSE).await;
                        continue;
                    }
                    Ok(resp) => {
                        tracing::debug!(
                            agent = %admitted.agent_id,
                            need = admitted.route.need_blocks,
                            cached = admitted.route.cached_blocks,
                            prefill = admitted.route.prefill_tokens,
                            predicted_ttft_ms = (admitted.route.predicted_ttft_s * 1e3) as u64,
                            waited_ms = waited.as_millis() as u64,
                            prefix = plan.block_hashes.first().map_or(0, |h| h % 10_000),
                            "routed"
                        );
                        self.metrics.count_request(&model, resp.status().as_u16());
                        // A refusal (4xx) freed nothing to keep.
                        let ok = resp.status().is_success();
                        let resp = proxy::relay(
                            resp,
                            &admitted.agent_id,
                            self.config.upstream_idle_timeout,
                            Arc::clone(&self.metrics),
                            (admitted.route.predicted_ttft_s > 0.0).then(|| proxy::TtftProbe {
                                sent,
                                predicted_s: admitted.route.predicted_ttft_s,
                                calibrate: Some(admitted.ttft_calibrator()),
                            }),
                            ok.then(|| admitted.finish_keeper()).flatten(),
                        );
                        let mut resp = resp;
                        if let Some(trace) = admitted.trace.take() {
                            let json = decisions::trace_json(
                                &decisions::TraceHead {
                                    policy: trace.policy.kind.as_str(),
                                    scorers: &trace.scorers,
                                    cost: trace.policy.cost,
                                    agent: &admitted.agent_id,
                                    attempts: attempt + 1,
                                    no_room_retries,
                                    waited,
                                },
                                &trace,
                            );
                            if debug {
                                if let Ok(v) = hyper::header::HeaderValue::from_str(&json.to_string())
                                {
                                    resp.headers_mut().insert(ROUTE_HEADER, v);
                                }
                            }
                            self.record(
                                &model,
                                &plan,
                                resp.status().as_u16(),
                                "routed",
                                Some(json),
                            );
                        }
                        return Ok(match permit {
                            // The key's request counts as in flight until its body ends.
                            Some(p) => resp.map(|b| {
                                Body::new(b.map_frame(move |f| {
                                    let _held = &p;
                                    f
                                }))
                            }),
                            None => resp,
                        });
                    }
                    Err(e) => {
                        self.metrics.count_upstream_failure();
                        last_error = format!("{}: {e}", admitted.endpoint);
                        tracing::warn!(agent = %admitted.agent_id, endpoint = %admitted.endpoint, error = %e, connect = e.is_connect(), "upstream failed before the first byte");
                        exclude.push(admitted.route.slot);
                        if e.is_connect() {
                            // Never reached the agent: its blocks are free again.
                            admitted.cancel();
                        }
                        if attempt < self.config.max_retries {
                            self.metrics.count_retry();
                        }
                        attempt += 1;
                    }
                }
            }
            Err(Error::Upstream(last_error))
        }
        .await;
        if let Err(e) = &outcome {
            self.record(&model, &plan, e.status().as_u16(), refusal_of(e), None);
        }
        outcome
    }

    /// Keeps a request's decision for the dashboard ([`super::decisions`]).
    fn record(
        &self,
        model: &str,
        plan: &super::types::PromptPlan,
        status: u16,
        outcome: &'static str,
        route: Option<serde_json::Value>,
    ) {
        self.decisions.push(decisions::DecisionRecord {
            t_ms: decisions::unix_ms(),
            model: model.to_string(),
            prompt_tokens: plan.prompt_tokens,
            output_tokens: plan.output_tokens,
            status,
            outcome,
            route,
        });
    }
}

/// The cache salt of a request of `tenant` under `--isolate-tenant-caches`: `tenant:<tenant>`,
/// and when the client sent a salt, `|` and the first 16 hex digits of its SHA-256 (so the
/// result stays short whatever the client sent; tenants are at most 64 characters).
pub fn tenant_salt(tenant: &str, client: Option<&str>) -> String {
    use sha2::Digest;
    match client {
        None => format!("tenant:{tenant}"),
        Some(c) => {
            let d = sha2::Sha256::digest(c.as_bytes());
            let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("tenant:{tenant}|{hex}")
        }
    }
}

#[cfg(test)]
mod salt_tests {
    use super::tenant_salt;

    #[test]
    fn a_tenant_salt_names_the_tenant_and_stays_short_whatever_the_client_sent() {
        assert_eq!(tenant_salt("alpha", None), "tenant:alpha");
        let long = "x".repeat(256);
        let s = tenant_salt(&"t".repeat(64), Some(&long));
        assert!(s.len() <= 7 + 64 + 1 + 16, "{s}");
        assert!(s.starts_with(&format!("tenant:{}|", "t".repeat(64))), "{s}");
        assert_ne!(tenant_salt("a", Some("s1")), tenant_salt("a", Some("s2")));
        assert_ne!(tenant_salt("a", Some("s1")), tenant_salt("b", Some("s1")));
        assert_ne!(tenant_salt("a", None), tenant_salt("a", Some("")));
    }
}

/// The dashboard's word for why a request got no answer from an agent.
fn refusal_of(e: &Error) -> &'static str {
    match e {
        Error::QueueFull { .. } => "queue_full",
        Error::QueueTimeout { .. } => "queue_timeout",
        Error::Upstream(_) => "upstream_failed",
        _ => "rejected",
    }
}

fn bad_request(e: prompt::BadRequest) -> Error {
    Error::BadRequest {
        message: e.message,
        param: e.param,
    }
}

async fn respond(
    gw: Arc<Gateway>,
    endpoint: Endpoint,
    path: &'static str,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let caller = match gw.identify(&headers) {
        Ok(c) => c,
        Err(e) => {
            gw.metrics.count_request("", e.status().as_u16());
            return e.into_response();
        }
    };
    let limit = gw.config.max_body_bytes;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            gw.metrics
                .count_request("", StatusCode::PAYLOAD_TOO_LARGE.as_u16());
            return Error::BodyTooLarge(limit).into_response();
        }
    };
    let metrics = Arc::clone(&gw.metrics);
    let tenant = caller.tenant.clone();
    let result = gw
        .handle(endpoint, path, headers, caller, bytes.clone())
        .await;
    metrics.count_tenant(
        &tenant,
        match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().as_u16(),
        },
    );
    match result {
        Ok(r) => r,
        Err(e) => {
            let model = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_default();
            metrics.count_request(&model, e.status().as_u16());
            tracing::info!(error = %e, kind = e.metric_label(), "request refused");
            e.into_response()
        }
    }
}

async fn completions(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    respond(gw, Endpoint::Completions, "/v1/completions", headers, body).await
}

async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        gw,
        Endpoint::ChatCompletions,
        "/v1/chat/completions",
        headers,
        body,
    )
    .await
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(e) = gw.identify(&headers) {
        return e.into_response();
    }
    let data: Vec<serde_json::Value> = gw
        .router
        .models()
        .into_iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "kvroute"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if gw.router.agents().iter().any(|a| a.eligible) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no eligible agent\n").into_response()
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let mut text = gw.metrics.render(&gw.router.agents());
    text.push_str(&metrics::render_kv_signals(&gw.router.kv_signals()));
    (
        [(header::CONTENT_TYPE, kvroute_contract::prom::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

async fn dashboard_page(State(gw): State<Arc<Gateway>>) -> Html<String> {
    Html(dashboard::render(
        &gw.dashboard_state(),
        &gw.decisions.recent(),
    ))
}

async fn dashboard_decisions(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(serde_json::json!({
        "capacity": gw.decisions.capacity(),
        "decisions": gw.decisions.recent(),
    }))
    .into_response()
}

async fn dashboard_json(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(gw.dashboard_state()).into_response()
}

async fn dashboard_history(State(gw): State<Arc<Gateway>>) -> Response {
    axum::Json(serde_json::json!({"samples": gw.history.samples()})).into_response()
}

/// Records one dashboard sample a second for as long as it runs.
async fn sample_history(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let (ok, rejected, errors) = gw.metrics.status_totals();
        let mut ttfts = gw.metrics.take_recent_ttfts();
        let agents = gw.router.agents();
        gw.history.push(super::history::Sample {
            t_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            queue_depth: gw.router.queue().depth,
            ok,
            rejected,
            errors,
            ttft_p50_s: super::history::quantile(&mut ttfts, 0.5),
            ttft_p99_s: super::history::quantile(&mut ttfts, 0.99),
            agents: super::history::agent_points(&agents),
        });
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": {"message": "not found", "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

/// The HTTP routes: the API's, and the admin ones (`/metrics`, `/dashboard*`) unless they
/// have their own listener (`--admin-listen`, [`admin_app`]). `/health` and `/ready` are on both.
pub fn app(gw: Arc<Gateway>) -> HttpRouter {
    let api = HttpRouter::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/kvroute/explain", post(explain))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready));
    let api = if gw.config.admin_listen.is_some() {
        api
    } else {
        api.merge(admin_routes())
    };
    api.fallback(not_found).with_state(gw)
}

fn admin_routes() -> HttpRouter<Arc<Gateway>> {
    HttpRouter::new()
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard_page))
        .route("/dashboard/state", get(dashboard_json))
        .route("/dashboard/history", get(dashboard_history))
        .route("/dashboard/decisions", get(dashboard_decisions))
}

/// The admin listener's routes: `/metrics`, `/dashboard*`, `/health`, `/ready`.
pub fn admin_app(gw: Arc<Gateway>) -> HttpRouter {
    admin_routes()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .fallback(not_found)
        .with_state(gw)
}

/// Starts a gateway on an already-bound listener, fed by `source`.
pub fn start_with(
    config: GatewayConfig,
    listener: TcpListener,
    source: Box<dyn AgentSource>,
) -> Result<RunningGateway, ServeError> {
    start_with_admin(config, listener, None, source)
}

/// [`start_with`], with the admin endpoints on their own bound listener (`--admin-listen`).
pub fn start_with_admin(
    config: GatewayConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    source: Box<dyn AgentSource>,
) -> Result<RunningGateway, ServeError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Bind(config.listen, e))?;
    let admin_addr = match (&admin, config.admin_listen) {
        (Some(l), Some(want)) => Some(l.local_addr().map_err(|e| ServeError::Bind(want, e))?),
        _ => None,
    };
    let mut config = config;
    if admin.is_none() {
        // No listener of its own: the admin endpoints stay on the API's.
        config.admin_listen = None;
    }
    let gw = Gateway::new(config)?;
    let admin_task = admin.map(|l| {
        let app = admin_app(Arc::clone(&gw));
        let limits = gw.config.http_limits;
        tokio::spawn(async move {
            kvroute_serve::serve(l, app, limits, std::future::pending::<()>()).await
        })
    });
    let (tx, rx) = watch::channel(AgentSet::default());
    let router = Arc::clone(&gw.router);
    let app = app(Arc::clone(&gw));
    let gw_auth = Arc::clone(&gw);
    let limits = gw.config.http_limits;
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let pump = tokio::spawn(Arc::clone(&router).run_pump());
        let holds = router
            .take_hold_actions()
            .map(|rx| tokio::spawn(run_holds(Arc::clone(&router), rx, proxy::http_client())));
        let tracker = tokio::spawn(track_agents(
            Arc::clone(&router),
            rx,
            WatchSettings::default(),
        ));
        let src = tokio::spawn(source.run(tx));
        let sampler = tokio::spawn(sample_history(Arc::clone(&gw_auth)));
        let keys = match &gw_auth.auth {
            auth::Auth::Keys(store) => Some(tokio::spawn(Arc::clone(store).watch())),
            auth::Auth::Off => None,
        };
        let served = kvroute_serve::serve(listener, app, limits, async move {
            let _ = stop_rx.await;
        })
        .await
        .map_err(ServeError::Serve);
        pump.abort();
        if let Some(h) = holds {
            h.abort();
        }
        tracker.abort();
        src.abort();
        if let Some(k) = keys {
            k.abort();
        }
        sampler.abort();
        if let Some(a) = admin_task {
            a.abort();
        }
        served
    });
    Ok(RunningGateway {
        addr,
        admin_addr,
        gateway: gw,
        task,
        stop: Some(stop),
    })
}

/// What [`Gateway::plan`] makes of a request body.
struct Planned {
    model: String,
    info: Option<Arc<ModelInfo>>,
    settings: super::config::ModelSettings,
    plan: super::types::PromptPlan,
}

/// A request header: `1` asks for the routing decision in [`ROUTE_HEADER`] (keys with
/// `may_debug`, or anyone with `--auth off`).
pub const DEBUG_HEADER: &str = "x-kvroute-debug";

/// The response header with the routing decision, as compact JSON.
pub const ROUTE_HEADER: &str = "x-kvroute-route";

/// `POST /v1/kvroute/explain`: what the gateway would do with this OpenAI request body now,
/// without sending or reserving anything (`kvroute explain`). Same keys as the debug header.
async fn explain(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let caller = match gw.identify(&headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !caller.may_debug {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"error": {
                "message": "this API key may not ask for routing decisions (may_debug)",
                "type": "invalid_request_error", "param": null, "code": "forbidden"}})),
        )
            .into_response();
    }
    let limit = gw.config.max_body_bytes;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return Error::BodyTooLarge(limit).into_response();
    };
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => {
            return Error::BadRequest {
                message: "the body must be a JSON object: an OpenAI completion or chat request"
                    .into(),
                param: None,
            }
            .into_response()
        }
    };
    let endpoint = if value.get("messages").is_some() {
        Endpoint::ChatCompletions
    } else {
        Endpoint::Completions
    };
    let Planned { info, plan, .. } = match gw.plan(endpoint, value).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (kind, agent, trace) = gw.router.explain_now(&plan);
    let (cfg, scorers) = (trace.policy, &trace.scorers);
    let head = decisions::TraceHead {
        policy: cfg.kind.as_str(),
        scorers,
        cost: cfg.cost,
        agent: agent.as_deref().unwrap_or(""),
        attempts: 0,
        no_room_retries: 0,
        waited: Duration::ZERO,
    };
    axum::Json(serde_json::json!({
        "policy": cfg.kind.as_str(),
        "decision": kind,
        "agent": agent,
        "prompt_tokens": plan.prompt_tokens,
        "output_tokens": plan.output_tokens,
        "prompt_blocks": plan.block_hashes.len(),
        "tokenized": info.as_deref().is_some_and(|i| i.tokenizer.is_some()),
        "scorers": scorers.iter().map(|s| serde_json::json!({"name": s.name, "weight": s.weight})).collect::<Vec<_>>(),
        "deciding": decisions::deciding(&head, &trace.candidates),
        "candidates": decisions::candidates_json(&trace.candidates, scorers.len()),
        "candidates_total": trace.candidates.len(),
        "filtered": decisions::filtered_json(&trace.filtered),
    }))
    .into_response()
}

/// The request header that names the prefix hold an agent keeps for a request.
pub const HOLD_HEADER: &str = "x-kvroute-hold";
/// Asks the agent to refuse (503 with [`NO_ROOM_HEADER`]) a request it has no room for.
pub const REQUIRE_ROOM_HEADER: &str = "x-kvroute-require-room";
pub const NO_ROOM_HEADER: &str = "x-kvroute-no-room";
/// How long a request the agent refused for lack of room waits before it is routed again:
/// about one capacity report.
const NO_ROOM_PAUSE: Duration = Duration::from_millis(20);

/// Carries out the router's prefix-hold work ([`HoldAction`]) against the agents, each call in
/// its own task so a slow agent delays no other. A hold that fails is simply not there: the
/// request still waits and is admitted as before, only its prefix may be evicted meanwhile.
async fn run_holds(
    router: Arc<Router>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<HoldAction>,
    client: HttpClient,
) {
    while let Some(action) = rx.recv().await {
        let (router, client) = (Arc::clone(&router), client.clone());
        tokio::spawn(async move {
            match action {
                HoldAction::Place {
                    entry,
                    ask,
                    slot: _,
                    endpoint,
                    block_hashes,
                    max_free,
                    ttl,
                } => {
                    let body = serde_json::json!({
                        "block_hashes": block_hashes,
                        "max_free_blocks": max_free,
                        "ttl_ms": ttl.as_millis() as u64,
                    });
                    match hold_call(&client, &endpoint, body, router.agent_token()).await {
                        HoldAnswer::Held { id, blocks } if blocks > 0 => {
                            router.hold_placed(entry, ask, endpoint, id, blocks);
                        }
                        HoldAnswer::Unsupported => router.hold_refused(entry, ask, true),
                        _ => router.hold_refused(entry, ask, false),
                    }
                }
                HoldAction::Release { endpoint, id, ask } => {
                    let req =
                        hyper::Request::delete(format!("http://{endpoint}/v1/kvroute/hold/{id}"))
                            .body(http_body_util::Full::new(Bytes::new()));
                    if let Ok(req) = req {
                        let req = proxy::with_agent_token(req, router.agent_token());
                        let _ =
                            tokio::time::timeout(Duration::from_secs(2), client.request(req)).await;
                    }
                    // Released (the agent's engine takes the release before any request sent
                    // after this), or not answered: then the hold ends with its TTL and the
                    // agent's reports show it until then.
                    if let Some(ask) = ask {
                        router.stray_hold_released(ask);
                    }
                }
            }
        });
    }
}

/// What an agent answered to `POST /v1/kvroute/hold`.
#[derive(Debug, PartialEq, Eq)]
enum HoldAnswer {
    Held {
        id: u64,
        blocks: u64,
    },
    /// No hold API there (404, 405, 501).
    Unsupported,
    /// Any other failure (timeout, refused connection, bad answer).
    Failed,
}

/// `POST /v1/kvroute/hold` on an agent.
async fn hold_call(
    client: &HttpClient,
    endpoint: &str,
    body: serde_json::Value,
    agent_token: Option<&str>,
) -> HoldAnswer {
    hold_call_inner(client, endpoint, body, agent_token)
        .await
        .unwrap_or(HoldAnswer::Failed)
}

async fn hold_call_inner(
    client: &HttpClient,
    endpoint: &str,
    body: serde_json::Value,
    agent_token: Option<&str>,
) -> Option<HoldAnswer> {
    let req = hyper::Request::post(format!("http://{endpoint}/v1/kvroute/hold"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .ok()?;
    let req = proxy::with_agent_token(req, agent_token);
    let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    if matches!(status.as_u16(), 404 | 405 | 501) {
        return Some(HoldAnswer::Unsupported);
    }
    if !status.is_success() {
        return None;
    }
    let bytes = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(HoldAnswer::Held {
        id: v["hold_id"].as_u64()?,
        blocks: v["blocks"].as_u64()?,
    })
}

/// Binds `config.listen` and starts a gateway for its agents.
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, ServeError> {
    let source: Box<dyn AgentSource> = if config.kubernetes {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| ServeError::Kubernetes(e.to_string()))?;
        Box::new(KubernetesAgents {
            client,
            namespace: config.namespace.clone(),
        })
    } else {
        Box::new(StaticAgents(config.agents.clone()))
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServeError::Bind(config.listen, e))?;
    let admin = match config.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| ServeError::Bind(a, e))?,
        ),
        None => None,
    };
    start_with_admin(config, listener, admin, source)
}
