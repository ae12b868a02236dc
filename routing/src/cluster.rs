//! The cluster view: what the gateway knows of each agent (capacity figures from its last report,
//! the prefix-cache block hashes it holds, the gateway's own outstanding reservations, prompts in
//! flight to it) and the index from block hash to the agents caching it. Decisions over this
//! view are made in [`pipeline`](crate::pipeline).

use std::collections::VecDeque;

use crate::cost::{ReleaseRate, TtftScale};
use crate::index::{has_bit, prefix_overlap, words_for, BlockMap, BlockSet, Holders, Scratch};
use crate::policy::{blocks_for, Decision, PolicyConfig, Reject, Route, RouteRequest, Slot};
use crate::registry::ScorerRegistry;
use crate::scorer::{AgentView, PipelineScratch};
use crate::sent::SentTree;

/// Prefix-cache changes carried by a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Stored(Vec<u64>),
    Removed(Vec<u64>),
    AllCleared,
    /// Cached blocks a request uses again (they were evictable).
    InUse(Vec<u64>),
    /// Cached blocks no request uses any more (free until reused: evictable).
    Evictable(Vec<u64>),
    /// The agent's host tier keeps these blocks (evicted from its device pool; a hit there is
    /// copied back, not recomputed).
    HostStored(Vec<u64>),
    /// These blocks are gone from the agent's host tier.
    HostRemoved(Vec<u64>),
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
    /// What one more sequence adds to a decode step, as the agent fitted it (0: not measured).
    pub decode_step_per_seq_ns: u32,
    /// What one more KV token read adds to a decode step there, picoseconds (0: not measured).
    pub decode_step_per_kv_token_ps: u32,
    /// Tokens the running requests hold in the KV cache there.
    pub running_kv_tokens: u64,
    /// Room given back by ended requests since the epoch began (monotonic).
    pub room_released_blocks: u64,
    /// Prompt tokens waiting in the engine's queue.
    pub waiting_prefill_tokens: u64,
    /// Prompt tokens the engine's running requests have still to compute.
    pub running_prefill_tokens: u64,
    /// True: `events` hold the agent's whole cache; what was known before is dropped.
    pub snapshot: bool,
    /// The agent reports which cached blocks are in use (`InUse` / `Evictable` events; a stored
    /// block is in use until `Evictable`). Reusing a block in use takes no room, so a request
    /// sharing a running request's prefix needs only its own blocks.
    pub block_use_events: bool,
    pub events: Vec<CacheEvent>,
    /// The agent acknowledges this gateway's dispatches (`acked_dispatches`): reservations are
    /// retired by their own acknowledgement, not by `requests_received`.
    pub dispatch_acks: bool,
    /// Dispatches (reservation ids, see [`ReservationHandle::id`]) the agent took in or refused
    /// since the previous report; a snapshot may repeat older ones.
    pub acked_dispatches: Vec<u64>,
    /// The agent is draining: no new request goes there.
    pub draining: bool,
    /// The agent's KV host tier: its slots and those holding a block (0: none).
    pub host_total_blocks: u64,
    pub host_used_blocks: u64,
    /// Measured nanoseconds to copy one block back from the host tier (0: not measured).
    pub host_copy_block_ns: u32,
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
    /// Its `need` counts prefix blocks as shared with running requests.
    shared: bool,
    /// Clock value (ms) when it was made; an unacknowledged dispatch expires
    /// [`DISPATCH_ACK_TTL_MS`] later.
    at_ms: u64,
}

/// How long a reservation on an agent that acknowledges dispatches waits for its
/// acknowledgement (the agent acknowledges on arrival: this only bounds a request lost on the
/// way, whose connection error the gateway did not see).
pub const DISPATCH_ACK_TTL_MS: u64 = 15_000;

/// How long a prefix sent to an agent counts as cached there before the agent reports it
/// (it normally does within one prefill; this only bounds a request that never got there).
pub const INFLIGHT_TTL_MS: u64 = 30_000;

/// Longest a gateway leaves its queue without deciding it again (ms). A queued request waits for
/// room, so the queue is decided again when a report opens room ([`Cluster::open_room`]) and a
/// request arrives; this bounds the wait for what neither shows (a queue deadline, an agent that
/// went stale, an agent whose cost fell below a hold's without room changing).
pub const REPUMP_MS: u64 = 250;

/// Names one reservation, to cancel it when the request never reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationHandle {
    pub slot: Slot,
    pub epoch: u64,
    /// Unique in this cluster view: the dispatch sequence number the request carries to the
    /// agent (`x-kvroute-dispatch`), which the agent acknowledges.
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
    pub(crate) cached: BlockSet,
    /// Of `cached`, the blocks the agent said no request uses (agents with `block_use_events`).
    idle: BlockSet,
    /// The blocks its host tier keeps (may overlap `cached`: the tier is inclusive).
    host: BlockSet,
    reservations: VecDeque<Reservation>,
    reserved_blocks: u64,
    /// Of the reservations, prompt tokens still to compute.
    pending_prefill: u64,
    /// Room released per second while busy, from the reports.
    release: ReleaseRate,
    /// Observed over predicted time to first token, averaged (see [`Cluster::observe_ttft`]).
    ttft: TtftScale,
    /// Reservations retired by the agent's acknowledgement, and expired unacknowledged.
    acked: u64,
    expired: u64,
    /// Preemptions the agent reported while this gateway had room reserved there.
    over_admitted: u64,
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

    /// Reservations retired by the agent's acknowledgement of their dispatch (since the gateway
    /// started), and those that expired unacknowledged.
    pub fn dispatches_acked(&self) -> u64 {
        self.acked
    }

    pub fn dispatches_expired(&self) -> u64 {
        self.expired
    }

    /// Preemptions the agent reported while this gateway had blocks reserved on it: room was
    /// over-admitted (by this gateway, another one, or direct clients).
    pub fn over_admissions(&self) -> u64 {
        self.over_admitted
    }

    /// Block hashes the agent is known to cache.
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Observed over predicted time to first token here (1: not calibrated yet).
    pub fn ttft_scale(&self) -> f64 {
        self.ttft.scale()
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
            && !self.report.draining
            && self
                .last_report_ms
                .is_some_and(|t| now_ms.saturating_sub(t) <= stale_after_ms)
    }
}

/// The agents, their caches and the gateway's reservations.
#[derive(Debug, Default)]
pub struct Cluster {
    pub(crate) agents: Vec<AgentState>,
    pub(crate) hot: Vec<AgentView>,
    /// Interned model names (`AgentView::model` indexes this).
    pub(crate) models: Vec<String>,
    /// Slots of the agents whose last report names each model, ascending (by `AgentView::model`).
    pub(crate) model_slots: Vec<Vec<u32>>,
    /// Block hash → agents caching it.
    pub(crate) index: BlockMap<Holders>,
    /// Block hash → agents a prompt holding it was sent to, not yet reported as cached.
    pub(crate) inflight_index: BlockMap<Holders>,
    /// Block hash → agents caching it with a request using it (agents with `block_use_events`).
    pub(crate) in_use_index: BlockMap<Holders>,
    /// Block hash → agents holding it in either tier (device cache or host tier); empty while
    /// no agent reports a host tier, and then not walked.
    pub(crate) reach_index: BlockMap<Holders>,
    /// Host-tier entries known over all agents (0: `reach_index` is not kept).
    pub(crate) host_entries: usize,
    /// Round-robin cursor per model (by `AgentView::model`): the slot after the last one reserved.
    pub(crate) rr_next: Vec<Slot>,
    pub(crate) next_reservation_id: u64,
    /// The latest clock value (ms) a report was applied at: when new reservations are made.
    clock_ms: u64,
    pub(crate) scratch: Scratch,
    pub(crate) scratch_inflight: Scratch,
    pub(crate) scratch_in_use: Scratch,
    pub(crate) scratch_reach: Scratch,
    /// Scorers by id (the built-in ones, then any the program registered).
    pub(crate) scorers: ScorerRegistry,
    pub(crate) pipeline: PipelineScratch,
    /// What was sent to each agent (kept for the `cache-aware` policy only).
    pub(crate) sent: SentTree,
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
    fn hot_of(a: &AgentState, model: u32) -> AgentView {
        let r = &a.report;
        AgentView {
            live: a.active && a.connected && a.last_report_ms.is_some() && !r.draining,
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
            queued_prefill: r
                .waiting_prefill_tokens
                .saturating_add(r.running_prefill_tokens)
                .saturating_add(a.pending_prefill),
            prefill_tps: r.prefill_tokens_per_s,
            host_block_cost: crate::scorer::host_block_cost(
                r.host_copy_block_ns,
                r.prefill_tokens_per_s,
                r.block_size,
            ),
            decode_step_us: r.decode_step_us,
            decode_batch: r.decode_batch,
            decode_per_seq_ns: r.decode_step_per_seq_ns,
            decode_per_kv_token_ps: r.decode_step_per_kv_token_ps,
            running_kv_tokens: r.running_kv_tokens,
            release_per_s: a.release.blocks_per_s,
            ttft_scale: a.ttft.scale(),
            credited_pending: a.reservations.iter().filter(|r| r.shared).count() as u32,
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
            self.sent.forget(slot);
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
        self.clear_cache(slot);
        self.clear_inflight(slot);
        let a = &mut self.agents[slot];
        a.reservations.clear();
        a.reserved_blocks = 0;
        a.pending_prefill = 0;
        a.release = ReleaseRate::default();
        a.ttft = TtftScale::default();
    }

    /// Forgets every block the agent was known to cache.
    fn clear_cache(&mut self, slot: Slot) {
        let words = words_for(self.agents.len());
        let a = &mut self.agents[slot];
        a.idle.clear();
        let hashes: Vec<u64> = a.cached.drain().collect();
        let host: Vec<u64> = a.host.drain().collect();
        self.host_entries -= host.len();
        for h in hashes.into_iter().chain(host) {
            remove_holder(&mut self.index, h, slot, words);
            remove_holder(&mut self.in_use_index, h, slot, words);
            remove_holder(&mut self.reach_index, h, slot, words);
        }
        if self.host_entries == 0 {
            self.reach_index.clear();
        }
    }

    /// Whether the reach index (either tier) is kept: some agent has reported a host tier.
    fn keeps_reach(&self) -> bool {
        self.host_entries > 0
    }

    /// Indexes every cached block of every agent in `reach_index` (the first host-tier entry
    /// of the cluster turns the index on).
    fn build_reach(&mut self) {
        let words = words_for(self.agents.len());
        for (slot, a) in self.agents.iter().enumerate() {
            for &h in a.cached.iter().chain(&a.host) {
                add_holder(&mut self.reach_index, h, slot, words);
            }
        }
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

    /// A request dispatched to the agent in `slot` during `epoch` with a predicted time to first
    /// token of `predicted_s` saw its first token after `observed_s`: the agent's later
    /// predictions are scaled by the running ratio of the two (learned, not configured).
    pub fn observe_ttft(&mut self, slot: Slot, epoch: u64, predicted_s: f64, observed_s: f64) {
        let Some(a) = self.agents.get_mut(slot) else {
            return;
        };
        if a.report.epoch != epoch {
            return;
        }
        a.ttft.observe(predicted_s, observed_s);
        self.sync_hot(slot);
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
            self.clear_cache(slot);
        }
        let tracks_use = report.block_use_events;
        let words = words_for(self.agents.len());
        for ev in events {
            match ev {
                CacheEvent::Stored(hashes) => {
                    for h in hashes {
                        let a = &mut self.agents[slot];
                        if a.inflight_count.remove(&h).is_some() {
                            remove_holder(&mut self.inflight_index, h, slot, words);
                        }
                        let a = &mut self.agents[slot];
                        let newly = a.cached.insert(h);
                        // A block is stored by the request that computed it: in use.
                        let was_idle = a.idle.remove(&h);
                        if newly {
                            add_holder(&mut self.index, h, slot, words);
                            if self.host_entries > 0 {
                                add_holder(&mut self.reach_index, h, slot, words);
                            }
                        }
                        if tracks_use && (newly || was_idle) {
                            add_holder(&mut self.in_use_index, h, slot, words);
                        }
                    }
                }
                CacheEvent::Removed(hashes) => {
                    for h in hashes {
                        let a = &mut self.agents[slot];
                        a.idle.remove(&h);
                        if a.cached.remove(&h) {
                            let in_host = a.host.contains(&h);
                            remove_holder(&mut self.index, h, slot, words);
                            remove_holder(&mut self.in_use_index, h, slot, words);
                            if !in_host {
                                remove_holder(&mut self.reach_index, h, slot, words);
                            }
                        }
                    }
                }
                CacheEvent::HostStored(hashes) => {
                    for h in hashes {
                        if self.agents[slot].host.insert(h) {
                            if self.host_entries == 0 {
                                self.build_reach();
                            }
                            self.host_entries += 1;
                            add_holder(&mut self.reach_index, h, slot, words);
                        }
                    }
                }
                CacheEvent::HostRemoved(hashes) => {
                    for h in hashes {
                        let a = &mut self.agents[slot];
                        if a.host.remove(&h) {
                            self.host_entries -= 1;
                            if !a.cached.contains(&h) {
                                remove_holder(&mut self.reach_index, h, slot, words);
                            }
                            if self.host_entries == 0 {
                                self.reach_index.clear();
                            }
                        }
                    }
                }
                CacheEvent::AllCleared => self.clear_cache(slot),
                CacheEvent::InUse(hashes) => {
                    for h in hashes {
                        let a = &mut self.agents[slot];
                        if tracks_use && a.cached.contains(&h) && a.idle.remove(&h) {
                            add_holder(&mut self.in_use_index, h, slot, words);
                        }
                    }
                }
                CacheEvent::Evictable(hashes) => {
                    for h in hashes {
                        let a = &mut self.agents[slot];
                        if tracks_use && a.cached.contains(&h) && a.idle.insert(h) {
                            remove_holder(&mut self.in_use_index, h, slot, words);
                        }
                    }
                }
            }
        }
        self.expire_inflight(slot, now_ms);
        self.clock_ms = self.clock_ms.max(now_ms);
        let a = &mut self.agents[slot];
        if !new_epoch && a.reserved_blocks > 0 {
            a.over_admitted += report.preemptions.saturating_sub(a.report.preemptions);
        }
        if report.dispatch_acks {
            retire_acked(a, &report.acked_dispatches, now_ms);
        }
        // The agent's counter now covers `covered` of our dispatches: it counts those requests.
        // Which ones is unknown (requests sent at nearly the same time may arrive in either
        // order), so the smallest are retired and the largest stay reserved: whatever arrived,
        // what stays reserved is at least what the agent has not counted yet.
        let covered = if report.dispatch_acks {
            0
        } else {
            a.reservations
                .iter()
                .take_while(|r| r.key <= report.requests_received)
                .count()
        };
        if covered > 0 {
            if covered < a.reservations.len() {
                a.reservations
                    .make_contiguous()
                    .sort_by_key(|r| (r.blocks, r.key));
            }
            for _ in 0..covered {
                if let Some(r) = a.reservations.pop_front() {
                    a.reserved_blocks = a.reserved_blocks.saturating_sub(r.blocks);
                    a.pending_prefill = a.pending_prefill.saturating_sub(r.prefill_tokens);
                }
            }
            // The rest are covered by the next counts, in dispatch order.
            a.reservations.make_contiguous().sort_by_key(|r| r.id);
            for (i, r) in a.reservations.iter_mut().enumerate() {
                r.key = report.requests_received + 1 + i as u64;
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

    /// What this gateway sent to the agent in `slot` and still remembers, in blocks
    /// (`cache-aware` policy).
    pub fn sent_blocks(&self, slot: Slot) -> u64 {
        self.sent.size(slot)
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
            shared: route.shared_blocks > 0,
            at_ms: self.clock_ms,
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
        if !a.report.dispatch_acks {
            for r in a.reservations.iter_mut().skip(pos) {
                r.key -= 1;
            }
        }
        self.sync_hot(handle.slot);
        true
    }

    /// Room the agent in `slot` offers new requests now: its free blocks less this gateway's
    /// reservations; `None` while it is not fresh at `now_ms` (or not listed). Compared before
    /// and after a report, it says whether the report opened room a queued request could take:
    /// most reports (a step's progress) only take room, and a queue pass then decides nothing
    /// new.
    pub fn open_room(&self, slot: Slot, now_ms: u64, stale_after_ms: u64) -> Option<u64> {
        let a = self.agents.get(slot)?;
        a.fresh(now_ms, stale_after_ms)
            .then(|| a.report.free_blocks.saturating_sub(a.reserved_blocks))
    }

    /// `Retry-After` for a refused request of `model` when the model's requests need `needed`
    /// blocks in all (see [`crate::cost::retry_after_s`]): room and release rates of the
    /// model's fresh agents at clock `now_ms`. `None` before any release rate was observed.
    pub fn retry_after_s(
        &self,
        model: &str,
        needed: u64,
        now_ms: u64,
        stale_after_ms: u64,
    ) -> Option<u64> {
        let (room, rate) = self
            .agents
            .iter()
            .filter(|a| a.eligible(model, now_ms, stale_after_ms))
            .fold((0u64, 0.0f64), |(room, rate), a| {
                (
                    room + a.report.free_blocks.saturating_sub(a.reserved_blocks),
                    rate + a.release.blocks_per_s,
                )
            });
        crate::cost::retry_after_s(needed, room, rate)
    }

    /// Leading blocks of `hashes` cached on each agent, by slot (the walk behind [`decide`]).
    ///
    /// [`decide`]: Cluster::decide
    #[cfg(test)]
    pub(crate) fn prefix_overlap(&mut self, hashes: &[u64]) -> Vec<u32> {
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
        let reach: &[u32] = if self.host_entries > 0 {
            prefix_overlap(&self.reach_index, hashes, n, &mut self.scratch_reach);
            &self.scratch_reach.overlap
        } else {
            &[]
        };
        let slots: &[u32] = self.model_slots.get(model).map_or(&[], Vec::as_slice);
        slots
            .iter()
            .map(|&s| {
                let s = s as usize;
                let cached = self.scratch.overlap.get(s).copied().unwrap_or(0);
                cached
                    .max(inflight.get(s).copied().unwrap_or(0))
                    .max(reach.get(s).copied().unwrap_or(0))
            })
            .max()
            .map_or(0, u64::from)
    }

    /// The registered scorers.
    pub fn scorers(&self) -> &ScorerRegistry {
        &self.scorers
    }

    /// The registered scorers, to add one (see [`ScorerRegistry::register`]).
    pub fn scorers_mut(&mut self) -> &mut ScorerRegistry {
        &mut self.scorers
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
    pub(crate) fn why_not(&self, req: &RouteRequest<'_>) -> Decision {
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
            // Retired by acknowledgement, the counter says nothing about them.
            if !a.report.dispatch_acks {
                if keys.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("agent {slot}: keys not increasing: {keys:?}"));
                }
                if keys
                    .first()
                    .is_some_and(|&k| k <= a.report.requests_received)
                {
                    return Err(format!("agent {slot}: covered reservation kept: {keys:?}"));
                }
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
        for (slot, a) in self.agents.iter().enumerate() {
            if let Some(h) = a.idle.iter().find(|h| !a.cached.contains(h)) {
                return Err(format!("agent {slot}: idle hash {h} not cached"));
            }
        }
        for (h, holders) in &self.in_use_index {
            for s in 0..self.agents.len() {
                let a = &self.agents[s];
                if holders.contains(s as u32) && (!a.cached.contains(h) || a.idle.contains(h)) {
                    return Err(format!("in-use index: hash {h} on {s} not cached in use"));
                }
            }
        }
        let host: usize = self.agents.iter().map(|a| a.host.len()).sum();
        if host != self.host_entries {
            return Err(format!(
                "{} host entries counted, {host} held",
                self.host_entries
            ));
        }
        if self.keeps_reach() {
            for (slot, a) in self.agents.iter().enumerate() {
                for h in a.cached.iter().chain(&a.host) {
                    if !self
                        .reach_index
                        .get(h)
                        .is_some_and(|s| s.contains(slot as u32))
                    {
                        return Err(format!("agent {slot}: hash {h} missing from reach index"));
                    }
                }
            }
            for (h, holders) in &self.reach_index {
                for s in 0..self.agents.len() {
                    let a = &self.agents[s];
                    if holders.contains(s as u32) && !a.cached.contains(h) && !a.host.contains(h) {
                        return Err(format!("reach index: hash {h} on {s} in neither tier"));
                    }
                }
            }
        } else if !self.reach_index.is_empty() {
            return Err("reach index kept with no host entries".into());
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

/// Adds `slot` to the holders of `hash` in `index`.
fn add_holder(index: &mut BlockMap<Holders>, hash: u64, slot: Slot, words: usize) {
    index
        .entry(hash)
        .or_insert_with(|| Holders::Few(Vec::new()))
        .insert(slot as u32, words);
}

/// Removes `slot` from the holders of `hash` in `index` (the entry goes with its last holder).
fn remove_holder(index: &mut BlockMap<Holders>, hash: u64, slot: Slot, words: usize) {
    if let Some(holders) = index.get_mut(&hash) {
        if holders.remove(slot as u32, words) {
            index.remove(&hash);
        }
    }
}

/// Retires the agent's reservations whose dispatch it acknowledged, and those whose
/// acknowledgement is overdue by `now_ms` ([`DISPATCH_ACK_TTL_MS`]).
fn retire_acked(a: &mut AgentState, acked: &[u64], now_ms: u64) {
    let n = a.reservations.len();
    if !acked.is_empty() {
        a.reservations.retain(|r| !acked.contains(&r.id));
    }
    let after_acks = a.reservations.len();
    a.reservations
        .retain(|r| r.at_ms.saturating_add(DISPATCH_ACK_TTL_MS) > now_ms);
    a.acked += (n - after_acks) as u64;
    a.expired += (after_acks - a.reservations.len()) as u64;
    if a.reservations.len() < n {
        a.reserved_blocks = a.reservations.iter().map(|r| r.blocks).sum();
        a.pending_prefill = a.reservations.iter().map(|r| r.prefill_tokens).sum();
    }
}
