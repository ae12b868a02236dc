//! One pass over a gateway's admission queue, shared by the gateway's router and the simulator.
//!
//! The queued requests are decided one by one, in queue order, and each decision sees what the
//! requests before it in the pass took:
//!
//! - a request that must wait for any agent (`Wait`) *claims* the agents of its model it could
//!   use, so a later, smaller request cannot take the room it waits for; once every agent of a
//!   model is claimed, the model is *blocked* and its later requests only wait;
//! - a request that waits for one agent (`Hold`) has its blocks counted *held* there, so later
//!   requests do not take that room (a second held request of the same cached prefix on the same
//!   agent is charged only what it adds: [`HeldPrefixes`]);
//! - the blocks of a request that just finished are held from every request but the next turn
//!   of its conversation, for a short window ([`QueuePass::keep`], `--keep-finished-for`).
//!
//! The caller owns the queue, the order and what happens to a routed request; this module owns
//! the bookkeeping between decisions. A decision allocates only while the pass's buffers grow and
//! when a model becomes blocked; keeping a finished request's blocks allocates once, when it ends.

use crate::cluster::Cluster;
use crate::policy::{
    Decision, HeldPrefixes, PolicyConfig, RandomSource, Reject, RouteRequest, Slot,
};

/// What the pass decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Passed {
    pub decision: Decision,
    /// For a `Hold`: the blocks already held on its agent by the requests before it in this
    /// pass (what its own charge was added to).
    pub held_before: u64,
}

/// The state of one queue pass (reused from pass to pass: [`QueuePass::begin`] clears it), and
/// the blocks of finished requests kept from later ones for a while ([`QueuePass::keep`]), which
/// outlive a pass.
#[derive(Debug, Default, Clone)]
pub struct QueuePass {
    claimed: Vec<u64>,
    held: Vec<u64>,
    held_prefixes: HeldPrefixes,
    blocked: Vec<String>,
    /// By the last full block of the finished request's prompt.
    kept: std::collections::HashMap<u64, Vec<Kept>>,
    /// How often what was kept was taken by a next turn (moving average; see [`Self::keep`]).
    kept_use: KeptUse,
    /// Blocks kept on each agent, by slot (this pass).
    kept_on: Vec<u64>,
    /// The agents keeping blocks for the request being decided.
    owned: Vec<Slot>,
    /// The last hashes `kept` holds (and perhaps some it held): most of a prompt's hashes are
    /// ruled out with a bit test rather than a map lookup.
    kept_filter: KeptFilter,
}

/// A 4,096-bit filter of hashes (a Bloom filter with one hash function: block hashes are
/// already uniform): `may_hold` is false for a hash never inserted since the last clear, except
/// for about one in 4,096 / (hashes inserted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeptFilter([u64; 64]);

impl Default for KeptFilter {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl KeptFilter {
    fn bit(h: u64) -> (usize, u64) {
        let b = (h ^ (h >> 32)) & 4095;
        ((b / 64) as usize, 1 << (b % 64))
    }

    fn insert(&mut self, h: u64) {
        let (word, bit) = Self::bit(h);
        if let Some(w) = self.0.get_mut(word) {
            *w |= bit;
        }
    }

    fn may_hold(&self, h: u64) -> bool {
        let (word, bit) = Self::bit(h);
        self.0.get(word).is_some_and(|w| w & bit != 0)
    }
}

/// How often a finished request's prompt was continued by a next turn within the window, rather
/// than ending unwanted: a moving average over about the last ten finished requests, starting
/// at 1. Below [`KeptUse::MIN`] (a workload without conversations, where keeping only takes room
/// from everyone) finished requests are not kept, but still watched, to notice when
/// conversations come back.
#[derive(Debug, Clone, Copy, PartialEq)]
struct KeptUse {
    rate: f64,
}

impl Default for KeptUse {
    fn default() -> Self {
        Self { rate: 1.0 }
    }
}

impl KeptUse {
    const MIN: f64 = 0.25;
    const WEIGHT: f64 = 0.2;

    fn observe(&mut self, used: bool) {
        let x = if used { 1.0 } else { 0.0 };
        self.rate += Self::WEIGHT * (x - self.rate);
    }

    /// Whether finished requests are kept now.
    fn keeping(&self) -> bool {
        self.rate >= Self::MIN
    }
}

/// A finished request's blocks on an agent, kept from other requests until `until_ms` (or only
/// watched, `holding` false: kept while conversations are seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    slot: Slot,
    blocks: u64,
    until_ms: u64,
    holding: bool,
    /// A request continuing the prompt was seen (routed elsewhere, or waiting for room): there
    /// are conversations to keep for, even if this keep ends unused.
    wanted: bool,
}

/// How long a finished request's blocks are kept for its next turn unless told otherwise
/// (milliseconds; `kvroute gateway --keep-finished-for`, the simulator's `keep_finished_s`).
pub const DEFAULT_KEEP_FINISHED_MS: u64 = 100;

/// Most prompts kept for at once (bounds the memory; later ones are not kept).
pub const MAX_KEPT: usize = 65_536;

impl QueuePass {
    /// Starts a pass over a cluster of `agents` slots: nothing claimed, held or blocked.
    pub fn begin(&mut self, agents: usize) {
        self.claimed.clear();
        self.claimed.resize(agents.div_ceil(64), 0);
        self.held.clear();
        self.held.resize(agents, 0);
        self.held_prefixes.clear();
        self.blocked.clear();
    }

    /// Keeps the `blocks` of a request that just finished on the agent in `slot` (the room it
    /// frees, [`crate::policy::Route::need_blocks`]) from the requests of later passes until
    /// `until_ms`, except from the next turns of the agent's conversations: a request whose
    /// prompt continues a prompt kept there (holds its last full block, `last_hash`). The next
    /// turn of a conversation, or of an agent's loop, arrives a few milliseconds after the
    /// answer, and in that gap a request that was waiting would otherwise take the room the
    /// finished one freed and evict the history the next turn needs (Continuum's KV
    /// time-to-live, for a router). When the next turn is routed to that agent, the kept blocks
    /// are its own and are let go.
    ///
    /// Where finished prompts are seldom continued within the window (no conversations),
    /// finished requests are only watched, not kept, until they are continued again. A next turn
    /// that waits for room counts as continuing its prompt.
    pub fn keep(&mut self, slot: Slot, blocks: u64, last_hash: u64, until_ms: u64) {
        if blocks == 0 || self.kept.len() >= MAX_KEPT {
            return;
        }
        self.kept_filter.insert(last_hash);
        self.kept.entry(last_hash).or_default().push(Kept {
            slot,
            blocks,
            until_ms,
            holding: self.kept_use.keeping(),
            wanted: false,
        });
    }

    /// Forgets what was kept until before `now_ms` and holds the rest from this pass's
    /// requests (call after [`QueuePass::begin`]).
    pub fn hold_kept(&mut self, now_ms: u64) {
        if self.kept.is_empty() {
            return;
        }
        let uses = &mut self.kept_use;
        let mut expired = false;
        self.kept.retain(|_, v| {
            v.retain(|k| {
                let live = k.until_ms > now_ms;
                if !live {
                    uses.observe(k.wanted);
                    expired = true;
                }
                live
            });
            !v.is_empty()
        });
        if expired {
            // Stale bits only cost a lookup; clear them when prompts leave.
            self.kept_filter = KeptFilter::default();
            for &h in self.kept.keys() {
                self.kept_filter.insert(h);
            }
        }
        self.kept_on.clear();
        self.kept_on.resize(self.held.len(), 0);
        for k in self.kept.values().flatten().filter(|k| k.holding) {
            if let Some(h) = self.held.get_mut(k.slot) {
                *h = h.saturating_add(k.blocks);
            }
            if let Some(o) = self.kept_on.get_mut(k.slot) {
                *o = o.saturating_add(k.blocks);
            }
        }
    }

    /// Takes what the agents keeping blocks for `hashes`' prompt (it continues a prompt that
    /// finished there) keep back from the held room while it is decided (`add` false), or holds
    /// it again (`add` true). All they keep, not only its own: when an agent's conversations
    /// finish a turn together, each next turn otherwise waits for the room the others keep, and
    /// all of them wait until the keeps end and then race for the room. Blocks kept on other
    /// agents stay held from it.
    fn own_kept(&mut self, hashes: &[u64], add: bool) {
        if self.kept.is_empty() {
            return;
        }
        if !add {
            self.owned.clear();
            for h in hashes.iter().filter(|&&h| self.kept_filter.may_hold(h)) {
                for k in self.kept.get_mut(h).into_iter().flatten() {
                    k.wanted = true;
                    if k.holding && !self.owned.contains(&k.slot) {
                        self.owned.push(k.slot);
                    }
                }
            }
        }
        for &slot in &self.owned {
            let kept = self.kept_on.get(slot).copied().unwrap_or(0);
            if let Some(held) = self.held.get_mut(slot) {
                *held = if add {
                    held.saturating_add(kept)
                } else {
                    held.saturating_sub(kept)
                };
            }
        }
        if add {
            self.owned.clear();
        }
    }

    /// The blocks kept for `hashes`' prompt on `slot` are its own now: let them go.
    fn take_kept(&mut self, hashes: &[u64], slot: Slot) {
        if self.kept.is_empty() {
            return;
        }
        for h in hashes.iter().filter(|&&h| self.kept_filter.may_hold(h)) {
            if let Some(v) = self.kept.get_mut(h) {
                let uses = &mut self.kept_use;
                let kept_on = &mut self.kept_on;
                v.retain(|k| {
                    let taken = k.slot == slot;
                    if taken {
                        uses.observe(true);
                    }
                    if taken && k.holding {
                        if let Some(o) = kept_on.get_mut(slot) {
                            *o = o.saturating_sub(k.blocks);
                        }
                    }
                    !taken
                });
                if v.is_empty() {
                    self.kept.remove(h);
                }
            }
        }
    }

    /// The room held on each agent so far, by slot; a caller may add room taken by what the
    /// pass does not see (the gateway's prefix holds asked of an agent and not yet answered).
    pub fn held_mut(&mut self) -> &mut [u64] {
        &mut self.held
    }

    /// The agents claimed so far (bitset over slots).
    pub fn claimed(&self) -> &[u64] {
        &self.claimed
    }

    /// Every agent of `model` is claimed by a request before: later ones can only wait.
    pub fn is_blocked(&self, model: &str) -> bool {
        self.blocked.iter().any(|m| m == model)
    }

    /// `q` as it is decided at this point of the pass: its own `claimed` and `held` are
    /// replaced by the pass's.
    pub fn request<'a>(&'a self, q: &RouteRequest<'a>) -> RouteRequest<'a> {
        RouteRequest {
            claimed: &self.claimed,
            held: &self.held,
            ..*q
        }
    }

    /// For a request of a blocked model: why it can never be served, if it cannot (it is
    /// refused at once rather than at its deadline); `None`: it waits.
    pub fn rejection(&self, cluster: &Cluster, q: &RouteRequest<'_>) -> Option<Reject> {
        cluster.rejection(&self.request(q))
    }

    /// Decides `q` and books what the decision takes from the requests after it: a `Wait`
    /// claims its agents (blocking its model when that claims them all), a `Hold` holds its
    /// blocks on its agent. A `Route` books nothing here: the caller dispatches it, which
    /// reserves its room in the cluster view.
    pub fn decide(
        &mut self,
        cluster: &mut Cluster,
        cfg: &PolicyConfig,
        q: &RouteRequest<'_>,
        now_ms: u64,
        rng: &mut dyn RandomSource,
    ) -> Passed {
        // What was kept for this request (it continues a finished one) is not kept from it.
        self.own_kept(q.block_hashes, false);
        let decision = cluster.decide(cfg, &self.request(q), now_ms, rng);
        // Routed to the agent that kept them, they are its own now; the rest stays kept.
        if let Decision::Route(r) = &decision {
            self.take_kept(q.block_hashes, r.slot);
        }
        self.own_kept(q.block_hashes, true);
        let mut held_before = 0;
        match &decision {
            Decision::Wait => {
                let all = cluster.claim_for(
                    cfg,
                    q.model,
                    q.prompt_tokens,
                    q.exclude,
                    now_ms,
                    &mut self.claimed,
                );
                if all && !self.is_blocked(q.model) {
                    self.blocked.push(q.model.to_string());
                }
            }
            Decision::Hold(route) => {
                let charge = self.held_prefixes.charge(route, q.block_hashes);
                if let Some(h) = self.held.get_mut(route.slot) {
                    held_before = *h;
                    *h = h.saturating_add(charge);
                }
            }
            Decision::Route(_) | Decision::Reject(_) => {}
        }
        Passed {
            decision,
            held_before,
        }
    }
}
