//! The gateway's Prometheus metrics (`kvroute_gateway_*`), rendered in the text exposition format
//! ([`kvroute_contract::prom`]).
//!
//! Owns counters and histograms only; per-agent gauges are read from the router when rendered.
//! Never blocks on I/O; every update is a short lock or an atomic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kvroute_contract::prom::{counter, gauge, header, sample, Histogram};

use super::types::AgentSnapshot;

/// Latency buckets in seconds (upper bounds).
const DECISION_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2,
];
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The gateway's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    policy: &'static str,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Times to first token observed since the last [`Metrics::take_recent_ttfts`] (at most
    /// [`RECENT_TTFTS`]).
    recent_ttfts: Mutex<Vec<f64>>,
    /// (tenant, status) → requests.
    tenants: Mutex<BTreeMap<(String, u16), u64>>,
    /// tenant → tokens reserved by its admitted requests.
    tenant_tokens: Mutex<BTreeMap<String, u64>>,
    decision: Histogram,
    queue_wait: Histogram,
    /// The `kv` policy's predicted time to first token, what was observed (dispatch to the
    /// agent's first body byte) and the absolute difference.
    ttft_predicted: Histogram,
    ttft_observed: Histogram,
    ttft_error: Histogram,
    held: AtomicU64,
    prefix_holds: AtomicU64,
    prefix_hold_blocks: AtomicU64,
    queue_depth: AtomicU64,
    retries: AtomicU64,
    no_room: AtomicU64,
    upstream_failures: AtomicU64,
    midstream_failures: AtomicU64,
    rejected_queue_full: AtomicU64,
    rejected_timeout: AtomicU64,
}

impl Metrics {
    pub fn new(policy: &'static str) -> Self {
        Self {
            policy,
            requests: Mutex::new(BTreeMap::new()),
            tenants: Mutex::new(BTreeMap::new()),
            recent_ttfts: Mutex::new(Vec::new()),
            tenant_tokens: Mutex::new(BTreeMap::new()),
            decision: Histogram::new(DECISION_BUCKETS),
            queue_wait: Histogram::new(WAIT_BUCKETS),
            ttft_predicted: Histogram::new(WAIT_BUCKETS),
            ttft_observed: Histogram::new(WAIT_BUCKETS),
            ttft_error: Histogram::new(WAIT_BUCKETS),
            held: AtomicU64::new(0),
            prefix_holds: AtomicU64::new(0),
            prefix_hold_blocks: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            no_room: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            midstream_failures: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
            rejected_timeout: AtomicU64::new(0),
        }
    }

    /// Counts an answered request. The model label comes from the client's body, so it is
    /// bounded: at most [`MAX_MODEL_LABELS`] distinct names (then `other`), each at most
    /// [`MAX_LABEL_LEN`] bytes.
    pub fn count_request(&self, model: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let label = bounded_label(m.keys().map(|(k, _)| k.as_str()), model);
        *m.entry((label, status)).or_insert(0) += 1;
    }

    /// The times to first token observed since the last call (for the dashboard's history).
    pub fn take_recent_ttfts(&self) -> Vec<f64> {
        std::mem::take(&mut *self.recent_ttfts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Requests answered so far: (2xx, 429, any other status).
    pub fn status_totals(&self) -> (u64, u64, u64) {
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .fold((0, 0, 0), |(ok, r, e), ((_, status), n)| match status {
                200..=299 => (ok + n, r, e),
                429 => (ok, r + n, e),
                _ => (ok, r, e + n),
            })
    }

    /// Counts a request of `tenant` answered with `status`. Tenants are bounded like model
    /// names.
    pub fn count_tenant(&self, tenant: &str, status: u16) {
        let mut m = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let label = bounded_label(m.keys().map(|(k, _)| k.as_str()), tenant);
        *m.entry((label, status)).or_insert(0) += 1;
    }

    /// Adds the tokens an admitted request of `tenant` reserved (prompt + output).
    pub fn add_tenant_tokens(&self, tenant: &str, tokens: u64) {
        let mut m = self.tenant_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let label = bounded_label(m.keys().map(String::as_str), tenant);
        *m.entry(label).or_insert(0) += tokens;
    }

    pub fn observe_decision(&self, d: Duration) {
        self.decision.observe_duration(d);
    }

    pub fn observe_queue_wait(&self, d: Duration) {
        self.queue_wait.observe_duration(d);
    }

    /// A dispatched request's first body byte arrived `observed` after it was sent; the policy
    /// had predicted `predicted_s` seconds.
    pub fn observe_ttft(&self, predicted_s: f64, observed: Duration) {
        let obs = observed.as_secs_f64();
        {
            let mut r = self.recent_ttfts.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() < RECENT_TTFTS {
                r.push(obs);
            }
        }
        self.ttft_predicted.observe(predicted_s);
        self.ttft_observed.observe(obs);
        self.ttft_error.observe((obs - predicted_s).abs());
    }

    /// A queued request chose to wait for one agent (the `kv` policy's locality) this pump.
    pub fn count_held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    /// An agent kept `blocks` cached blocks of a waiting request's prefix from eviction.
    pub fn count_prefix_hold(&self, blocks: u64) {
        self.prefix_holds.fetch_add(1, Ordering::Relaxed);
        self.prefix_hold_blocks.fetch_add(blocks, Ordering::Relaxed);
    }

    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    /// An agent refused a request for lack of room (it is routed again).
    pub fn count_no_room(&self) {
        self.no_room.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_upstream_failure(&self) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_midstream_failure(&self) {
        self.midstream_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_queue_full(&self) {
        self.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_queue_timeout(&self) {
        self.rejected_timeout.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with per-agent gauges from `agents`.
    pub fn render(&self, agents: &[AgentSnapshot]) -> String {
        let mut out = String::new();
        let p = self.policy;
        header(
            &mut out,
            "kvroute_gateway_requests_total",
            "Requests answered, by model, policy and HTTP status.",
            "counter",
        );
        for ((model, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let status = status.to_string();
            sample(
                &mut out,
                "kvroute_gateway_requests_total",
                &[("model", model), ("policy", p), ("status", &status)],
                *n as f64,
            );
        }
        {
            let t = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            header(
                &mut out,
                "kvroute_gateway_tenant_requests_total",
                "Requests answered, by tenant (the API key's, or the header's with --auth off) and HTTP status.",
                "counter",
            );
            for ((tenant, status), n) in t.iter() {
                let status = status.to_string();
                sample(
                    &mut out,
                    "kvroute_gateway_tenant_requests_total",
                    &[("tenant", tenant), ("status", &status)],
                    *n as f64,
                );
            }
            header(
                &mut out,
                "kvroute_gateway_tenant_tokens_total",
                "Tokens reserved (prompt + output) by a tenant's admitted requests.",
                "counter",
            );
            let tokens = self.tenant_tokens.lock().unwrap_or_else(|e| e.into_inner());
            for (tenant, k) in tokens.iter() {
                sample(
                    &mut out,
                    "kvroute_gateway_tenant_tokens_total",
                    &[("tenant", tenant)],
                    *k as f64,
                );
            }
        }
        gauge(
            &mut out,
            "kvroute_gateway_queue_depth",
            "Requests waiting in the admission queue.",
            &[],
            self.queue_depth.load(Ordering::Relaxed) as f64,
        );
        for (name, help, h) in [
            (
                "kvroute_gateway_queue_wait_seconds",
                "Time requests waited for admission.",
                &self.queue_wait,
            ),
            (
                "kvroute_gateway_routing_decision_seconds",
                "Time the policy took per decision.",
                &self.decision,
            ),
            (
                "kvroute_gateway_ttft_predicted_seconds",
                "Time to first token the kv policy predicted for each dispatched request.",
                &self.ttft_predicted,
            ),
            (
                "kvroute_gateway_ttft_observed_seconds",
                "Time from dispatch to the agent's first response body byte, for the same requests.",
                &self.ttft_observed,
            ),
            (
                "kvroute_gateway_ttft_prediction_error_seconds",
                "Absolute difference between predicted and observed time to first token.",
                &self.ttft_error,
            ),
        ] {
            h.write(&mut out, name, help, &[]);
        }
        for (name, help, v) in [
            (
                "kvroute_gateway_held_total",
                "Times a queued request chose to wait for the agent that caches its prefix.",
                &self.held,
            ),
            (
                "kvroute_gateway_prefix_holds_total",
                "Prefix holds placed on agents for requests waiting there (their cached prefix kept from eviction).",
                &self.prefix_holds,
            ),
            (
                "kvroute_gateway_prefix_hold_blocks_total",
                "Cached blocks kept from eviction by prefix holds.",
                &self.prefix_hold_blocks,
            ),
            (
                "kvroute_gateway_retries_total",
                "Requests re-routed after a connection failure before the first byte.",
                &self.retries,
            ),
            (
                "kvroute_gateway_no_room_total",
                "Requests an agent refused for lack of KV room (503 x-kvroute-no-room), routed again.",
                &self.no_room,
            ),
            (
                "kvroute_gateway_upstream_failures_total",
                "Upstream connections that failed before a response.",
                &self.upstream_failures,
            ),
            (
                "kvroute_gateway_midstream_failures_total",
                "Responses cut off by an upstream failure after the first byte.",
                &self.midstream_failures,
            ),
            (
                "kvroute_gateway_rejected_queue_full_total",
                "Requests answered 429 because the admission queue was full.",
                &self.rejected_queue_full,
            ),
            (
                "kvroute_gateway_rejected_deadline_total",
                "Requests answered 429 because their queue deadline passed.",
                &self.rejected_timeout,
            ),
        ] {
            counter(&mut out, name, help, &[], v.load(Ordering::Relaxed) as f64);
        }
        for (name, help, kind, f) in [
            (
                "kvroute_gateway_agent_free_blocks",
                "Free KV blocks in the agent's last report.",
                "gauge",
                (|a: &AgentSnapshot| a.free_blocks) as fn(&AgentSnapshot) -> u64,
            ),
            (
                "kvroute_gateway_agent_total_blocks",
                "KV blocks in the agent's pool.",
                "gauge",
                |a| a.total_blocks,
            ),
            (
                "kvroute_gateway_agent_host_blocks",
                "Slots of the agent's KV host tier (0: none).",
                "gauge",
                |a| a.host_total_blocks,
            ),
            (
                "kvroute_gateway_agent_host_blocks_used",
                "Slots of the agent's KV host tier holding an evicted prefix block.",
                "gauge",
                |a| a.host_used_blocks,
            ),
            (
                "kvroute_gateway_agent_reserved_blocks",
                "KV blocks this gateway reserved on the agent, not yet covered by a report.",
                "gauge",
                |a| a.reserved_blocks,
            ),
            (
                "kvroute_gateway_agent_eligible",
                "1 when the agent is connected and its last report is fresh.",
                "gauge",
                |a| u64::from(a.eligible),
            ),
            (
                "kvroute_gateway_agent_dispatches_acked_total",
                "Reservations on the agent retired by its acknowledgement of their dispatch.",
                "counter",
                |a| a.dispatches_acked,
            ),
            (
                "kvroute_gateway_agent_over_admissions_total",
                "Preemptions the agent reported while this gateway had KV blocks reserved on it (room was over-admitted).",
                "counter",
                |a| a.over_admissions,
            ),
            (
                "kvroute_gateway_agent_dispatches_expired_total",
                "Reservations on the agent retired because their dispatch was never acknowledged.",
                "counter",
                |a| a.dispatches_expired,
            ),
        ] {
            header(&mut out, name, help, kind);
            for a in agents {
                sample(
                    &mut out,
                    name,
                    &[("agent", &a.agent_id), ("endpoint", &a.endpoint)],
                    f(a) as f64,
                );
            }
        }
        out
    }
}

/// Most times to first token kept between two dashboard samples.
pub const RECENT_TTFTS: usize = 4096;

/// Most distinct model labels on request counters (client-chosen; beyond: [`OTHER_LABEL`]).
pub const MAX_MODEL_LABELS: usize = 64;

/// Longest model label kept (longer names are cut).
pub const MAX_LABEL_LEN: usize = 128;

/// The label of requests whose model name came after the first [`MAX_MODEL_LABELS`].
pub const OTHER_LABEL: &str = "other";

/// The label to count `value` under, given the labels in use: itself (cut to
/// [`MAX_LABEL_LEN`] bytes) if in use or while fewer than [`MAX_MODEL_LABELS`] are, else
/// [`OTHER_LABEL`].
/// `in_use` comes from a `BTreeMap`'s keys: sorted, so equal labels are adjacent. Allocates
/// nothing beyond the returned label.
fn bounded_label<'a>(in_use: impl Iterator<Item = &'a str> + Clone, value: &str) -> String {
    let mut end = value.len().min(MAX_LABEL_LEN);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let value = &value[..end];
    if in_use.clone().any(|k| k == value) {
        return value.to_string();
    }
    let mut distinct = 0usize;
    let mut last = None;
    for k in in_use {
        if last != Some(k) {
            distinct += 1;
            last = Some(k);
        }
    }
    if distinct < MAX_MODEL_LABELS {
        value.to_string()
    } else {
        OTHER_LABEL.to_string()
    }
}

/// Reads one number of a model's KV signal.
type SignalField = fn(&kvroute_routing::autoscale::KvSignal) -> u64;

/// The autoscaling signal per model (`Router::kv_signals`), for an HPA or KEDA to scale on:
/// demand over `blocks_per_replica × target` is the replicas needed.
pub fn render_kv_signals(signals: &[(String, kvroute_routing::autoscale::KvSignal)]) -> String {
    let mut out = String::new();
    let families: [(&str, &str, SignalField); 5] = [
        (
            "kvroute_gateway_model_kv_demand_blocks",
            "KV blocks a model's requests use, have reserved, and wait for beyond the room there is.",
            |s| s.demand_blocks(),
        ),
        (
            "kvroute_gateway_model_kv_shortfall_blocks",
            "KV blocks a model's waiting requests need beyond the room its agents have.",
            |s| s.shortfall_blocks,
        ),
        (
            "kvroute_gateway_model_kv_used_blocks",
            "KV blocks in use on a model's live agents.",
            |s| s.used_blocks,
        ),
        (
            "kvroute_gateway_model_kv_blocks_per_replica",
            "KV blocks in one of a model's agents (the largest).",
            |s| s.blocks_per_replica,
        ),
        (
            "kvroute_gateway_model_waiting_requests",
            "Requests of a model waiting in this gateway for room.",
            |s| s.waiting_requests,
        ),
    ];
    for (name, help, get) in families {
        header(&mut out, name, help, "gauge");
        for (model, s) in signals {
            sample(&mut out, name, &[("model", model)], get(s) as f64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_model_labels_are_bounded() {
        let m = Metrics::new("kv");
        for i in 0..200 {
            m.count_request(&format!("model-{i}"), 404);
        }
        m.count_request("model-3", 200);
        m.count_request(&"x".repeat(10_000), 404);
        let text = m.render(&[]);
        let mut labels: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kvroute_gateway_requests_total{"))
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), MAX_MODEL_LABELS + 1, "{labels:?}");
        assert!(labels.contains(&OTHER_LABEL));
        assert!(labels.contains(&"model-3"), "a known name keeps counting");
        assert!(labels.iter().all(|l| l.len() <= MAX_LABEL_LEN));
        let other: u64 = text
            .lines()
            .filter(|l| l.contains("model=\"other\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(other, 200 - MAX_MODEL_LABELS as u64 + 1);
    }

    #[test]
    fn tenants_are_counted_with_bounded_labels() {
        let m = Metrics::new("kv");
        m.count_tenant("team-a", 200);
        m.count_tenant("team-a", 200);
        m.count_tenant("team-a", 429);
        m.add_tenant_tokens("team-a", 100);
        m.add_tenant_tokens("team-a", 28);
        for i in 0..100 {
            m.count_tenant(&format!("t{i}"), 200);
        }
        let text = m.render(&[]);
        assert!(text
            .contains("kvroute_gateway_tenant_requests_total{tenant=\"team-a\",status=\"200\"} 2"));
        assert!(text
            .contains("kvroute_gateway_tenant_requests_total{tenant=\"team-a\",status=\"429\"} 1"));
        assert!(text.contains("kvroute_gateway_tenant_tokens_total{tenant=\"team-a\"} 128"));
        let tenants = text
            .lines()
            .filter(|l| l.starts_with("kvroute_gateway_tenant_requests_total{"))
            .count();
        assert!(tenants <= MAX_MODEL_LABELS + 2, "{tenants}");
        assert!(text.contains("tenant=\"other\""));
    }
}
