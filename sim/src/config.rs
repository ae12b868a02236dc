//! The simulation's configuration file (JSON), checked once before anything runs.

use std::path::Path;

use serde::Deserialize;

use kvroute_routing::PolicyKind;

use crate::step::{Gpu, Measured, ModelShape, Roofline, StepModel};
use crate::workload::{parse_trace, RequestSpec, WorkloadConfig};

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest trace or bench file read.
pub const MAX_DATA_BYTES: u64 = 1 << 30;

/// The simulated agents (all alike).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    pub count: u32,
    /// A GPU preset (`h100`, `h200`) or its figures; with `model`. Or `cpu_bench`.
    #[serde(default)]
    pub gpu: Option<GpuChoice>,
    /// A model preset (`llama-3.1-8b`, `llama-3.1-70b-fp8`) or its figures.
    #[serde(default)]
    pub model: Option<ModelChoice>,
    /// A file of `kvroute-agent bench --json` lines (relative to the configuration): CPU agents
    /// timed as measured. Needs `kv_blocks`.
    #[serde(default)]
    pub cpu_bench: Option<String>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// KV blocks per agent; default for a GPU: what `memory_fraction` of its memory holds once
    /// the weights are loaded.
    #[serde(default)]
    pub kv_blocks: Option<u64>,
    #[serde(default = "default_memory_fraction")]
    pub memory_fraction: f64,
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: u32,
    #[serde(default = "default_max_batched")]
    pub max_num_batched_tokens: u32,
    #[serde(default = "default_max_model_len")]
    pub max_model_len: u32,
    /// Start a request only when its whole future fits (kvroute-agent's default); false: vLLM's
    /// way (start when the prompt fits, preempt when the pool runs out).
    #[serde(default = "yes")]
    pub admit_whole_future: bool,
    #[serde(default = "default_compute_eff")]
    pub compute_efficiency: f64,
    #[serde(default = "default_memory_eff")]
    pub memory_efficiency: f64,
    #[serde(default = "default_overhead_ms")]
    pub step_overhead_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum GpuChoice {
    Preset(String),
    Spec(Gpu),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ModelChoice {
    Preset(String),
    Spec(ModelShape),
}

fn default_block_size() -> u32 {
    16
}
fn default_memory_fraction() -> f64 {
    0.9
}
fn default_max_num_seqs() -> u32 {
    256
}
fn default_max_batched() -> u32 {
    8192
}
fn default_max_model_len() -> u32 {
    32_768
}
fn yes() -> bool {
    true
}
fn default_compute_eff() -> f64 {
    0.5
}
fn default_memory_eff() -> f64 {
    0.8
}
fn default_overhead_ms() -> f64 {
    2.0
}

/// The gateways in front of the agents.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaysConfig {
    /// Gateway replicas; requests are spread over them in turn, each keeps its own view.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// An agent reports at most this often (and at least once a second while idle).
    #[serde(default = "default_report_ms")]
    pub report_interval_ms: f64,
    /// A report reaches a gateway this long after it is sent.
    #[serde(default = "default_report_delay_ms")]
    pub report_delay_ms: f64,
    /// A dispatched request reaches its agent this long after the decision.
    #[serde(default = "default_network_ms")]
    pub network_delay_ms: f64,
    /// A gateway looks at its queue at most this often: wake-ups (arrivals, reports) in
    /// between wait for the interval's end.
    #[serde(default = "default_pump_ms")]
    pub pump_interval_ms: f64,
    /// Requests a gateway queues; one more is refused (429).
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// A queued request is refused (429) after waiting this long.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_s: f64,
}

fn default_replicas() -> u32 {
    1
}
fn default_report_ms() -> f64 {
    20.0
}
fn default_report_delay_ms() -> f64 {
    1.0
}
fn default_network_ms() -> f64 {
    0.5
}
fn default_pump_ms() -> f64 {
    2.0
}
fn default_max_queue() -> u32 {
    10_000
}
fn default_queue_timeout() -> f64 {
    60.0
}

impl Default for GatewaysConfig {
    fn default() -> Self {
        GatewaysConfig {
            replicas: default_replicas(),
            report_interval_ms: default_report_ms(),
            report_delay_ms: default_report_delay_ms(),
            network_delay_ms: default_network_ms(),
            pump_interval_ms: default_pump_ms(),
            max_queue: default_max_queue(),
            queue_timeout_s: default_queue_timeout(),
        }
    }
}

/// The service-level objectives goodput counts against.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            ttft_s: 2.0,
            tpot_s: 0.1,
        }
    }
}

/// A whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub agents: AgentsConfig,
    #[serde(default)]
    pub gateways: GatewaysConfig,
    /// Generated requests; or `trace`.
    #[serde(default)]
    pub workload: Option<WorkloadConfig>,
    /// A CSV trace to replay (relative to the configuration): see [`parse_trace`].
    #[serde(default)]
    pub trace: Option<String>,
    /// Policies to compare, each run on the same workload: kv, kv-score, round-robin,
    /// least-requests, gpu-utilization.
    pub policies: Vec<String>,
    #[serde(default)]
    pub slo: Slo,
    /// KV utilisation is sampled this often (simulated seconds).
    #[serde(default = "default_sample_s")]
    pub sample_s: f64,
    /// The `kv` policy's cost weights (as `kvroute gateway --cost-*`); unset ones keep the
    /// gateway's defaults.
    #[serde(default)]
    pub kv_cost: KvCost,
    /// Scorers in place of the `kv` policy's `cost` scorer, as `[name, weight]` pairs (as
    /// `kvroute gateway --scorer NAME=WEIGHT`): `kv` keeps its room rule, holds and in-flight
    /// prefixes. Unset: `cost`.
    #[serde(default)]
    pub kv_scorers: Option<Vec<(String, f64)>>,
}

/// The `kv` policy's cost weights, each optional.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCost {
    /// As `kvroute gateway --slo-tpot` (seconds; unset or 0: none).
    pub tpot_slo_s: Option<f64>,
    /// As `kvroute gateway --slo-ttft` (seconds; unset or 0: none).
    pub ttft_slo_s: Option<f64>,
    /// As `kvroute gateway --cache-first-for` (seconds; unset: the gateway's default, 0: off).
    pub cache_first_s: Option<f64>,
    /// As `kvroute gateway --keep-finished-for` (seconds; unset: the gateway's default, 0: off).
    pub keep_finished_s: Option<f64>,
    pub wait: Option<f64>,
    pub prefill: Option<f64>,
    pub duplicate: Option<f64>,
    pub decode: Option<f64>,
    pub stick: Option<f64>,
    pub stall: Option<f64>,
    pub late: Option<f64>,
}

impl KvCost {
    /// The gateway's defaults with the weights given here.
    pub fn weights(&self) -> kvroute_routing::cost::CostWeights {
        let d = kvroute_routing::cost::CostWeights::default();
        kvroute_routing::cost::CostWeights {
            wait: self.wait.unwrap_or(d.wait),
            prefill: self.prefill.unwrap_or(d.prefill),
            duplicate: self.duplicate.unwrap_or(d.duplicate),
            decode: self.decode.unwrap_or(d.decode),
            stick: self.stick.unwrap_or(d.stick),
            stall: self.stall.unwrap_or(d.stall),
            late: self.late.unwrap_or(d.late),
        }
    }
}

fn default_seed() -> u64 {
    1
}
fn default_sample_s() -> f64 {
    1.0
}

/// A configuration checked and resolved: the step model built, the trace read.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub cfg: SimConfig,
    pub step: StepModel,
    pub kv_blocks: u64,
    pub policies: Vec<PolicyKind>,
    /// `kv_scorers`, checked.
    pub kv_scorers: Option<kvroute_routing::ScorerList>,
    /// The trace's requests (when `trace` is set).
    pub trace: Option<Vec<RequestSpec>>,
}

fn read_limited(path: &Path, limit: u64) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > limit {
        return Err(format!(
            "{}: {} bytes, more than the {limit} read",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl SimConfig {
    /// Parses a configuration's JSON text.
    pub fn parse(text: &str) -> Result<SimConfig, String> {
        serde_json::from_str(text).map_err(|e| format!("configuration: {e}"))
    }

    /// Reads and resolves the file at `path` (files it names are relative to it).
    pub fn load(path: &Path) -> Result<Resolved, String> {
        let text = read_limited(path, MAX_CONFIG_BYTES)?;
        let cfg = SimConfig::parse(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base)
    }

    /// Checks every value and builds what the run needs; `base` is where relative paths start.
    pub fn resolve(self, base: &Path) -> Result<Resolved, String> {
        let a = &self.agents;
        if a.count == 0 || a.count > 100_000 {
            return Err(format!(
                "agents.count must be in 1..=100,000 (got {})",
                a.count
            ));
        }
        if !(1..=1024).contains(&a.block_size) {
            return Err(format!(
                "agents.block_size must be in 1..=1024 (got {})",
                a.block_size
            ));
        }
        if a.max_num_seqs == 0 || a.max_num_batched_tokens == 0 || a.max_model_len < 2 {
            return Err(
                "agents.max_num_seqs and max_num_batched_tokens must be ≥ 1 and max_model_len ≥ 2"
                    .into(),
            );
        }
        let frac = |v: f64, what: &str| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(v)
            } else {
                Err(format!("agents.{what} must be in (0, 1] (got {v})"))
            }
        };
        frac(a.memory_fraction, "memory_fraction")?;
        frac(a.compute_efficiency, "compute_efficiency")?;
        frac(a.memory_efficiency, "memory_efficiency")?;
        if !(a.step_overhead_ms.is_finite() && (0.0..=10_000.0).contains(&a.step_overhead_ms)) {
            return Err(format!(
                "agents.step_overhead_ms must be in 0..=10000 (got {})",
                a.step_overhead_ms
            ));
        }
        let (step, default_blocks) = match (&a.gpu, &a.cpu_bench) {
            (Some(_), Some(_)) => {
                return Err("agents: give either gpu (with model) or cpu_bench, not both".into())
            }
            (None, None) => return Err("agents: give gpu (with model) or cpu_bench".into()),
            (Some(g), None) => {
                let gpu = match g {
                    GpuChoice::Preset(name) => Gpu::preset(name).ok_or_else(|| {
                        format!("agents.gpu: unknown preset {name:?} (h100, h200)")
                    })?,
                    GpuChoice::Spec(s) => *s,
                };
                let pos = |v: f64| v.is_finite() && v > 0.0;
                if !(pos(gpu.hbm_bytes_per_s) && pos(gpu.flops_per_s) && pos(gpu.memory_bytes)) {
                    return Err("agents.gpu: every figure must be finite and > 0".into());
                }
                let model = match &a.model {
                    None => return Err("agents.model is needed with agents.gpu".into()),
                    Some(ModelChoice::Preset(name)) => ModelShape::preset(name).ok_or_else(|| {
                        format!(
                            "agents.model: unknown preset {name:?} (llama-3.1-8b, llama-3.1-70b-fp8)"
                        )
                    })?,
                    Some(ModelChoice::Spec(m)) => *m,
                };
                if !(pos(model.params)
                    && pos(model.bytes_per_param)
                    && pos(model.kv_bytes_per_elem)
                    && model.layers > 0
                    && model.q_dim > 0
                    && model.kv_heads > 0
                    && model.head_dim > 0)
                {
                    return Err("agents.model: every figure must be finite and > 0".into());
                }
                let r = Roofline {
                    gpu,
                    model,
                    compute_efficiency: a.compute_efficiency,
                    memory_efficiency: a.memory_efficiency,
                    overhead_s: a.step_overhead_ms / 1e3,
                };
                let blocks = r.kv_blocks(a.memory_fraction, a.block_size);
                (StepModel::Roofline(r), Some(blocks))
            }
            (None, Some(file)) => {
                if a.model.is_some() {
                    return Err(
                        "agents.model is for gpu agents; cpu_bench times the model it measured"
                            .into(),
                    );
                }
                let text = read_limited(&base.join(file), MAX_DATA_BYTES)?;
                let m = Measured::from_bench_lines(&text)
                    .map_err(|e| format!("agents.cpu_bench {file}: {e}"))?;
                (StepModel::Measured(m), None)
            }
        };
        let kv_blocks = match (a.kv_blocks, default_blocks) {
            (Some(b), _) => b,
            (None, Some(b)) => b,
            (None, None) => return Err("agents.kv_blocks is needed with cpu_bench".into()),
        };
        if kv_blocks == 0 || kv_blocks > 10_000_000 {
            return Err(format!(
                "agents: {kv_blocks} KV blocks per agent (need 1..=10,000,000; the model may not fit the GPU)"
            ));
        }
        let g = &self.gateways;
        if g.replicas == 0 || g.replicas > 64 {
            return Err(format!(
                "gateways.replicas must be in 1..=64 (got {})",
                g.replicas
            ));
        }
        for (v, what, lo) in [
            (g.report_interval_ms, "report_interval_ms", 0.1),
            (g.report_delay_ms, "report_delay_ms", 0.0),
            (g.network_delay_ms, "network_delay_ms", 0.0),
            (g.pump_interval_ms, "pump_interval_ms", 0.0),
            (g.queue_timeout_s, "queue_timeout_s", 0.001),
        ] {
            if !(v.is_finite() && v >= lo && v <= 3_600_000.0) {
                return Err(format!(
                    "gateways.{what} must be in {lo}..=3600000 (got {v})"
                ));
            }
        }
        if g.max_queue == 0 {
            return Err("gateways.max_queue must be ≥ 1".into());
        }
        if !(self.slo.ttft_s.is_finite()
            && self.slo.ttft_s > 0.0
            && self.slo.tpot_s.is_finite()
            && self.slo.tpot_s > 0.0)
        {
            return Err("slo.ttft_s and slo.tpot_s must be finite and > 0".into());
        }
        if !(self.sample_s.is_finite() && self.sample_s >= 0.001) {
            return Err(format!("sample_s must be ≥ 0.001 (got {})", self.sample_s));
        }
        let w = self.kv_cost.weights();
        for (v, what) in [
            (w.wait, "wait"),
            (w.prefill, "prefill"),
            (w.duplicate, "duplicate"),
            (w.decode, "decode"),
            (w.stick, "stick"),
            (w.stall, "stall"),
            (w.late, "late"),
        ] {
            if !(v.is_finite() && (0.0..=1000.0).contains(&v)) {
                return Err(format!("kv_cost.{what} must be in 0..=1000 (got {v})"));
            }
        }
        for (t, what) in [
            (self.kv_cost.tpot_slo_s, "tpot_slo_s"),
            (self.kv_cost.ttft_slo_s, "ttft_slo_s"),
            (self.kv_cost.cache_first_s, "cache_first_s"),
            (self.kv_cost.keep_finished_s, "keep_finished_s"),
        ] {
            if let Some(t) = t {
                if !(t.is_finite() && (0.0..=3600.0).contains(&t)) {
                    return Err(format!(
                        "kv_cost.{what} must be in 0..=3600 seconds (got {t})"
                    ));
                }
            }
        }
        let kv_scorers = match &self.kv_scorers {
            None => None,
            Some(list) => {
                let mut scorers = kvroute_routing::ScorerList::default();
                for (name, weight) in list {
                    let id = kvroute_routing::ScorerId::builtin(name).ok_or_else(|| {
                        format!(
                            "kv_scorers: unknown scorer {name:?} (expected one of {})",
                            kvroute_routing::ScorerId::BUILTIN.join(", ")
                        )
                    })?;
                    if !(weight.is_finite() && (0.0..=1000.0).contains(weight)) {
                        return Err(format!(
                            "kv_scorers: weight of {name} must be in 0..=1000 (got {weight})"
                        ));
                    }
                    scorers
                        .push(id, *weight)
                        .map_err(|e| format!("kv_scorers: {e}"))?;
                }
                if scorers.is_empty() {
                    return Err("kv_scorers: name at least one scorer, or leave it out".into());
                }
                Some(scorers)
            }
        };
        if self.policies.is_empty() {
            return Err("policies: name at least one (kv, kv-score, round-robin, least-requests, gpu-utilization, cache-aware, llm-d)".into());
        }
        let policies = self
            .policies
            .iter()
            .map(|p| {
                p.parse::<PolicyKind>()
                    .map_err(|e| format!("policies: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let trace = match (&self.workload, &self.trace) {
            (Some(w), None) => {
                w.validate()?;
                None
            }
            (None, Some(file)) => {
                let text = read_limited(&base.join(file), MAX_DATA_BYTES)?;
                Some(parse_trace(&text).map_err(|e| format!("trace {file}: {e}"))?)
            }
            _ => return Err("give exactly one of workload and trace".into()),
        };
        Ok(Resolved {
            cfg: self,
            step,
            kv_blocks,
            policies,
            kv_scorers,
            trace,
        })
    }
}
