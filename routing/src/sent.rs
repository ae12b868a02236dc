//! What a text-matching router remembers: the prompts it sent to each agent, as block hashes with
//! their last use. The `cache-aware` policy reads it; it re-implements the `cache_aware` policy of
//! SGLang's router (also vLLM-router's and smg's), from its public description, over chained
//! block hashes instead of request text.
//!
//! Their router keeps one approximate radix tree of the text it sent, each node tagged with the
//! workers it went to and when. Chained block hashes make a tree unnecessary: hash `i` of a
//! prompt stands for its whole prefix up to block `i`, so "the tree has a node for this prefix"
//! is "some agent was sent hash `i`". Differences, kept small on purpose:
//! - it matches whole blocks, not characters (a prompt shorter than one block matches nothing);
//! - an agent's entries past its bound are evicted at once on insert, least recently used
//!   first, the later blocks of a prompt before its earlier ones (theirs: every
//!   `eviction_interval`, leaves first, which has the same order);
//! - its "load" is what this gateway knows of the agent (running, waiting and sent-unreported
//!   requests; theirs: requests the router has open there).

use std::collections::VecDeque;

use crate::index::BlockMap;
use crate::policy::{CacheAwareParams, Slot};
use crate::scorer::{AgentView, Candidate};

/// An agent's slot and when (ms) it was last sent a hash.
type Stamp = (u32, u64);

/// The agents a hash was sent to, with when (ms) each last was; one agent needs no allocation.
#[derive(Debug, Clone)]
enum Tenants {
    One(u32, u64),
    Many(Vec<Stamp>),
}

impl Tenants {
    fn iter(&self) -> impl Iterator<Item = Stamp> + '_ {
        let (one, many): (Option<Stamp>, &[Stamp]) = match self {
            Tenants::One(s, at) => (Some((*s, *at)), &[]),
            Tenants::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().copied())
    }

    /// Sets `slot`'s time; true when `slot` is new here.
    fn touch(&mut self, slot: u32, at: u64) -> bool {
        match self {
            Tenants::One(s, t) if *s == slot => {
                *t = at;
                false
            }
            Tenants::One(s, t) => {
                *self = Tenants::Many(vec![(*s, *t), (slot, at)]);
                true
            }
            Tenants::Many(v) => match v.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, t)) => {
                    *t = at;
                    false
                }
                None => {
                    v.push((slot, at));
                    true
                }
            },
        }
    }

    fn time_of(&self, slot: u32) -> Option<u64> {
        self.iter().find(|&(s, _)| s == slot).map(|(_, at)| at)
    }

    /// Removes `slot`; true when no agent is left.
    fn remove(&mut self, slot: u32) -> bool {
        match self {
            Tenants::One(s, _) => *s == slot,
            Tenants::Many(v) => {
                v.retain(|&(s, _)| s != slot);
                match v.as_slice() {
                    [] => true,
                    [(s, at)] => {
                        *self = Tenants::One(*s, *at);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// The prompts sent to each agent, by block hash (see the module's documentation).
#[derive(Debug, Default)]
pub struct SentTree {
    nodes: BlockMap<Tenants>,
    /// Hashes kept per agent, by slot.
    sizes: Vec<u64>,
    /// Per agent, `(hash, when)` in the order of use; an entry whose time is no longer the
    /// hash's time for that agent is stale and skipped.
    lru: Vec<VecDeque<(u64, u64)>>,
}

impl SentTree {
    /// Records that a prompt with these chained block hashes was sent to `slot` at `now_ms`,
    /// then evicts that agent's least recently used hashes beyond `max_blocks`.
    pub fn insert(&mut self, slot: Slot, hashes: &[u64], now_ms: u64, max_blocks: u64) {
        if self.sizes.len() <= slot {
            self.sizes.resize(slot + 1, 0);
            self.lru.resize_with(slot + 1, VecDeque::new);
        }
        let s = slot as u32;
        // Later blocks first, so that within one prompt its tail is evicted before its prefix.
        for &h in hashes.iter().rev() {
            let added = match self.nodes.get_mut(&h) {
                Some(t) => t.touch(s, now_ms),
                None => {
                    self.nodes.insert(h, Tenants::One(s, now_ms));
                    true
                }
            };
            if added {
                self.sizes[slot] += 1;
            }
            self.lru[slot].push_back((h, now_ms));
        }
        while self.sizes[slot] > max_blocks {
            let Some((h, at)) = self.lru[slot].pop_front() else {
                break;
            };
            self.drop_if_current(slot, h, at);
        }
        // Stale entries (hashes touched again later) would make the queue grow without bound
        // under a steady prefix: compact it once it is twice what it holds.
        let q = &self.lru[slot];
        if q.len() as u64 > 2 * self.sizes[slot] + 64 {
            let nodes = &self.nodes;
            self.lru[slot].retain(|&(h, at)| nodes.get(&h).and_then(|t| t.time_of(s)) == Some(at));
        }
    }

    /// Removes `slot`'s entry for `h` when it was last used at `at` (the queue entry is current).
    fn drop_if_current(&mut self, slot: Slot, h: u64, at: u64) {
        let s = slot as u32;
        let Some(t) = self.nodes.get_mut(&h) else {
            return;
        };
        if t.time_of(s) != Some(at) {
            return;
        }
        if t.remove(s) {
            self.nodes.remove(&h);
        }
        self.sizes[slot] -= 1;
    }

    /// Forgets everything sent to `slot` (the agent left).
    pub fn forget(&mut self, slot: Slot) {
        let Some(q) = self.lru.get_mut(slot) else {
            return;
        };
        let q = std::mem::take(q);
        for (h, at) in q {
            self.drop_if_current(slot, h, at);
        }
    }

    /// Hashes kept for `slot`.
    pub fn size(&self, slot: Slot) -> u64 {
        self.sizes.get(slot).copied().unwrap_or(0)
    }

    /// Hashes kept for all agents (one per agent and hash).
    pub fn len(&self) -> u64 {
        self.sizes.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The `cache-aware` choice among `candidates` (sorted by slot, non-empty): the least loaded
    /// when loads are out of balance; else the candidate sent the longest prefix of the prompt,
    /// when that covers more than `match_threshold` of it; else the one sent the least.
    pub(crate) fn pick(
        &self,
        candidates: &[Candidate],
        agents: &[AgentView],
        hashes: &[u64],
        prompt_tokens: u64,
        p: &CacheAwareParams,
    ) -> usize {
        let load = |c: &Candidate| {
            agents.get(c.slot).map_or(0, |a| {
                u64::from(a.running) + u64::from(a.waiting) + u64::from(a.pending)
            })
        };
        let mut least = 0usize;
        let (mut min, mut max) = (u64::MAX, 0u64);
        for (i, c) in candidates.iter().enumerate() {
            let l = load(c);
            if l < min {
                min = l;
                least = i;
            }
            max = max.max(l);
        }
        if max.saturating_sub(min) > u64::from(p.balance_abs)
            && max as f64 > min as f64 * p.balance_rel
        {
            return least;
        }
        // The deepest prompt block sent to a candidate, and the candidate it went to last:
        // find how deep the record goes (hash lookups only), then look at the agents of the
        // deepest blocks first, stopping at the first block sent to a candidate.
        let present = hashes
            .iter()
            .take_while(|h| self.nodes.contains_key(h))
            .count();
        let matched = hashes[..present]
            .iter()
            .enumerate()
            .rev()
            .find_map(|(depth, h)| {
                let latest = self.nodes.get(h)?.iter().filter_map(|(s, at)| {
                    candidates
                        .binary_search_by_key(&(s as usize), |c| c.slot)
                        .ok()
                        .map(|i| (at, i))
                });
                latest.max().map(|(_, i)| (depth + 1, i))
            });
        if let Some((blocks, i)) = matched {
            let block_size = candidates
                .get(i)
                .and_then(|c| agents.get(c.slot))
                .map_or(1, |a| u64::from(a.block_size.max(1)));
            let rate = (blocks as u64 * block_size) as f64 / prompt_tokens.max(1) as f64;
            if rate > p.match_threshold {
                return i;
            }
        }
        candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| self.size(c.slot))
            .map_or(0, |(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_sent_again_and_again_keeps_the_use_queue_bounded() {
        let mut t = SentTree::default();
        for now in 0..10_000 {
            t.insert(3, &[1, 2, 3], now, 100);
        }
        assert_eq!(t.size(3), 3);
        assert!(t.lru[3].len() <= 2 * 3 + 64 + 3, "{}", t.lru[3].len());
        // Every kept hash still has its current entry in the queue: eviction finds it.
        t.insert(3, &[7, 8], 10_000, 2);
        assert_eq!(t.size(3), 2);
        assert!(t.nodes.contains_key(&7) && t.nodes.contains_key(&8));
        assert!(!t.nodes.contains_key(&1));
    }

    #[test]
    fn an_agent_leaving_takes_only_its_own_entries() {
        let mut t = SentTree::default();
        t.insert(0, &[1, 2], 1, 100);
        t.insert(1, &[1, 5], 2, 100);
        t.forget(0);
        assert_eq!((t.size(0), t.size(1), t.len()), (0, 2, 2));
        assert!(t.nodes.contains_key(&1) && !t.nodes.contains_key(&2));
        t.forget(1);
        assert!(t.is_empty());
        t.forget(9);
    }
}
