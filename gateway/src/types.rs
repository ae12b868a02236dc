//! Data types shared by the gateway's modules. They sit below every module that uses them, so
//! no two modules import each other (`scripts/check-architecture.py` keeps it so).

use kvroute_routing::Slot;

/// A request's routing-relevant facts (sizes and block hashes, computed from its prompt).
#[derive(Debug, Clone)]
pub struct PromptPlan {
    pub model: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub block_size: u32,
    pub block_hashes: Vec<u64>,
}

/// One agent's two endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentEndpoint {
    /// `HOST:PORT` of its OpenAI HTTP API.
    pub http: String,
    /// `http://HOST:PORT` URI of its gRPC capacity service.
    pub grpc: String,
}

/// A bad `--agent` value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--agent {value:?}: {reason} (expected http://HOST:PORT,grpc://HOST:PORT)")]
pub struct AgentSpecError {
    pub value: String,
    pub reason: &'static str,
}

impl std::str::FromStr for AgentEndpoint {
    type Err = AgentSpecError;
    fn from_str(s: &str) -> Result<Self, AgentSpecError> {
        let err = |reason| AgentSpecError {
            value: s.to_string(),
            reason,
        };
        let (a, b) = s.split_once(',').ok_or_else(|| err("missing ','"))?;
        let mut http = None;
        let mut grpc = None;
        for part in [a.trim(), b.trim()] {
            if let Some(rest) = part.strip_prefix("http://") {
                http = Some(rest.trim_end_matches('/'));
            } else if let Some(rest) = part.strip_prefix("grpc://") {
                grpc = Some(rest.trim_end_matches('/'));
            } else {
                return Err(err("each part must start with http:// or grpc://"));
            }
        }
        let http = http.ok_or_else(|| err("no http:// part"))?;
        let grpc = grpc.ok_or_else(|| err("no grpc:// part"))?;
        for hp in [http, grpc] {
            let (host, port) = hp.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            if host.is_empty() || host.contains('/') {
                return Err(err("bad host"));
            }
            port.parse::<u16>().map_err(|_| err("bad port"))?;
        }
        Ok(AgentEndpoint {
            http: http.to_string(),
            grpc: format!("http://{grpc}"),
        })
    }
}

/// A model's own settings as its ModelDeployment states them (`None`: the spec says nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSpecSettings {
    pub routing: Option<kvroute_crd::RoutingSpec>,
    pub admission: Option<kvroute_crd::AdmissionSpec>,
}

/// A point-in-time copy of one agent for the dashboard and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentSnapshot {
    pub slot: Slot,
    pub endpoint: String,
    pub agent_id: String,
    pub model: String,
    pub active: bool,
    pub connected: bool,
    pub eligible: bool,
    pub report_age_ms: Option<u64>,
    pub epoch: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub cached_blocks: u64,
    pub used_blocks: u64,
    pub reserved_blocks: u64,
    pub pending_requests: usize,
    pub running_requests: u32,
    pub waiting_requests: u32,
    pub requests_received: u64,
    pub preemptions: u64,
    pub gpu_utilization_percent: Option<u32>,
    pub prefix_hashes: usize,
    /// Reservations retired by the agent's acknowledgement, and expired unacknowledged.
    pub dispatches_acked: u64,
    pub dispatches_expired: u64,
    /// Preemptions the agent reported while this gateway had room reserved there.
    pub over_admissions: u64,
    /// The agent's KV host tier (evicted prefixes kept in host memory): slots, slots in use,
    /// and the hashes this gateway knows it holds. 0 without one.
    pub host_total_blocks: u64,
    pub host_used_blocks: u64,
}

/// Queue depth per class and tenant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueSnapshot {
    pub depth: usize,
    pub capacity: usize,
    pub entries: Vec<QueueEntry>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueEntry {
    pub priority: String,
    pub tenant: String,
    pub depth: usize,
}
