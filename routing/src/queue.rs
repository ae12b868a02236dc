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
//!   agent is charged only what it adds: [`HeldPrefixes`]).
//!
//! The caller owns the queue, the order and what happens to a routed request; this module owns
//! the bookkeeping between decisions. It allocates only while its buffers grow and when a model
//! becomes blocked.

use crate::cluster::Cluster;
use crate::policy::{Decision, HeldPrefixes, PolicyConfig, RandomSource, Reject, RouteRequest};

/// What the pass decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Passed {
    pub decision: Decision,
    /// For a `Hold`: the blocks already held on its agent by the requests before it in this
    /// pass (what its own charge was added to).
    pub held_before: u64,
}

/// The state of one queue pass (reused from pass to pass: [`QueuePass::begin`] clears it).
#[derive(Debug, Default, Clone)]
pub struct QueuePass {
    claimed: Vec<u64>,
    held: Vec<u64>,
    held_prefixes: HeldPrefixes,
    blocked: Vec<String>,
}

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
        let decision = cluster.decide(cfg, &self.request(q), now_ms, rng);
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
