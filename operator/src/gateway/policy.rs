//! The routing policy and the router's view of the agents: pure data and pure functions.
//!
//! [`Cluster`] holds what the gateway knows of each agent (capacity figures from its last report,
//! the prefix-cache block hashes it holds, the gateway's own outstanding reservations) and an index
//! from block hash to the agents caching it. [`Cluster::decide`] takes a request (token counts and
//! block hashes, never text), a clock value and a random source, and returns a [`Decision`].
//!
//! This module must never do I/O, read a clock or own a random source: the capacity streams, the
//! server and the simulator feed it, so tests drive exactly the code that runs in production.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::cost::{self, AgentLoad, Ask, CostWeights, Priors, ReleaseRate};

/// Hasher for block hashes, which are already well-mixed 64-bit values: one multiply-rotate
/// instead of SipHash keeps the prefix walk cheap at 1,000 agents.
#[derive(Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;
type BlockSet = HashSet<u64, BuildHasherDefault<BlockHasher>>;

/// Words of a bitset over `n` agent slots.
fn words_for(n: usize) -> usize {
    n.div_ceil(64)
}

/// The agents caching one block hash: a sorted list of slots while few hold it, a bitset over
/// slots once the list would be larger than the bitset. The prefix walk intersects the set of
/// agents still matching with this, word by word, so a hash held by hundreds of agents costs
/// `agents / 64` word operations, not one per holder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holders {
    Few(Vec<u32>),
    Many { bits: Vec<u64>, count: u32 },
}

impl Holders {
    /// Largest list kept as a list for a cluster whose bitsets have `words` words.
    fn few_max(words: usize) -> usize {
        2 * words.max(4)
    }

    /// Adds `slot`; `words` is the bitset size for the current number of agents.
    fn insert(&mut self, slot: u32, words: usize) {
        match self {
            Holders::Few(v) => {
                if let Err(pos) = v.binary_search(&slot) {
                    v.insert(pos, slot);
                    if v.len() > Self::few_max(words) {
                        let mut bits = vec![0u64; words.max(slot as usize / 64 + 1)];
                        for &s in v.iter() {
                            bits[s as usize / 64] |= 1 << (s % 64);
                        }
                        let count = v.len() as u32;
                        *self = Holders::Many { bits, count };
                    }
                }
            }
            Holders::Many { bits, count } => {
                let w = slot as usize / 64;
                if w >= bits.len() {
                    bits.resize(w + 1, 0);
                }
                let bit = 1u64 << (slot % 64);
                if bits[w] & bit == 0 {
                    bits[w] |= bit;
                    *count += 1;
                }
            }
        }
    }

    /// Removes `slot`; returns true when no agent holds the hash any more.
    fn remove(&mut self, slot: u32, words: usize) -> bool {
        match self {
            Holders::Few(v) => {
                if let Ok(pos) = v.binary_search(&slot) {
                    v.remove(pos);
                }
            }
            Holders::Many { bits, count } => {
                let bit = 1u64 << (slot % 64);
                if let Some(word) = bits.get_mut(slot as usize / 64) {
                    if *word & bit != 0 {
                        *word &= !bit;
                        *count -= 1;
                    }
                }
                // Back to a list well below the threshold, so one agent toggling a hash does
                // not convert it back and forth.
                if (*count as usize) <= Self::few_max(words) / 2 {
                    let mut v = Vec::with_capacity(*count as usize);
                    for (w, &word) in bits.iter().enumerate() {
                        let mut m = word;
                        while m != 0 {
                            v.push((w * 64) as u32 + m.trailing_zeros());
                            m &= m - 1;
                        }
                    }
                    *self = Holders::Few(v);
                }
            }
        }
        self.is_empty()
    }

    fn is_empty(&self) -> bool {
        match self {
            Holders::Few(v) => v.is_empty(),
            Holders::Many { count, .. } => *count == 0,
        }
    }

    fn contains(&self, slot: u32) -> bool {
        match self {
            Holders::Few(v) => v.binary_search(&slot).is_ok(),
            Holders::Many { bits, .. } => bits
                .get(slot as usize / 64)
                .is_some_and(|w| w & (1 << (slot % 64)) != 0),
        }
    }

    /// Bits of word `w` (slots `64w..64w+64`) set for this hash's holders; `pos` is a cursor into
    /// a list, advanced across calls for increasing `w`.
    #[inline]
    fn word(&self, w: usize, pos: &mut usize) -> u64 {
        match self {
            Holders::Few(v) => {
                let mut m = 0u64;
                while let Some(&s) = v.get(*pos) {
                    let sw = s as usize / 64;
                    if sw > w {
                        break;
                    }
                    if sw == w {
                        m |= 1 << (s % 64);
                    }
                    *pos += 1;
                }
                m
            }
            Holders::Many { bits, .. } => bits.get(w).copied().unwrap_or(0),
        }
    }
}

/// Prompt blocks whose index entries the walk looks up at once.
const WALK_CHUNK: usize = 32;

/// Reusable buffers of [`Cluster::decide`], so a decision allocates nothing once warm.
#[derive(Debug, Default)]
struct Scratch {
    /// Agents whose cache still matches every prompt block walked so far (bitset over slots).
    matching: Vec<u64>,
    /// Leading prompt blocks cached, by slot.
    overlap: Vec<u32>,
}

/// Sets `overlap[slot] = value` for every slot whose bit is set in `mask` (word `w`).
#[inline]
fn mark(overlap: &mut [u32], w: usize, mut mask: u64, value: u32) {
    while mask != 0 {
        let slot = w * 64 + mask.trailing_zeros() as usize;
        if let Some(o) = overlap.get_mut(slot) {
            *o = value;
        }
        mask &= mask - 1;
    }
}

/// Fills `scratch.overlap` (length `n`) with the number of leading `hashes` each agent caches.
///
/// One pass over the prompt's hashes keeps the set of agents still matching as a bitset and stops
/// as soon as it is empty; an agent leaving the set at block `i` has overlap `i`. The cost is
/// `O(blocks walked × live words + holders in short lists)`, with no allocation once the buffers
/// have grown to `n`.
fn prefix_overlap(index: &BlockMap<Holders>, hashes: &[u64], n: usize, scratch: &mut Scratch) {
    let Scratch { matching, overlap } = scratch;
    overlap.clear();
    overlap.resize(n, 0);
    let words = words_for(n);
    matching.clear();
    matching.resize(words, 0);
    let Some(first) = hashes.first().and_then(|h| index.get(h)) else {
        return;
    };
    let mut pos = 0;
    let mut alive = 0u32;
    for (w, m) in matching.iter_mut().enumerate() {
        *m = first.word(w, &mut pos);
        alive += m.count_ones();
    }
    // Words outside `lo..hi` are zero: the range only shrinks.
    let mut lo = 0;
    let mut hi = words;
    let mut start = 1;
    // Short runs first: a walk that ends after a few blocks does not pay for many lookups.
    let mut chunk = 4;
    while start < hashes.len() {
        // Look up a run of hashes before walking it: the lookups are independent, so their cache
        // misses overlap instead of being paid one after another (they dominate the walk).
        let end = (start + chunk).min(hashes.len());
        chunk = (chunk * 2).min(WALK_CHUNK);
        let mut run: [Option<&Holders>; WALK_CHUNK] = [None; WALK_CHUNK];
        let mut touched = 0u64;
        for (r, h) in run.iter_mut().zip(&hashes[start..end]) {
            *r = index.get(h);
            touched ^= match r {
                Some(Holders::Many { bits, .. }) => bits.get(lo).copied().unwrap_or(0),
                Some(Holders::Few(v)) => v.first().copied().map_or(0, u64::from),
                None => 0,
            };
        }
        std::hint::black_box(touched);
        for (k, holders) in run.iter().take(end - start).enumerate() {
            while lo < hi && matching[lo] == 0 {
                lo += 1;
            }
            while hi > lo && matching[hi - 1] == 0 {
                hi -= 1;
            }
            if lo == hi {
                return;
            }
            let i = (start + k) as u32;
            let Some(holders) = holders else {
                for (w, m) in matching.iter().enumerate().take(hi).skip(lo) {
                    mark(overlap, w, *m, i);
                }
                return;
            };
            match holders {
                Holders::Few(v)
                    if v.iter().filter(|&&s| has_bit(matching, s as usize)).count()
                        == alive as usize =>
                {
                    // Every agent still matching holds this block too: nothing changes.
                }
                Holders::Many { bits, .. } if bits.len() >= hi => {
                    // The common case for a popular prefix: plain word-wise AND.
                    for ((w, m), b) in matching[lo..hi].iter_mut().enumerate().zip(&bits[lo..hi]) {
                        let gone = *m & !b;
                        if gone != 0 {
                            mark(overlap, lo + w, gone, i);
                            alive -= gone.count_ones();
                            *m &= b;
                        }
                    }
                }
                _ => {
                    let mut pos = match holders {
                        // Skip the list entries below the live range.
                        Holders::Few(v) => v.partition_point(|&s| (s as usize) < lo * 64),
                        Holders::Many { .. } => 0,
                    };
                    for (w, m) in matching.iter_mut().enumerate().take(hi).skip(lo) {
                        if *m == 0 {
                            continue;
                        }
                        let keep = *m & holders.word(w, &mut pos);
                        let gone = *m & !keep;
                        mark(overlap, w, gone, i);
                        alive -= gone.count_ones();
                        *m = keep;
                    }
                }
            }
        }
        start = end;
    }
    let full = hashes.len() as u32;
    for (w, m) in matching.iter().enumerate().take(hi).skip(lo) {
        mark(overlap, w, *m, full);
    }
}

/// Index of an agent in a [`Cluster`]; stable for the cluster's lifetime.
pub type Slot = usize;

/// Which algorithm picks the agent.
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
            other => Err(format!(
                "unknown policy {other:?} (expected kv, kv-score, round-robin, least-requests or gpu-utilization)"
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Kv,
            weights: Weights::default(),
            cost: CostWeights::default(),
            priors: Priors::default(),
            stale_after_ms: 3_000,
            cache_first_ms: 2_000,
        }
    }
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

/// Prefix-cache changes carried by a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Stored(Vec<u64>),
    Removed(Vec<u64>),
    AllCleared,
}

/// One capacity report, decoupled from the wire type so the simulator can produce them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    pub agent_id: String,
    pub epoch: u64,
    pub sequence: u64,
    pub model: String,
    pub block_size: u32,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub cached_evictable_blocks: u64,
    pub running_requests: u32,
    pub waiting_requests: u32,
    pub requests_received: u64,
    pub preemptions: u64,
    pub gpu_utilization_percent: Option<u32>,
    pub max_model_len: u32,
    /// Measured speed (0: not measured): prompt tokens per second, decode step time and batch.
    pub prefill_tokens_per_s: u32,
    pub decode_step_us: u32,
    pub decode_batch: u32,
    /// Room given back by ended requests since the epoch began (monotonic).
    pub room_released_blocks: u64,
    /// Prompt tokens waiting in the engine's queue.
    pub waiting_prefill_tokens: u64,
    /// True: `events` hold the agent's whole cache; what was known before is dropped.
    pub snapshot: bool,
    pub events: Vec<CacheEvent>,
}

/// Blocks the gateway set aside on an agent for a request it dispatched there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    id: u64,
    /// The value of the agent's `requests_received` that covers this request.
    key: u64,
    blocks: u64,
    /// Prompt tokens the agent will compute for it (not cached there).
    prefill_tokens: u64,
}

/// How long a prefix sent to an agent counts as cached there before the agent reports it
/// (it normally does within one prefill; this only bounds a request that never got there).
pub const INFLIGHT_TTL_MS: u64 = 30_000;

/// Names one reservation, to cancel it when the request never reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationHandle {
    pub slot: Slot,
    pub epoch: u64,
    pub id: u64,
    pub blocks: u64,
}

/// What the gateway knows of one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// Where the agent is (its HTTP address); the name shown until it reports its id.
    pub endpoint: String,
    /// Still listed by the agent source.
    pub active: bool,
    /// Its capacity stream is up.
    pub connected: bool,
    /// Clock value (ms) when its last report arrived; `None` before the first one of an epoch.
    pub last_report_ms: Option<u64>,
    /// Its last report (without events); `epoch` there is the epoch everything below belongs to.
    pub report: Report,
    cached: BlockSet,
    reservations: VecDeque<Reservation>,
    reserved_blocks: u64,
    /// Of the reservations, prompt tokens still to compute.
    pending_prefill: u64,
    /// Room released per second while busy, from the reports.
    release: ReleaseRate,
    /// Prompts sent here whose blocks the agent has not reported yet: (expiry, block hashes).
    inflight: VecDeque<(u64, Vec<u64>)>,
    /// How many of `inflight` hold each hash.
    inflight_count: BlockMap<u32>,
}

impl AgentState {
    /// Blocks reserved by this gateway and not yet covered by a report.
    pub fn reserved_blocks(&self) -> u64 {
        self.reserved_blocks
    }

    /// Requests dispatched here that the agent's reports do not show yet.
    pub fn pending_requests(&self) -> usize {
        self.reservations.len()
    }

    /// Block hashes the agent is known to cache.
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Room this agent gives back per second while busy, as observed (0: not yet).
    pub fn release_blocks_per_s(&self) -> f64 {
        self.release.blocks_per_s
    }

    /// Eligible for `model` at clock `now_ms`: listed, connected, fresh, serving it.
    pub fn eligible(&self, model: &str, now_ms: u64, stale_after_ms: u64) -> bool {
        self.fresh(now_ms, stale_after_ms) && self.report.model == model
    }

    /// Listed, connected, and its last report is recent enough.
    pub fn fresh(&self, now_ms: u64, stale_after_ms: u64) -> bool {
        self.active
            && self.connected
            && self
                .last_report_ms
                .is_some_and(|t| now_ms.saturating_sub(t) <= stale_after_ms)
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
}

/// True when bit `slot` is set in the bitset `bits`.
fn has_bit(bits: &[u64], slot: usize) -> bool {
    bits.get(slot / 64)
        .is_some_and(|w| (w >> (slot % 64)) & 1 == 1)
}

/// The chosen agent and what the choice costs there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Route {
    pub slot: Slot,
    /// Blocks to reserve: blocks(prompt + output) minus cached prefix blocks.
    pub need_blocks: u64,
    /// Leading prompt blocks already cached on the agent.
    pub cached_blocks: u64,
    pub score: f64,
    /// Prompt tokens the agent will compute (not cached there, nor in flight to it).
    pub prefill_tokens: u64,
    /// `kv` policy: the predicted time to first token there (seconds; 0 for the others).
    pub predicted_ttft_s: f64,
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

fn blocks_for(tokens: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size.max(1));
    tokens.div_ceil(bs)
}

/// The fields a decision reads, packed per agent so a scan over 1,000 agents stays in cache.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hot {
    /// Listed, connected and reported at least once in this epoch.
    live: bool,
    last_report_ms: u64,
    /// Index into `Cluster::models`.
    model: u32,
    block_size: u32,
    max_model_len: u32,
    running: u32,
    waiting: u32,
    pending: u32,
    gpu_util: Option<u32>,
    total: u64,
    free: u64,
    /// Of `free`, blocks that hold a cached prefix.
    cached_evictable: u64,
    reserved: u64,
    /// Prompt tokens ahead of a new request: the engine's queue and our unreported dispatches.
    queued_prefill: u64,
    prefill_tps: u32,
    decode_step_us: u32,
    decode_batch: u32,
    release_per_s: f64,
}

/// The agents, their caches and the gateway's reservations.
#[derive(Debug, Default)]
pub struct Cluster {
    agents: Vec<AgentState>,
    hot: Vec<Hot>,
    /// Interned model names (`Hot::model` indexes this).
    models: Vec<String>,
    /// Slots of the agents whose last report names each model, ascending (by `Hot::model`).
    model_slots: Vec<Vec<u32>>,
    /// Block hash → agents caching it.
    index: BlockMap<Holders>,
    /// Block hash → agents a prompt holding it was sent to, not yet reported as cached.
    inflight_index: BlockMap<Holders>,
    /// Round-robin cursor per model (by `Hot::model`): the slot after the last one reserved.
    rr_next: Vec<Slot>,
    next_reservation_id: u64,
    scratch: Scratch,
    scratch_inflight: Scratch,
}

impl Cluster {
    pub fn new() -> Self {
        Self::default()
    }

    /// All agents ever added (inactive ones included), by slot.
    pub fn agents(&self) -> &[AgentState] {
        &self.agents
    }

    /// The slot of the agent at `endpoint`, adding it (active) if new.
    pub fn upsert_agent(&mut self, endpoint: &str) -> Slot {
        if let Some(slot) = self.agents.iter().position(|a| a.endpoint == endpoint) {
            self.agents[slot].active = true;
            self.sync_hot(slot);
            return slot;
        }
        self.agents.push(AgentState {
            endpoint: endpoint.to_string(),
            active: true,
            ..AgentState::default()
        });
        let slot = self.agents.len() - 1;
        self.sync_hot(slot);
        slot
    }

    /// The interned id of the model named in the agent's last report.
    fn model_id(&mut self, slot: Slot) -> u32 {
        let name = &self.agents[slot].report.model;
        match self.models.iter().position(|m| m == name) {
            Some(i) => i as u32,
            None => {
                self.models.push(name.clone());
                self.model_slots.push(Vec::new());
                (self.models.len() - 1) as u32
            }
        }
    }

    /// The packed view of one agent.
    fn hot_of(a: &AgentState, model: u32) -> Hot {
        let r = &a.report;
        Hot {
            live: a.active && a.connected && a.last_report_ms.is_some(),
            last_report_ms: a.last_report_ms.unwrap_or(0),
            model,
            block_size: r.block_size.max(1),
            max_model_len: r.max_model_len,
            running: r.running_requests,
            waiting: r.waiting_requests,
            pending: u32::try_from(a.reservations.len()).unwrap_or(u32::MAX),
            gpu_util: r.gpu_utilization_percent,
            total: r.total_blocks,
            free: r.free_blocks,
            cached_evictable: r.cached_evictable_blocks,
            reserved: a.reserved_blocks,
            queued_prefill: r.waiting_prefill_tokens.saturating_add(a.pending_prefill),
            prefill_tps: r.prefill_tokens_per_s,
            decode_step_us: r.decode_step_us,
            decode_batch: r.decode_batch,
            release_per_s: a.release.blocks_per_s,
        }
    }

    /// Copies the agent's decision-relevant fields into the packed array.
    fn sync_hot(&mut self, slot: Slot) {
        let model = self.model_id(slot);
        let hot = Self::hot_of(&self.agents[slot], model);
        let old = if slot < self.hot.len() {
            Some(std::mem::replace(&mut self.hot[slot], hot).model)
        } else {
            self.hot.push(hot);
            None
        };
        if old != Some(model) {
            let s = slot as u32;
            if let Some(list) = old.and_then(|m| self.model_slots.get_mut(m as usize)) {
                if let Ok(pos) = list.binary_search(&s) {
                    list.remove(pos);
                }
            }
            if let Some(list) = self.model_slots.get_mut(model as usize) {
                if let Err(pos) = list.binary_search(&s) {
                    list.insert(pos, s);
                }
            }
        }
    }

    /// The agent left the source: not eligible, and what we knew of it is dropped.
    pub fn deactivate(&mut self, slot: Slot) {
        if slot < self.agents.len() {
            self.forget(slot);
            let a = &mut self.agents[slot];
            a.active = false;
            a.connected = false;
            a.last_report_ms = None;
            self.sync_hot(slot);
        }
    }

    /// The agent's capacity stream went down: not eligible until it reports again.
    pub fn set_disconnected(&mut self, slot: Slot) {
        if let Some(a) = self.agents.get_mut(slot) {
            a.connected = false;
            self.sync_hot(slot);
        }
    }

    /// Drops the agent's cache and reservations (new epoch, or gone).
    fn forget(&mut self, slot: Slot) {
        let hashes: Vec<u64> = self.agents[slot].cached.drain().collect();
        for h in hashes {
            self.unindex(h, slot);
        }
        self.clear_inflight(slot);
        let a = &mut self.agents[slot];
        a.reservations.clear();
        a.reserved_blocks = 0;
        a.pending_prefill = 0;
        a.release = ReleaseRate::default();
    }

    /// Forgets every prefix in flight to the agent.
    fn clear_inflight(&mut self, slot: Slot) {
        let a = &mut self.agents[slot];
        a.inflight.clear();
        let hashes: Vec<u64> = a.inflight_count.drain().map(|(h, _)| h).collect();
        for h in hashes {
            self.unindex_inflight(h, slot);
        }
    }

    fn unindex_inflight(&mut self, hash: u64, slot: Slot) {
        let words = words_for(self.agents.len());
        if let Some(holders) = self.inflight_index.get_mut(&hash) {
            if holders.remove(slot as u32, words) {
                self.inflight_index.remove(&hash);
            }
        }
    }

    /// Drops in-flight prefixes of the agent that passed their expiry by `now_ms`.
    fn expire_inflight(&mut self, slot: Slot, now_ms: u64) {
        while let Some((expiry, _)) = self.agents[slot].inflight.front() {
            if *expiry > now_ms {
                break;
            }
            let Some((_, hashes)) = self.agents[slot].inflight.pop_front() else {
                break;
            };
            for h in hashes {
                self.drop_inflight_hash(slot, h);
            }
        }
    }

    /// One in-flight prompt holding `hash` on the agent is gone.
    fn drop_inflight_hash(&mut self, slot: Slot, hash: u64) {
        let a = &mut self.agents[slot];
        if let Some(n) = a.inflight_count.get_mut(&hash) {
            *n -= 1;
            if *n == 0 {
                a.inflight_count.remove(&hash);
                self.unindex_inflight(hash, slot);
            }
        }
    }

    /// Records that a prompt with these block hashes was just sent to the agent in `slot`: until
    /// the agent reports them (or [`INFLIGHT_TTL_MS`] passes) they count as cached there for the
    /// `kv` policy's locality, so the next request of a new prefix group follows the first one.
    /// They never count as room: the agent shares blocks only once they are computed.
    pub fn track_inflight(&mut self, slot: Slot, hashes: &[u64], now_ms: u64) {
        if slot >= self.agents.len() || hashes.is_empty() {
            return;
        }
        self.expire_inflight(slot, now_ms);
        let words = words_for(self.agents.len());
        let mut fresh = Vec::with_capacity(hashes.len());
        for &h in hashes {
            if self.agents[slot].cached.contains(&h) {
                continue;
            }
            let n = self.agents[slot].inflight_count.entry(h).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.inflight_index
                    .entry(h)
                    .or_insert_with(|| Holders::Few(Vec::new()))
                    .insert(slot as u32, words);
            }
            fresh.push(h);
        }
        if !fresh.is_empty() {
            self.agents[slot]
                .inflight
                .push_back((now_ms + INFLIGHT_TTL_MS, fresh));
        }
    }

    /// Prompt blocks in flight to the agent in `slot` (not yet reported as cached).
    pub fn inflight_blocks(&self, slot: Slot) -> usize {
        self.agents.get(slot).map_or(0, |a| a.inflight_count.len())
    }

    fn unindex(&mut self, hash: u64, slot: Slot) {
        let words = words_for(self.agents.len());
        if let Some(holders) = self.index.get_mut(&hash) {
            if holders.remove(slot as u32, words) {
                self.index.remove(&hash);
            }
        }
    }

    /// Applies one report from the agent in `slot`, received at clock `now_ms`.
    /// Returns true when the report began a new epoch (what was known was reset).
    pub fn apply_report(&mut self, slot: Slot, mut report: Report, now_ms: u64) -> bool {
        if slot >= self.agents.len() {
            return false;
        }
        let new_epoch = {
            let a = &self.agents[slot];
            a.last_report_ms.is_none()
                || a.report.epoch != report.epoch
                || a.report.agent_id != report.agent_id
        };
        if new_epoch {
            self.forget(slot);
        }
        let events = std::mem::take(&mut report.events);
        if report.snapshot && !new_epoch {
            let hashes: Vec<u64> = self.agents[slot].cached.drain().collect();
            for h in hashes {
                self.unindex(h, slot);
            }
        }
        for ev in events {
            match ev {
                CacheEvent::Stored(hashes) => {
                    let words = words_for(self.agents.len());
                    for h in hashes {
                        if self.agents[slot].inflight_count.remove(&h).is_some() {
                            self.unindex_inflight(h, slot);
                        }
                        if self.agents[slot].cached.insert(h) {
                            self.index
                                .entry(h)
                                .or_insert_with(|| Holders::Few(Vec::new()))
                                .insert(slot as u32, words);
                        }
                    }
                }
                CacheEvent::Removed(hashes) => {
                    for h in hashes {
                        if self.agents[slot].cached.remove(&h) {
                            self.unindex(h, slot);
                        }
                    }
                }
                CacheEvent::AllCleared => {
                    let hashes: Vec<u64> = self.agents[slot].cached.drain().collect();
                    for h in hashes {
                        self.unindex(h, slot);
                    }
                }
            }
        }
        self.expire_inflight(slot, now_ms);
        let a = &mut self.agents[slot];
        // Retire every reservation the agent's counter now covers: it counts those requests.
        while let Some(r) = a.reservations.front() {
            if r.key <= report.requests_received {
                a.reserved_blocks = a.reserved_blocks.saturating_sub(r.blocks);
                a.pending_prefill = a.pending_prefill.saturating_sub(r.prefill_tokens);
                a.reservations.pop_front();
            } else {
                break;
            }
        }
        let busy = |r: &Report| r.running_requests > 0 || r.waiting_requests > 0;
        let was_busy = !new_epoch && busy(&a.report);
        a.release.observe(
            report.room_released_blocks,
            now_ms,
            was_busy || busy(&report),
        );
        a.report = report;
        a.connected = true;
        a.last_report_ms = Some(now_ms);
        self.sync_hot(slot);
        new_epoch
    }

    /// Reserves `route.need_blocks` on the chosen agent for a request about to be dispatched.
    pub fn reserve(&mut self, route: &Route) -> Option<ReservationHandle> {
        let a = self.agents.get_mut(route.slot)?;
        let key = a.report.requests_received + a.reservations.len() as u64 + 1;
        self.next_reservation_id += 1;
        let id = self.next_reservation_id;
        a.reservations.push_back(Reservation {
            id,
            key,
            blocks: route.need_blocks,
            prefill_tokens: route.prefill_tokens,
        });
        a.reserved_blocks += route.need_blocks;
        a.pending_prefill += route.prefill_tokens;
        let epoch = a.report.epoch;
        if let Some(model) = self.hot.get(route.slot).map(|h| h.model as usize) {
            if self.rr_next.len() <= model {
                self.rr_next.resize(model + 1, 0);
            }
            self.rr_next[model] = route.slot + 1;
        }
        self.sync_hot(route.slot);
        Some(ReservationHandle {
            slot: route.slot,
            epoch,
            id,
            blocks: route.need_blocks,
        })
    }

    /// Cancels a reservation whose request never reached the agent (connection refused).
    /// Returns false when it was already retired or belonged to an older epoch.
    pub fn cancel(&mut self, handle: ReservationHandle) -> bool {
        let Some(a) = self.agents.get_mut(handle.slot) else {
            return false;
        };
        if a.report.epoch != handle.epoch {
            return false;
        }
        let Some(pos) = a.reservations.iter().position(|r| r.id == handle.id) else {
            return false;
        };
        if let Some(r) = a.reservations.remove(pos) {
            a.reserved_blocks = a.reserved_blocks.saturating_sub(r.blocks);
            a.pending_prefill = a.pending_prefill.saturating_sub(r.prefill_tokens);
        }
        // The agent will count one request fewer: later requests are covered one value earlier.
        for r in a.reservations.iter_mut().skip(pos) {
            r.key -= 1;
        }
        self.sync_hot(handle.slot);
        true
    }

    /// Leading blocks of `hashes` cached on each agent, by slot (the walk behind [`decide`]).
    ///
    /// [`decide`]: Cluster::decide
    #[cfg(test)]
    fn prefix_overlap(&mut self, hashes: &[u64]) -> Vec<u32> {
        prefix_overlap(&self.index, hashes, self.agents.len(), &mut self.scratch);
        self.scratch.overlap.clone()
    }

    /// The longest leading run of `hashes` that an agent serving `model` caches or is computing
    /// (in flight), in blocks: what a request with this prompt can reuse at best. Two walks of
    /// the hashes; allocates nothing once the scratch buffers are warm.
    pub fn local_prefix_blocks(&mut self, model: &str, hashes: &[u64]) -> u64 {
        let Some(model) = self.models.iter().position(|m| m == model) else {
            return 0;
        };
        let n = self.hot.len();
        prefix_overlap(&self.index, hashes, n, &mut self.scratch);
        let inflight: &[u32] = if self.inflight_index.is_empty() {
            &[]
        } else {
            prefix_overlap(&self.inflight_index, hashes, n, &mut self.scratch_inflight);
            &self.scratch_inflight.overlap
        };
        let slots: &[u32] = self.model_slots.get(model).map_or(&[], Vec::as_slice);
        slots
            .iter()
            .map(|&s| {
                let s = s as usize;
                let cached = self.scratch.overlap.get(s).copied().unwrap_or(0);
                cached.max(inflight.get(s).copied().unwrap_or(0))
            })
            .max()
            .map_or(0, u64::from)
    }

    /// Picks an agent for `req` under `cfg` at clock `now_ms`; ties broken with `rng`.
    ///
    /// Costs one walk of the prompt's block hashes (KV policy only) and one pass over the agents
    /// serving the model; it allocates nothing once the cluster's scratch buffers are warm.
    /// `&mut self` only for those buffers: a decision changes no state (round-robin's cursor moves
    /// in [`reserve`](Cluster::reserve)).
    pub fn decide(
        &mut self,
        cfg: &PolicyConfig,
        req: &RouteRequest<'_>,
        now_ms: u64,
        rng: &mut dyn RandomSource,
    ) -> Decision {
        let Some(model) = self.models.iter().position(|m| m == req.model) else {
            return self.why_not(req);
        };
        let n = self.hot.len();
        let walks = matches!(cfg.kind, PolicyKind::Kv | PolicyKind::KvScore);
        if walks {
            prefix_overlap(&self.index, req.block_hashes, n, &mut self.scratch);
        }
        let overlap: &[u32] = if walks { &self.scratch.overlap } else { &[] };
        let inflight: &[u32] = if cfg.kind == PolicyKind::Kv && !self.inflight_index.is_empty() {
            prefix_overlap(
                &self.inflight_index,
                req.block_hashes,
                n,
                &mut self.scratch_inflight,
            );
            &self.scratch_inflight.overlap
        } else {
            &[]
        };
        let prompt_blocks = req.block_hashes.len().max(1) as f64;

        let mut best: Option<Route> = None;
        // Blocks the best agent lacks now (`kv` only): > 0 means wait for it.
        let mut best_deficit = 0u64;
        let mut best_left = 0i128;
        let mut ties = 0u64;
        let slots: &[u32] = self.model_slots.get(model).map_or(&[], Vec::as_slice);
        let model = model as u32;
        let total_tokens = req.prompt_tokens + req.output_tokens;
        // Round-robin walks from the cursor (cyclically, in slot order); the others from the
        // lowest slot.
        let start = if cfg.kind == PolicyKind::RoundRobin && n > 0 {
            let cursor = self.rr_next.get(model as usize).copied().unwrap_or(0) % n;
            slots.partition_point(|&s| (s as usize) < cursor)
        } else {
            0
        };
        let (tail, head) = slots.split_at(start);
        // The longest prefix of this prompt any agent of the model holds or is computing: blocks
        // recomputed elsewhere are duplicates (`kv` only).
        let best_local = if cfg.kind == PolicyKind::Kv {
            slots
                .iter()
                .map(|&s| {
                    let s = s as usize;
                    let o = overlap.get(s).copied().unwrap_or(0);
                    o.max(inflight.get(s).copied().unwrap_or(0))
                })
                .max()
                .map_or(0, u64::from)
        } else {
            0
        };
        // Block counts for the last block size seen (agents of a model share one in practice).
        let mut sized = (0u32, 0u64, 0u64);
        for &slot in head.iter().chain(tail) {
            let slot = slot as usize;
            let Some(h) = self.hot.get(slot) else {
                continue;
            };
            if !h.live
                || h.model != model
                || now_ms.saturating_sub(h.last_report_ms) > cfg.stale_after_ms
                || (h.max_model_len > 0 && req.prompt_tokens >= u64::from(h.max_model_len))
                || req.exclude.contains(&slot)
                || has_bit(req.claimed, slot)
            {
                continue;
            }
            if sized.0 != h.block_size {
                sized = (
                    h.block_size,
                    blocks_for(total_tokens, h.block_size),
                    blocks_for(req.prompt_tokens + 1, h.block_size),
                );
            }
            let (_, all_blocks, prompt_min) = sized;
            if prompt_min > h.total {
                continue;
            }
            // A request whose reserved output would not fit even in an empty pool is clamped to
            // the pool: it can still run when the agent is idle.
            let blocks = all_blocks.min(h.total);
            let cached = if h.block_size == req.block_size {
                overlap.get(slot).copied().map_or(0, u64::from)
            } else {
                0
            };
            // Cached prefix blocks that no running request holds are counted in `free` too:
            // using them takes them out of `free`. Which of ours are is unknown, so as many as
            // the agent has evictable ones are assumed to be (exact on an idle agent).
            let need = blocks.saturating_sub(cached.saturating_sub(h.cached_evictable));
            let held = req.held.get(slot).copied().unwrap_or(0);
            let headroom = h.free as i128 - h.reserved as i128 - held as i128 - need as i128;
            let mut prefill_tokens = req
                .prompt_tokens
                .saturating_sub(cached * u64::from(h.block_size));
            let mut predicted_ttft_s = 0.0;
            let mut deficit = 0u64;
            let score = match cfg.kind {
                PolicyKind::Kv => {
                    if headroom < 0 && !req.may_hold {
                        continue;
                    }
                    let local = if h.block_size == req.block_size {
                        inflight.get(slot).copied().map_or(0, u64::from).max(cached)
                    } else {
                        0
                    };
                    prefill_tokens = req
                        .prompt_tokens
                        .saturating_sub(local * u64::from(h.block_size));
                    let room = h.free as i128 - h.reserved as i128 - held as i128;
                    let load = AgentLoad {
                        total_blocks: h.total,
                        room: room.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
                        running: h.running,
                        queued_prefill_tokens: h.queued_prefill,
                        prefill_tokens_per_s: f64::from(h.prefill_tps),
                        decode_step_s: f64::from(h.decode_step_us) / 1e6,
                        decode_batch: f64::from(h.decode_batch),
                        release_blocks_per_s: h.release_per_s,
                    };
                    let duplicate_tokens = (best_local.saturating_sub(local)
                        * u64::from(h.block_size))
                    .min(prefill_tokens);
                    let ask = Ask {
                        need_blocks: need,
                        uncached_tokens: prefill_tokens,
                        duplicate_tokens,
                        output_tokens: req.output_tokens,
                    };
                    let e = cost::estimate(&load, &ask, &cfg.priors, &cfg.cost);
                    predicted_ttft_s = e.ttft_s();
                    deficit = e.deficit_blocks;
                    -e.cost
                }
                PolicyKind::KvScore => {
                    if headroom < 0 {
                        continue;
                    }
                    let prefix = cached as f64 / prompt_blocks;
                    let room = headroom as f64 / h.total.max(1) as f64;
                    let queued = u64::from(h.waiting) + u64::from(h.pending);
                    let all = queued + u64::from(h.running) + 1;
                    let pressure = queued as f64 / all as f64;
                    cfg.weights.prefix * prefix + cfg.weights.headroom * room
                        - cfg.weights.queue * pressure
                }
                PolicyKind::RoundRobin => {
                    // The first eligible agent from the cursor wins outright.
                    best = Some(Route {
                        slot,
                        need_blocks: need,
                        cached_blocks: cached,
                        score: 0.0,
                        prefill_tokens,
                        predicted_ttft_s,
                    });
                    break;
                }
                PolicyKind::LeastRequests => {
                    let load = u64::from(h.running) + u64::from(h.waiting) + u64::from(h.pending);
                    -(load as f64)
                }
                PolicyKind::GpuUtilization => {
                    let util = match h.gpu_util {
                        Some(u) => f64::from(u),
                        None if h.total > 0 => {
                            100.0 * (h.total - h.free.min(h.total)) as f64 / h.total as f64
                        }
                        None => 0.0,
                    };
                    -util
                }
            };
            let candidate = Route {
                slot,
                need_blocks: need,
                cached_blocks: cached,
                score,
                prefill_tokens,
                predicted_ttft_s,
            };
            // `kv`: equal costs go to the agent with more blocks left after the request (then a
            // random one); the other policies' scores already include what they prefer.
            let left = if cfg.kind == PolicyKind::Kv {
                headroom
            } else {
                0
            };
            match best {
                None => {
                    best = Some(candidate);
                    best_deficit = deficit;
                    best_left = left;
                    ties = 1;
                }
                Some(b)
                    if score > b.score + 1e-12
                        || ((score - b.score).abs() <= 1e-12 && left > best_left) =>
                {
                    best = Some(candidate);
                    best_deficit = deficit;
                    best_left = left;
                    ties = 1;
                }
                Some(b) if (score - b.score).abs() <= 1e-12 && left == best_left => {
                    // Reservoir sampling: each tied agent ends up chosen with equal chance.
                    ties += 1;
                    if rng.below(ties) == 0 {
                        best = Some(candidate);
                        best_deficit = deficit;
                        best_left = left;
                    }
                }
                Some(_) => {}
            }
        }
        match best {
            Some(route) if best_deficit > 0 => Decision::Hold(route),
            Some(route) => Decision::Route(route),
            None => self.why_not(req),
        }
    }

    /// Sets in `claimed` (a bitset over slots, grown as needed) every agent that could serve a
    /// `prompt_tokens` prompt for `model` once it has room: fresh, serving the model,
    /// `max_model_len` above the prompt, a pool that holds the prompt, not in `exclude`. Returns
    /// true when no fresh agent of the model is left unclaimed (no later request for the model
    /// can be routed in this round).
    pub fn claim_for(
        &self,
        cfg: &PolicyConfig,
        model: &str,
        prompt_tokens: u64,
        exclude: &[Slot],
        now_ms: u64,
        claimed: &mut Vec<u64>,
    ) -> bool {
        let Some(model) = self.models.iter().position(|m| m == model) else {
            return false;
        };
        let words = words_for(self.hot.len());
        if claimed.len() < words {
            claimed.resize(words, 0);
        }
        let mut all = true;
        for &slot in self.model_slots.get(model).map_or(&[][..], Vec::as_slice) {
            let s = slot as usize;
            let Some(h) = self.hot.get(s) else {
                continue;
            };
            if !h.live || now_ms.saturating_sub(h.last_report_ms) > cfg.stale_after_ms {
                continue;
            }
            let fits = (h.max_model_len == 0 || prompt_tokens < u64::from(h.max_model_len))
                && blocks_for(prompt_tokens + 1, h.block_size) <= h.total;
            if fits && !exclude.contains(&s) {
                claimed[s / 64] |= 1 << (s % 64);
            } else if !has_bit(claimed, s) {
                all = false;
            }
        }
        all
    }

    /// Why `req` can never be served as it is, if it cannot (the checks [`decide`] makes when no
    /// agent is picked).
    ///
    /// [`decide`]: Cluster::decide
    pub fn rejection(&self, req: &RouteRequest<'_>) -> Option<Reject> {
        match self.why_not(req) {
            Decision::Reject(r) => Some(r),
            _ => None,
        }
    }

    /// No agent was picked: a request that can never be served is rejected (judged on every
    /// agent that ever reported the model, stale ones included: pool sizes do not go stale);
    /// anything else waits for capacity.
    fn why_not(&self, req: &RouteRequest<'_>) -> Decision {
        let known = || {
            self.agents
                .iter()
                .filter(|a| a.active && a.last_report_ms.is_some() && a.report.model == req.model)
        };
        if known().next().is_none() {
            return if self
                .agents
                .iter()
                .any(|a| a.active && a.last_report_ms.is_none())
            {
                // Agents still starting up might serve it.
                Decision::Wait
            } else {
                Decision::Reject(Reject::UnknownModel)
            };
        }
        let max_len = known().map(|a| a.report.max_model_len).max().unwrap_or(0);
        if max_len > 0 && req.prompt_tokens >= u64::from(max_len) {
            return Decision::Reject(Reject::PromptTooLong {
                prompt_tokens: req.prompt_tokens,
                max_model_len: max_len,
            });
        }
        let fits = |a: &AgentState| {
            blocks_for(req.prompt_tokens + 1, a.report.block_size) <= a.report.total_blocks
        };
        if !known().any(fits) {
            let largest = known().map(|a| a.report.total_blocks).max().unwrap_or(0);
            let bs = known().next().map_or(1, |a| a.report.block_size);
            return Decision::Reject(Reject::PromptTooLarge {
                prompt_blocks: blocks_for(req.prompt_tokens + 1, bs),
                largest_pool: largest,
            });
        }
        Decision::Wait
    }

    /// Checks the bookkeeping invariants (tests and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        for (slot, a) in self.agents.iter().enumerate() {
            let sum: u64 = a.reservations.iter().map(|r| r.blocks).sum();
            if sum != a.reserved_blocks {
                return Err(format!(
                    "agent {slot}: reserved {} != sum {sum}",
                    a.reserved_blocks
                ));
            }
            let keys: Vec<u64> = a.reservations.iter().map(|r| r.key).collect();
            if keys.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("agent {slot}: keys not increasing: {keys:?}"));
            }
            if keys
                .first()
                .is_some_and(|&k| k <= a.report.requests_received)
            {
                return Err(format!("agent {slot}: covered reservation kept: {keys:?}"));
            }
            for h in &a.cached {
                if !self.index.get(h).is_some_and(|s| s.contains(slot as u32)) {
                    return Err(format!("agent {slot}: hash {h} missing from index"));
                }
            }
            let prefill: u64 = a.reservations.iter().map(|r| r.prefill_tokens).sum();
            if prefill != a.pending_prefill {
                return Err(format!(
                    "agent {slot}: pending prefill {} != sum {prefill}",
                    a.pending_prefill
                ));
            }
            for (h, &n) in &a.inflight_count {
                if n == 0
                    || !self
                        .inflight_index
                        .get(h)
                        .is_some_and(|s| s.contains(slot as u32))
                {
                    return Err(format!(
                        "agent {slot}: in-flight hash {h} ({n}) not indexed"
                    ));
                }
            }
        }
        for (h, holders) in &self.inflight_index {
            for s in 0..self.agents.len() {
                let indexed = holders.contains(s as u32);
                if indexed != self.agents[s].inflight_count.contains_key(h) {
                    return Err(format!("in-flight index: hash {h} on {s} out of date"));
                }
            }
        }
        for (slot, a) in self.agents.iter().enumerate() {
            let model = self.models.iter().position(|m| *m == a.report.model);
            let want = model.map(|m| Self::hot_of(a, m as u32));
            if want.is_none() || self.hot.get(slot).copied() != want {
                return Err(format!("agent {slot}: packed view out of date"));
            }
        }
        for (h, holders) in &self.index {
            let slots: Vec<u32> = match holders {
                Holders::Few(v) => {
                    if v.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(format!("index: hash {h}: list not sorted: {v:?}"));
                    }
                    v.clone()
                }
                Holders::Many { bits, count } => {
                    let ones: u32 = bits.iter().map(|w| w.count_ones()).sum();
                    if ones != *count {
                        return Err(format!("index: hash {h}: count {count} != {ones} bits"));
                    }
                    (0..bits.len() as u32 * 64)
                        .filter(|&s| holders.contains(s))
                        .collect()
                }
            };
            if slots.is_empty() {
                return Err(format!("index: hash {h} held by nobody"));
            }
            for s in slots {
                if !self
                    .agents
                    .get(s as usize)
                    .is_some_and(|a| a.cached.contains(h))
                {
                    return Err(format!("index: hash {h} on {s} not cached there"));
                }
            }
        }
        for (m, list) in self.model_slots.iter().enumerate() {
            let want: Vec<u32> = (0..self.hot.len() as u32)
                .filter(|&s| self.hot[s as usize].model == m as u32)
                .collect();
            if *list != want {
                return Err(format!("model {m}: slots {list:?} != {want:?}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report(id: &str, epoch: u64, total: u64, free: u64) -> Report {
        Report {
            agent_id: id.into(),
            epoch,
            model: "m".into(),
            block_size: 16,
            total_blocks: total,
            free_blocks: free,
            max_model_len: 100_000,
            snapshot: true,
            ..Report::default()
        }
    }

    fn req<'a>(prompt: u64, output: u64, hashes: &'a [u64]) -> RouteRequest<'a> {
        RouteRequest {
            model: "m",
            prompt_tokens: prompt,
            output_tokens: output,
            block_size: 16,
            block_hashes: hashes,
            exclude: &[],
            claimed: &[],
            held: &[],
            may_hold: true,
        }
    }

    fn cluster(frees: &[(u64, u64)]) -> Cluster {
        let mut c = Cluster::new();
        for (i, &(total, free)) in frees.iter().enumerate() {
            let s = c.upsert_agent(&format!("a{i}"));
            c.apply_report(s, report(&format!("a{i}"), 1, total, free), 0);
        }
        c
    }

    #[test]
    fn picks_agent_with_most_headroom() {
        let mut c = cluster(&[(100, 10), (100, 80), (100, 40)]);
        let d = c.decide(
            &PolicyConfig::default(),
            &req(64, 16, &[]),
            0,
            &mut SplitMix64(1),
        );
        let Decision::Route(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!(r.slot, 1);
        assert_eq!(r.need_blocks, 5);
    }

    #[test]
    fn prefers_cached_prefix() {
        let mut c = cluster(&[(100, 50), (100, 60)]);
        let hashes = [11, 12, 13, 14];
        c.apply_report(
            0,
            Report {
                snapshot: false,
                events: vec![CacheEvent::Stored(vec![11, 12, 13, 14])],
                ..report("a0", 1, 100, 50)
            },
            1,
        );
        let d = c.decide(
            &PolicyConfig::default(),
            &req(70, 16, &hashes),
            1,
            &mut SplitMix64(1),
        );
        let Decision::Route(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!(r.slot, 0);
        assert_eq!(r.cached_blocks, 4);
        assert_eq!(r.need_blocks, 6 - 4);
    }

    /// Two measured agents: a0 caches a 15-block prefix; `free0`/`free1` blocks of room.
    fn locality_cluster(free0: u64, free1: u64) -> Cluster {
        let mut c = Cluster::new();
        for (i, free) in [(0, free0), (1, free1)] {
            let id = format!("a{i}");
            let s = c.upsert_agent(&id);
            let stored: Vec<u64> = if i == 0 { (100..115).collect() } else { vec![] };
            let r = Report {
                events: vec![CacheEvent::Stored(stored)],
                running_requests: 4,
                prefill_tokens_per_s: 300,
                decode_step_us: 20_000,
                decode_batch: 4,
                ..report(&id, 1, 91, free)
            };
            c.apply_report(s, r, 0);
        }
        c
    }

    /// A request of the cached group: 15 shared blocks + a question, 32 output tokens.
    fn group_hashes() -> Vec<u64> {
        (100..117).collect()
    }

    #[test]
    fn kv_waits_for_the_agent_caching_its_prefix_instead_of_spilling() {
        let hashes = group_hashes();
        // a0 has no room now; a1 has plenty but would recompute 280 tokens (~0.9 s at 300 tok/s).
        let mut c = locality_cluster(0, 60);
        let d = c.decide(
            &PolicyConfig::default(),
            &req(280, 32, &hashes),
            0,
            &mut SplitMix64(1),
        );
        let Decision::Hold(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!(r.slot, 0);
        assert_eq!(r.cached_blocks, 15);
        // The old score policy spills to the agent with room.
        let score = PolicyConfig {
            kind: PolicyKind::KvScore,
            ..PolicyConfig::default()
        };
        let Decision::Route(r) = c.decide(&score, &req(280, 32, &hashes), 0, &mut SplitMix64(1))
        else {
            panic!("no route")
        };
        assert_eq!(r.slot, 1);
        // With room on a0 it routes there at once.
        let mut c = locality_cluster(20, 60);
        let d = c.decide(
            &PolicyConfig::default(),
            &req(280, 32, &hashes),
            0,
            &mut SplitMix64(1),
        );
        assert!(matches!(d, Decision::Route(r) if r.slot == 0), "{d:?}");
    }

    #[test]
    fn kv_spills_when_the_wait_behind_earlier_requests_exceeds_the_recompute() {
        let hashes = group_hashes();
        let mut c = locality_cluster(0, 60);
        // Many blocks already promised to requests queued for a0.
        let held = [2000, 0];
        let d = c.decide(
            &PolicyConfig::default(),
            &RouteRequest {
                held: &held,
                ..req(280, 32, &hashes)
            },
            0,
            &mut SplitMix64(1),
        );
        assert!(matches!(d, Decision::Route(r) if r.slot == 1), "{d:?}");
        // A request that may not wait goes where there is room now.
        let d = c.decide(
            &PolicyConfig::default(),
            &RouteRequest {
                may_hold: false,
                ..req(280, 32, &hashes)
            },
            0,
            &mut SplitMix64(1),
        );
        assert!(matches!(d, Decision::Route(r) if r.slot == 1), "{d:?}");
    }

    #[test]
    fn kv_sends_a_new_groups_second_request_after_its_first() {
        let mut c = locality_cluster(60, 60);
        let cfg = PolicyConfig::default();
        let fresh: Vec<u64> = (500..517).collect();
        let Decision::Route(first) = c.decide(&cfg, &req(280, 32, &fresh), 0, &mut SplitMix64(7))
        else {
            panic!("no route")
        };
        c.reserve(&first);
        c.track_inflight(first.slot, &fresh, 0);
        assert_eq!(c.inflight_blocks(first.slot), 17);
        c.check_invariants().unwrap();
        for seed in 0..8 {
            let Decision::Route(second) =
                c.decide(&cfg, &req(280, 32, &fresh), 1, &mut SplitMix64(seed))
            else {
                panic!("no route")
            };
            assert_eq!(second.slot, first.slot, "seed {seed}");
            // In flight is locality only: the blocks still count against room.
            assert_eq!(second.need_blocks, first.need_blocks);
            assert_eq!(second.cached_blocks, 0);
        }
        // The agent reports the blocks as stored: they leave the in-flight view.
        c.apply_report(
            first.slot,
            Report {
                snapshot: false,
                events: vec![CacheEvent::Stored(fresh.clone())],
                ..report(&format!("a{}", first.slot), 1, 91, 40)
            },
            2,
        );
        assert_eq!(c.inflight_blocks(first.slot), 0);
        c.check_invariants().unwrap();
        // Never reported: forgotten after the TTL.
        let other: Vec<u64> = (900..910).collect();
        c.track_inflight(1, &other, 10);
        assert_eq!(c.inflight_blocks(1), 10);
        c.apply_report(1, report("a1", 1, 91, 60), 10 + INFLIGHT_TTL_MS);
        assert_eq!(c.inflight_blocks(1), 0);
        c.check_invariants().unwrap();
    }

    #[test]
    fn kv_balances_unshared_requests_by_running_batch_and_queued_prefill() {
        // No prefix anywhere: the agent with the smaller batch and no queue wins.
        let mut c = Cluster::new();
        for (i, running, queued) in [(0, 8u32, 2000u64), (1, 2, 0)] {
            let id = format!("a{i}");
            let s = c.upsert_agent(&id);
            let r = Report {
                running_requests: running,
                waiting_prefill_tokens: queued,
                ..report(&id, 1, 100, 50)
            };
            c.apply_report(s, r, 0);
        }
        let d = c.decide(
            &PolicyConfig::default(),
            &req(200, 32, &[1, 2, 3]),
            0,
            &mut SplitMix64(3),
        );
        assert!(matches!(d, Decision::Route(r) if r.slot == 1), "{d:?}");
        let Decision::Route(r) = d else {
            unreachable!()
        };
        assert!(r.predicted_ttft_s > 0.0 && r.prefill_tokens == 200, "{r:?}");
    }

    #[test]
    fn cached_prefix_blocks_that_are_free_still_count_against_room() {
        // 6 blocks, 4 of them a cached prefix. The agent has 3 evictable cached blocks (in its
        // free count): at most 3 of ours are free ones, so at least 1 is held by a running
        // request and is the only block not taken from `free`.
        let hashes = [11, 12, 13, 14];
        let mut c = cluster(&[(100, 50)]);
        let cached = |evictable| Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![11, 12, 13, 14])],
            cached_evictable_blocks: evictable,
            ..report("a0", 1, 100, 50)
        };
        c.apply_report(0, cached(3), 1);
        let d = c.decide(
            &PolicyConfig::default(),
            &req(70, 16, &hashes),
            1,
            &mut SplitMix64(1),
        );
        let Decision::Route(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!((r.cached_blocks, r.need_blocks), (4, 6 - 1));
        // None evictable: the whole prefix is held by running requests.
        c.apply_report(0, cached(0), 2);
        let Decision::Route(r) = c.decide(
            &PolicyConfig::default(),
            &req(70, 16, &hashes),
            2,
            &mut SplitMix64(1),
        ) else {
            panic!("no route")
        };
        assert_eq!((r.cached_blocks, r.need_blocks), (4, 6 - 4));
    }

    #[test]
    fn prefix_must_be_leading() {
        let mut c = cluster(&[(100, 50)]);
        c.apply_report(
            0,
            Report {
                snapshot: true,
                events: vec![CacheEvent::Stored(vec![12, 13])],
                ..report("a0", 1, 100, 50)
            },
            0,
        );
        let Decision::Route(r) = c.decide(
            &PolicyConfig::default(),
            &req(64, 0, &[11, 12, 13, 14]),
            0,
            &mut SplitMix64(1),
        ) else {
            panic!()
        };
        assert_eq!(r.cached_blocks, 0);
    }

    #[test]
    fn waits_when_no_room_and_rejects_never_fitting() {
        let mut c = cluster(&[(10, 2), (10, 3)]);
        let cfg = PolicyConfig::default();
        // Needs 5 blocks: the kv policy waits for the agent that makes room first (the one
        // 2 blocks short); asked not to wait for one agent, it waits for any.
        let d = c.decide(&cfg, &req(64, 16, &[]), 0, &mut SplitMix64(1));
        assert!(matches!(d, Decision::Hold(r) if r.slot == 1), "{d:?}");
        let no_hold = RouteRequest {
            may_hold: false,
            ..req(64, 16, &[])
        };
        assert_eq!(
            c.decide(&cfg, &no_hold, 0, &mut SplitMix64(1)),
            Decision::Wait
        );
        let score = PolicyConfig {
            kind: PolicyKind::KvScore,
            ..PolicyConfig::default()
        };
        assert_eq!(
            c.decide(&score, &req(64, 16, &[]), 0, &mut SplitMix64(1)),
            Decision::Wait
        );
        assert!(matches!(
            c.decide(&cfg, &req(16 * 10, 1, &[]), 0, &mut SplitMix64(1)),
            Decision::Reject(Reject::PromptTooLarge {
                largest_pool: 10,
                ..
            })
        ));
        let mut other = req(1, 1, &[]);
        other.model = "other";
        assert_eq!(
            c.decide(&cfg, &other, 0, &mut SplitMix64(1)),
            Decision::Reject(Reject::UnknownModel)
        );
    }

    #[test]
    fn stale_and_disconnected_agents_are_not_eligible() {
        let mut c = cluster(&[(100, 90), (100, 10)]);
        let cfg = PolicyConfig::default();
        c.set_disconnected(0);
        let Decision::Route(r) = c.decide(&cfg, &req(16, 16, &[]), 0, &mut SplitMix64(1)) else {
            panic!()
        };
        assert_eq!(r.slot, 1);
        // Both stale: wait, never crash or pick.
        assert_eq!(
            c.decide(&cfg, &req(16, 16, &[]), 10_000, &mut SplitMix64(1)),
            Decision::Wait
        );
    }

    #[test]
    fn reservations_retire_on_counter_and_reset_on_epoch() {
        let mut c = cluster(&[(100, 100)]);
        let cfg = PolicyConfig::default();
        let mut handles = Vec::new();
        for _ in 0..3 {
            let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 0, &mut SplitMix64(1))
            else {
                panic!()
            };
            handles.push(c.reserve(&r).unwrap());
        }
        assert_eq!(c.agents()[0].reserved_blocks(), 30);
        // The second request never reached the agent.
        assert!(c.cancel(handles[1]));
        assert_eq!(c.agents()[0].reserved_blocks(), 20);
        c.check_invariants().unwrap();
        // The agent has seen one request: only the first is retired.
        c.apply_report(
            0,
            Report {
                requests_received: 1,
                snapshot: false,
                ..report("a0", 1, 100, 90)
            },
            1,
        );
        assert_eq!(c.agents()[0].reserved_blocks(), 10);
        c.apply_report(
            0,
            Report {
                requests_received: 2,
                snapshot: false,
                ..report("a0", 1, 100, 80)
            },
            2,
        );
        assert_eq!(c.agents()[0].reserved_blocks(), 0);
        // A new epoch drops reservations and the cache.
        let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 2, &mut SplitMix64(1)) else {
            panic!()
        };
        let h = c.reserve(&r).unwrap();
        c.apply_report(
            0,
            Report {
                events: vec![CacheEvent::Stored(vec![1, 2])],
                ..report("a0", 2, 100, 100)
            },
            3,
        );
        assert_eq!(c.agents()[0].reserved_blocks(), 0);
        assert!(!c.cancel(h), "a reservation of the old epoch is gone");
        c.check_invariants().unwrap();
    }

    #[test]
    fn baselines_ignore_room() {
        let mut c = cluster(&[(10, 0), (10, 0)]);
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::LeastRequests,
            PolicyKind::GpuUtilization,
        ] {
            let cfg = PolicyConfig {
                kind,
                ..PolicyConfig::default()
            };
            assert!(matches!(
                c.decide(&cfg, &req(16, 16, &[]), 0, &mut SplitMix64(3)),
                Decision::Route(_)
            ));
        }
    }

    #[test]
    fn round_robin_cycles() {
        let mut c = cluster(&[(10, 10), (10, 10), (10, 10)]);
        let cfg = PolicyConfig {
            kind: PolicyKind::RoundRobin,
            ..PolicyConfig::default()
        };
        let mut picks = Vec::new();
        for _ in 0..6 {
            let Decision::Route(r) = c.decide(&cfg, &req(1, 1, &[]), 0, &mut SplitMix64(1)) else {
                panic!()
            };
            c.reserve(&r);
            picks.push(r.slot);
        }
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_keeps_one_cursor_per_model() {
        // Slots 0, 2 serve "m"; 1, 3 serve "n": picks for "n" must not move "m"'s turn.
        let mut c = Cluster::new();
        for (i, model) in ["m", "n", "m", "n"].iter().enumerate() {
            let s = c.upsert_agent(&format!("a{i}"));
            c.apply_report(
                s,
                Report {
                    model: model.to_string(),
                    ..report(&format!("a{i}"), 1, 10, 10)
                },
                0,
            );
        }
        let cfg = PolicyConfig {
            kind: PolicyKind::RoundRobin,
            ..PolicyConfig::default()
        };
        let mut picks = Vec::new();
        for model in ["m", "n", "m", "n", "m"] {
            let mut r = req(1, 1, &[]);
            r.model = model;
            let Decision::Route(route) = c.decide(&cfg, &r, 0, &mut SplitMix64(1)) else {
                panic!()
            };
            c.reserve(&route);
            picks.push(route.slot);
        }
        assert_eq!(picks, vec![0, 1, 2, 3, 0]);
    }

    #[test]
    fn claimed_agents_are_not_picked() {
        let mut c = cluster(&[(100, 90), (100, 10), (100, 50)]);
        let cfg = PolicyConfig::default();
        let mut claimed = Vec::new();
        // A 20-block prompt could use every pool; agent 1 is excluded for it.
        let all = c.claim_for(&cfg, "m", 320, &[1], 0, &mut claimed);
        assert!(!all, "agent 1 is still free for others");
        assert_eq!(claimed, vec![0b101]);
        let mut r = req(16, 0, &[]);
        r.claimed = &claimed;
        let Decision::Route(route) = c.decide(&cfg, &r, 0, &mut SplitMix64(1)) else {
            panic!()
        };
        assert_eq!(route.slot, 1);
        assert!(c.claim_for(&cfg, "m", 16, &[], 0, &mut claimed));
        let mut r = req(16, 0, &[]);
        r.claimed = &claimed;
        assert_eq!(c.decide(&cfg, &r, 0, &mut SplitMix64(1)), Decision::Wait);
    }

    #[test]
    fn retry_excludes_failed_agent() {
        let mut c = cluster(&[(100, 90), (100, 10)]);
        let mut r = req(16, 16, &[]);
        r.exclude = &[0];
        let Decision::Route(route) = c.decide(&PolicyConfig::default(), &r, 0, &mut SplitMix64(1))
        else {
            panic!()
        };
        assert_eq!(route.slot, 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Report {
            agent: usize,
            epoch_bump: bool,
            free: u64,
            received_step: u64,
            store: Vec<u64>,
            remove: Vec<u64>,
            snapshot: bool,
        },
        Route {
            prompt: u64,
            output: u64,
            hashes: Vec<u64>,
        },
        Cancel(usize),
        Disconnect(usize),
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0..5usize,
                prop::bool::weighted(0.05),
                0..200u64,
                0..3u64,
                prop::collection::vec(0..40u64, 0..6),
                prop::collection::vec(0..40u64, 0..3),
                prop::bool::weighted(0.1)
            )
                .prop_map(
                    |(agent, epoch_bump, free, received_step, store, remove, snapshot)| {
                        Op::Report {
                            agent,
                            epoch_bump,
                            free,
                            received_step,
                            store,
                            remove,
                            snapshot,
                        }
                    }
                ),
            (1..3000u64, 0..500u64, prop::collection::vec(0..40u64, 0..8)).prop_map(
                |(prompt, output, hashes)| Op::Route {
                    prompt,
                    output,
                    hashes
                }
            ),
            (0..64usize).prop_map(Op::Cancel),
            (0..5usize).prop_map(Op::Disconnect),
            (0..2000u64).prop_map(Op::Tick),
        ]
    }

    struct Sim {
        c: Cluster,
        epochs: Vec<u64>,
        received: Vec<u64>,
        totals: Vec<u64>,
        handles: Vec<ReservationHandle>,
        now: u64,
    }

    fn run(ops: &[Op], seed: u64, kind: PolicyKind) -> (Vec<Decision>, Sim) {
        let cfg = PolicyConfig {
            kind,
            ..PolicyConfig::default()
        };
        let mut sim = Sim {
            c: Cluster::new(),
            epochs: vec![1; 5],
            received: vec![0; 5],
            totals: vec![50, 100, 150, 200, 400],
            handles: Vec::new(),
            now: 0,
        };
        for i in 0..5 {
            sim.c.upsert_agent(&format!("a{i}"));
        }
        let mut rng = SplitMix64(seed);
        let mut decisions = Vec::new();
        for op in ops {
            match op {
                Op::Report {
                    agent,
                    epoch_bump,
                    free,
                    received_step,
                    store,
                    remove,
                    snapshot,
                } => {
                    if *epoch_bump {
                        sim.epochs[*agent] += 1;
                        sim.received[*agent] = 0;
                    }
                    sim.received[*agent] += received_step;
                    let total = sim.totals[*agent];
                    let r = Report {
                        agent_id: format!("a{agent}"),
                        epoch: sim.epochs[*agent],
                        model: "m".into(),
                        block_size: 16,
                        total_blocks: total,
                        free_blocks: (*free).min(total),
                        requests_received: sim.received[*agent],
                        max_model_len: 4096,
                        // Speed figures that vary with the op, so the cost model sees measured
                        // and unmeasured agents, busy and idle.
                        running_requests: (*free % 5) as u32,
                        room_released_blocks: sim.received[*agent] * 3,
                        prefill_tokens_per_s: ((*free * 37) % 2000) as u32,
                        decode_step_us: (*free * 150) as u32,
                        decode_batch: (*free % 8) as u32,
                        waiting_prefill_tokens: *free * 3,
                        snapshot: *snapshot,
                        events: vec![
                            CacheEvent::Stored(store.clone()),
                            CacheEvent::Removed(remove.clone()),
                        ],
                        ..Report::default()
                    };
                    sim.c.apply_report(*agent, r, sim.now);
                }
                Op::Route {
                    prompt,
                    output,
                    hashes,
                } => {
                    let rq = RouteRequest {
                        model: "m",
                        prompt_tokens: *prompt,
                        output_tokens: *output,
                        block_size: 16,
                        block_hashes: hashes,
                        exclude: &[],
                        claimed: &[],
                        held: &[],
                        may_hold: true,
                    };
                    let d = sim.c.decide(&cfg, &rq, sim.now, &mut rng);
                    if let Decision::Hold(r) = &d {
                        // Only the `kv` policy waits for one agent, and only one without room.
                        assert_eq!(kind, PolicyKind::Kv);
                        let a = &sim.c.agents()[r.slot];
                        assert!(a.eligible("m", sim.now, cfg.stale_after_ms));
                        assert!(
                            a.report.free_blocks < a.reserved_blocks() + r.need_blocks,
                            "held for {} although it has room",
                            r.slot
                        );
                    }
                    if let Decision::Route(r) = &d {
                        let a = &sim.c.agents()[r.slot];
                        // Stale or down agents are never picked.
                        assert!(a.eligible("m", sim.now, cfg.stale_after_ms));
                        if matches!(kind, PolicyKind::Kv | PolicyKind::KvScore) {
                            // Never an agent without room for what it needs.
                            assert!(
                                a.report.free_blocks >= a.reserved_blocks() + r.need_blocks,
                                "picked {} without room: free {} reserved {} need {}",
                                r.slot,
                                a.report.free_blocks,
                                a.reserved_blocks(),
                                r.need_blocks
                            );
                        }
                        let h = sim.c.reserve(r).unwrap();
                        sim.handles.push(h);
                        if kind == PolicyKind::Kv {
                            sim.c.track_inflight(r.slot, hashes, sim.now);
                        }
                    }
                    decisions.push(d);
                }
                Op::Cancel(i) => {
                    if !sim.handles.is_empty() {
                        let h = sim.handles.remove(i % sim.handles.len());
                        sim.c.cancel(h);
                    }
                }
                Op::Disconnect(a) => sim.c.set_disconnected(*a),
                Op::Tick(ms) => sim.now += ms,
            }
            sim.c.check_invariants().unwrap();
        }
        (decisions, sim)
    }

    /// Leading `hashes` in each agent's cache, computed the obvious way.
    fn naive_overlap(c: &Cluster, hashes: &[u64]) -> Vec<u32> {
        c.agents()
            .iter()
            .map(|a| hashes.iter().take_while(|h| a.cached.contains(h)).count() as u32)
            .collect()
    }

    #[test]
    fn holders_switch_between_list_and_bitset() {
        // 300 agents: 5 words, lists hold at most 10 slots.
        let mut c = Cluster::new();
        for i in 0..300 {
            c.upsert_agent(&format!("a{i}"));
        }
        for i in 0..300 {
            c.apply_report(
                i,
                Report {
                    events: vec![CacheEvent::Stored(vec![7, 8])],
                    ..report(&format!("a{i}"), 1, 10, 10)
                },
                0,
            );
            c.check_invariants().unwrap();
        }
        assert!(matches!(
            c.index.get(&7),
            Some(Holders::Many { count: 300, .. })
        ));
        assert_eq!(c.prefix_overlap(&[7, 8, 9]), vec![2; 300]);
        for i in 0..298 {
            c.apply_report(
                i,
                Report {
                    snapshot: false,
                    events: vec![CacheEvent::Removed(vec![7])],
                    ..report(&format!("a{i}"), 1, 10, 10)
                },
                0,
            );
            c.check_invariants().unwrap();
        }
        assert_eq!(c.index.get(&7), Some(&Holders::Few(vec![298, 299])));
        let mut want = vec![0; 300];
        want[298] = 2;
        want[299] = 2;
        assert_eq!(c.prefix_overlap(&[7, 8]), want);
        for i in 298..300 {
            c.apply_report(
                i,
                Report {
                    events: vec![CacheEvent::AllCleared],
                    snapshot: false,
                    ..report(&format!("a{i}"), 1, 10, 10)
                },
                0,
            );
        }
        assert_eq!(c.index.get(&7), None);
        c.check_invariants().unwrap();
    }

    /// Caches drawn from a few chains (so many agents share prefixes, some with holes), with
    /// enough agents that popular hashes are held as bitsets and rare ones as lists.
    /// Agent count, each agent's stored hashes, and (agent, hashes) removals.
    type RandomCluster = (usize, Vec<Vec<u64>>, Vec<(usize, Vec<u64>)>);

    fn random_cluster() -> impl Strategy<Value = RandomCluster> {
        (1..400usize).prop_flat_map(|n| {
            (
                Just(n),
                prop::collection::vec(prop::collection::vec(0..24u64, 0..24), n),
                prop::collection::vec((0..n, prop::collection::vec(0..24u64, 0..6)), 0..40),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The bitset walk gives every agent exactly the leading-run length a per-agent scan
        /// gives, after stores, removals and snapshots, for prompts that match, diverge or
        /// repeat hashes.
        #[test]
        fn overlap_equals_naive_reference(
            (n, stores, removals) in random_cluster(),
            prompts in prop::collection::vec(prop::collection::vec(0..24u64, 0..30), 1..8),
            chain_len in 0..24usize,
        ) {
            let mut c = Cluster::new();
            for (i, stored) in stores.iter().enumerate() {
                let s = c.upsert_agent(&format!("a{i}"));
                // Most agents hold a prefix of the chain 0, 1, 2, ... plus random hashes.
                let mut hashes: Vec<u64> = (0..(i % (chain_len + 1)) as u64).collect();
                hashes.extend(stored);
                c.apply_report(s, Report {
                    events: vec![CacheEvent::Stored(hashes)],
                    ..report(&format!("a{i}"), 1, 10, 10)
                }, 0);
            }
            for (agent, removed) in &removals {
                c.apply_report(*agent, Report {
                    snapshot: false,
                    events: vec![CacheEvent::Removed(removed.clone())],
                    ..report(&format!("a{agent}"), 1, 10, 10)
                }, 0);
            }
            c.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(c.agents().len(), n);
            let chain: Vec<u64> = (0..chain_len as u64).collect();
            for p in prompts.iter().chain(std::iter::once(&chain)) {
                let want = naive_overlap(&c, p);
                prop_assert_eq!(c.prefix_overlap(p), want);
            }
        }
    }

    proptest! {
        #[test]
        fn kv_policy_never_overcommits_and_books_balance(
            ops in prop::collection::vec(op(), 1..200),
            seed in any::<u64>(),
        ) {
            let (_, sim) = run(&ops, seed, PolicyKind::Kv);
            for a in sim.c.agents() {
                // Reservations never go negative: the total equals the sum of live ones.
                prop_assert!(a.reserved_blocks() <= a.pending_requests() as u64 * 400);
            }
        }

        #[test]
        fn deterministic_for_a_fixed_seed(
            ops in prop::collection::vec(op(), 1..150),
            seed in any::<u64>(),
            kind in prop_oneof![
                Just(PolicyKind::Kv),
                Just(PolicyKind::KvScore),
                Just(PolicyKind::RoundRobin),
                Just(PolicyKind::LeastRequests),
                Just(PolicyKind::GpuUtilization)
            ],
        ) {
            let (a, _) = run(&ops, seed, kind);
            let (b, _) = run(&ops, seed, kind);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn all_policies_only_pick_eligible_agents(
            ops in prop::collection::vec(op(), 1..150),
            seed in any::<u64>(),
        ) {
            for kind in [PolicyKind::KvScore, PolicyKind::RoundRobin, PolicyKind::LeastRequests, PolicyKind::GpuUtilization] {
                run(&ops, seed, kind);
            }
        }

        #[test]
        fn full_reports_retire_everything(
            n in 1..50usize,
            seed in any::<u64>(),
        ) {
            let mut c = cluster(&[(1000, 1000), (1000, 1000)]);
            let mut rng = SplitMix64(seed);
            let cfg = PolicyConfig::default();
            let mut sent = [0u64; 2];
            for _ in 0..n {
                if let Decision::Route(r) = c.decide(&cfg, &req(100, 10, &[]), 0, &mut rng) {
                    c.reserve(&r);
                    sent[r.slot] += 1;
                }
            }
            for (s, &count) in sent.iter().enumerate() {
                c.apply_report(s, Report {
                    requests_received: count,
                    snapshot: false,
                    ..report(&format!("a{s}"), 1, 1000, 1000)
                }, 1);
                prop_assert_eq!(c.agents()[s].reserved_blocks(), 0);
                prop_assert_eq!(c.agents()[s].pending_requests(), 0);
            }
        }
    }
}
