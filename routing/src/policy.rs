//! What a routing decision takes and gives: the request as the router sees it, the policy's
//! settings, the answer, and the random source that breaks ties.

use crate::cost::{CostWeights, Priors};

/// Index of an agent in a [`Cluster`]; stable for the cluster's lifetime.
pub type Slot = usize;

/// A routing preset: which filters, scorers and picker decide (see [`pipeline`](crate::pipeline)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// The lowest predicted cost in time (wait for room + prefill of the uncached prompt + decode
    /// slow-down, see [`cost`]); never into negative room; a request may wait for the agent
    /// that caches its prefix (the point of kvroute).
    Kv,
    /// The earlier KV policy: a weighted score of prefix overlap, headroom and queue pressure
    /// among the agents with room now (kept for comparison).
    KvScore,
    /// Baseline: each eligible agent in turn, ignoring KV.
    RoundRobin,
    /// Baseline: fewest running + waiting + dispatched-but-unreported requests, ignoring KV.
    LeastRequests,
    /// Baseline: lowest GPU utilization (KV usage when the agent has no GPU), ignoring KV room.
    GpuUtilization,
    /// Peer: SGLang's / vLLM-router's `cache_aware`, re-implemented over block hashes (see
    /// [`sent`](crate::sent)): the agent sent the longest prefix of the prompt, unless loads are
    /// out of balance; ignores KV room and what agents report cached.
    CacheAware,
    /// Peer: llm-d's default scheduling profile (prefix-cache scorer 3, KV-utilisation scorer
    /// 2, queue scorer 2, highest total), its prefix scorer fed by the agents' block events
    /// (llm-d's "precise" one); ignores KV room.
    LlmD,
}

impl PolicyKind {
    /// The name used on the command line and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Kv => "kv",
            PolicyKind::KvScore => "kv-score",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastRequests => "least-requests",
            PolicyKind::GpuUtilization => "gpu-utilization",
            PolicyKind::CacheAware => "cache-aware",
            PolicyKind::LlmD => "llm-d",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kv" => Ok(PolicyKind::Kv),
            "kv-score" => Ok(PolicyKind::KvScore),
            "round-robin" => Ok(PolicyKind::RoundRobin),
            "least-requests" => Ok(PolicyKind::LeastRequests),
            "gpu-utilization" => Ok(PolicyKind::GpuUtilization),
            "cache-aware" => Ok(PolicyKind::CacheAware),
            "llm-d" => Ok(PolicyKind::LlmD),
            other => Err(format!(
                "unknown policy {other:?} (expected kv, kv-score, round-robin, least-requests, gpu-utilization, cache-aware or llm-d)"
            )),
        }
    }
}

/// Weights of the `kv-score` policy's terms (each term is in 0..=1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Fraction of the prompt's blocks already cached on the agent.
    pub prefix: f64,
    /// Fraction of the agent's pool left free after this request and our reservations.
    pub headroom: f64,
    /// Queue pressure (waiting and not-yet-reported requests over all requests), subtracted.
    pub queue: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            prefix: 2.0,
            headroom: 1.0,
            queue: 1.0,
        }
    }
}

/// The `cache-aware` policy's settings, with SGLang router's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAwareParams {
    /// Loads are out of balance when the most and least loaded candidates differ by more than
    /// this many requests...
    pub balance_abs: u32,
    /// ...and the most loaded has more than this times the least loaded's.
    pub balance_rel: f64,
    /// Follow the longest sent prefix only when it covers more than this fraction of the prompt.
    pub match_threshold: f64,
    /// Prompt tokens remembered per agent (theirs: 2^26 characters, about 2^24 tokens).
    pub tree_tokens: u64,
}

impl Default for CacheAwareParams {
    fn default() -> Self {
        Self {
            balance_abs: 64,
            balance_rel: 1.5,
            match_threshold: 0.3,
            tree_tokens: 1 << 24,
        }
    }
}

/// Policy settings, validated once at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    pub weights: Weights,
    /// The `kv` policy's cost terms and its stand-ins for unmeasured agents.
    pub cost: CostWeights,
    pub priors: Priors,
    /// An agent whose last report is older than this (milliseconds) is not eligible.
    pub stale_after_ms: u64,
    /// `kv` only: for this long (milliseconds) a queued request may be passed by later requests
    /// of its priority class that have more of their prompt cached or in flight on an agent of
    /// their model; once it has waited this long it is served in arrival order again. 0 keeps
    /// the queue in arrival order.
    pub cache_first_ms: u64,
    /// `kv` only: the time per output token to keep (seconds; 0: no target). An agent whose
    /// predicted decode step, with the request and the ones sent there ahead of it joining its
    /// batch, is longer than this has no room for the request now: it waits, as for blocks,
    /// until a request there ends (an idle agent always takes it).
    pub tpot_slo_s: f64,
    /// `kv` only: the time to first token to keep (milliseconds; 0: no target). A queued request
    /// that has waited this long can no longer meet it: the queue pass serves it after the
    /// requests of its class that still can (in arrival order, until the queue timeout), instead
    /// of letting it make them late too; and the `kv` cost model prices each predicted second of
    /// a request's time to first token past what is left of it ([`crate::cost::CostWeights::late`]).
    pub ttft_slo_ms: u64,
    /// Scorers (with weights) in place of the preset's own; `None`: the preset's.
    pub scorers: Option<ScorerList>,
    /// The `cache-aware` policy's settings.
    pub cache_aware: CacheAwareParams,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Kv,
            weights: Weights::default(),
            cost: CostWeights::default(),
            priors: Priors::default(),
            stale_after_ms: 3_000,
            cache_first_ms: 30_000,
            tpot_slo_s: 0.0,
            ttft_slo_ms: 0,
            scorers: None,
            cache_aware: CacheAwareParams::default(),
        }
    }
}

/// [`queue_rank`]'s key: late, within the cache-first window, cached or in-flight blocks.
pub type QueueRank = (bool, bool, std::cmp::Reverse<u64>);

/// Where a queued request goes in a queue pass of its priority class, smallest first (the
/// gateway and the simulator sort by it, stably, so equal keys keep the queue's order): with a
/// `kv` policy, requests still within the time-to-first-token target before late ones
/// ([`PolicyConfig::ttft_slo_ms`]); then, within the cache-first window
/// ([`PolicyConfig::cache_first_ms`]), requests that have waited longer than the window first
/// (none is passed for ever) and the younger ones by how many of their prompt blocks are cached
/// or in flight on an agent, most first (`local`, asked for only then). Other policies: all
/// keys equal.
pub fn queue_rank(cfg: &PolicyConfig, waited_ms: u64, local: impl FnOnce() -> u64) -> QueueRank {
    if cfg.kind != PolicyKind::Kv {
        return (false, false, std::cmp::Reverse(0));
    }
    let late = cfg.ttft_slo_ms > 0 && waited_ms >= cfg.ttft_slo_ms;
    let young = !late && cfg.cache_first_ms > 0 && waited_ms < cfg.cache_first_ms;
    let local = if young { local() } else { 0 };
    (late, young, std::cmp::Reverse(local))
}

/// A source of randomness, passed in so decisions are reproducible for a fixed seed.
pub trait RandomSource {
    fn next_u64(&mut self) -> u64;

    /// Uniform in `0..n` (`n > 0`); the slight modulo bias does not matter for tie-breaking.
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// SplitMix64: tiny, fast, good enough to break ties; deterministic for a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl RandomSource for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A request as the policy sees it: sizes and block hashes, never text.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub model: &'a str,
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Output tokens to reserve room for.
    pub output_tokens: u64,
    /// Block size the hashes were computed with; agents with another size score no overlap.
    pub block_size: u32,
    /// Chained hashes of the prompt's full blocks, in order.
    pub block_hashes: &'a [u64],
    /// Agents not to pick (a retry after a failed connection).
    pub exclude: &'a [Slot],
    /// Agents not to pick either, as a bitset over slots (bit `s % 64` of word `s / 64`): those
    /// claimed by earlier queued requests waiting for room there. Empty: none.
    pub claimed: &'a [u64],
    /// Blocks that earlier queued requests wait for on each agent, by slot (`kv` policy): not
    /// room for this request. Empty: none.
    pub held: &'a [u64],
    /// The request may wait in the queue for a specific agent (`kv` policy); false: only agents
    /// with room now are considered.
    pub may_hold: bool,
    /// The agent this queued request waits for (its last decision was to hold there), if any:
    /// elsewhere, the prompt tokens that agent caches are priced by the cost model's `stick`.
    pub home: Option<Slot>,
    /// Milliseconds it has waited in the queue (0: new): with a TTFT target, what is left of it
    /// is the cost model's budget.
    pub waited_ms: u64,
}

/// The chosen agent and what the choice costs there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub slot: Slot,
    /// Blocks to reserve: blocks(prompt + output) minus the cached prefix blocks running
    /// requests hold (`shared_blocks`); cached blocks no running request holds are counted in
    /// the agent's free room, so using them takes room too. What the request frees when it ends.
    pub need_blocks: u64,
    /// Leading prompt blocks already cached on the agent.
    pub cached_blocks: u64,
    /// Of those, blocks counted as held by running requests (shared, taking no room).
    pub shared_blocks: u64,
    pub score: f64,
    /// Prompt tokens the agent will compute (not cached there, nor in flight to it).
    pub prefill_tokens: u64,
    /// `kv` policy: the predicted time to first token there (seconds; 0 for the others).
    pub predicted_ttft_s: f64,
}

/// The cached prefixes that requests held for an agent in one queue pass will take out of its
/// evictable (free) blocks. A held request is charged its whole need against the room the
/// requests after it see, cached prefix included: using evictable cached blocks takes them out
/// of the free ones. A second held request of the same prefix on the same agent shares those
/// blocks, so it is charged only the rest (charging it again made a few queued requests of one
/// group look like several times the room they take, and the predicted wait sent the next
/// request of the group to an agent without its prefix).
#[derive(Debug, Default, Clone)]
pub struct HeldPrefixes(std::collections::HashSet<(Slot, u64)>);

impl HeldPrefixes {
    /// Forgets every prefix (a new queue pass).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The blocks a request held for `route` takes from that agent's room, given the requests
    /// held before it in this pass; `hashes` are its prompt's block hashes. Two prompts share a
    /// cached run when the hash of its last block is the same (a block's hash covers every
    /// block before it).
    pub fn charge(&mut self, route: &Route, hashes: &[u64]) -> u64 {
        let evictable = route.cached_blocks.saturating_sub(route.shared_blocks);
        let last = usize::try_from(route.cached_blocks)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| hashes.get(i));
        match last {
            Some(&h) if evictable > 0 => {
                if self.0.insert((route.slot, h)) {
                    route.need_blocks
                } else {
                    route.need_blocks.saturating_sub(evictable)
                }
            }
            _ => route.need_blocks,
        }
    }
}

/// Why a request can never be served as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No agent has ever reported serving this model.
    UnknownModel,
    /// The prompt alone needs more blocks than the largest pool serving the model.
    PromptTooLarge {
        prompt_blocks: u64,
        largest_pool: u64,
    },
    /// The prompt is longer than every agent's `max_model_len`.
    PromptTooLong {
        prompt_tokens: u64,
        max_model_len: u32,
    },
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Route(Route),
    /// `kv` policy: the cheapest agent is this one, which has no room yet; wait for it (the
    /// route's `need_blocks` are what the request waits for there).
    Hold(Route),
    /// No eligible agent has room now; queue and retry when capacity changes.
    Wait,
    Reject(Reject),
}

pub(crate) fn blocks_for(tokens: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size.max(1));
    tokens.div_ceil(bs)
}

/// Index of a scorer in a [`ScorerRegistry`](crate::registry::ScorerRegistry). The built-in scorers have fixed ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScorerId(pub u16);

impl ScorerId {
    pub const COST: ScorerId = ScorerId(0);
    pub const PREFIX: ScorerId = ScorerId(1);
    pub const HEADROOM: ScorerId = ScorerId(2);
    pub const QUEUE: ScorerId = ScorerId(3);
    pub const REQUESTS: ScorerId = ScorerId(4);
    pub const GPU: ScorerId = ScorerId(5);
    pub const KV_USAGE: ScorerId = ScorerId(6);
    pub const WAITING: ScorerId = ScorerId(7);

    /// The built-in scorers' names, by id.
    pub const BUILTIN: [&'static str; 8] = [
        "cost", "prefix", "headroom", "queue", "requests", "gpu", "kv-usage", "waiting",
    ];

    /// The id of a built-in scorer (what flags and specs may name).
    pub fn builtin(name: &str) -> Option<ScorerId> {
        Self::BUILTIN
            .iter()
            .position(|&n| n == name)
            .map(|i| ScorerId(i as u16))
    }
}

/// Scorers a pipeline runs at most.
pub const MAX_SCORERS: usize = 8;

/// A weighted list of scorers (fixed capacity, so [`PolicyConfig`] stays `Copy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScorerList {
    items: [(ScorerId, f64); MAX_SCORERS],
    len: u8,
}

impl Default for ScorerList {
    fn default() -> Self {
        Self {
            items: [(ScorerId(0), 0.0); MAX_SCORERS],
            len: 0,
        }
    }
}

impl ScorerList {
    /// A list of `(scorer, weight)` pairs; refused when longer than [`MAX_SCORERS`] or a weight
    /// is not a finite number.
    pub fn new(items: &[(ScorerId, f64)]) -> Result<Self, String> {
        let mut list = Self::default();
        for &(id, w) in items {
            list.push(id, w)?;
        }
        Ok(list)
    }

    /// Appends one scorer with its weight.
    pub fn push(&mut self, id: ScorerId, weight: f64) -> Result<(), String> {
        if !weight.is_finite() {
            return Err(format!("scorer weight {weight} is not a finite number"));
        }
        let slot = self
            .items
            .get_mut(usize::from(self.len))
            .ok_or_else(|| format!("at most {MAX_SCORERS} scorers"))?;
        *slot = (id, weight);
        self.len += 1;
        Ok(())
    }

    pub fn as_slice(&self) -> &[(ScorerId, f64)] {
        &self.items[..usize::from(self.len)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
