//! Property tests of the KV block pool and manager over random operation sequences.
//!
//! A shadow model records which tokens (and extra key) were written into each block, so the
//! tests check not just the bookkeeping invariants (free + used = total, ref counts equal table
//! references, free iff unreferenced, every cached hash maps to a block holding it) but that a
//! prefix hit always hands out blocks holding exactly the requested tokens, and that nothing is
//! ever written into a block someone else also references.
#![allow(clippy::unwrap_used)]

use kvroute_engine::kv::{
    block_hashes, extend_block_hashes, hash_block, BlockEvent, KvConfig, KvError, KvManager, KvSeq,
};
use proptest::prelude::*;
use std::collections::HashSet;

#[derive(Debug, Clone)]
enum Op {
    /// Open a sequence with a prompt over a tiny alphabet (so prefixes are shared) and one of
    /// two extra keys.
    Open {
        prompt: Vec<u32>,
        key: u8,
    },
    /// Admit sequence `i` (if it holds no blocks) computing up to `chunk` tokens past its hit.
    Admit {
        i: usize,
        chunk: usize,
    },
    /// Grow running sequence `i` by `n` tokens (sampling one first if all are computed).
    Step {
        i: usize,
        n: usize,
        tok: u32,
    },
    /// Preempt: free its blocks, keep its tokens.
    Free {
        i: usize,
    },
    Close {
        i: usize,
    },
    /// Open a sequence with sequence `i`'s tokens and key (a returning conversation: its
    /// prefix may be cached, or evicted to the host tier).
    Again {
        i: usize,
    },
    Reset,
}

/// Operations that keep prefixes coming back after their blocks were freed and evicted: many
/// closes and returning prompts, no cache reset.
fn churn_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (prop::collection::vec(0u32..2, 0..12), 0u8..2).prop_map(|(prompt, key)| Op::Open { prompt, key }),
        4 => (0usize..8, 1usize..12).prop_map(|(i, chunk)| Op::Admit { i, chunk }),
        2 => (0usize..8, 1usize..4, 0u32..2).prop_map(|(i, n, tok)| Op::Step { i, n, tok }),
        2 => (0usize..8).prop_map(|i| Op::Free { i }),
        4 => (0usize..8).prop_map(|i| Op::Close { i }),
        3 => (0usize..8).prop_map(|i| Op::Again { i }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::collection::vec(0u32..3, 0..24), 0u8..2).prop_map(|(prompt, key)| Op::Open { prompt, key }),
        4 => (0usize..8, 1usize..24).prop_map(|(i, chunk)| Op::Admit { i, chunk }),
        4 => (0usize..8, 1usize..6, 0u32..3).prop_map(|(i, n, tok)| Op::Step { i, n, tok }),
        1 => (0usize..8).prop_map(|i| Op::Free { i }),
        2 => (0usize..8).prop_map(|i| Op::Close { i }),
        2 => (0usize..8).prop_map(|i| Op::Again { i }),
        1 => Just(Op::Reset),
    ]
}

struct SimSeq {
    h: KvSeq,
    key: Vec<u8>,
    tokens: Vec<u32>,
    computed: usize,
}

struct Sim {
    kv: KvManager,
    bs: usize,
    seqs: Vec<SimSeq>,
    /// What each block holds: the writer's extra key and token per offset (None = unwritten).
    shadow: Vec<(Vec<u8>, Vec<Option<u32>>)>,
    cached: HashSet<u64>,
    /// Of `cached`, the hashes the events say no sequence uses.
    idle: HashSet<u64>,
    /// What each host-tier slot holds (copied by `flush`, as the runner would).
    host_shadow: Vec<(Vec<u8>, Vec<Option<u32>>)>,
    /// The host tier's hashes, from the events.
    host: HashSet<u64>,
    events_ok: bool,
}

impl Sim {
    fn check(&self) {
        self.kv.check_invariants().unwrap();
        let snap = self.kv.snapshot();
        assert_eq!(snap.free + snap.used, snap.total);
        assert!(snap.cached_evictable <= snap.free);
        let held: usize = self
            .seqs
            .iter()
            .map(|s| self.kv.block_table(&s.h).len())
            .sum();
        // Every used block is held by someone; shared blocks make `held` larger.
        assert!(held as u64 >= snap.used);
        for s in &self.seqs {
            let t = self.kv.block_table(&s.h);
            assert!(t.len() * self.bs >= s.computed);
            // The KV a sequence would attend to is its own tokens.
            for p in 0..s.computed {
                let (key, content) = &self.shadow[t[p / self.bs] as usize];
                assert_eq!(key, &s.key);
                assert_eq!(content[p % self.bs], Some(s.tokens[p]), "position {p}");
            }
        }
    }

    /// Performs the step's copies on the shadow (offloads, then reloads), as the runner does
    /// before a forward pass, and ends the step.
    fn flush(&mut self) {
        let c = self.kv.copies().clone();
        for &(b, s) in &c.offload {
            self.host_shadow[s as usize] = self.shadow[b as usize].clone();
        }
        for &(s, b) in &c.reload {
            assert_eq!(
                self.kv.pool().ref_count(b),
                1,
                "reloading into a shared block"
            );
            self.shadow[b as usize] = self.host_shadow[s as usize].clone();
        }
        self.kv.begin_step();
    }

    fn compute(&mut self, i: usize, upto: usize) {
        let s = &mut self.seqs[i];
        let t = self.kv.block_table(&s.h);
        for p in s.computed..upto {
            let b = t[p / self.bs];
            assert_eq!(
                self.kv.pool().ref_count(b),
                1,
                "writing into a shared block {b}"
            );
            let (key, content) = &mut self.shadow[b as usize];
            if p % self.bs == 0 {
                key.clone_from(&s.key);
                content.iter_mut().for_each(|c| *c = None);
            }
            assert_eq!(key, &s.key);
            content[p % self.bs] = Some(s.tokens[p]);
        }
        s.computed = upto;
        self.kv.cache_computed(&s.h, &s.tokens, upto);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Open { prompt, key } => {
                if self.seqs.len() < 8 {
                    let key = vec![key; key as usize];
                    let h = self.kv.open(&key);
                    self.kv.update_hashes(&h, &prompt);
                    self.seqs.push(SimSeq {
                        h,
                        key,
                        tokens: prompt,
                        computed: 0,
                    });
                }
            }
            Op::Admit { i, chunk } => {
                let Some(s) = self.seqs.get(i) else { return };
                if !self.kv.block_table(&s.h).is_empty() || s.tokens.is_empty() {
                    return;
                }
                self.kv.update_hashes(&s.h, &s.tokens);
                let hit = self.kv.lookup_prefix(&s.h, s.tokens.len());
                assert!(
                    hit.total() * self.bs < s.tokens.len(),
                    "hit covers the last token"
                );
                let start = hit.total() * self.bs;
                let upto = (start + chunk).min(s.tokens.len());
                let before = self.kv.snapshot();
                match self.kv.allocate_slots(&s.h, upto, Some(hit)) {
                    Ok(new) => {
                        self.flush();
                        let s = &self.seqs[i];
                        let t = self.kv.block_table(&s.h);
                        assert_eq!(t.len(), upto.div_ceil(self.bs));
                        assert_eq!(new, t.len() - hit.blocks);
                        // Hit blocks (device ones, and host ones once copied back) hold
                        // exactly this sequence's tokens and key.
                        for (j, &b) in t[..hit.total()].iter().enumerate() {
                            let (key, content) = &self.shadow[b as usize];
                            assert_eq!(key, &s.key);
                            let want = &s.tokens[j * self.bs..(j + 1) * self.bs];
                            assert!(content.iter().zip(want).all(|(c, t)| *c == Some(*t)));
                        }
                        let after = self.kv.snapshot();
                        assert_eq!(
                            after.prefix_hit_tokens - before.prefix_hit_tokens,
                            start as u64
                        );
                        self.seqs[i].computed = start;
                        self.compute(i, upto);
                    }
                    Err(KvError::DoesNotFit { needed, available }) => {
                        assert!(needed > available);
                        assert!(available as u64 <= before.free);
                        assert_eq!(
                            self.kv.snapshot(),
                            before,
                            "a failed allocation changes nothing"
                        );
                        assert!(self.kv.block_table(&s.h).is_empty());
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Step { i, n, tok } => {
                let Some(s) = self.seqs.get_mut(i) else {
                    return;
                };
                if self.kv.block_table(&s.h).is_empty() {
                    return;
                }
                if s.computed == s.tokens.len() {
                    s.tokens.push(tok);
                }
                let upto = (s.computed + n).min(s.tokens.len());
                let before = self.kv.snapshot();
                let had = self.kv.block_table(&s.h).len();
                match self.kv.allocate_slots(&s.h, upto, None) {
                    Ok(new) => {
                        self.flush();
                        assert_eq!(new, upto.div_ceil(self.bs).saturating_sub(had));
                        self.compute(i, upto);
                    }
                    Err(KvError::DoesNotFit { needed, available }) => {
                        assert_eq!(available as u64, before.free);
                        assert!(needed > available);
                        assert_eq!(self.kv.snapshot(), before);
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Free { i } => {
                if let Some(s) = self.seqs.get_mut(i) {
                    self.kv.free(&s.h);
                    s.computed = 0;
                }
            }
            Op::Close { i } => {
                if i < self.seqs.len() {
                    let s = self.seqs.swap_remove(i);
                    self.kv.close(s.h);
                }
            }
            Op::Again { i } => {
                if self.seqs.len() < 8 {
                    if let Some(s) = self.seqs.get(i) {
                        let (key, tokens) = (s.key.clone(), s.tokens.clone());
                        let h = self.kv.open(&key);
                        self.kv.update_hashes(&h, &tokens);
                        self.seqs.push(SimSeq {
                            h,
                            key,
                            tokens,
                            computed: 0,
                        });
                    }
                }
            }
            Op::Reset => self.kv.reset_prefix_cache(),
        }
        // Replaying the events gives exactly the cached set.
        for e in self.kv.take_events() {
            match e {
                BlockEvent::Stored(hs) => {
                    for h in hs {
                        self.events_ok &= self.cached.insert(h);
                    }
                }
                BlockEvent::Removed(hs) => {
                    for h in hs {
                        self.events_ok &= self.cached.remove(&h);
                        // Only an evictable block is reused for something else.
                        self.events_ok &= self.idle.remove(&h);
                    }
                }
                BlockEvent::AllCleared => {
                    self.cached.clear();
                    self.idle.clear();
                    self.host.clear();
                }
                BlockEvent::HostStored(hs) => {
                    for h in hs {
                        self.events_ok &= self.host.insert(h);
                    }
                }
                BlockEvent::HostRemoved(hs) => {
                    for h in hs {
                        self.events_ok &= self.host.remove(&h);
                    }
                }
                BlockEvent::InUse(hs) => {
                    for h in hs {
                        self.events_ok &= self.cached.contains(&h) && self.idle.remove(&h);
                    }
                }
                BlockEvent::Evictable(hs) => {
                    for h in hs {
                        self.events_ok &= self.cached.contains(&h) && self.idle.insert(h);
                    }
                }
            }
        }
        let idle: HashSet<u64> = self.kv.pool().evictable_hashes().collect();
        assert_eq!(idle, self.idle, "use events replay to the evictable set");
        assert_eq!(idle.len(), self.kv.pool().cached_evictable());
        assert!(
            self.events_ok,
            "an event stored a cached hash or removed an unknown one"
        );
        let now: HashSet<u64> = self.kv.pool().cached_hashes().collect();
        assert_eq!(now, self.cached, "events replay to the cache's contents");
        let host: HashSet<u64> = self
            .kv
            .host()
            .map(|h| h.hashes().collect())
            .unwrap_or_default();
        assert_eq!(
            host, self.host,
            "host events replay to the host tier's contents"
        );
        self.check();
    }
}

/// Runs `ops` on a fresh manager (with a host tier of `host_slots`, 0 = none), checking every
/// invariant after each, then closes every sequence and checks the pool is whole again.
fn run_ops(
    bs: usize,
    num_blocks: usize,
    caching: bool,
    host_slots: usize,
    ops: Vec<Op>,
) -> kvroute_engine::kv::CapacitySnapshot {
    let mut kv = KvManager::new(&KvConfig {
        block_size: bs,
        num_blocks,
        enable_prefix_caching: caching,
        enable_events: true,
    })
    .unwrap();
    let host_slots = if caching { host_slots } else { 0 };
    kv.set_host_tier(host_slots).unwrap();
    let mut sim = Sim {
        kv,
        bs,
        seqs: Vec::new(),
        shadow: vec![(Vec::new(), vec![None; bs]); num_blocks],
        cached: HashSet::new(),
        idle: HashSet::new(),
        host_shadow: vec![(Vec::new(), vec![None; bs]); host_slots],
        host: HashSet::new(),
        events_ok: true,
    };
    for o in ops {
        sim.apply(o);
    }
    // Closing everything frees the whole pool.
    while let Some(s) = sim.seqs.pop() {
        sim.kv.close(s.h);
    }
    let snap = sim.kv.snapshot();
    assert_eq!(snap.free, snap.total);
    assert_eq!(snap.cached_evictable as usize, sim.kv.pool().cached());
    sim.kv.check_invariants().unwrap();
    snap
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(
        bs in 1usize..5,
        num_blocks in 1usize..24,
        caching in prop::bool::weighted(0.85),
        host_slots in prop_oneof![Just(0usize), 1usize..12],
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run_ops(bs, num_blocks, caching, host_slots, ops);
    }

    /// The host tier under pressure: small pools, always a tier, long runs, so blocks move
    /// between the tiers many times (offloaded, copied back, evicted from both).
    #[test]
    fn blocks_move_between_the_tiers_without_leaking_or_losing_contents(
        bs in 1usize..3,
        num_blocks in 2usize..8,
        host_slots in 1usize..8,
        ops in prop::collection::vec(churn_op(), 40..200),
    ) {
        let snap = run_ops(bs, num_blocks, true, host_slots, ops);
        prop_assert!(snap.host_used <= snap.host_total);
    }

    #[test]
    fn hashes_chain_and_extend_incrementally(
        tokens in prop::collection::vec(any::<u32>(), 0..200),
        bs in 1usize..20,
        key in prop::collection::vec(any::<u8>(), 0..12),
        cut in 0usize..200,
    ) {
        let all = block_hashes(&tokens, bs, &key);
        prop_assert_eq!(all.len(), tokens.len() / bs);
        let mut parent = None;
        for (i, &h) in all.iter().enumerate() {
            prop_assert_eq!(h, hash_block(parent, &key, &tokens[i * bs..(i + 1) * bs]));
            parent = Some(h);
        }
        let mut out = block_hashes(&tokens[..cut.min(tokens.len())], bs, &key);
        extend_block_hashes(&mut out, &tokens, bs, &key);
        prop_assert_eq!(out, all);
    }

    #[test]
    fn hash_matches_the_documented_byte_encoding(
        parent in prop::option::of(any::<u64>()),
        tokens in prop::collection::vec(any::<u32>(), 0..70),
        key in prop::collection::vec(any::<u8>(), 0..70),
    ) {
        let mut bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        bytes.extend_from_slice(&key);
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        let seed = parent.unwrap_or(kvroute_engine::kv::hash::ROOT_SEED);
        prop_assert_eq!(hash_block(parent, &key, &tokens), kvroute_engine::kv::hash::xxh64(&bytes, seed));
    }
}

#[test]
fn pool_of_one_block() {
    let mut kv = KvManager::new(&KvConfig {
        block_size: 4,
        num_blocks: 1,
        enable_prefix_caching: true,
        enable_events: false,
    })
    .unwrap();
    let a = kv.open(b"");
    let b = kv.open(b"");
    assert_eq!(kv.allocate_slots(&a, 4, None), Ok(1));
    assert_eq!(
        kv.allocate_slots(&a, 5, None),
        Err(KvError::DoesNotFit {
            needed: 1,
            available: 0
        })
    );
    assert_eq!(
        kv.allocate_slots(&b, 1, None),
        Err(KvError::DoesNotFit {
            needed: 1,
            available: 0
        })
    );
    kv.cache_computed(&a, &[1, 2, 3, 4], 4);
    kv.close(a);
    // b's 5-token prompt hits the cached block; sharing it takes it off the free list, so the
    // second block it needs does not fit, and nothing changes.
    kv.update_hashes(&b, &[1, 2, 3, 4, 5]);
    let hit = kv.lookup_prefix(&b, 5);
    assert_eq!(hit.blocks, 1);
    assert_eq!(
        kv.allocate_slots(&b, 5, Some(hit)),
        Err(KvError::DoesNotFit {
            needed: 1,
            available: 0
        })
    );
    assert_eq!(kv.snapshot().cached_evictable, 1);
    // Covering only the hit works.
    assert_eq!(kv.allocate_slots(&b, 4, Some(hit)), Ok(0));
    assert_eq!(kv.snapshot().free, 0);
    kv.check_invariants().unwrap();
}

#[test]
fn zero_tokens_and_misplaced_hits() {
    let mut kv = KvManager::new(&KvConfig {
        block_size: 2,
        num_blocks: 4,
        enable_prefix_caching: true,
        enable_events: false,
    })
    .unwrap();
    let a = kv.open(b"");
    assert_eq!(kv.lookup_prefix(&a, 0).blocks, 0);
    assert_eq!(kv.allocate_slots(&a, 0, None), Ok(0));
    assert!(kv.block_table(&a).is_empty());
    kv.update_hashes(&a, &[1, 2, 3]);
    assert_eq!(kv.allocate_slots(&a, 3, None), Ok(2));
    kv.cache_computed(&a, &[1, 2, 3], 3);
    // A hit for a sequence that already holds blocks is refused.
    let hit = kv.lookup_prefix(&a, 3);
    assert_eq!(hit.blocks, 1);
    assert_eq!(
        kv.allocate_slots(&a, 3, Some(hit)),
        Err(KvError::StaleHit { blocks: 1 })
    );
    // A hit whose block was evicted since the lookup is refused too.
    let b = kv.open(b"");
    kv.update_hashes(&b, &[1, 2, 3]);
    let hit = kv.lookup_prefix(&b, 3);
    kv.reset_prefix_cache();
    assert_eq!(
        kv.allocate_slots(&b, 3, Some(hit)),
        Err(KvError::StaleHit { blocks: 1 })
    );
    kv.check_invariants().unwrap();
    assert!(KvManager::new(&KvConfig {
        block_size: 0,
        num_blocks: 4,
        enable_prefix_caching: true,
        enable_events: false
    })
    .is_err());
}

#[derive(Debug, Clone)]
enum PoolOp {
    Allocate,
    Release(usize),
    Touch(u64),
    Register(usize, u64),
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// The pool against a plain model of reference counts and cached hashes: a block is handed
    /// out only when nobody references it, counts never underflow, lazy eviction drops exactly
    /// the reallocated block's hash, and free + used = total throughout.
    #[test]
    fn pool_matches_a_reference_model(
        n in 1usize..16,
        ops in prop::collection::vec(prop_oneof![
            3 => Just(PoolOp::Allocate),
            3 => (0usize..64).prop_map(PoolOp::Release),
            2 => (0u64..8).prop_map(PoolOp::Touch),
            2 => (0usize..64, 0u64..8).prop_map(|(i, h)| PoolOp::Register(i, h)),
        ], 1..120),
    ) {
        let mut pool = kvroute_engine::kv::BlockPool::new(n, true);
        let mut refs = vec![0u32; n];
        let mut hash_of: Vec<Option<u64>> = vec![None; n];
        // Held references, one entry per reference.
        let mut held: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                PoolOp::Allocate => match pool.allocate() {
                    Some(b) => {
                        prop_assert_eq!(refs[b as usize], 0, "handed out a referenced block");
                        refs[b as usize] = 1;
                        hash_of[b as usize] = None;
                        held.push(b);
                    }
                    None => prop_assert!(refs.iter().all(|&r| r > 0)),
                },
                PoolOp::Release(i) if !held.is_empty() => {
                    let b = held.swap_remove(i % held.len());
                    pool.release(b);
                    refs[b as usize] -= 1;
                }
                PoolOp::Touch(h) => {
                    let want = hash_of.iter().position(|&x| x == Some(h));
                    prop_assert_eq!(pool.lookup(h).map(|b| b as usize), want);
                    if let Some(b) = want {
                        pool.touch(b as u32);
                        refs[b] += 1;
                        held.push(b as u32);
                    }
                }
                PoolOp::Register(i, h) if !held.is_empty() => {
                    let b = held[i % held.len()] as usize;
                    let fresh = hash_of[b].is_none() && !hash_of.contains(&Some(h));
                    prop_assert_eq!(pool.register(b as u32, h), fresh);
                    if fresh {
                        hash_of[b] = Some(h);
                    }
                }
                _ => {}
            }
            pool.check().unwrap();
            let free = refs.iter().filter(|&&r| r == 0).count();
            prop_assert_eq!(pool.free(), free);
            let cached_free = (0..n).filter(|&b| refs[b] == 0 && hash_of[b].is_some()).count();
            prop_assert_eq!(pool.cached_evictable(), cached_free);
            for b in 0..n {
                prop_assert_eq!(pool.ref_count(b as u32), refs[b]);
                prop_assert_eq!(pool.block_hash(b as u32), hash_of[b]);
            }
        }
    }
}
