//! The `ModelDeployment` custom resource (`kvroute.dev/v1alpha1`), generated from these types.
//!
//! Owns the wire shape of the CRD: spec, status, printer columns, subresources and the CEL
//! validation rules (`x-kubernetes-validations`) the API server enforces. `kvroute crd` prints
//! [`crd_yaml`]; the committed `deploy/crd.yaml` and `charts/kvroute/crds/modeldeployments.yaml`
//! must equal it (a test fails on drift).
//!
//! Must never do I/O. The controller re-checks what CEL checks ([`ModelSpec::source`],
//! [`ModelDeploymentSpec::validate`]) because objects can predate a CRD upgrade.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of kvroute's resources.
pub const GROUP: &str = "kvroute.dev";
/// Block sizes (tokens per KV block) the engine supports.
pub const BLOCK_SIZES: [u32; 3] = [8, 16, 32];

/// Errors in a `ModelDeployment` spec that the schema cannot express or that slipped past it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("spec.model: exactly one source (url, pvc, hostPath, image) must be set, found {0}")]
    ModelSource(usize),
    #[error("spec.model.name must not be empty")]
    EmptyModelName,
    #[error("spec.engine.blockSize must be one of 8, 16, 32, got {0}")]
    BlockSize(u32),
    #[error("spec.engine.gpuMemoryUtilization must be in (0, 1], got {0}")]
    GpuMemoryUtilization(f64),
    #[error("spec.engine: set at most one of gpuMemoryUtilization and kvMemory")]
    KvSizing,
    #[error("spec.replicas must be >= 0, got {0}")]
    Replicas(i32),
    #[error("spec.admission.queueTimeout {0:?} is not a duration like 500ms, 30s, 2m or 1h")]
    QueueTimeout(String),
    #[error("spec.routing.slo.{field} {value:?} is not a duration like 100ms or 2s")]
    Slo { field: &'static str, value: String },
    #[error("{field} {value:?} is not a relative path inside the volume")]
    VolumePath { field: &'static str, value: String },
    #[error("spec.autoscaling: {0}")]
    Autoscaling(String),
}

impl SpecError {
    /// Short stable label for metrics and condition reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SpecError::ModelSource(_) => "model_source",
            SpecError::EmptyModelName => "model_name",
            SpecError::BlockSize(_) => "block_size",
            SpecError::GpuMemoryUtilization(_) => "gpu_memory_utilization",
            SpecError::KvSizing => "kv_sizing",
            SpecError::Replicas(_) => "replicas",
            SpecError::QueueTimeout(_) => "queue_timeout",
            SpecError::Slo { .. } => "slo",
            SpecError::VolumePath { .. } => "volume_path",
            SpecError::Autoscaling(_) => "autoscaling",
        }
    }
}

/// A model served by a fleet of kvroute agents; the gateway routes to them by KV headroom.
// Each `printcolumn(...)` repeats `type_`/`json_path`; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kvroute.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "mdep",
    category = "kvroute",
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A model served by kvroute agents, routed and admitted by free KV-cache blocks.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.name"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "agents ready"
    ),
    printcolumn(
        name = "KV free",
        type_ = "integer",
        json_path = ".status.kv.freeBlocks",
        description = "free KV blocks over all agents"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model: its served name, file format and where the file comes from.
    pub model: ModelSpec,
    /// Number of agents (ignored when `placement.perNode` is true). Scalable through the scale
    /// subresource (HPA, KEDA).
    #[serde(default = "default_replicas")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= 0", "message": "replicas must be >= 0"}
    ]))]
    pub replicas: i32,
    /// Where agents run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Resources per agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<AgentResources>,
    /// Engine settings passed to each agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSpec>,
    /// How the gateway picks an agent for a request of this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,
    /// How the gateway queues requests when no agent has KV room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<AdmissionSpec>,
    /// Agent container image; the operator's `--agent-image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_image: Option<String>,
    /// KV-aware autoscaling: the operator sets `replicas` from the KV blocks the agents use and
    /// the blocks their waiting requests need (not with `placement.perNode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// KV-aware autoscaling settings (see `controller::autoscale`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest agents.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: u32,
    /// Most agents.
    #[schemars(range(min = 1))]
    pub max_replicas: u32,
    /// Fraction (0, 1] of each agent's KV blocks the demand may fill; default 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kv_utilization: Option<f64>,
    /// Scale up to the highest need seen within this window, like `30s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"))]
    pub scale_up_window: Option<String>,
    /// Scale down only after this long of lower need, like `5m` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"))]
    pub scale_down_window: Option<String>,
}

fn default_min_replicas() -> u32 {
    1
}

impl AutoscalingSpec {
    /// The policy these settings stand for, checked.
    pub fn policy(&self) -> Result<kvroute_routing::autoscale::AutoscalePolicy, SpecError> {
        let d = kvroute_routing::autoscale::AutoscalePolicy::default();
        let window = |field: &str, v: &Option<String>, default| match v {
            None => Ok(default),
            Some(s) if kvroute_contract::units::has_unit(s) => {
                kvroute_contract::units::parse_duration(s)
                    .map_err(|e| SpecError::Autoscaling(format!("{field} {s:?}: {}", e.0)))
            }
            Some(s) => Err(SpecError::Autoscaling(format!(
                "{field} {s:?} is not a duration like 30s or 5m"
            ))),
        };
        let p = kvroute_routing::autoscale::AutoscalePolicy {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_utilization: self.target_kv_utilization.unwrap_or(d.target_utilization),
            up_window: window("scaleUpWindow", &self.scale_up_window, d.up_window)?,
            down_window: window("scaleDownWindow", &self.scale_down_window, d.down_window)?,
        };
        p.validate().map_err(SpecError::Autoscaling)?;
        Ok(p)
    }
}

fn default_replicas() -> i32 {
    1
}

/// The served model and its single source.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.url) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.image) ? 1 : 0) == 1",
    "message": "exactly one model source (url, pvc, hostPath, image) must be set"
}]))]
pub struct ModelSpec {
    /// Served model name, matched against the OpenAI `model` field.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// File format of the weights.
    #[serde(default)]
    pub format: ModelFormat,
    /// Download the model file from this URL into an emptyDir at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Read the model from a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// Read the model from a path on the node (a file for gguf, a directory for safetensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// Read the model from an OCI image mounted as a volume (image volumes, Kubernetes ≥ 1.33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
}

/// Weight file formats the engine loads.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    #[default]
    Gguf,
    Safetensors,
}

/// A model file inside a PersistentVolumeClaim.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim, in the ModelDeployment's namespace.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Path of the model inside the volume.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// A model file inside an OCI image.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference holding the model.
    #[schemars(length(min = 1))]
    pub reference: String,
    /// Path of the model inside the image.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// The one source of a model, as the controller uses it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelSource<'a> {
    Url(&'a str),
    Pvc(&'a PvcSource),
    HostPath(&'a str),
    Image(&'a ImageSource),
}

impl ModelSpec {
    /// The single model source, or an error when none or several are set.
    pub fn source(&self) -> Result<ModelSource<'_>, SpecError> {
        let mut found = Vec::with_capacity(1);
        if let Some(u) = &self.url {
            found.push(ModelSource::Url(u));
        }
        if let Some(p) = &self.pvc {
            found.push(ModelSource::Pvc(p));
        }
        if let Some(h) = &self.host_path {
            found.push(ModelSource::HostPath(h));
        }
        if let Some(i) = &self.image {
            found.push(ModelSource::Image(i));
        }
        match found.as_slice() {
            [one] => Ok(*one),
            other => Err(SpecError::ModelSource(other.len())),
        }
    }
}

/// Where agents run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// One agent on every matching node (a DaemonSet) instead of `replicas` agents.
    #[serde(default)]
    pub per_node: bool,
    /// Nodes the agents may run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// Resources of each agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentResources {
    /// GPUs per agent (`nvidia.com/gpu`); 0 or unset runs on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: Option<u32>,
    /// Memory request and limit per agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// CPU request per agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
}

/// Engine settings each agent gets as flags (through `KVROUTE_*` environment variables).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.gpuMemoryUtilization) && has(self.kvMemory))",
    "message": "set at most one of gpuMemoryUtilization and kvMemory"
}]))]
pub struct EngineSpec {
    /// Tokens per KV block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self in [8, 16, 32]", "message": "blockSize must be 8, 16 or 32"}
    ]))]
    pub block_size: Option<u32>,
    /// Fraction of GPU memory the agent may use (weights + KV cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "double(self) > 0.0 && double(self) <= 1.0",
        "message": "gpuMemoryUtilization must be in (0, 1]"
    }]))]
    pub gpu_memory_utilization: Option<f64>,
    /// Bytes of KV cache, as the agent's `--kv-memory` (for example `2GiB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_memory: Option<String>,
    /// KV cache element type, as the agent's `--kv-cache-dtype`: `f16`, or `q8_0` (8-bit, 1.88×
    /// the blocks in the same memory; CPU agents only so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// Host memory for prefix blocks evicted from the KV cache, as the agent's
    /// `--kv-offload-memory` (for example `8GiB`): they are copied back instead of recomputed.
    /// Count it in the agent's memory request. CPU agents only so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_offload_memory: Option<String>,
    /// Longest request (prompt + output tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_model_len: Option<u32>,
    /// Most sequences batched at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_num_seqs: Option<u32>,
    /// Compute device; `auto` uses CUDA when the agent has a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
}

/// KV cache element type.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum KvCacheDtype {
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl KvCacheDtype {
    /// The agent's `--kv-cache-dtype` value.
    pub fn as_flag(self) -> &'static str {
        match self {
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::Q8_0 => "q8_0",
        }
    }
}

/// Agent compute device.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
    Auto,
}

impl Device {
    /// The agent's `--device` value.
    pub fn as_flag(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

/// Routing settings for one model.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// Policy: `kv` (KV headroom + prefix overlap + queue depth) or a baseline.
    #[serde(default)]
    pub policy: RoutingPolicy,
    /// Weights of the `kv-score` terms (`--policy kv-score` on the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<RoutingWeights>,
    /// Scorers (and their weights) in place of the policy's own: the policy keeps its filters
    /// and picker (`kv`: may wait for the agent it picks), these scorers rank the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8))]
    pub scorers: Option<Vec<WeightedScorer>>,
    /// The latencies that count (`kv` only; the gateway's `--slo-ttft` / `--slo-tpot` when
    /// unset): the gateway admits for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
}

/// Latency targets of a model's requests (docs/gateway.md, "SLO targets").
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Time to first token, like `2s`: a queued request that has waited this long is served after
    /// the ones that can still meet it. `0s`: no target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"))]
    pub ttft: Option<String>,
    /// Time per output token, like `100ms`: a request waits rather than join a batch whose
    /// decode step would then be longer. `0s`: no target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"))]
    pub tpot: Option<String>,
}

/// [`SloSpec`] parsed; `None`: unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SloTargets {
    pub ttft: Option<std::time::Duration>,
    pub tpot: Option<std::time::Duration>,
}

impl SloSpec {
    /// The targets it sets, parsed.
    pub fn targets(&self) -> Result<SloTargets, SpecError> {
        let parse = |field: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|t| {
                    parse_duration(t).map_err(|_| SpecError::Slo {
                        field,
                        value: t.to_string(),
                    })
                })
                .transpose()
        };
        Ok(SloTargets {
            ttft: parse("ttft", &self.ttft)?,
            tpot: parse("tpot", &self.tpot)?,
        })
    }
}

/// One scorer of a routing pipeline with its weight.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightedScorer {
    pub name: ScorerName,
    #[serde(default = "one")]
    #[schemars(range(min = 0.0))]
    pub weight: f64,
}

/// The gateway's built-in scorers (see docs/architecture.md).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ScorerName {
    /// Minus the predicted cost in seconds (wait for room, prefill, duplication, decode).
    Cost,
    /// Fraction of the prompt cached on the agent.
    Prefix,
    /// Fraction of the pool left after the request.
    Headroom,
    /// Minus the share of the agent's requests that wait.
    Queue,
    /// Minus the agent's running, waiting and unreported requests.
    Requests,
    /// Minus GPU utilisation (KV use without a GPU).
    Gpu,
}

impl ScorerName {
    /// The name the gateway's `--scorer` flag and its registry use.
    pub fn as_str(self) -> &'static str {
        match self {
            ScorerName::Cost => "cost",
            ScorerName::Prefix => "prefix",
            ScorerName::Headroom => "headroom",
            ScorerName::Queue => "queue",
            ScorerName::Requests => "requests",
            ScorerName::Gpu => "gpu",
        }
    }
}

/// Routing policies the gateway implements.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RoutingPolicy {
    #[default]
    Kv,
    RoundRobin,
    LeastRequests,
    GpuUtilization,
}

/// Weights of the `kv` score; each ≥ 0.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingWeights {
    #[serde(default = "one")]
    #[schemars(range(min = 0.0))]
    pub prefix: f64,
    #[serde(default = "one")]
    #[schemars(range(min = 0.0))]
    pub headroom: f64,
    #[serde(default = "one")]
    #[schemars(range(min = 0.0))]
    pub queue: f64,
}

fn one() -> f64 {
    1.0
}

/// Admission settings for one model.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionSpec {
    /// Requests that may wait for KV room; a full queue answers 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queue: Option<u32>,
    /// How long a request may wait, like `500ms`, `30s`, `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"))]
    pub queue_timeout: Option<String>,
    /// Output tokens reserved per request when it names no `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub reserve_output: Option<u32>,
}

/// Parses a `queueTimeout`: a duration with its unit (`500ms`, `30s`, `2m`, `1.5h`), the format
/// the gateway's `--queue-timeout` flag takes ([`kvroute_contract::units`]) less the bare number.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, SpecError> {
    if !kvroute_contract::units::has_unit(s) {
        return Err(SpecError::QueueTimeout(s.to_string()));
    }
    kvroute_contract::units::parse_duration(s).map_err(|_| SpecError::QueueTimeout(s.to_string()))
}

impl ModelDeploymentSpec {
    /// Checks what the CRD's schema and CEL rules check, for objects that bypassed them.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.model.name.trim().is_empty() {
            return Err(SpecError::EmptyModelName);
        }
        let source = self.model.source()?;
        let check_rel = |field: &'static str, p: &str| {
            let bad = p.is_empty()
                || p.starts_with('/')
                || p.split('/').any(|c| c == "..")
                || p.contains('\0');
            if bad {
                Err(SpecError::VolumePath {
                    field,
                    value: p.to_string(),
                })
            } else {
                Ok(())
            }
        };
        match source {
            ModelSource::Pvc(p) => check_rel("spec.model.pvc.path", &p.path)?,
            ModelSource::Image(i) => check_rel("spec.model.image.path", &i.path)?,
            ModelSource::HostPath(_) | ModelSource::Url(_) => {}
        }
        if self.replicas < 0 {
            return Err(SpecError::Replicas(self.replicas));
        }
        if let Some(a) = &self.autoscaling {
            a.policy()?;
        }
        if let Some(e) = &self.engine {
            if let Some(b) = e.block_size {
                if !BLOCK_SIZES.contains(&b) {
                    return Err(SpecError::BlockSize(b));
                }
            }
            if let Some(u) = e.gpu_memory_utilization {
                // NaN fails both comparisons, so it is rejected too.
                if !(u > 0.0 && u <= 1.0) {
                    return Err(SpecError::GpuMemoryUtilization(u));
                }
            }
            if e.gpu_memory_utilization.is_some() && e.kv_memory.is_some() {
                return Err(SpecError::KvSizing);
            }
        }
        if let Some(t) = self
            .admission
            .as_ref()
            .and_then(|a| a.queue_timeout.as_ref())
        {
            parse_duration(t)?;
        }
        if let Some(slo) = self.routing.as_ref().and_then(|r| r.slo.as_ref()) {
            slo.targets()?;
        }
        Ok(())
    }

    /// True when agents run as a DaemonSet, one per matching node.
    pub fn per_node(&self) -> bool {
        self.placement.as_ref().is_some_and(|p| p.per_node)
    }
}

/// Observed state, written by the controller through the status subresource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Agents that exist (scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Agents whose `/ready` passes.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the agent pods, as a string (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// KV cache over all agents that answered `GetCapacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvStatus>,
    /// Base URL of the gateway that serves this model (OpenAI API; pass `model: spec.model.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The autoscaler's last decision, its signal and why (with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the autoscaler saw and decided.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    pub desired_replicas: u32,
    /// KV blocks in use on the agents plus the blocks their waiting requests need.
    pub demand_blocks: u64,
    /// Of the demand, the blocks waiting requests need beyond the room there is.
    pub shortfall_blocks: u64,
    pub reason: String,
}

/// KV-cache capacity summed over the agents that reported.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvStatus {
    /// Tokens per block (agents of one deployment share it).
    pub block_size: u32,
    pub total_blocks: u64,
    pub free_blocks: u64,
    /// Used fraction as a percentage string with one decimal, like `37.5%`.
    pub usage: String,
    /// Agents that answered.
    pub agents_reporting: u32,
}

/// The CRD as YAML, exactly what `kvroute crd` prints and what is committed under `deploy/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&ModelDeployment::crd())?;
    Ok(format!(
        "# Generated by `kvroute crd` from crd/src/resource.rs; do not edit by hand.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelDeploymentSpec {
        ModelDeploymentSpec {
            model: ModelSpec {
                name: "smollm2".into(),
                url: Some("https://example.invalid/m.gguf".into()),
                ..Default::default()
            },
            replicas: 1,
            placement: None,
            resources: None,
            engine: None,
            routing: None,
            admission: None,
            agent_image: None,
            autoscaling: None,
        }
    }

    #[test]
    fn autoscaling_settings_are_checked() {
        let mut s = spec();
        let ok = AutoscalingSpec {
            min_replicas: 1,
            max_replicas: 3,
            target_kv_utilization: None,
            scale_up_window: Some("15s".into()),
            scale_down_window: None,
        };
        s.autoscaling = Some(ok.clone());
        assert!(s.validate().is_ok());
        let p = ok.policy().unwrap();
        assert_eq!(
            (p.up_window, p.target_utilization),
            (std::time::Duration::from_secs(15), 0.8)
        );
        for bad in [
            AutoscalingSpec {
                min_replicas: 4,
                ..ok.clone()
            },
            AutoscalingSpec {
                max_replicas: 0,
                ..ok.clone()
            },
            AutoscalingSpec {
                target_kv_utilization: Some(1.5),
                ..ok.clone()
            },
            AutoscalingSpec {
                scale_up_window: Some("soon".into()),
                ..ok.clone()
            },
            AutoscalingSpec {
                scale_up_window: Some("10m".into()),
                ..ok.clone()
            },
        ] {
            s.autoscaling = Some(bad.clone());
            let e = s.validate().unwrap_err();
            assert!(
                e.to_string().starts_with("spec.autoscaling"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn exactly_one_source() {
        let mut s = spec();
        assert!(s.validate().is_ok());
        s.model.host_path = Some("/data/m.gguf".into());
        assert_eq!(s.validate(), Err(SpecError::ModelSource(2)));
        s.model.url = None;
        s.model.host_path = None;
        assert_eq!(s.validate(), Err(SpecError::ModelSource(0)));
    }

    #[test]
    fn engine_ranges() {
        let mut s = spec();
        for (b, ok) in [
            (8, true),
            (16, true),
            (32, true),
            (0, false),
            (12, false),
            (64, false),
        ] {
            s.engine = Some(EngineSpec {
                block_size: Some(b),
                ..Default::default()
            });
            assert_eq!(s.validate().is_ok(), ok, "block size {b}");
        }
        for (u, ok) in [
            (0.0, false),
            (0.01, true),
            (1.0, true),
            (1.01, false),
            (f64::NAN, false),
        ] {
            s.engine = Some(EngineSpec {
                gpu_memory_utilization: Some(u),
                ..Default::default()
            });
            assert_eq!(s.validate().is_ok(), ok, "utilization {u}");
        }
        s.engine = Some(EngineSpec {
            gpu_memory_utilization: Some(0.5),
            kv_memory: Some("1GiB".into()),
            ..Default::default()
        });
        assert_eq!(s.validate(), Err(SpecError::KvSizing));
        s.engine = None;
        s.replicas = -1;
        assert_eq!(s.validate(), Err(SpecError::Replicas(-1)));
    }

    #[test]
    fn volume_paths_stay_inside() {
        let mut s = spec();
        s.model.url = None;
        for (p, ok) in [
            ("m.gguf", true),
            ("a/b.gguf", true),
            ("/etc/passwd", false),
            ("../x", false),
            ("", false),
        ] {
            s.model.pvc = Some(PvcSource {
                claim_name: "models".into(),
                path: p.into(),
            });
            assert_eq!(s.validate().is_ok(), ok, "path {p:?}");
        }
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        // The gateway's flag grammar: hours and fractions too.
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "s",
            "10",
            "1d",
            "-1s",
            "99999999999999999999s",
            "999999999999999999m",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crd_shape() {
        let crd = ModelDeployment::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("modeldeployments.kvroute.dev")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["mdep".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Model", "Ready", "Replicas", "KV free", "Age"]);
        let yaml = crd_yaml().unwrap();
        for rule in [
            "self in [8, 16, 32]",
            "self >= 0",
            "has(self.hostPath)",
            "double(self) <= 1.0",
        ] {
            assert!(yaml.contains(rule), "missing CEL rule {rule}");
        }
    }
}
