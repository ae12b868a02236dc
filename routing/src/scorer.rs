//! What a scorer sees: the [`Scorer`] trait, the [`Candidate`]s the filters leave, and the
//! packed [`AgentView`] of each agent.

use crate::policy::{PolicyConfig, RouteRequest, Slot};

/// One agent that passed the filters, and what the request takes there.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Candidate {
    pub slot: Slot,
    /// Blocks to reserve there: blocks(prompt + output) less the cached prefix.
    pub need_blocks: u64,
    /// Leading prompt blocks the agent reports cached (0 for another block size).
    pub cached_blocks: u64,
    /// Leading prompt blocks cached or in flight there (in flight: presets that track it).
    pub local_blocks: u64,
    /// Of the cached blocks, those counted as held by running requests (no room needed).
    pub shared_blocks: u64,
    /// Blocks the request may take there now: free less this gateway's reservations and the
    /// blocks earlier queued requests wait for there (negative: over-booked).
    pub room: i64,
    /// Leading prompt blocks after the local ones that its host tier keeps: copied back, not
    /// computed (agents with a host tier).
    pub host_blocks: u64,
    /// Prompt tokens the agent would compute (not local there), with each host-tier block
    /// counted as [`HOST_BLOCK_COST`] of a block to compute.
    pub prefill_tokens: u64,
}

/// What a prompt block copied back from an agent's host tier costs, as a fraction of
/// computing it, until the agent has measured both (a prior: a PCIe copy of a block against
/// its prefill on a GPU; see docs/gateway.md).
pub const HOST_BLOCK_COST: f64 = 0.1;

/// The agent's measured cost of a host-tier block as a fraction of computing it: the time to
/// copy one block (`copy_ns`) over the time to prefill `block_size` tokens at `prefill_tps`,
/// clamped to 0..=1; [`HOST_BLOCK_COST`] until both are measured.
pub fn host_block_cost(copy_ns: u32, prefill_tps: u32, block_size: u32) -> f32 {
    if copy_ns == 0 || prefill_tps == 0 || block_size == 0 {
        return HOST_BLOCK_COST as f32;
    }
    let block_prefill_s = f64::from(block_size) / f64::from(prefill_tps);
    ((f64::from(copy_ns) * 1e-9) / block_prefill_s).clamp(0.0, 1.0) as f32
}

impl Candidate {
    /// Blocks left after this request (negative: it does not fit now).
    pub fn headroom(&self) -> i64 {
        self.room
            .saturating_sub(i64::try_from(self.need_blocks).unwrap_or(i64::MAX))
    }

    /// Blocks missing now (0: it fits).
    pub fn deficit_blocks(&self) -> u64 {
        self.headroom().min(0).unsigned_abs()
    }
}

/// What a scorer may read besides the candidates.
pub struct ScoreContext<'a> {
    pub request: &'a RouteRequest<'a>,
    pub config: &'a PolicyConfig,
    /// The longest prefix of the prompt that any agent of the model holds or is computing, in
    /// blocks (what a candidate without it would compute a second time).
    pub best_local_blocks: u64,
    /// The request's home agent ([`RouteRequest::home`]) and the prefix it caches or computes
    /// there, in blocks, when that agent is a candidate.
    pub home: Option<(Slot, u64)>,
    agents: &'a [AgentView],
}

impl<'a> ScoreContext<'a> {
    pub(crate) fn new(
        request: &'a RouteRequest<'a>,
        config: &'a PolicyConfig,
        best_local_blocks: u64,
        home: Option<(Slot, u64)>,
        agents: &'a [AgentView],
    ) -> Self {
        Self {
            request,
            config,
            best_local_blocks,
            home,
            agents,
        }
    }
}

impl ScoreContext<'_> {
    /// The agent behind a candidate, as of its last report and this gateway's reservations.
    pub fn agent(&self, slot: Slot) -> &AgentView {
        &self.agents[slot]
    }
}

/// Scores candidates: one value per candidate into `out` (same length; higher is better). Must
/// not allocate (a decision allocates nothing once warm) and must be deterministic.
pub trait Scorer: Send + Sync {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]);
}

/// Reusable buffers of a decision.
#[derive(Debug, Default)]
pub(crate) struct PipelineScratch {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) scores: Vec<f64>,
    pub(crate) totals: Vec<f64>,
    /// The last decision's `ScoreContext::best_local_blocks` (for [`Cluster::explain`]).
    pub(crate) best_local: u64,
}

/// The fields a decision reads, packed per agent so a scan over 1,000 agents stays in cache
/// (what a [`Scorer`](crate::pipeline::Scorer) sees of an agent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentView {
    /// Listed, connected and reported at least once in this epoch.
    pub live: bool,
    pub last_report_ms: u64,
    /// Index into `Cluster::models`.
    pub model: u32,
    pub block_size: u32,
    pub max_model_len: u32,
    pub running: u32,
    pub waiting: u32,
    pub pending: u32,
    pub gpu_util: Option<u32>,
    pub total: u64,
    pub free: u64,
    /// Of `free`, blocks that hold a cached prefix.
    pub cached_evictable: u64,
    pub reserved: u64,
    /// Prompt tokens ahead of a new request: the engine's queue and our unreported dispatches.
    pub queued_prefill: u64,
    pub prefill_tps: u32,
    /// What copying one block back from its host tier costs there, as a fraction of computing
    /// it (see [`host_block_cost`]).
    pub host_block_cost: f32,
    pub decode_step_us: u32,
    pub decode_batch: u32,
    /// What one more sequence adds to a decode step there (0: not measured).
    pub decode_per_seq_ns: u32,
    /// What one more KV token read adds to a decode step there, picoseconds (0: not measured).
    pub decode_per_kv_token_ps: u32,
    /// Tokens the running requests hold in the KV cache there.
    pub running_kv_tokens: u64,
    pub release_per_s: f64,
    /// Observed over predicted time to first token there (1: not calibrated yet).
    pub ttft_scale: f64,
    /// Requests sent here, not yet counted by the agent, whose `need` counted prefix blocks as
    /// shared with running requests.
    pub credited_pending: u32,
}

impl AgentView {
    /// The requests the agent has: running, waiting, and sent by this gateway but not reported.
    pub fn requests(&self) -> u64 {
        u64::from(self.running) + u64::from(self.waiting) + u64::from(self.pending)
    }
}
