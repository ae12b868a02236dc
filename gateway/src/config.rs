//! `kvroute gateway` flags, validated once into a typed [`GatewayConfig`].
//!
//! Errors name the flag and the bad value. Nothing here starts anything.

use std::net::SocketAddr;
use std::time::Duration;

use super::prompt::ReserveOutput;
use super::types::AgentEndpoint;
use kvroute_contract::dispatch::{check_dispatcher, MAX_DISPATCHER_LEN};
use kvroute_routing::cost::{CostWeights, Priors};
use kvroute_routing::{PolicyConfig, PolicyKind, ScorerId, ScorerList, Weights};

/// Flags of `kvroute gateway` (also embedded by `kvroute up`).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address to serve the OpenAI API, /metrics and /dashboard on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "KVROUTE_LISTEN")]
    pub listen: SocketAddr,
    /// Serve /metrics and /dashboard on this address instead, and not on --listen (they show
    /// agents, tenants and routing decisions: keep them off the port clients reach).
    #[arg(long, env = "KVROUTE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// An agent to route to, as `http://HOST:PORT,grpc://HOST:PORT` (repeatable).
    #[arg(long = "agent", value_name = "http://HOST:PORT,grpc://HOST:PORT")]
    pub agents: Vec<AgentEndpoint>,
    /// Discover agents from Kubernetes (ModelDeployment EndpointSlices) instead of --agent.
    #[arg(long, conflicts_with = "agents")]
    pub kubernetes: bool,
    /// With --kubernetes: only this namespace (default: every namespace the client may list).
    #[arg(long, env = "KVROUTE_NAMESPACE", requires = "kubernetes")]
    pub namespace: Option<String>,
    /// Routing policy: kv (lowest predicted time, waits for the agent caching the prefix),
    /// kv-score (the earlier weighted score), round-robin, least-requests or gpu-utilization;
    /// or, to compare, re-implementations of peers' policies: cache-aware (SGLang router's) and
    /// llm-d (llm-d's default scheduling profile).
    #[arg(long, default_value = "kv", env = "KVROUTE_POLICY")]
    pub policy: PolicyKind,
    /// Requests of one model that may wait for room at once; more are answered 429 (the default
    /// for models whose ModelDeployment sets no `spec.admission.maxQueue`).
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// How long a request may wait for room before a 429 (e.g. 500ms, 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub queue_timeout: Duration,
    /// Output tokens to reserve KV room for: `full` (max_tokens) or `expected`.
    #[arg(long, default_value = "full", value_parser = ["full", "expected"])]
    pub reserve_output: String,
    /// With `--reserve-output expected`: output tokens reserved per request at most.
    #[arg(long, default_value_t = 256)]
    pub expected_output_tokens: u64,
    /// An agent whose last capacity report is older than this is not eligible.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub stale_after: Duration,
    /// Score weight of the cached-prefix fraction (kv-score policy).
    #[arg(long, default_value_t = 2.0)]
    pub weight_prefix: f64,
    /// Score weight of the free-KV fraction left after the request (kv-score policy).
    #[arg(long, default_value_t = 1.0)]
    pub weight_headroom: f64,
    /// Score weight of queue pressure, subtracted (kv-score policy).
    #[arg(long, default_value_t = 1.0)]
    pub weight_queue: f64,
    /// kv policy: weight of the predicted wait for room (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub cost_wait: f64,
    /// kv policy: weight of the predicted prefill time of the uncached prompt (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub cost_prefill: f64,
    /// kv policy: weight of recomputing a prefix another agent holds or is computing (the cache
    /// room a duplicate takes from other prefixes).
    #[arg(long, default_value_t = 1.0)]
    pub cost_duplicate: f64,
    /// kv policy: weight of the decode slow-down: what the batch there adds to each of the
    /// request's decode steps (and the request to theirs).
    #[arg(long, default_value_t = kvroute_routing::cost::DECODE)]
    pub cost_decode: f64,
    /// kv policy: extra weight, for a request waiting for one agent, of recomputing elsewhere the
    /// prefix that agent caches (keeps a waiting conversation from moving back and forth).
    #[arg(long, default_value_t = kvroute_routing::cost::STICK)]
    pub cost_stick: f64,
    /// kv policy: weight of the stall the request's prefill imposes on the requests running or
    /// waiting on the agent (its uncached prefill time, once per such request).
    #[arg(long, default_value_t = kvroute_routing::cost::STALL)]
    pub cost_stall: f64,
    /// kv policy, with `--slo-ttft`: weight of each predicted second of a request's time to first
    /// token past what is left of the target (a late request no longer counts toward goodput).
    #[arg(long, default_value_t = kvroute_routing::cost::LATE)]
    pub cost_late: f64,
    /// kv policy: how long a queued request may be passed by later ones with more of their
    /// prompt cached on an agent (they take little room and prefill; 0 = arrival order).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub cache_first_for: Duration,
    /// kv policy: the time per output token to keep (e.g. `100ms`; `0s`: none). A request waits
    /// rather than join a batch whose decode step, as the agent measures it, would then be
    /// longer; an idle agent always takes it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub slo_tpot: Duration,
    /// kv policy: the time to first token to keep (e.g. `2s`; `0s`: none). A queued request that
    /// has waited this long is served after the ones that can still meet it (it keeps its place
    /// among the late ones, until `--queue-timeout`).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub slo_ttft: Duration,
    /// kv policy: how long the blocks of a request that just finished stay kept from other
    /// requests on its agent, for the next turn of its conversation (a request whose prompt
    /// continues its prompt), which arrives a few milliseconds after the answer (0 = not kept).
    /// Where finished prompts are seldom continued, they are not kept.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub keep_finished_for: Duration,
    /// kv policy: don't ask an agent to keep the cached prefix of a request waiting for it
    /// (`POST /v1/kvroute/hold`); without holds, requests admitted meanwhile may evict it.
    #[arg(long)]
    pub no_prefix_holds: bool,
    /// Scorers in place of the policy's own, as `NAME=WEIGHT` (repeatable; NAME one of cost,
    /// prefix, headroom, queue, requests, gpu, kv-usage, waiting): the policy keeps its filters and picker.
    #[arg(long = "scorer", value_name = "NAME=WEIGHT", value_parser = parse_scorer)]
    pub scorers: Vec<(ScorerId, f64)>,
    /// Other agents to try when connecting to the chosen one fails before the first byte.
    #[arg(long, default_value_t = 2)]
    pub max_retries: u32,
    /// End a response whose upstream sent nothing for this long (SSE gets an error event).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// `required`: every OpenAI request needs an `Authorization: Bearer` key listed in
    /// `--api-keys` (401 otherwise). `off`: anyone who reaches the gateway may use it, and the
    /// priority and tenant headers are honoured from anyone (said in the log at start).
    #[arg(long, value_enum, env = "KVROUTE_AUTH", default_value = "required")]
    pub auth: AuthMode,
    /// The API key file: SHA-256 digests of keys with their name, tenant and priority class
    /// (see docs/security.md); reloaded when it changes.
    #[arg(long, env = "KVROUTE_API_KEYS_FILE", value_name = "FILE")]
    pub api_keys: Option<std::path::PathBuf>,
    /// File holding the shared token the agents require (their `--auth-token-file`): sent on
    /// every request, hold and capacity stream. Clients' own `Authorization` is never passed on.
    #[arg(long, env = "KVROUTE_AGENT_TOKEN_FILE", value_name = "FILE")]
    pub agent_token_file: Option<std::path::PathBuf>,
    /// Seed of the tie-breaking random source (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Tenants never share cached prefix blocks: every request's `cache_salt` is set from its
    /// tenant (the API key's; the header's with `--auth off`), the client's own salt folded in.
    #[arg(long)]
    pub isolate_tenant_caches: bool,
    /// How many of the last requests' routing decisions the dashboard keeps and shows
    /// (`/dashboard/decisions`; each routed request is then traced: one more pass over its
    /// candidates). 0 turns it off.
    #[arg(long, default_value_t = super::decisions::DEFAULT_LEN,
          value_parser = clap::value_parser!(u16).range(0..=super::decisions::MAX_LEN as i64))]
    pub decision_log: u16,
    /// Names this gateway replica to agents (the pod name in Kubernetes). A random suffix is
    /// added per process, so every replica and every restart stamps its own dispatch ids.
    #[arg(long, env = "POD_NAME", default_value = "kvroute-gateway")]
    pub gateway_name: String,
    /// Largest request body accepted (e.g. `4MiB`); larger ones get 413. The agent's default.
    #[arg(long, default_value = "4MiB", value_parser = parse_body_limit)]
    pub max_body_bytes: usize,
    /// A request's headers (and a connection's first byte, and a kept-alive connection's next
    /// request) must arrive within this: a client that stalls is disconnected.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub body_read_timeout: Duration,
    /// Most open client connections; more are answered 503 + Retry-After and closed.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// On SIGTERM: stop accepting, answer /ready 503, let open requests and streams finish for
    /// up to this long, then exit.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    Required,
    Off,
}

/// Who may call the gateway, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    Off,
    Keys(std::path::PathBuf),
}

/// A bad flag value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("no agents: pass --agent http://HOST:PORT,grpc://HOST:PORT or --kubernetes")]
    NoAgents,
    #[error("--auth required (the default) needs --api-keys FILE (see docs/security.md); pass --auth off to serve without keys")]
    NoKeys,
}

/// The settings that may differ per model: a ModelDeployment's `spec.routing` and
/// `spec.admission` with `--kubernetes`, the gateway's flags for everything a spec leaves unset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSettings {
    pub policy: PolicyConfig,
    /// Requests of this model that may wait for room at once (0: none wait, 429 at once).
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub reserve_output: ReserveOutput,
    /// Output tokens to reserve for a request that names no `max_tokens`
    /// (`spec.admission.reserveOutput`); `None`: the endpoint's own default.
    pub default_output_tokens: Option<u64>,
}

impl ModelSettings {
    /// The settings for a model whose spec says `routing` / `admission` (`None`: nothing), on top
    /// of `defaults`. A value the CRD's schema should have refused (an object that bypassed it)
    /// keeps the default and is named in the returned warnings.
    pub fn from_spec(
        defaults: &ModelSettings,
        routing: Option<&kvroute_crd::RoutingSpec>,
        admission: Option<&kvroute_crd::AdmissionSpec>,
    ) -> (ModelSettings, Vec<String>) {
        use kvroute_crd::RoutingPolicy;
        let mut out = *defaults;
        let mut warnings = Vec::new();
        if let Some(r) = routing {
            out.policy.kind = match r.policy {
                RoutingPolicy::Kv => PolicyKind::Kv,
                RoutingPolicy::RoundRobin => PolicyKind::RoundRobin,
                RoutingPolicy::LeastRequests => PolicyKind::LeastRequests,
                RoutingPolicy::GpuUtilization => PolicyKind::GpuUtilization,
            };
            if let Some(list) = &r.scorers {
                let mut scorers = ScorerList::default();
                for sc in list {
                    let pushed = match ScorerId::builtin(sc.name.as_str()) {
                        Some(_) if !(sc.weight.is_finite() && sc.weight >= 0.0) => {
                            Err(format!("weight {} must be a finite number ≥ 0", sc.weight))
                        }
                        Some(id) => scorers.push(id, sc.weight),
                        None => Err("unknown scorer".to_string()),
                    };
                    if let Err(e) = pushed {
                        warnings.push(format!(
                            "spec.routing.scorers {}: {e}; the scorer is left out",
                            sc.name.as_str()
                        ));
                    }
                }
                out.policy.scorers = (!scorers.is_empty()).then_some(scorers);
            }
            if let Some(w) = &r.weights {
                let mut weights = defaults.policy.weights;
                for (field, value, slot) in [
                    ("prefix", w.prefix, &mut weights.prefix),
                    ("headroom", w.headroom, &mut weights.headroom),
                    ("queue", w.queue, &mut weights.queue),
                ] {
                    if value.is_finite() && value >= 0.0 {
                        *slot = value;
                    } else {
                        warnings.push(format!(
                            "spec.routing.weights.{field} {value}: must be a finite number ≥ 0; using {}",
                            *slot
                        ));
                    }
                }
                out.policy.weights = weights;
            }
            if let Some(slo) = &r.slo {
                match slo.targets() {
                    Ok(kvroute_crd::SloTargets { ttft, tpot }) => {
                        if let Some(t) = ttft {
                            out.policy.ttft_slo_ms = t.as_millis().min(u128::from(u64::MAX)) as u64;
                        }
                        if let Some(t) = tpot {
                            out.policy.tpot_slo_s = t.as_secs_f64();
                        }
                    }
                    Err(e) => warnings.push(format!("{e}; the gateway's targets stay")),
                }
            }
        }
        if let Some(a) = admission {
            if let Some(n) = a.max_queue {
                out.max_queue = n as usize;
            }
            if let Some(t) = &a.queue_timeout {
                match kvroute_crd::parse_duration(t) {
                    Ok(d) => out.queue_timeout = d,
                    Err(e) => warnings.push(format!(
                        "{e}; using {}ms",
                        defaults.queue_timeout.as_millis()
                    )),
                }
            }
            if let Some(n) = a.reserve_output {
                out.default_output_tokens = Some(u64::from(n.max(1)));
            }
        }
        (out, warnings)
    }
}

/// Validated gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Where /metrics and /dashboard are served when not on `listen`.
    pub admin_listen: Option<SocketAddr>,
    pub agents: Vec<AgentEndpoint>,
    pub kubernetes: bool,
    pub namespace: Option<String>,
    pub policy: PolicyConfig,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub reserve_output: ReserveOutput,
    pub max_retries: u32,
    pub upstream_idle_timeout: Duration,
    pub auth: AuthConfig,
    pub seed: u64,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Ask agents to keep waiting requests' cached prefixes (`kv` policy).
    pub prefix_holds: bool,
    /// How long a finished request's blocks are kept for its conversation's next turn.
    pub keep_finished_for: Duration,
    /// This replica's dispatcher id: agents acknowledge the requests it sends under it.
    pub gateway_id: String,
    /// Header, body and connection limits of the HTTP server.
    pub http_limits: kvroute_serve::Limits,
    /// How long open requests may run on after SIGTERM.
    pub drain_timeout: Duration,
    /// The shared token agents require.
    pub agent_token: Option<String>,
    /// Decisions the dashboard keeps (0: none, and no request is traced for it).
    pub decision_log: usize,
    /// Each request's cache salt is its tenant's.
    pub isolate_tenant_caches: bool,
}

/// This process's dispatcher id: `name` and a random suffix.
pub fn gateway_id(name: &str) -> Result<String, ConfigError> {
    use std::hash::{BuildHasher, Hasher};
    // Room for the suffix within the id's length bound.
    let invalid = |reason: String| ConfigError::Invalid {
        flag: "--gateway-name",
        value: name.chars().take(64).collect(),
        reason,
    };
    if name.len() > MAX_DISPATCHER_LEN - 17 {
        return Err(invalid(format!(
            "at most {} characters",
            MAX_DISPATCHER_LEN - 17
        )));
    }
    check_dispatcher(name).map_err(|e| invalid(e.to_string()))?;
    // RandomState is seeded from the OS's random source; the clock and pid tell apart two
    // processes even if it were not.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    Ok(format!("{name}-{:016x}", h.finish()))
}

/// Parses one `--scorer NAME=WEIGHT`.
pub fn parse_scorer(s: &str) -> Result<(ScorerId, f64), String> {
    let (name, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=WEIGHT, e.g. cost=1"))?;
    let id = ScorerId::builtin(name.trim()).ok_or_else(|| {
        format!(
            "unknown scorer {:?} (expected one of {})",
            name.trim(),
            ScorerId::BUILTIN.join(", ")
        )
    })?;
    let w: f64 = weight
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: weight {weight:?} is not a number"))?;
    if !w.is_finite() || w < 0.0 {
        return Err(format!("{s:?}: weight must be a finite number ≥ 0"));
    }
    Ok((id, w))
}

/// Parses a duration flag ([`kvroute_contract::units::parse_duration`]: `250ms`, `3s`, `2m`,
/// `1h`, or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    kvroute_contract::units::parse_duration(s).map_err(|e| e.0)
}

/// A duration flag that must be more than 0.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// `--max-body-bytes`: a size from 1 KiB to 1 GiB.
pub fn parse_body_limit(s: &str) -> Result<usize, String> {
    let n = kvroute_contract::units::parse_size(s).map_err(|e| e.0)?;
    if !(1024..=1 << 30).contains(&n) {
        return Err(format!("{n} bytes: must be from 1KiB to 1GiB"));
    }
    usize::try_from(n).map_err(|_| format!("{n} bytes: too large"))
}

impl GatewayArgs {
    /// Validates the flags.
    pub fn into_config(self) -> Result<GatewayConfig, ConfigError> {
        if self.agents.is_empty() && !self.kubernetes {
            return Err(ConfigError::NoAgents);
        }
        for (flag, w) in [
            ("--weight-prefix", self.weight_prefix),
            ("--weight-headroom", self.weight_headroom),
            ("--weight-queue", self.weight_queue),
            ("--cost-wait", self.cost_wait),
            ("--cost-prefill", self.cost_prefill),
            ("--cost-duplicate", self.cost_duplicate),
            ("--cost-decode", self.cost_decode),
            ("--cost-stick", self.cost_stick),
            ("--cost-stall", self.cost_stall),
            ("--cost-late", self.cost_late),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(ConfigError::Invalid {
                    flag,
                    value: w.to_string(),
                    reason: "must be a finite number ≥ 0".into(),
                });
            }
        }
        if let Some(admin) = self.admin_listen {
            if admin == self.listen && admin.port() != 0 {
                return Err(ConfigError::Invalid {
                    flag: "--admin-listen",
                    value: admin.to_string(),
                    reason: "is the --listen address: give the admin endpoints their own".into(),
                });
            }
        }
        if self.max_queue == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-queue",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let auth = match (self.auth, &self.api_keys) {
            (AuthMode::Required, Some(path)) => AuthConfig::Keys(path.clone()),
            (AuthMode::Required, None) => return Err(ConfigError::NoKeys),
            (AuthMode::Off, None) => AuthConfig::Off,
            (AuthMode::Off, Some(path)) => {
                return Err(ConfigError::Invalid {
                    flag: "--api-keys",
                    value: path.display().to_string(),
                    reason: "given with --auth off: say which you mean".into(),
                })
            }
        };
        let scorers = if self.scorers.is_empty() {
            None
        } else {
            Some(
                ScorerList::new(&self.scorers).map_err(|reason| ConfigError::Invalid {
                    flag: "--scorer",
                    value: format!("{} scorers", self.scorers.len()),
                    reason,
                })?,
            )
        };
        let reserve_output = if self.reserve_output == "expected" {
            ReserveOutput::Expected(self.expected_output_tokens.max(1))
        } else {
            ReserveOutput::Full
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(GatewayConfig {
            listen: self.listen,
            agents: self.agents,
            kubernetes: self.kubernetes,
            namespace: self.namespace,
            policy: PolicyConfig {
                kind: self.policy,
                weights: Weights {
                    prefix: self.weight_prefix,
                    headroom: self.weight_headroom,
                    queue: self.weight_queue,
                },
                cost: CostWeights {
                    wait: self.cost_wait,
                    prefill: self.cost_prefill,
                    duplicate: self.cost_duplicate,
                    decode: self.cost_decode,
                    stick: self.cost_stick,
                    stall: self.cost_stall,
                    late: self.cost_late,
                },
                priors: Priors::default(),
                stale_after_ms: self.stale_after.as_millis() as u64,
                cache_first_ms: self.cache_first_for.as_millis().min(u128::from(u64::MAX)) as u64,
                tpot_slo_s: self.slo_tpot.as_secs_f64(),
                ttft_slo_ms: self.slo_ttft.as_millis().min(u128::from(u64::MAX)) as u64,
                scorers,
                cache_aware: Default::default(),
            },
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            reserve_output,
            max_retries: self.max_retries,
            upstream_idle_timeout: self.upstream_idle_timeout,
            auth,
            seed,
            max_body_bytes: self.max_body_bytes,
            prefix_holds: !self.no_prefix_holds,
            keep_finished_for: self.keep_finished_for,
            gateway_id: gateway_id(&self.gateway_name)?,
            http_limits: kvroute_serve::Limits {
                header_read_timeout: self.header_read_timeout,
                body_read_timeout: self.body_read_timeout,
                max_connections: self.max_connections as usize,
                ..kvroute_serve::Limits::default()
            },
            drain_timeout: self.drain_timeout,
            agent_token: match &self.agent_token_file {
                Some(p) => Some(
                    kvroute_contract::token::read_token_file(p).map_err(|reason| {
                        ConfigError::Invalid {
                            flag: "--agent-token-file",
                            value: p.display().to_string(),
                            reason,
                        }
                    })?,
                ),
                None => None,
            },
            decision_log: usize::from(self.decision_log),
            isolate_tenant_caches: self.isolate_tenant_caches,
            admin_listen: self.admin_listen,
        })
    }
}

impl GatewayConfig {
    /// The per-model settings the flags give (every model's, unless its spec says otherwise).
    pub fn model_defaults(&self) -> ModelSettings {
        ModelSettings {
            policy: self.policy,
            max_queue: self.max_queue,
            queue_timeout: self.queue_timeout,
            reserve_output: self.reserve_output,
            default_output_tokens: None,
        }
    }

    /// Defaults for a gateway in front of `agents` (tests, `kvroute up`).
    pub fn for_agents(listen: SocketAddr, agents: Vec<AgentEndpoint>) -> Self {
        GatewayConfig {
            listen,
            agents,
            kubernetes: false,
            namespace: None,
            policy: PolicyConfig::default(),
            max_queue: 1024,
            queue_timeout: Duration::from_secs(30),
            reserve_output: ReserveOutput::Full,
            max_retries: 2,
            upstream_idle_timeout: Duration::from_secs(120),
            auth: AuthConfig::Off,
            seed: 0x006b_7672_6f75_7465,
            max_body_bytes: kvroute_openai::DEFAULT_MAX_BODY_BYTES,
            prefix_holds: true,
            keep_finished_for: Duration::from_millis(
                kvroute_routing::queue::DEFAULT_KEEP_FINISHED_MS,
            ),
            gateway_id: gateway_id("kvroute-gateway").unwrap_or_default(),
            http_limits: kvroute_serve::Limits::default(),
            drain_timeout: Duration::from_secs(30),
            agent_token: None,
            decision_log: usize::from(super::decisions::DEFAULT_LEN),
            isolate_tenant_caches: false,
            admin_listen: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    /// Parses `flags` after `--agent ...` (and `--auth off`, unless `flags` name keys).
    fn parse(flags: &[&str]) -> Result<GatewayConfig, String> {
        use clap::Parser;
        let keyed = flags.iter().any(|f| *f == "--auth" || *f == "--api-keys");
        let base: &[&str] = if keyed {
            &[
                "kvroute",
                "--agent",
                "http://127.0.0.1:1,grpc://127.0.0.1:2",
            ]
        } else {
            &[
                "kvroute",
                "--agent",
                "http://127.0.0.1:1,grpc://127.0.0.1:2",
                "--auth",
                "off",
            ]
        };
        let args = base.iter().chain(flags);
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        cli.gateway.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn scorer_flags_replace_the_presets_scorers() {
        let cfg = parse(&[
            "--policy",
            "kv-score",
            "--scorer",
            "prefix=2",
            "--scorer",
            " cost = 0.5",
        ])
        .unwrap();
        assert_eq!(cfg.policy.kind, PolicyKind::KvScore);
        assert_eq!(
            cfg.policy.scorers.map(|l| l.as_slice().to_vec()),
            Some(vec![(ScorerId::PREFIX, 2.0), (ScorerId::COST, 0.5)])
        );
        assert_eq!(parse(&[]).unwrap().policy.scorers, None);
        for (bad, says) in [
            ("nope=1", "unknown scorer"),
            ("cost", "expected NAME=WEIGHT"),
            ("cost=", "not a number"),
            ("cost=-1", "finite number"),
            ("cost=nan", "finite number"),
            ("cost=1e999", "finite number"),
        ] {
            let e = parse(&["--scorer", bad]).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let nine: Vec<&str> = ["--scorer", "queue=1"].repeat(9);
        let e = parse(&nine).unwrap_err();
        assert!(e.contains("--scorer") && e.contains("at most 8"), "{e}");
    }

    #[test]
    fn cost_late_is_off_by_default_and_a_finite_weight_of_at_least_zero() {
        assert_eq!(parse(&[]).unwrap().policy.cost.late, 0.0);
        assert_eq!(
            parse(&["--cost-late", "2.5"]).unwrap().policy.cost.late,
            2.5
        );
        for bad in ["-1", "nan", "inf"] {
            let e = parse(&[&format!("--cost-late={bad}")]).unwrap_err();
            assert!(
                e.contains("--cost-late") && e.contains("finite"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cost_stall_is_a_finite_weight_of_at_least_zero() {
        assert_eq!(
            parse(&[]).unwrap().policy.cost.stall,
            kvroute_routing::cost::STALL
        );
        assert_eq!(
            parse(&["--cost-stall", "0"]).unwrap().policy.cost.stall,
            0.0
        );
        assert_eq!(
            parse(&["--cost-stall", "2.5"]).unwrap().policy.cost.stall,
            2.5
        );
        for bad in ["-0.5", "nan", "inf"] {
            let e = parse(&[&format!("--cost-stall={bad}")]).unwrap_err();
            assert!(
                e.contains("--cost-stall") && e.contains("finite"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cost_stick_is_a_finite_weight_of_at_least_zero() {
        assert_eq!(
            parse(&[]).unwrap().policy.cost.stick,
            kvroute_routing::cost::STICK
        );
        assert_eq!(
            parse(&["--cost-stick", "0"]).unwrap().policy.cost.stick,
            0.0
        );
        for bad in ["-1", "nan", "inf", "1e999"] {
            let e = parse(&[&format!("--cost-stick={bad}")]).unwrap_err();
            assert!(
                e.contains("--cost-stick") && e.contains("finite"),
                "{bad}: {e}"
            );
        }
        let e = parse(&["--cost-stick", "lots"]).unwrap_err();
        assert!(e.contains("--cost-stick"), "{e}");
    }

    #[test]
    fn the_admin_address_is_optional_and_not_the_api_address() {
        assert_eq!(parse(&[]).unwrap().admin_listen, None);
        let c = parse(&["--admin-listen", "127.0.0.1:9090"]).unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let e = parse(&["--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:8080"]).unwrap_err();
        assert!(e.contains("--admin-listen") && e.contains("own"), "{e}");
        for bad in ["9090", "localhost", "1.2.3.4:99999", ""] {
            let e = parse(&[&format!("--admin-listen={bad}")]).unwrap_err();
            assert!(e.contains("--admin-listen"), "{bad}: {e}");
        }
    }

    #[test]
    fn tenant_cache_isolation_is_off_unless_asked() {
        assert!(!parse(&[]).unwrap().isolate_tenant_caches);
        assert!(
            parse(&["--isolate-tenant-caches"])
                .unwrap()
                .isolate_tenant_caches
        );
        let e = parse(&["--isolate-tenant-caches=maybe"]).unwrap_err();
        assert!(e.contains("--isolate-tenant-caches"), "{e}");
    }

    #[test]
    fn decision_log_keeps_0_to_1000_decisions() {
        assert_eq!(
            parse(&[]).unwrap().decision_log,
            usize::from(super::super::decisions::DEFAULT_LEN)
        );
        assert_eq!(parse(&["--decision-log", "0"]).unwrap().decision_log, 0);
        assert_eq!(
            parse(&["--decision-log", "1000"]).unwrap().decision_log,
            1000
        );
        for bad in ["1001", "-1", "70000", "many", ""] {
            let e = parse(&[&format!("--decision-log={bad}")]).unwrap_err();
            assert!(e.contains("--decision-log"), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_are_required_unless_auth_is_off_explicitly() {
        let e = parse(&["--auth", "required"]).unwrap_err();
        assert!(e.contains("--api-keys") && e.contains("--auth off"), "{e}");
        assert_eq!(
            parse(&["--api-keys", "/etc/keys.yaml"]).unwrap().auth,
            AuthConfig::Keys("/etc/keys.yaml".into())
        );
        assert_eq!(parse(&[]).unwrap().auth, AuthConfig::Off);
        let e = parse(&["--auth", "off", "--api-keys", "k.yaml"]).unwrap_err();
        assert!(e.contains("--api-keys") && e.contains("--auth off"), "{e}");
        let e = parse(&["--auth", "maybe"]).unwrap_err();
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn server_limits_and_drain_flags() {
        let d = parse(&[]).unwrap();
        assert_eq!(d.http_limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(d.http_limits.body_read_timeout, Duration::from_secs(60));
        assert_eq!(d.http_limits.max_connections, 8192);
        assert_eq!(d.drain_timeout, Duration::from_secs(30));
        let c = parse(&[
            "--header-read-timeout",
            "500ms",
            "--body-read-timeout",
            "2m",
            "--max-connections",
            "10",
            "--drain-timeout",
            "0s",
        ])
        .unwrap();
        assert_eq!(
            c.http_limits.header_read_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(c.http_limits.body_read_timeout, Duration::from_secs(120));
        assert_eq!(c.http_limits.max_connections, 10);
        assert_eq!(c.drain_timeout, Duration::ZERO);
        for (flag, bad) in [
            ("--header-read-timeout", "0s"),
            ("--header-read-timeout", "soon"),
            ("--body-read-timeout", "0"),
            ("--body-read-timeout", "3d"),
            ("--max-connections", "0"),
            ("--max-connections", "1000001"),
            ("--max-connections", "lots"),
            ("--drain-timeout", "forever"),
        ] {
            let e = parse(&[flag, bad]).unwrap_err();
            assert!(e.contains(flag) && e.contains(bad), "{flag} {bad}: {e}");
        }
    }

    #[test]
    fn keep_finished_window_is_a_duration() {
        let default = Duration::from_millis(kvroute_routing::queue::DEFAULT_KEEP_FINISHED_MS);
        assert_eq!(parse(&[]).unwrap().keep_finished_for, default);
        let cfg = parse(&["--keep-finished-for", "250ms"]).unwrap();
        assert_eq!(cfg.keep_finished_for, Duration::from_millis(250));
        let off = parse(&["--keep-finished-for", "0"]).unwrap();
        assert_eq!(off.keep_finished_for, Duration::ZERO);
        for bad in ["soon", ""] {
            let e = parse(&["--keep-finished-for", bad]).unwrap_err();
            assert!(e.contains("--keep-finished-for"), "{bad}: {e}");
        }
        assert!(parse(&["--keep-finished-for", "-1s"]).is_err());
    }

    #[test]
    fn cache_first_window_is_a_duration() {
        assert_eq!(parse(&[]).unwrap().policy.cache_first_ms, 30_000);
        let cfg = parse(&["--cache-first-for", "250ms"]).unwrap();
        assert_eq!(cfg.policy.cache_first_ms, 250);
        assert_eq!(
            parse(&["--cache-first-for", "0"])
                .unwrap()
                .policy
                .cache_first_ms,
            0
        );
        assert!(parse(&["--cache-first-for", "soon"]).is_err());
        assert!(parse(&["--cache-first-for", "-1s"]).is_err());
    }

    #[test]
    fn slo_targets_are_durations_off_by_default() {
        let d = parse(&[]).unwrap().policy;
        assert_eq!((d.tpot_slo_s, d.ttft_slo_ms), (0.0, 0));
        let p = parse(&["--slo-tpot", "100ms", "--slo-ttft", "2s"])
            .unwrap()
            .policy;
        assert!((p.tpot_slo_s - 0.1).abs() < 1e-12, "{}", p.tpot_slo_s);
        assert_eq!(p.ttft_slo_ms, 2_000);
        for (flag, bad) in [
            ("--slo-tpot", "fast"),
            ("--slo-tpot", "-100ms"),
            ("--slo-ttft", "soon"),
            ("--slo-ttft", "1e99s"),
        ] {
            assert!(parse(&[flag, bad]).is_err(), "{flag} {bad}");
        }
    }

    #[test]
    fn model_settings_from_spec_override_only_what_the_spec_sets() {
        use kvroute_crd::{
            AdmissionSpec, RoutingPolicy, RoutingSpec, RoutingWeights, ScorerName, WeightedScorer,
        };
        let cfg = GatewayConfig::for_agents("127.0.0.1:0".parse().unwrap(), Vec::new());
        let defaults = cfg.model_defaults();
        assert_eq!(
            ModelSettings::from_spec(&defaults, None, None),
            (defaults, Vec::new())
        );
        let routing = RoutingSpec {
            policy: RoutingPolicy::RoundRobin,
            weights: Some(RoutingWeights {
                prefix: 0.5,
                headroom: f64::NAN,
                queue: -1.0,
            }),
            scorers: Some(vec![
                WeightedScorer {
                    name: ScorerName::Prefix,
                    weight: 3.0,
                },
                WeightedScorer {
                    name: ScorerName::Requests,
                    weight: f64::INFINITY,
                },
            ]),
            slo: None,
        };
        let admission = AdmissionSpec {
            max_queue: Some(0),
            queue_timeout: Some("250ms".into()),
            reserve_output: Some(64),
        };
        let (s, warnings) = ModelSettings::from_spec(&defaults, Some(&routing), Some(&admission));
        assert_eq!(s.policy.kind, PolicyKind::RoundRobin);
        assert_eq!(s.policy.weights.prefix, 0.5);
        // Bad weights keep the flags' values, and each is named.
        assert_eq!(s.policy.weights.headroom, defaults.policy.weights.headroom);
        assert_eq!(s.policy.weights.queue, defaults.policy.weights.queue);
        // The scorer list replaces the preset's; the one with a bad weight is left out, named.
        assert_eq!(
            s.policy.scorers.map(|l| l.as_slice().to_vec()),
            Some(vec![(ScorerId::PREFIX, 3.0)])
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].contains("spec.routing.scorers requests"),
            "{warnings:?}"
        );
        assert!(
            warnings[2].contains("spec.routing.weights.queue -1"),
            "{warnings:?}"
        );
        assert_eq!(s.max_queue, 0);
        assert_eq!(s.queue_timeout, Duration::from_millis(250));
        assert_eq!(s.default_output_tokens, Some(64));
        assert_eq!(s.policy.stale_after_ms, defaults.policy.stale_after_ms);
        // Only the timeout set: everything else stays the flags'.
        let only = AdmissionSpec {
            queue_timeout: Some("soon".into()),
            ..AdmissionSpec::default()
        };
        let (s, warnings) = ModelSettings::from_spec(&defaults, None, Some(&only));
        assert_eq!(s, defaults);
        assert!(warnings[0].contains("\"soon\""), "{warnings:?}");
    }

    #[test]
    fn a_models_slo_targets_replace_the_flags_and_bad_ones_are_named() {
        use kvroute_crd::{RoutingSpec, SloSpec};
        let cfg = GatewayConfig::for_agents("127.0.0.1:0".parse().unwrap(), Vec::new());
        let defaults = cfg.model_defaults();
        let with = |ttft: Option<&str>, tpot: Option<&str>| RoutingSpec {
            slo: Some(SloSpec {
                ttft: ttft.map(Into::into),
                tpot: tpot.map(Into::into),
            }),
            ..RoutingSpec::default()
        };
        let (s, warnings) =
            ModelSettings::from_spec(&defaults, Some(&with(Some("2s"), Some("100ms"))), None);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(s.policy.ttft_slo_ms, 2_000);
        assert!((s.policy.tpot_slo_s - 0.1).abs() < 1e-12);
        // Only one set: the other stays the gateway's.
        let (s, _) = ModelSettings::from_spec(&defaults, Some(&with(None, Some("50ms"))), None);
        assert_eq!(s.policy.ttft_slo_ms, defaults.policy.ttft_slo_ms);
        assert!((s.policy.tpot_slo_s - 0.05).abs() < 1e-12);
        // A bad one (bypassing the schema) leaves both at the gateway's, named.
        for (ttft, tpot, bad) in [
            (Some("fast"), Some("100ms"), "ttft \"fast\""),
            (Some("2s"), Some("100"), "tpot \"100\""),
            (Some("-2s"), None, "ttft \"-2s\""),
        ] {
            let (s, warnings) = ModelSettings::from_spec(&defaults, Some(&with(ttft, tpot)), None);
            assert_eq!(s.policy.ttft_slo_ms, defaults.policy.ttft_slo_ms);
            assert_eq!(s.policy.tpot_slo_s, defaults.policy.tpot_slo_s);
            assert!(
                warnings.len() == 1 && warnings[0].contains(bad),
                "{bad}: {warnings:?}"
            );
            use kvroute_crd::fixtures::ModelDeploymentFixture;
            let mut md = kvroute_crd::ModelDeployment::test();
            md.spec.routing = Some(with(ttft, tpot));
            assert!(md.spec.validate().is_err(), "{bad}");
        }
    }
}
