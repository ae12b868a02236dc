//! Scheduler unit tests, driven by a fake model that "samples" a deterministic token.

use super::*;

fn cfg(block_size: usize, num_blocks: usize) -> SchedConfig {
    SchedConfig {
        block_size,
        num_blocks,
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
        max_model_len: 1024,
        enable_chunked_prefill: true,
        enable_prefix_caching: true,
        enable_events: true,
        admit_whole_future: false,
        share_inflight_prefixes: true,
    }
}

fn spec(id: u64, prompt: Vec<u32>, max_tokens: u32) -> SeqSpec {
    SeqSpec {
        id,
        prompt,
        max_tokens,
        extra_key: Vec::new(),
    }
}

fn fake_token(id: u64, pos: usize) -> u32 {
    (id as u32).wrapping_mul(1000).wrapping_add(pos as u32)
}

/// One fake model step: samples for every `sample` entry, completes, finishes capped
/// sequences. Returns the plan's (id, start, len, sample) and the ids finished.
/// A plan entry as (id, start, len, sample).
type Planned = (u64, usize, usize, bool);

fn step(s: &mut Scheduler) -> (Vec<Planned>, Vec<u64>) {
    let view = s.schedule();
    let mut planned = Vec::new();
    let mut sampled = Vec::new();
    for e in view.seqs() {
        assert_eq!(view.tokens(e).len(), e.len, "tokens slice matches len");
        assert!(view.block_table(e).len() * view.sched.cfg.block_size >= e.start + e.len);
        planned.push((e.id, e.start, e.len, e.sample));
        if e.sample {
            sampled.push((e.id, fake_token(e.id, e.start + e.len)));
        }
    }
    s.complete_step(&sampled).unwrap();
    let mut done = Vec::new();
    for &(id, _) in &sampled {
        if s.is_length_capped(id) == Some(true) {
            s.finish(id).unwrap();
            done.push(id);
        }
    }
    s.check_invariants().unwrap();
    (planned, done)
}

#[test]
fn one_request_prefills_decodes_and_frees() {
    let mut s = Scheduler::new(cfg(4, 8)).unwrap();
    s.add(spec(1, (0..10).collect(), 3)).unwrap();
    assert_eq!(s.stats().waiting_prompt_blocks, 3);
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 0, 10, true)]);
    assert_eq!(s.stats().running, 1);
    assert_eq!(s.stats().waiting_prompt_blocks, 0);
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 10, 1, true)]);
    let (p, done) = step(&mut s);
    assert_eq!(p, vec![(1, 11, 1, true)]);
    assert_eq!(done, vec![1]);
    let st = s.stats();
    assert_eq!(
        (
            st.running,
            st.waiting,
            st.requests_received,
            st.requests_finished
        ),
        (0, 0, 1, 1)
    );
    assert_eq!(st.capacity.free, 8);
    // 12 positions were computed... the 13th token was sampled but never computed: 3 full
    // blocks (12 tokens) are cached.
    assert_eq!(st.capacity.cached_evictable, 3);
    assert!(s.is_empty());
}

#[test]
fn chunked_prefill_splits_by_budget_and_samples_only_at_the_end() {
    let mut c = cfg(4, 64);
    c.max_num_batched_tokens = 32;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..100).collect(), 1)).unwrap();
    let lens: Vec<_> = (0..4).map(|_| step(&mut s).0[0]).collect();
    assert_eq!(
        lens,
        vec![
            (1, 0, 32, false),
            (1, 32, 32, false),
            (1, 64, 32, false),
            (1, 96, 4, true)
        ]
    );
    assert!(
        s.is_empty(),
        "max_tokens 1: finished after the first sample"
    );
}

#[test]
fn budget_is_shared_running_first_then_waiting() {
    let mut c = cfg(4, 64);
    c.max_num_batched_tokens = 10;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..8).collect(), 100)).unwrap();
    assert_eq!(step(&mut s).0, vec![(1, 0, 8, true)]);
    s.add(spec(2, (100..120).collect(), 100)).unwrap();
    // The decode of 1 comes first, 2 gets the 9 tokens left.
    assert_eq!(step(&mut s).0, vec![(1, 8, 1, true), (2, 0, 9, false)]);
    assert_eq!(step(&mut s).0, vec![(1, 9, 1, true), (2, 9, 9, false)]);
    assert_eq!(step(&mut s).0, vec![(1, 10, 1, true), (2, 18, 2, true)]);
}

#[test]
fn prefix_hit_starts_after_the_cached_blocks() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    let shared: Vec<u32> = (0..12).collect();
    let mut p1 = shared.clone();
    p1.extend([50, 51]);
    s.add(spec(1, p1, 1)).unwrap();
    step(&mut s);
    let mut p2 = shared.clone();
    p2.extend([60, 61, 62]);
    s.add(spec(2, p2, 1)).unwrap();
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(2, 12, 3, true)]);
    let c = s.stats().capacity;
    assert_eq!(c.prefix_hit_tokens, 12);
    assert_eq!(c.prefix_query_tokens, 14 + 15);
}

#[test]
fn hit_never_covers_the_last_prompt_token() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    let prompt: Vec<u32> = (0..8).collect();
    s.add(spec(1, prompt.clone(), 1)).unwrap();
    step(&mut s);
    s.add(spec(2, prompt.clone(), 1)).unwrap();
    // Both blocks are cached but the last token must be computed: only block 0 is a hit.
    assert_eq!(step(&mut s).0, vec![(2, 4, 4, true)]);
    s.add(spec(3, prompt[..5].to_vec(), 1)).unwrap();
    assert_eq!(step(&mut s).0, vec![(3, 4, 1, true)]);
}

#[test]
fn running_sequences_share_hit_blocks() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    let prompt: Vec<u32> = (0..9).collect();
    s.add(spec(1, prompt.clone(), 10)).unwrap();
    step(&mut s);
    s.add(spec(2, prompt.clone(), 10)).unwrap();
    step(&mut s);
    let t1 = s.kv().block_table(&s.seq(s.index[&1]).kv).to_vec();
    let t2 = s.kv().block_table(&s.seq(s.index[&2]).kv).to_vec();
    assert_eq!(t1[..2], t2[..2]);
    assert_ne!(t1[2], t2[2]);
    assert_eq!(s.kv().pool().ref_count(t1[0]), 2);
}

#[test]
fn extra_keys_do_not_share() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    let prompt: Vec<u32> = (0..9).collect();
    s.add(SeqSpec {
        id: 1,
        prompt: prompt.clone(),
        max_tokens: 1,
        extra_key: b"a".to_vec(),
    })
    .unwrap();
    step(&mut s);
    s.add(SeqSpec {
        id: 2,
        prompt: prompt.clone(),
        max_tokens: 1,
        extra_key: b"b".to_vec(),
    })
    .unwrap();
    assert_eq!(step(&mut s).0, vec![(2, 0, 9, true)]);
    s.add(SeqSpec {
        id: 3,
        prompt,
        max_tokens: 1,
        extra_key: b"a".to_vec(),
    })
    .unwrap();
    assert_eq!(step(&mut s).0, vec![(3, 8, 1, true)]);
}

#[test]
fn preempts_newest_and_admits_nothing_in_that_step_then_resumes_from_own_prefix() {
    // 6 blocks of 4: two sequences of 8 prompt tokens use 2 blocks each (+1 each at their
    // first decode position 8), then they grow until the pool is full.
    let mut c = cfg(4, 6);
    c.max_model_len = 24;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..8).collect(), 100)).unwrap();
    s.add(spec(2, (100..108).collect(), 100)).unwrap();
    assert_eq!(step(&mut s).0, vec![(1, 0, 8, true), (2, 0, 8, true)]);
    s.add(spec(3, (200..204).collect(), 100)).unwrap();
    // Step 2: positions 8 need a third block each: 6 blocks, all used. 3 cannot be admitted.
    assert_eq!(step(&mut s).0, vec![(1, 8, 1, true), (2, 8, 1, true)]);
    assert_eq!(s.stats().waiting, 1);
    for _ in 0..3 {
        step(&mut s);
    }
    // Positions 9..11 fit; now position 12 needs a 4th block each: 1 is served by preempting 2.
    let view = s.schedule();
    assert_eq!(view.preempted(), &[2]);
    assert_eq!(
        view.seqs().len(),
        1,
        "no admission in a step that preempted"
    );
    assert_eq!((view.seqs()[0].id, view.seqs()[0].start), (1, 12));
    let e = view.seqs()[0];
    s.complete_step(&[(1, fake_token(1, 13))]).unwrap();
    assert_eq!(s.stats().preemptions, 1);
    assert_eq!(s.is_running(2), Some(false));
    assert_eq!(s.num_computed(2), Some(0));
    // 2's 3 full blocks were freed tail first and stay cached while free, except the chain's
    // tail, which was the first reused (for 1's position 12).
    assert_eq!(s.stats().capacity.cached_evictable, 2);
    assert_eq!(e.len, 1);
    // Finish 1: 2 comes back first (front of the queue) and hits its own cached prefix.
    s.finish(1).unwrap();
    let view = s.schedule();
    let e2 = view.seqs()[0];
    assert_eq!(e2.id, 2);
    // 2 knows 13 tokens (8 prompt + 5 generated); its first 2 blocks are still cached.
    assert_eq!((e2.start, e2.len, e2.sample), (8, 5, true));
    assert_eq!(s.stats().capacity.prefix_hit_tokens, 8);
    s.complete_step(&[(2, 7)]).unwrap();
    assert_eq!(s.seq(s.index[&2]).preemptions, 1);
    s.check_invariants().unwrap();
}

#[test]
fn lone_sequence_preempts_itself_when_pool_is_exhausted_by_others() {
    // Pool of 3 blocks of 2: seq 1 (older) takes 2 blocks, seq 2 one; when 2 needs a second
    // block it is the newest, so it preempts itself and 1 keeps running.
    let mut c = cfg(2, 3);
    c.max_model_len = 6;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, vec![1, 2, 3], 10)).unwrap();
    s.add(spec(2, vec![4], 10)).unwrap();
    assert_eq!(step(&mut s).0, vec![(1, 0, 3, true), (2, 0, 1, true)]);
    // 1 at position 3 (block 1, held), 2 at position 1 (block 0, held): fits.
    assert_eq!(step(&mut s).0, vec![(1, 3, 1, true), (2, 1, 1, true)]);
    // 1 at position 4 needs a 3rd block: preempts 2.
    let view = s.schedule();
    assert_eq!(view.preempted(), &[2]);
    s.complete_step(&[(1, 0)]).unwrap();
    // 1 has 6 tokens = max_len: capped, caller finishes it.
    assert_eq!(s.is_length_capped(1), Some(true));
    s.finish(1).unwrap();
    // 2 resumes from scratch: its only cached block was the one 1 took.
    assert_eq!(step(&mut s).0, vec![(2, 0, 3, true)]);
}

#[test]
fn max_num_seqs_limits_admissions() {
    let mut c = cfg(4, 64);
    c.max_num_seqs = 2;
    let mut s = Scheduler::new(c).unwrap();
    for id in 0..3 {
        s.add(spec(id, vec![id as u32; 3], 5)).unwrap();
    }
    assert_eq!(step(&mut s).0.len(), 2);
    assert_eq!(s.stats().waiting, 1);
    s.finish(0).unwrap();
    let p = step(&mut s).0;
    assert_eq!(p.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn without_chunking_a_prefill_waits_for_a_whole_budget() {
    let mut c = cfg(4, 64);
    c.enable_chunked_prefill = false;
    c.max_num_batched_tokens = 40;
    c.max_model_len = 40;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..10).collect(), 10)).unwrap();
    s.add(spec(2, (0..35).map(|t| t + 500).collect(), 2))
        .unwrap();
    s.add(spec(3, vec![9], 2)).unwrap();
    // 1 (10) fits; 2 (35) does not fit in the 30 left, and FCFS keeps 3 behind it.
    assert_eq!(step(&mut s).0, vec![(1, 0, 10, true)]);
    // 1 decodes (1), 2 still needs 35 > 39? no: 39 left, so 2 runs whole; 3 (1) fits in 4.
    assert_eq!(
        step(&mut s).0,
        vec![(1, 10, 1, true), (2, 0, 35, true), (3, 0, 1, true)]
    );
}

#[test]
fn rejects_requests_that_can_never_run() {
    let mut c = cfg(4, 4); // pool of 16 tokens
    c.max_model_len = 100;
    let mut s = Scheduler::new(c).unwrap();
    assert_eq!(s.max_len(), 16);
    assert_eq!(
        s.add(spec(1, vec![], 1)),
        Err(SchedError::EmptyPrompt { id: 1 })
    );
    assert_eq!(
        s.add(spec(1, vec![1], 0)),
        Err(SchedError::ZeroMaxTokens { id: 1 })
    );
    assert!(matches!(
        s.add(spec(1, vec![0; 16], 1)),
        Err(SchedError::PromptTooLong {
            len: 16,
            max: 15,
            ..
        })
    ));
    s.add(spec(1, vec![0; 15], 5)).unwrap();
    assert_eq!(
        s.add(spec(1, vec![1], 1)),
        Err(SchedError::DuplicateId { id: 1 })
    );
    assert_eq!(s.stats().requests_received, 1);
    // At the boundary: the 15-token prompt generates exactly one token, then is capped.
    let (_, done) = step(&mut s);
    assert_eq!(done, vec![1]);
    s.check_invariants().unwrap();
}

#[test]
fn max_model_len_caps_before_max_tokens() {
    let mut c = cfg(4, 64);
    c.max_model_len = 10;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..7).collect(), 100)).unwrap();
    let mut steps = 0;
    while !s.is_empty() {
        step(&mut s);
        steps += 1;
        assert!(steps < 10);
    }
    assert_eq!(steps, 3, "7 + 3 generated = 10 = max_model_len");
}

#[test]
fn invalid_configs_are_rejected() {
    let bad = [
        SchedConfig {
            block_size: 0,
            ..cfg(4, 4)
        },
        SchedConfig {
            num_blocks: 0,
            ..cfg(4, 4)
        },
        SchedConfig {
            max_num_seqs: 0,
            ..cfg(4, 4)
        },
        SchedConfig {
            max_num_batched_tokens: 0,
            ..cfg(4, 4)
        },
        SchedConfig {
            max_model_len: 1,
            ..cfg(4, 4)
        },
        SchedConfig {
            block_size: 1,
            num_blocks: 1,
            ..cfg(4, 4)
        },
        SchedConfig {
            enable_chunked_prefill: false,
            max_num_batched_tokens: 8,
            ..cfg(4, 4)
        },
    ];
    for c in bad {
        assert!(
            matches!(Scheduler::new(c.clone()), Err(SchedError::Config(_))),
            "{c:?}"
        );
    }
    // The smallest useful pool: one block of two tokens (prompt 1 + one generated token).
    let mut s = Scheduler::new(SchedConfig::new(2, 1)).unwrap();
    s.add(spec(1, vec![3], 9)).unwrap();
    assert_eq!(s.schedule().seqs().len(), 1);
    s.complete_step(&[(1, 4)]).unwrap();
    assert_eq!(s.is_length_capped(1), Some(true));
    assert!(
        s.schedule().is_empty(),
        "a capped sequence is not scheduled"
    );
    s.complete_step(&[(1, 5)]).unwrap_err();
    assert_eq!(s.tokens(1), Some(&[3, 4][..]));
    s.finish(1).unwrap();
}

#[test]
fn complete_step_rejects_misplaced_samples() {
    let mut s = Scheduler::new(cfg(4, 16)).unwrap();
    assert_eq!(s.complete_step(&[]), Err(SchedError::NoPendingStep));
    let mut c = cfg(4, 16);
    c.max_num_batched_tokens = 4;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..6).collect(), 5)).unwrap();
    s.add(spec(2, vec![1], 5)).unwrap();
    s.schedule();
    // 1 is mid-prefill (no sample), 9 is unknown; 2 was not scheduled this step.
    assert_eq!(
        s.complete_step(&[(1, 5), (9, 5)]),
        Err(SchedError::UnexpectedSample { id: 1 })
    );
    assert_eq!(s.tokens(1).unwrap().len(), 6, "nothing appended");
    assert_eq!(s.num_computed(1), Some(4), "the step itself was applied");
    assert_eq!(s.complete_step(&[]), Err(SchedError::NoPendingStep));
    let v = s.schedule();
    assert_eq!(v.seqs().len(), 2);
    // Two samples for one sequence: the second is refused.
    assert_eq!(
        s.complete_step(&[(1, 5), (1, 6), (2, 1)]),
        Err(SchedError::UnexpectedSample { id: 1 })
    );
    assert_eq!(s.output_tokens(1), Some(&[5][..]));
    assert_eq!(s.output_tokens(2), Some(&[1][..]));
    s.check_invariants().unwrap();
}

#[test]
fn abort_between_schedule_and_complete_is_safe() {
    let mut s = Scheduler::new(cfg(4, 16)).unwrap();
    s.add(spec(1, (0..6).collect(), 5)).unwrap();
    s.add(spec(2, (10..16).collect(), 5)).unwrap();
    let view = s.schedule();
    let e = view.seqs()[0];
    assert_eq!(e.id, 1);
    let u = s.abort(1).unwrap();
    assert_eq!(
        u,
        SeqUsage {
            prompt_tokens: 6,
            output_tokens: 0,
            cached_tokens: 0,
            preemptions: 0
        }
    );
    assert!(s.step_tokens(&e).is_empty());
    assert!(s.step_block_table(&e).is_empty());
    // A new sequence reuses the slot; the stale entry still does not resolve to it.
    s.add(spec(3, vec![1, 2], 5)).unwrap();
    assert!(s.step_tokens(&e).is_empty());
    s.complete_step(&[(1, 9), (2, 9)]).unwrap_err();
    assert_eq!(s.output_tokens(2), Some(&[9][..]));
    assert_eq!(s.abort(1), Err(SchedError::UnknownSeq { id: 1 }));
    assert_eq!(s.stats().requests_aborted, 1);
    s.abort(3).unwrap();
    assert_eq!(s.stats().waiting_prompt_blocks, 0);
    s.check_invariants().unwrap();
}

#[test]
fn block_events_follow_the_cache() {
    let mut s = Scheduler::new(cfg(2, 3)).unwrap();
    s.add(spec(1, vec![1, 2, 3], 1)).unwrap();
    step(&mut s);
    let hs = crate::kv::block_hashes(&[1, 2, 3], 2, b"");
    // Stored by the sequence that computed it, evictable once that one finished.
    assert_eq!(
        s.take_events(),
        vec![
            BlockEvent::Stored(hs.clone()),
            BlockEvent::Evictable(hs.clone())
        ]
    );
    // A new 6-token prompt needs all 3 blocks: the cached one is evicted.
    s.add(spec(2, vec![9, 9, 9, 9, 9], 1)).unwrap();
    step(&mut s);
    let ev = s.take_events();
    assert_eq!(ev[0], BlockEvent::Removed(hs));
    let mut snapshot: Vec<_> = s.cached_hashes().collect();
    snapshot.sort_unstable();
    let mut want = crate::kv::block_hashes(&[9, 9, 9, 9, 9], 2, b"");
    want.sort_unstable();
    assert_eq!(snapshot, want);
    s.reset_prefix_cache();
    assert_eq!(s.take_events(), vec![BlockEvent::AllCleared]);
    assert_eq!(s.cached_hashes().count(), 0);
    assert_eq!(s.stats().capacity.cached_evictable, 0);
}

#[test]
fn block_size_one() {
    let mut s = Scheduler::new(cfg(1, 8)).unwrap();
    s.add(spec(1, vec![5, 6, 7], 3)).unwrap();
    while !s.is_empty() {
        step(&mut s);
    }
    s.add(spec(2, vec![5, 6, 7, 8], 1)).unwrap();
    // Tokens 5, 6, 7 are cached one block each; the last prompt token (8) is computed.
    assert_eq!(step(&mut s).0, vec![(2, 3, 1, true)]);
}

#[test]
fn prefix_caching_off_never_hits() {
    let mut c = cfg(4, 16);
    c.enable_prefix_caching = false;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..9).collect(), 1)).unwrap();
    step(&mut s);
    s.add(spec(2, (0..9).collect(), 1)).unwrap();
    assert_eq!(step(&mut s).0, vec![(2, 0, 9, true)]);
    assert_eq!(s.stats().capacity.cached_evictable, 0);
    assert!(s.take_events().is_empty());
}

#[test]
fn steady_state_decode_does_not_reallocate_plan_buffers() {
    let mut s = Scheduler::new(SchedConfig::new(16, 4096)).unwrap();
    for id in 0..64 {
        s.add(spec(id, vec![id as u32; 20], 10_000)).unwrap();
    }
    step(&mut s);
    let (cap_seqs, ptr) = (s.plan.seqs.capacity(), s.plan.seqs.as_ptr());
    for _ in 0..50 {
        step(&mut s);
    }
    assert_eq!(
        (s.plan.seqs.capacity(), s.plan.seqs.as_ptr()),
        (cap_seqs, ptr)
    );
}

#[test]
fn replanning_without_completion_is_safe() {
    let mut s = Scheduler::new(cfg(4, 16)).unwrap();
    s.add(spec(1, (0..6).collect(), 5)).unwrap();
    let first: Vec<_> = s.schedule().seqs().to_vec();
    let second: Vec<_> = s.schedule().seqs().to_vec();
    assert_eq!(first, second);
    s.complete_step(&[(1, 3)]).unwrap();
    assert_eq!(s.num_computed(1), Some(6));
    s.check_invariants().unwrap();
}

#[test]
fn samples_in_any_order_are_accepted() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    for id in 0..4 {
        s.add(spec(id, vec![id as u32; 3], 5)).unwrap();
    }
    s.schedule();
    s.complete_step(&[(3, 30), (1, 10), (0, 0), (2, 20)])
        .unwrap();
    for id in 0..4u64 {
        assert_eq!(s.output_tokens(id), Some(&[id as u32 * 10][..]));
    }
}

#[test]
fn generated_tokens_fill_blocks_that_become_cached() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    s.add(spec(1, vec![1, 2, 3], 10)).unwrap();
    let mut stored = Vec::new();
    for _ in 0..6 {
        step(&mut s);
        for e in s.take_events() {
            if let BlockEvent::Stored(h) = e {
                stored.extend(h);
            }
        }
    }
    // 3 prompt + 6 generated = 9 known, 8 computed: two full blocks, hashed over the prompt and
    // the generated tokens.
    let tokens = s.tokens(1).unwrap().to_vec();
    assert_eq!(tokens.len(), 9);
    assert_eq!(stored, crate::kv::block_hashes(&tokens[..8], 4, b""));
}

#[test]
fn usage_reports_cached_prompt_tokens() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    s.add(spec(1, (0..10).collect(), 1)).unwrap();
    step(&mut s);
    s.add(spec(2, (0..10).collect(), 2)).unwrap();
    step(&mut s);
    let u = s.finish(2).unwrap();
    assert_eq!(
        u,
        SeqUsage {
            prompt_tokens: 10,
            output_tokens: 1,
            cached_tokens: 8,
            preemptions: 0
        }
    );
}

#[test]
fn waiting_prompt_blocks_tracks_the_queue() {
    let mut c = cfg(4, 4);
    c.max_num_seqs = 1;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, vec![1; 5], 1)).unwrap();
    s.add(spec(2, vec![2; 9], 1)).unwrap();
    assert_eq!(s.stats().waiting_prompt_blocks, 2 + 3);
    s.schedule();
    assert_eq!(s.stats().waiting_prompt_blocks, 3);
    s.complete_step(&[(1, 0)]).unwrap();
    s.abort(2).unwrap();
    assert_eq!(s.stats().waiting_prompt_blocks, 0);
    s.check_invariants().unwrap();
}

#[test]
fn committed_blocks_count_what_live_sequences_still_grow_into() {
    // Blocks of 4; a 5-token prompt with max_tokens 10 caps at 15 tokens = 4 blocks.
    let mut c = cfg(4, 32);
    c.max_model_len = 12;
    let mut s = Scheduler::new(c).unwrap();
    s.add(spec(1, (0..5).collect(), 10)).unwrap();
    // Waiting: nothing allocated, the whole (capped) sequence is promised: 12 tokens = 3 blocks.
    assert_eq!(s.stats().committed_blocks, 3);
    s.add(spec(2, (100..103).collect(), 2)).unwrap();
    // 3 + 2 tokens = 2 blocks more.
    assert_eq!(s.stats().committed_blocks, 5);
    step(&mut s);
    // Admitted: 1 holds 2 blocks (5 tokens), 2 holds 1 block (3 tokens).
    assert_eq!(s.stats().capacity.used, 3);
    assert_eq!(s.stats().committed_blocks, 1 + 1);
    // Run to the end: every promise is kept or released, and nothing is left committed.
    while !s.is_empty() {
        step(&mut s);
        let st = s.stats();
        assert!(
            st.capacity.used as usize + st.committed_blocks <= 5,
            "{st:?}"
        );
    }
    assert_eq!(s.stats().committed_blocks, 0);
    assert_eq!(s.stats().preemptions, 0);
}

/// Runs `id` with `prompt` to completion (alone) and returns the chained hashes of its prompt's
/// full blocks, which stay cached (evictable).
fn run_alone(s: &mut Scheduler, id: u64, prompt: Vec<u32>, max_tokens: u32) -> Vec<u64> {
    s.add(spec(id, prompt, max_tokens)).unwrap();
    let hashes = s.kv.block_hashes(&s.seq(s.index[&id]).kv).to_vec();
    while !s.is_empty() {
        step(s);
    }
    hashes
}

#[test]
fn a_held_prefix_survives_allocations_that_would_evict_it() {
    // 8 blocks of 4 tokens. Request 1 leaves 3 cached prompt blocks behind (evictable).
    let mut s = Scheduler::new(cfg(4, 8)).unwrap();
    let hashes = run_alone(&mut s, 1, (0..13).collect(), 1);
    assert_eq!(hashes.len(), 3);
    assert_eq!(s.hold_prefix(7, &hashes, usize::MAX), 3);
    assert_eq!(s.holds(), 1);
    assert_eq!(s.kv().snapshot().free, 5, "held blocks leave the free list");
    assert_eq!(s.kv().snapshot().cached_evictable, 0);
    s.check_invariants().unwrap();
    // Another request takes every other block: the held ones are not evicted for it.
    let (p, _) = step_after_add(&mut s, spec(2, (100..119).collect(), 1));
    assert_eq!(p, vec![(2, 0, 19, true)]);
    for &h in &hashes {
        assert!(
            s.kv().pool().lookup(h).is_some(),
            "held block {h} was evicted"
        );
    }
    while !s.is_empty() {
        step(&mut s);
    }
    // The request the prefix was held for hits all of it; then the hold is let go.
    s.add(spec(3, (0..13).chain(50..53).collect(), 1)).unwrap();
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(3, 12, 4, true)], "starts after the 3 held blocks");
    assert!(s.release_hold(7));
    assert!(!s.release_hold(7), "a hold is let go once");
    assert_eq!(s.holds(), 0);
    s.check_invariants().unwrap();
}

fn step_after_add(s: &mut Scheduler, sp: SeqSpec) -> (Vec<Planned>, Vec<u64>) {
    s.add(sp).unwrap();
    step(s)
}

#[test]
fn a_hold_takes_no_room_promised_to_live_sequences() {
    // Request 1 leaves 3 cached blocks; request 2 then runs and is promised growth.
    let mut s = Scheduler::new(cfg(4, 8)).unwrap();
    let hashes = run_alone(&mut s, 1, (0..13).collect(), 1);
    // A caller's limit on free blocks holds: the 3 cached blocks are all evictable (free).
    assert_eq!(s.hold_prefix(11, &hashes, 0), 0);
    assert_eq!(s.hold_prefix(11, &hashes, 2), 2);
    assert!(s.release_hold(11));
    // 2 holds 3 blocks now and grows to 7 (27 tokens): 4 more promised of the 5 free.
    s.add(spec(2, (100..111).collect(), 16)).unwrap();
    step(&mut s);
    let st = s.stats();
    assert_eq!(st.capacity.free, 5);
    assert_eq!(st.committed_blocks, 4);
    // Only one free block is not promised: the hold takes the first cached block only.
    assert_eq!(s.hold_prefix(9, &hashes, usize::MAX), 1);
    let st = s.stats();
    assert!(st.capacity.free as usize >= st.committed_blocks);
    // Request 2 runs to the end without preemption.
    while !s.is_empty() {
        step(&mut s);
    }
    assert_eq!(s.stats().preemptions, 0);
    // Holding what is not cached holds nothing and keeps no hold.
    assert_eq!(s.hold_prefix(10, &[1, 2, 3], usize::MAX), 0);
    assert!(!s.release_hold(10));
    // Request 2 took the two cached blocks that were not held; the held one is still there.
    // A second hold under the same key replaces the first.
    assert_eq!(s.hold_prefix(9, &hashes, usize::MAX), 1);
    assert_eq!(s.holds(), 1);
    assert!(s.release_hold(9));
    assert!(s.kv().pool().lookup(hashes[0]).is_some());
    assert!(s.kv().pool().lookup(hashes[1]).is_none());
    s.check_invariants().unwrap();
}

/// Two requests with one new 12-token prefix (3 blocks of 4) and different questions.
fn burst_of_one_prefix(s: &mut Scheduler) {
    let prefix: Vec<u32> = (100..112).collect();
    for (id, q) in [(1u64, 7u32), (2, 9)] {
        let mut p = prefix.clone();
        p.extend([q, q + 1]);
        s.add(spec(id, p, 2)).unwrap();
    }
}

#[test]
fn a_burst_computes_a_new_prefix_once() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    burst_of_one_prefix(&mut s);
    // Step 1: only the first runs; the second waits for the prefix the first is computing.
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 0, 14, true)]);
    assert_eq!(s.stats().waiting, 1);
    // Step 2: the prefix is cached; the second starts after its 3 blocks.
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 14, 1, true), (2, 12, 2, true)]);
    while !s.is_empty() {
        step(&mut s);
    }
    let st = s.stats().capacity;
    assert_eq!((st.prefix_query_tokens, st.prefix_hit_tokens), (28, 12));
}

#[test]
fn without_sharing_in_flight_prefixes_a_burst_computes_it_twice() {
    let mut c = cfg(4, 32);
    c.share_inflight_prefixes = false;
    let mut s = Scheduler::new(c).unwrap();
    burst_of_one_prefix(&mut s);
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 0, 14, true), (2, 0, 14, true)]);
}

#[test]
fn a_request_waiting_for_a_prefix_lets_later_ones_start() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    burst_of_one_prefix(&mut s);
    s.add(spec(3, (500..506).collect(), 2)).unwrap();
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 0, 14, true), (3, 0, 6, true)]);
}

#[test]
fn a_prefix_whose_computer_is_aborted_is_computed_by_the_waiter() {
    let mut s = Scheduler::new(cfg(4, 32)).unwrap();
    burst_of_one_prefix(&mut s);
    let _ = s.schedule();
    s.abort(1).unwrap();
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(2, 0, 14, true)]);
}

#[test]
fn a_prefix_computed_in_chunks_is_waited_for_chunk_by_chunk() {
    let mut c = cfg(4, 32);
    c.max_num_batched_tokens = 8;
    let mut s = Scheduler::new(c).unwrap();
    burst_of_one_prefix(&mut s);
    // 8 tokens of the first: blocks 0-1 computed; the second's next block (0) is being
    // computed, so it waits.
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 0, 8, false)]);
    // The first computes 6 more; the second now hits blocks 0-1 and waits for block 2.
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 8, 6, true)]);
    let (p, _) = step(&mut s);
    assert_eq!(p, vec![(1, 14, 1, true), (2, 12, 2, true)]);
}

#[test]
fn running_prefill_tokens_count_what_running_prompts_have_left() {
    // 64 tokens a step: a 150-token prompt takes three steps; a second prompt waits behind it.
    let mut s = Scheduler::new(cfg(16, 64)).unwrap();
    s.add(spec(1, (0..150).collect(), 4)).unwrap();
    assert_eq!(
        s.stats().running_prefill_tokens,
        0,
        "nothing runs before a step"
    );
    step(&mut s);
    assert_eq!(s.stats().running_prefill_tokens, 150 - 64);
    // What it holds in the KV cache: the 64 computed.
    assert_eq!(s.stats().running_kv_tokens, 64);
    s.add(spec(2, (1000..1100).collect(), 4)).unwrap();
    step(&mut s);
    // 64 more of the first: 22 left. The second waits (the step's budget went to the first)
    // and is not counted here: the waiting queue is `waiting_prompt_blocks`.
    let st = s.stats();
    assert_eq!((st.running, st.waiting), (1, 1));
    assert_eq!(st.running_prefill_tokens, 22, "{st:?}");
    step(&mut s);
    // The first's last 22, and 42 of the second's 100.
    assert_eq!(s.stats().running_prefill_tokens, 100 - 42);
    assert_eq!(s.stats().running_kv_tokens, 150 + 42);
    step(&mut s);
    // Both prompts computed: decoding needs no prefill.
    assert_eq!(s.stats().running_prefill_tokens, 0);
    assert!(s.stats().running_kv_tokens >= 250, "{:?}", s.stats());
}
