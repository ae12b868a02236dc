//! Property tests of the scheduler, driven by a fake model over random workloads.
//!
//! The fake model "writes KV" into a shadow of the pool exactly where the plan says (tokens
//! `start..start+len` into the plan's block table) and checks, every step, that the positions a
//! sequence attends to (`0..start`) hold its own tokens: prefix hits and recomputation after
//! preemption must never hand a sequence someone else's KV.
#![allow(clippy::unwrap_used)]

use kvroute_engine::sched::{SchedConfig, SchedError, Scheduler, SeqSpec};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn config() -> impl Strategy<Value = SchedConfig> {
    (
        1usize..6,
        1usize..16,
        1usize..6,
        1usize..40,
        2usize..60,
        any::<bool>(),
        prop::bool::weighted(0.85),
    )
        .prop_map(|(bs, nb, seqs, budget, mml, chunked, caching)| {
            let max_len = mml.min(bs * nb).max(2);
            SchedConfig {
                block_size: bs,
                num_blocks: nb.max(2usize.div_ceil(bs)),
                max_num_seqs: seqs,
                max_num_batched_tokens: if chunked { budget } else { budget.max(max_len) },
                max_model_len: mml,
                enable_chunked_prefill: chunked,
                enable_prefix_caching: caching,
                enable_events: false,
                admit_whole_future: false,
                share_inflight_prefixes: true,
            }
        })
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        prompt: Vec<u32>,
        max_tokens: u32,
        key: bool,
    },
    Step {
        stop: u8,
    },
    Abort {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::collection::vec(0u32..2, 0..30), 1u32..16, prop::bool::weighted(0.2))
            .prop_map(|(prompt, max_tokens, key)| Op::Add { prompt, max_tokens, key }),
        5 => (0u8..8).prop_map(|stop| Op::Step { stop }),
        1 => (0usize..16).prop_map(|pick| Op::Abort { pick }),
    ]
}

struct Harness {
    s: Scheduler,
    bs: usize,
    /// Per block: (writer id, token per offset).
    shadow: Vec<(u64, Vec<Option<u32>>)>,
    /// Per live sequence: its extra key flag (writers with other keys or tokens must not be
    /// read).
    live: BTreeMap<u64, bool>,
    ended: BTreeSet<u64>,
    next_id: u64,
    steps: u64,
}

impl Harness {
    fn new(cfg: SchedConfig) -> Self {
        let (bs, nb) = (cfg.block_size, cfg.num_blocks);
        Self {
            s: Scheduler::new(cfg).unwrap(),
            bs,
            shadow: vec![(u64::MAX, vec![None; bs]); nb],
            live: BTreeMap::new(),
            ended: BTreeSet::new(),
            next_id: 0,
            steps: 0,
        }
    }

    fn add(&mut self, prompt: Vec<u32>, max_tokens: u32, key: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let len = prompt.len();
        let extra_key = if key { b"salt".to_vec() } else { Vec::new() };
        match self.s.add(SeqSpec {
            id,
            prompt,
            max_tokens,
            extra_key,
        }) {
            Ok(()) => {
                assert!(
                    len >= 1 && len < self.s.max_len(),
                    "accepted a prompt of {len}"
                );
                self.live.insert(id, key);
            }
            Err(SchedError::EmptyPrompt { .. }) => assert_eq!(len, 0),
            Err(SchedError::PromptTooLong { .. }) => assert!(len >= self.s.max_len()),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// One fake model step; `stop` makes the model emit a stop token now and then (the caller
    /// then finishes the sequence, as on EOS).
    fn step(&mut self, stop: u8) {
        let cfg = self.s.config().clone();
        let before_running = self.s.stats().running;
        let view = self.s.schedule();
        let plan = view.plan();
        assert!(plan.num_tokens() <= cfg.max_num_batched_tokens);
        assert_eq!(
            plan.num_tokens(),
            plan.seqs().iter().map(|e| e.len).sum::<usize>()
        );
        let mut sampled = Vec::new();
        let mut seen = BTreeSet::new();
        for e in plan.seqs() {
            assert!(seen.insert(e.id), "a sequence scheduled twice in one step");
            assert!(e.len >= 1);
            let toks = view.tokens(e);
            let table = view.block_table(e);
            assert_eq!(toks.len(), e.len);
            assert!(table.len() * self.bs >= e.start + e.len);
            let all = view.all_tokens(e);
            assert_eq!(e.sample, e.start + e.len == all.len());
            // What it attends to is its own KV.
            for p in 0..e.start {
                let (_, c) = &self.shadow[table[p / self.bs] as usize];
                assert_eq!(c[p % self.bs], Some(all[p]), "seq {} position {p}", e.id);
            }
            for (k, p) in (e.start..e.start + e.len).enumerate() {
                let (w, c) = &mut self.shadow[table[p / self.bs] as usize];
                *w = e.id;
                c[p % self.bs] = Some(toks[k]);
            }
            if e.sample {
                let t = (e.id as u32 + (e.start + e.len) as u32) % 3;
                sampled.push((e.id, t));
            }
        }
        if !plan.preempted().is_empty() {
            // No admissions in a step that preempted: only formerly running sequences ran.
            assert!(plan.seqs().len() <= before_running);
        }
        for id in plan.preempted() {
            assert!(
                !plan.seqs().iter().any(|e| e.id == *id),
                "preempted and scheduled"
            );
        }
        self.s.complete_step(&sampled).unwrap();
        self.steps += 1;
        for (i, &(id, tok)) in sampled.iter().enumerate() {
            let stop_now = stop > 0 && (tok as u8 + i as u8) % 8 == stop;
            if self.s.is_length_capped(id) == Some(true) || stop_now {
                let u = self.s.finish(id).unwrap();
                assert!(u.output_tokens >= 1);
                assert!(u.prompt_tokens + u.output_tokens <= self.s.max_len());
                self.live.remove(&id);
                self.ended.insert(id);
            }
        }
    }

    fn abort(&mut self, pick: usize) {
        if let Some(&id) = self.live.keys().nth(pick % self.live.len().max(1)) {
            self.s.abort(id).unwrap();
            self.live.remove(&id);
            self.ended.insert(id);
        }
    }

    fn check(&self) {
        self.s.check_invariants().unwrap();
        let st = self.s.stats();
        assert_eq!(
            st.running + st.waiting,
            self.live.len(),
            "every request finished or queued"
        );
        for id in self.live.keys() {
            assert!(self.s.tokens(*id).is_some());
        }
        for id in &self.ended {
            assert!(self.s.tokens(*id).is_none());
        }
        assert_eq!(
            st.requests_received,
            self.live.len() as u64 + self.ended.len() as u64
        );
        assert_eq!(st.capacity.free + st.capacity.used, st.capacity.total);
        assert!(st.running <= self.s.config().max_num_seqs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Random adds, steps and aborts: every invariant holds after every operation, and with
    /// only steps afterwards every request finishes (no livelock, no lost request).
    #[test]
    fn random_workloads_keep_invariants_and_drain(cfg in config(), ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new(cfg);
        for o in ops {
            match o {
                Op::Add { prompt, max_tokens, key } => h.add(prompt, max_tokens, key),
                Op::Step { stop } => h.step(stop),
                Op::Abort { pick } => h.abort(pick),
            }
            h.check();
        }
        let mut guard = 0;
        while !h.live.is_empty() {
            h.step(0);
            h.check();
            guard += 1;
            prop_assert!(guard < 5_000, "did not drain: {:?}", h.s.stats());
        }
        let st = h.s.stats();
        prop_assert_eq!(st.capacity.free, st.capacity.total);
        prop_assert_eq!(st.waiting_prompt_blocks, 0);
    }

    /// A preempted request resumes and hits its own cached prefix.
    #[test]
    fn preempted_request_resumes_from_its_own_cached_prefix(
        bs in 1usize..8,
        a_len in 2usize..40,
        b_extra in 1usize..30,
    ) {
        // (A has at least 2 tokens so that B, at b_len + 1 tokens, stays under the pool-size
        // length cap.) B has at least two full computed blocks after its prefill. The pool holds exactly
        // what A's and B's prompts need, so the first decode that crosses a block boundary
        // preempts B (the newest).
        let b_len = 2 * bs + b_extra;
        let nb = a_len.div_ceil(bs) + b_len.div_ceil(bs);
        let mut cfg = SchedConfig::new(bs, nb);
        cfg.max_num_batched_tokens = a_len + b_len;
        cfg.max_model_len = 10_000;
        let mut s = Scheduler::new(cfg).unwrap();
        let a: Vec<u32> = (0..a_len as u32).collect();
        let b: Vec<u32> = (0..b_len as u32).map(|t| t + 1000).collect();
        s.add(SeqSpec { id: 1, prompt: a, max_tokens: 10_000, extra_key: vec![] }).unwrap();
        s.add(SeqSpec { id: 2, prompt: b, max_tokens: 10_000, extra_key: vec![] }).unwrap();
        let mut cached_blocks_at_preemption = None;
        for _ in 0..(2 * bs + 2) {
            let computed_b = s.num_computed(2).unwrap();
            let v = s.schedule();
            let sampled: Vec<_> = v.seqs().iter().filter(|e| e.sample).map(|e| (e.id, 7)).collect();
            let preempted = v.preempted().to_vec();
            s.complete_step(&sampled).unwrap();
            if !preempted.is_empty() {
                prop_assert_eq!(preempted, vec![2]);
                cached_blocks_at_preemption = Some(computed_b / bs);
                break;
            }
        }
        let k = cached_blocks_at_preemption.expect("the pool runs out within 2 blocks of decodes");
        prop_assert!(k >= 2);
        prop_assert_eq!(s.is_running(2), Some(false));
        let hits_before = s.stats().capacity.prefix_hit_tokens;
        s.finish(1).unwrap();
        let v = s.schedule();
        let e = v.seqs()[0];
        prop_assert_eq!(e.id, 2);
        // A took at most one block (one decode) since B was preempted: at most B's chain tail
        // was evicted.
        prop_assert!(e.start >= (k - 1) * bs, "start {} k {}", e.start, k);
        prop_assert_eq!(s.stats().capacity.prefix_hit_tokens - hits_before, e.start as u64);
        s.complete_step(&[(2, 1)]).unwrap();
        s.check_invariants().unwrap();
    }

    /// Admission order is FCFS and nothing is scheduled beyond the pool, for any pool size.
    #[test]
    fn never_exceeds_pool_with_many_small_requests(bs in 1usize..5, nb in 1usize..12, n in 1usize..20) {
        let mut cfg = SchedConfig::new(bs, nb.max(2));
        cfg.max_num_seqs = 64;
        cfg.max_num_batched_tokens = 16;
        let mut s = Scheduler::new(cfg).unwrap();
        for id in 0..n as u64 {
            s.add(SeqSpec { id, prompt: vec![id as u32; 1], max_tokens: 3, extra_key: vec![] }).unwrap();
        }
        let mut admitted = Vec::new();
        for _ in 0..200 {
            if s.is_empty() { break; }
            let v = s.schedule();
            let mut sampled = Vec::new();
            for e in v.seqs() {
                if e.start == 0 { admitted.push(e.id); }
                if e.sample { sampled.push((e.id, 0)); }
            }
            s.complete_step(&sampled).unwrap();
            let st = s.stats();
            prop_assert!(st.capacity.used <= st.capacity.total);
            s.check_invariants().unwrap();
            for (id, _) in sampled {
                if s.is_length_capped(id) == Some(true) { s.finish(id).unwrap(); }
            }
        }
        prop_assert!(s.is_empty());
        // First admissions happen in id order (preempted ones re-admit, ids may repeat).
        let mut firsts = Vec::new();
        for id in admitted { if !firsts.contains(&id) { firsts.push(id); } }
        prop_assert_eq!(firsts, (0..n as u64).collect::<Vec<_>>());
    }
}

/// Runs `reqs` (arriving at the given steps) through a scheduler with a fake model that reads
/// its context from the KV blocks the plan names (a shadow of the pool), and returns every
/// request's output. The model's next token is a function of the context it read, so any wrong
/// block (a bad prefix hit, a stale block after preemption) changes the output.
fn run_to_completion(cfg: SchedConfig, reqs: &[(usize, Vec<u32>, u32)]) -> BTreeMap<u64, Vec<u32>> {
    run_counting_preemptions(cfg, reqs).0
}

/// [`run_to_completion`], with the preemptions the run made.
fn run_counting_preemptions(
    cfg: SchedConfig,
    reqs: &[(usize, Vec<u32>, u32)],
) -> (BTreeMap<u64, Vec<u32>>, u64) {
    let bs = cfg.block_size;
    let mut shadow = vec![vec![u32::MAX; bs]; cfg.num_blocks];
    let mut s = Scheduler::new(cfg).unwrap();
    let mut outputs = BTreeMap::new();
    let mut next = 0;
    let mut step_no = 0;
    while next < reqs.len() || !s.is_empty() {
        while next < reqs.len() && reqs[next].0 <= step_no {
            let (_, prompt, max_tokens) = &reqs[next];
            let r = s.add(SeqSpec {
                id: next as u64,
                prompt: prompt.clone(),
                max_tokens: *max_tokens,
                extra_key: Vec::new(),
            });
            if r.is_err() {
                outputs.insert(next as u64, vec![u32::MAX]);
            }
            next += 1;
        }
        let v = s.schedule();
        let mut sampled = Vec::new();
        for e in v.seqs() {
            let table = v.block_table(e);
            for (k, &t) in v.tokens(e).iter().enumerate() {
                let p = e.start + k;
                shadow[table[p / bs] as usize][p % bs] = t;
            }
            if e.sample {
                // FNV-1a over the context as read from the KV blocks.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for p in 0..e.start + e.len {
                    h = (h ^ u64::from(shadow[table[p / bs] as usize][p % bs]))
                        .wrapping_mul(0x100_0000_01b3);
                }
                sampled.push((e.id, (h % 5) as u32));
            }
        }
        s.complete_step(&sampled).unwrap();
        for (id, tok) in sampled {
            if tok == 4 || s.is_length_capped(id) == Some(true) {
                outputs.insert(id, s.output_tokens(id).unwrap().to_vec());
                s.finish(id).unwrap();
            }
        }
        s.check_invariants().unwrap();
        step_no += 1;
        assert!(step_no < 20_000, "did not drain");
    }
    (outputs, s.stats().preemptions)
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Scheduling is invisible in the results: with a model that reads its context from the KV
    /// blocks, every request's output is the same under a tight pool (preemptions), a small
    /// token budget (chunked prefill), prefix caching on or off, as under a roomy reference.
    #[test]
    fn outputs_do_not_depend_on_scheduling(
        bs in 1usize..5,
        nb in 8usize..24,
        seqs in 1usize..6,
        budget in 1usize..24,
        caching in any::<bool>(),
        reqs in prop::collection::vec(
            (0usize..12, prop::collection::vec(0u32..3, 1..20), 1u32..12), 1..10),
    ) {
        let mut reqs = reqs;
        reqs.sort_by_key(|r| r.0);
        // The same length cap in both runs: the tight pool's size, at most 24 tokens.
        let max_len = (bs * nb).min(24);
        let reference = SchedConfig {
            block_size: bs,
            // Room for every request at once (10 × 24 tokens at block size 1): no preemption.
            num_blocks: 256,
            max_num_seqs: 64,
            max_num_batched_tokens: 4096,
            max_model_len: max_len,
            enable_chunked_prefill: true,
            enable_prefix_caching: false,
            enable_events: false,
            admit_whole_future: false,
            share_inflight_prefixes: true,
        };
        let tight = SchedConfig {
            num_blocks: nb,
            max_num_seqs: seqs,
            max_num_batched_tokens: budget,
            enable_prefix_caching: caching,
            ..reference.clone()
        };
        let want = run_to_completion(reference, &reqs);
        let (got, _) = run_counting_preemptions(tight.clone(), &reqs);
        prop_assert_eq!(&got, &want);
        // Admitting a sequence only when its whole future fits: the same outputs, and the
        // pool never runs out under a running sequence.
        let whole = SchedConfig { admit_whole_future: true, ..tight };
        let (got, preemptions) = run_counting_preemptions(whole, &reqs);
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(preemptions, 0);
    }
}
