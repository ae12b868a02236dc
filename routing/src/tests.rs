use crate::cluster::*;
use crate::cost::{CostWeights, TtftScale};
use crate::index::*;
use crate::policy::*;
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
        home: None,
        waited_ms: 0,
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

#[test]
fn explain_shows_every_candidate_with_the_picked_one_scoring_best() {
    let mut c = cluster(&[(100, 50), (100, 60), (100, 0)]);
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
    let cfg = PolicyConfig::default();
    let r = req(70, 16, &hashes);
    let Decision::Route(route) = c.decide(&cfg, &r, 1, &mut SplitMix64(1)) else {
        panic!("routed")
    };
    let trace = c.explain(&cfg, &r);
    let slots: Vec<usize> = trace.iter().map(|t| t.candidate.slot).collect();
    assert_eq!(
        slots,
        [0, 1, 2],
        "agents without room are candidates to wait for"
    );
    let best = trace
        .iter()
        .max_by(|a, b| a.score.total_cmp(&b.score))
        .unwrap();
    assert_eq!(best.candidate.slot, route.slot);
    assert_eq!(best.score, route.score);
    // The kv policy's one scorer is minus the cost the estimate names.
    for t in &trace {
        assert!((t.score + t.estimate.cost).abs() < 1e-9, "{t:?}");
        assert_eq!(t.values[0], t.score, "{t:?}");
        assert!(t.values[1..].iter().all(|&v| v == 0.0), "{t:?}");
    }
    assert_eq!(trace[0].candidate.cached_blocks, 4);
    assert!(
        trace[2].estimate.wait_s > 0.0,
        "the full agent predicts a wait"
    );
}

#[test]
fn explain_gives_each_scorers_value_whose_weighted_sum_is_the_score() {
    let mut c = cluster(&[(100, 50), (100, 60), (100, 90)]);
    c.apply_report(
        0,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![11, 12, 13, 14])],
            ..report("a0", 1, 100, 50)
        },
        1,
    );
    let cfg = PolicyConfig {
        kind: PolicyKind::KvScore,
        ..PolicyConfig::default()
    };
    let r = req(70, 16, &[11, 12, 13, 14]);
    let Decision::Route(_) = c.decide(&cfg, &r, 1, &mut SplitMix64(1)) else {
        panic!("routed")
    };
    let trace = c.explain(&cfg, &r);
    assert_eq!(trace.len(), 3);
    let scorers = crate::pipeline::Preset::of(&cfg).scorers;
    assert_eq!(scorers.as_slice().len(), 3, "prefix, headroom, queue");
    for t in &trace {
        let sum: f64 = scorers
            .as_slice()
            .iter()
            .zip(t.values)
            .map(|(&(_, w), v)| w * v)
            .sum();
        assert!((sum - t.score).abs() < 1e-9, "{t:?}: {sum}");
    }
    // The prefix scorer (first) is highest on the agent caching the prompt's blocks.
    assert!(trace[0].values[0] > trace[1].values[0], "{trace:?}");
    assert_eq!(trace[1].values[0], trace[2].values[0], "{trace:?}");
}

#[test]
fn filter_verdicts_say_why_each_agent_was_left_out() {
    use crate::pipeline::Verdict;
    // a0 fits; a1 is disconnected; a2's pool is too small for the prompt; a3 has no room now;
    // a4 is excluded; a5's max_model_len is below the prompt; a6 last reported long ago.
    let now = 10_000;
    let mut c = Cluster::new();
    for (i, total, free, max_len) in [
        (0, 100, 90, 100_000),
        (1, 100, 90, 100_000),
        (2, 3, 3, 100_000),
        (3, 100, 0, 100_000),
        (4, 100, 90, 100_000),
        (5, 100, 90, 50),
        (6, 100, 90, 100_000),
    ] {
        let id = format!("a{i}");
        let s = c.upsert_agent(&id);
        let at = if i == 6 { 0 } else { now };
        c.apply_report(
            s,
            Report {
                max_model_len: max_len,
                ..report(&id, 1, total, free)
            },
            at,
        );
    }
    c.set_disconnected(1);
    let exclude = [4usize];
    let r = RouteRequest {
        exclude: &exclude,
        ..req(70, 16, &[])
    };
    let verdicts = |c: &mut Cluster, kind| {
        let cfg = PolicyConfig {
            kind,
            ..PolicyConfig::default()
        };
        let d = c.decide(&cfg, &r, now, &mut SplitMix64(1));
        (d, c.filter_verdicts(&cfg, &r, now))
    };
    let (d, v) = verdicts(&mut c, PolicyKind::KvScore);
    assert!(matches!(d, Decision::Route(ref x) if x.slot == 0), "{d:?}");
    assert_eq!(
        v,
        [
            (1, Verdict::Down),
            (2, Verdict::PoolTooSmall),
            (3, Verdict::NoRoom),
            (4, Verdict::Excluded),
            (5, Verdict::PromptTooLong),
            (6, Verdict::Stale),
        ]
    );
    // kv may wait for room: a3 is a candidate there, not filtered.
    let (_, v) = verdicts(&mut c, PolicyKind::Kv);
    assert!(v.iter().all(|&(s, _)| s != 3), "{v:?}");
    assert_eq!(v.len(), 5, "{v:?}");
    // Round-robin stops at the first eligible agent: the others were not tried.
    let (_, v) = verdicts(&mut c, PolicyKind::RoundRobin);
    assert!(v.contains(&(3, Verdict::NotTried)), "{v:?}");
    assert!(v.contains(&(1, Verdict::Down)), "{v:?}");
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
    let Decision::Route(r) = c.decide(&score, &req(280, 32, &hashes), 0, &mut SplitMix64(1)) else {
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
    // Many blocks already promised to requests queued for a0: a wait longer than the recompute
    // on a1 and the stall it imposes on a1's four running requests.
    let held = [20_000, 0];
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
            home: None,
            waited_ms: 0,
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
fn kv_counts_the_prefill_running_requests_have_left_and_waiting_ones_in_the_batch() {
    // Agent 0 looks idle by its running batch (1), but its running prompts have 20,000 tokens
    // left to compute and 6 requests wait to join the batch; agent 1 runs 4 with nothing left to
    // prefill. Both measured alike: a GPU-like decode (one more sequence adds 50 µs).
    let mut c = Cluster::new();
    for (i, running, waiting, left) in [(0, 1u32, 6u32, 20_000u64), (1, 4, 0, 0)] {
        let id = format!("a{i}");
        let s = c.upsert_agent(&id);
        let r = Report {
            running_requests: running,
            waiting_requests: waiting,
            running_prefill_tokens: left,
            prefill_tokens_per_s: 10_000,
            decode_step_us: 10_000,
            decode_batch: 4,
            decode_step_per_seq_ns: 50_000,
            ..report(&id, 1, 100, 50)
        };
        c.apply_report(s, r, 0);
    }
    let cfg = PolicyConfig::default();
    let d = c.decide(&cfg, &req(200, 32, &[1, 2, 3]), 0, &mut SplitMix64(3));
    assert!(matches!(d, Decision::Route(r) if r.slot == 1), "{d:?}");
    let e = c.explain(&cfg, &req(200, 32, &[1, 2, 3]));
    let on = |slot: usize| {
        e.iter()
            .find(|t| t.candidate.slot == slot)
            .map(|t| t.estimate)
    };
    let (busy, idle) = (on(0).unwrap(), on(1).unwrap());
    // 20,200 tokens at 10,000 tok/s ahead of its first token there.
    assert!((busy.prefill_s - 2.02).abs() < 1e-9, "{busy:?}");
    // 7 requests (1 running, 6 waiting) pay 32 steps × 50 µs each, against 4 on agent 1.
    assert!(
        (busy.decode_s - 7.0 * 32.0 * 50e-6).abs() < 1e-9,
        "{busy:?}"
    );
    assert!(
        (idle.decode_s - 4.0 * 32.0 * 50e-6).abs() < 1e-9,
        "{idle:?}"
    );
}

#[test]
fn a_prefix_a_running_request_uses_takes_no_room() {
    // 6 blocks, 4 of them a cached prefix; the agent reports which cached blocks are in use.
    let hashes = [11, 12, 13, 14];
    let mut c = cluster(&[(100, 50)]);
    let with = |events: Vec<CacheEvent>| Report {
        snapshot: false,
        block_use_events: true,
        events,
        // Many evictable blocks elsewhere: the count alone proves nothing about ours.
        cached_evictable_blocks: 40,
        ..report("a0", 1, 100, 50)
    };
    let need = |c: &mut Cluster| match c.decide(
        &PolicyConfig::default(),
        &req(70, 16, &hashes),
        1,
        &mut SplitMix64(1),
    ) {
        Decision::Route(r) => (r.cached_blocks, r.need_blocks),
        d => panic!("{d:?}"),
    };
    // Stored by the request computing them: in use, shared for free.
    c.apply_report(0, with(vec![CacheEvent::Stored(vec![11, 12, 13, 14])]), 1);
    assert_eq!(need(&mut c), (4, 6 - 4));
    // That request ended: the last two blocks are free again, the first two still used by
    // another request (a leading run, as sharing always is).
    c.apply_report(0, with(vec![CacheEvent::Evictable(vec![13, 14])]), 1);
    assert_eq!(need(&mut c), (4, 6 - 2));
    c.apply_report(0, with(vec![CacheEvent::Evictable(vec![11, 12])]), 1);
    assert_eq!(need(&mut c), (4, 6));
    // Used again; then evicted and gone.
    c.apply_report(0, with(vec![CacheEvent::InUse(vec![11, 12, 13])]), 1);
    assert_eq!(need(&mut c), (4, 6 - 3));
    c.apply_report(0, with(vec![CacheEvent::Removed(vec![12])]), 1);
    assert_eq!(need(&mut c), (1, 6 - 1));
    c.check_invariants().unwrap();
    // A prompt of exactly 4 blocks: an engine computes at least its last token, so it reuses
    // at most 3 of them (the 4th is allocated again).
    c.apply_report(0, with(vec![CacheEvent::InUse(vec![12, 14])]), 1);
    c.apply_report(0, with(vec![CacheEvent::Stored(vec![12])]), 1);
    let aligned = c.decide(
        &PolicyConfig::default(),
        &req(64, 16, &hashes),
        1,
        &mut SplitMix64(1),
    );
    let Decision::Route(r) = aligned else {
        panic!("{aligned:?}")
    };
    assert_eq!(
        (r.cached_blocks, r.need_blocks, r.prefill_tokens),
        (3, 5 - 3, 16)
    );
    // An agent that does not report block use: the stored prefix is not assumed in use.
    let mut old = cluster(&[(100, 50)]);
    old.apply_report(
        0,
        Report {
            block_use_events: false,
            ..with(vec![CacheEvent::Stored(vec![11, 12, 13, 14])])
        },
        1,
    );
    assert_eq!(need(&mut old), (4, 6));
    old.check_invariants().unwrap();
}

#[test]
fn one_request_at_a_time_travels_on_a_shared_prefix_credit() {
    // The prefix is in use; two requests of its group are sent before the agent counts either.
    // If the holders ended and the prefix were evicted before they arrive, both would recompute
    // it; the holders' release covers one. So the second pays its whole prompt until the first
    // is counted.
    let hashes = [11, 12, 13, 14];
    let mut c = cluster(&[(100, 60)]);
    let at = |received: u64, free: u64, events: Vec<CacheEvent>| Report {
        snapshot: false,
        block_use_events: true,
        requests_received: received,
        cached_evictable_blocks: 40,
        events,
        ..report("a0", 1, 100, free)
    };
    c.apply_report(
        0,
        at(0, 60, vec![CacheEvent::Stored(vec![11, 12, 13, 14])]),
        1,
    );
    let route = |c: &mut Cluster| match c.decide(
        &PolicyConfig::default(),
        &req(70, 16, &hashes),
        1,
        &mut SplitMix64(1),
    ) {
        Decision::Route(r) => r,
        d => panic!("{d:?}"),
    };
    let first = route(&mut c);
    assert_eq!((first.need_blocks, first.shared_blocks), (2, 4));
    c.reserve(&first).unwrap();
    let second = route(&mut c);
    assert_eq!((second.need_blocks, second.shared_blocks), (6, 0));
    c.reserve(&second).unwrap();
    c.check_invariants().unwrap();
    // The agent counted both (it reserves their whole prompts while they wait): credit again.
    c.apply_report(0, at(2, 48, Vec::new()), 2);
    let third = route(&mut c);
    assert_eq!((third.need_blocks, third.shared_blocks), (2, 4));
    c.check_invariants().unwrap();
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
        home: None,
        waited_ms: 0,
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
fn open_room_says_which_reports_opened_room_for_the_queue() {
    let stale = PolicyConfig::default().stale_after_ms;
    let mut c = Cluster::new();
    let slot = c.upsert_agent("a0");
    assert_eq!(c.open_room(slot, 0, stale), None, "never reported");
    assert_eq!(c.open_room(slot + 1, 0, stale), None, "not listed");
    c.apply_report(slot, report("a0", 1, 100, 40), 0);
    assert_eq!(c.open_room(slot, 0, stale), Some(40));
    // A request sent there takes its blocks until the agent counts it.
    let Decision::Route(r) = c.decide(
        &PolicyConfig::default(),
        &req(160, 0, &[]),
        0,
        &mut SplitMix64(1),
    ) else {
        panic!()
    };
    c.reserve(&r).unwrap();
    assert_eq!(c.open_room(slot, 0, stale), Some(30));
    // The agent counts it and a step takes two more blocks: no room opened.
    let step = |free: u64| Report {
        requests_received: 1,
        snapshot: false,
        ..report("a0", 1, 100, free)
    };
    c.apply_report(slot, step(28), 1);
    assert_eq!(c.open_room(slot, 1, stale), Some(28));
    // A request ends: room opened.
    c.apply_report(slot, step(45), 2);
    assert_eq!(c.open_room(slot, 2, stale), Some(45));
    // Stale, or disconnected: none to offer.
    assert_eq!(c.open_room(slot, 2 + stale + 1, stale), None);
    c.set_disconnected(slot);
    assert_eq!(c.open_room(slot, 2, stale), None);
}

#[test]
fn reservations_retire_on_counter_and_reset_on_epoch() {
    let mut c = cluster(&[(100, 100)]);
    let cfg = PolicyConfig::default();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 0, &mut SplitMix64(1)) else {
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
fn with_dispatch_acks_only_this_gateways_acknowledgements_retire_its_reservations() {
    let mut c = cluster(&[(100, 100)]);
    let cfg = PolicyConfig::default();
    let acking = |received: u64, free: u64, acked: Vec<u64>| Report {
        requests_received: received,
        snapshot: false,
        dispatch_acks: true,
        acked_dispatches: acked,
        ..report("a0", 1, 100, free)
    };
    c.apply_report(0, acking(0, 100, Vec::new()), 1);
    let mut handles = Vec::new();
    for _ in 0..3 {
        let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 1, &mut SplitMix64(1)) else {
            panic!()
        };
        handles.push(c.reserve(&r).unwrap());
    }
    assert_eq!(c.agents()[0].reserved_blocks(), 30);
    // Another gateway's and direct clients' requests move the counter: nothing is retired.
    c.apply_report(0, acking(5, 60, Vec::new()), 2);
    assert_eq!(c.agents()[0].reserved_blocks(), 30);
    c.check_invariants().unwrap();
    // The agent took in the third (out of order) and refused an unknown one.
    c.apply_report(0, acking(6, 50, vec![handles[2].id, 999_999]), 3);
    assert_eq!(c.agents()[0].reserved_blocks(), 20);
    assert_eq!(c.agents()[0].dispatches_acked(), 1);
    // The first never reached the agent (connection refused): cancelled; the second is
    // acknowledged twice (a snapshot repeats it): retired once.
    assert!(c.cancel(handles[0]));
    c.apply_report(0, acking(7, 40, vec![handles[1].id]), 4);
    c.apply_report(
        0,
        Report {
            snapshot: true,
            ..acking(7, 40, vec![handles[1].id, handles[2].id])
        },
        5,
    );
    assert_eq!(c.agents()[0].reserved_blocks(), 0);
    assert_eq!(c.agents()[0].dispatches_acked(), 2);
    assert_eq!(c.agents()[0].dispatches_expired(), 0);
    c.check_invariants().unwrap();
}

#[test]
fn an_unacknowledged_dispatch_expires() {
    let mut c = cluster(&[(100, 100)]);
    let cfg = PolicyConfig::default();
    let acking = |free: u64| Report {
        snapshot: false,
        dispatch_acks: true,
        ..report("a0", 1, 100, free)
    };
    c.apply_report(0, acking(100), 1_000);
    let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 1_000, &mut SplitMix64(1)) else {
        panic!()
    };
    c.reserve(&r).unwrap();
    c.apply_report(0, acking(100), 1_000 + DISPATCH_ACK_TTL_MS - 1);
    assert_eq!(c.agents()[0].reserved_blocks(), 10);
    c.apply_report(0, acking(100), 1_000 + DISPATCH_ACK_TTL_MS);
    assert_eq!(c.agents()[0].reserved_blocks(), 0);
    assert_eq!(c.agents()[0].dispatches_expired(), 1);
    assert_eq!(c.agents()[0].dispatches_acked(), 0);
    c.check_invariants().unwrap();
}

#[test]
fn the_largest_reservations_stay_until_the_agent_counts_them() {
    // Two requests sent at nearly the same time, 54 then 30 blocks. The agent's counter says it
    // has one of them; it may be either (they can arrive in either order), so the 54 stays
    // reserved: otherwise an agent that got the 30 first is over-booked by 24 blocks.
    let mut c = cluster(&[(100, 100)]);
    let cfg = PolicyConfig::default();
    for tokens in [54 * 16, 30 * 16] {
        let Decision::Route(r) = c.decide(&cfg, &req(tokens - 1, 1, &[]), 0, &mut SplitMix64(1))
        else {
            panic!()
        };
        c.reserve(&r).unwrap();
    }
    assert_eq!(c.agents()[0].reserved_blocks(), 84);
    let counted = |n: u64, free: u64| Report {
        requests_received: n,
        snapshot: false,
        ..report("a0", 1, 100, free)
    };
    c.apply_report(0, counted(1, 70), 1);
    assert_eq!(c.agents()[0].reserved_blocks(), 54);
    assert_eq!(c.agents()[0].pending_requests(), 1);
    c.check_invariants().unwrap();
    // A third request; then the agent counts two more: nothing stays reserved.
    let Decision::Route(r) = c.decide(&cfg, &req(10 * 16 - 1, 1, &[]), 1, &mut SplitMix64(1))
    else {
        panic!()
    };
    c.reserve(&r).unwrap();
    assert_eq!(c.agents()[0].reserved_blocks(), 64);
    c.apply_report(0, counted(2, 16), 2);
    assert_eq!(c.agents()[0].reserved_blocks(), 54);
    c.apply_report(0, counted(3, 6), 3);
    assert_eq!(c.agents()[0].reserved_blocks(), 0);
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
                    // Block-use events from some reports: blocks going idle, reused, evicted.
                    block_use_events: *free % 2 == 0,
                    events: vec![
                        CacheEvent::Stored(store.clone()),
                        CacheEvent::Evictable(
                            store.iter().copied().filter(|h| h % 3 == 0).collect(),
                        ),
                        CacheEvent::InUse(remove.clone()),
                        CacheEvent::Removed(
                            remove.iter().copied().filter(|h| h % 2 == 0).collect(),
                        ),
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
                    home: None,
                    waited_ms: 0,
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

#[test]
fn observed_times_to_first_token_calibrate_the_agent() {
    // Two equal agents with room; `a0` caches half the prompt, so it wins at first.
    let hashes = [11, 12, 13, 14];
    let mut c = cluster(&[(100, 80), (100, 80)]);
    c.apply_report(
        0,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![11, 12])],
            ..report("a0", 1, 100, 80)
        },
        1,
    );
    let pick = |c: &mut Cluster| match c.decide(
        &PolicyConfig::default(),
        &req(600, 16, &hashes),
        1,
        &mut SplitMix64(1),
    ) {
        Decision::Route(r) => r,
        d => panic!("{d:?}"),
    };
    let first = pick(&mut c);
    assert_eq!(first.slot, 0);
    // `a0` turns out four times slower than predicted, `a1` as predicted.
    for _ in 0..50 {
        c.observe_ttft(0, 1, 1.0, 4.0);
        c.observe_ttft(1, 1, 1.0, 1.0);
    }
    let after = pick(&mut c);
    assert_eq!(after.slot, 1);
    assert_eq!(c.agents()[0].ttft_scale(), TtftScale::MAX);
    // Another epoch's sample, or an unknown slot, changes nothing.
    c.observe_ttft(1, 7, 1.0, 4.0);
    c.observe_ttft(9, 1, 1.0, 4.0);
    assert!((c.agents()[1].ttft_scale() - 1.0).abs() < 1e-9);
    c.check_invariants().unwrap();
}

#[test]
fn retry_after_follows_the_room_the_queue_needs_and_the_observed_release_rate() {
    use crate::cost::{retry_after_s, MAX_RETRY_AFTER_S};
    assert_eq!(retry_after_s(10, 20, 0.0), Some(1), "room now: at once");
    assert_eq!(retry_after_s(30, 20, 0.0), None, "no rate observed");
    assert_eq!(retry_after_s(30, 20, f64::NAN), None);
    assert_eq!(retry_after_s(30, 20, 5.0), Some(2));
    assert_eq!(retry_after_s(31, 20, 5.0), Some(3));
    assert_eq!(retry_after_s(10_000, 0, 1.0), Some(MAX_RETRY_AFTER_S));
    assert_eq!(retry_after_s(u64::MAX, 0, 1e-300), Some(MAX_RETRY_AFTER_S));

    // Two busy agents of 100 blocks, 10 free each: reports every 250 ms for 3 s in which the
    // first gives back 5 blocks per report (20/s) and the second 2 (8/s).
    let mut c = cluster(&[(100, 10), (100, 10)]);
    let busy = |released: u64| Report {
        snapshot: false,
        running_requests: 4,
        room_released_blocks: released,
        ..report("x", 1, 100, 10)
    };
    assert_eq!(c.retry_after_s("m", 200, 0, 5_000), None);
    for step in 1..=12u64 {
        let now = step * 250;
        c.apply_report(
            0,
            Report {
                agent_id: "a0".into(),
                ..busy(step * 5)
            },
            now,
        );
        c.apply_report(
            1,
            Report {
                agent_id: "a1".into(),
                ..busy(step * 2)
            },
            now,
        );
    }
    let rate = c.agents()[0].release_blocks_per_s() + c.agents()[1].release_blocks_per_s();
    assert!((rate - 28.0).abs() < 0.5, "{rate}");
    // 200 blocks wanted, 20 free: 180 at 28/s → 7 s.
    assert_eq!(c.retry_after_s("m", 200, 3_000, 5_000), Some(7));
    assert_eq!(c.retry_after_s("m", 15, 3_000, 5_000), Some(1));
    // Another model's agents say nothing about this one; stale agents neither.
    assert_eq!(c.retry_after_s("other", 200, 3_000, 5_000), None);
    assert_eq!(c.retry_after_s("m", 200, 60_000, 5_000), None);
}

#[test]
fn preemptions_while_room_is_reserved_count_as_over_admission_and_a_new_epoch_drops_acked_reservations(
) {
    let mut c = cluster(&[(100, 100)]);
    let cfg = PolicyConfig::default();
    let acking = |epoch: u64, preemptions: u64, acked: Vec<u64>| Report {
        snapshot: false,
        dispatch_acks: true,
        preemptions,
        acked_dispatches: acked,
        ..report("a0", epoch, 100, 100)
    };
    c.apply_report(0, acking(1, 0, Vec::new()), 1);
    // Preempting with nothing reserved here is someone else's business.
    c.apply_report(0, acking(1, 2, Vec::new()), 2);
    assert_eq!(c.agents()[0].over_admissions(), 0);
    let Decision::Route(r) = c.decide(&cfg, &req(160, 0, &[]), 2, &mut SplitMix64(1)) else {
        panic!()
    };
    let h = c.reserve(&r).unwrap();
    c.apply_report(0, acking(1, 5, Vec::new()), 3);
    assert_eq!(c.agents()[0].over_admissions(), 3);
    // The agent restarts mid-burst: the reservation of the old epoch is gone, and an
    // acknowledgement of its id in the new epoch retires nothing (there is nothing to retire).
    c.apply_report(
        0,
        Report {
            snapshot: true,
            ..acking(2, 0, vec![h.id])
        },
        4,
    );
    assert_eq!(c.agents()[0].reserved_blocks(), 0);
    assert_eq!(c.agents()[0].pending_requests(), 0);
    assert!(!c.cancel(h));
    assert_eq!(
        c.agents()[0].over_admissions(),
        3,
        "a new epoch's counter starts over"
    );
    c.check_invariants().unwrap();
}

#[test]
fn a_prefix_in_an_agents_host_tier_counts_less_than_on_its_device_but_more_than_none() {
    let hashes = [11, 12, 13, 14];
    let pick = |c: &mut Cluster| {
        let d = c.decide(
            &PolicyConfig::default(),
            &req(70, 16, &hashes),
            1,
            &mut SplitMix64(1),
        );
        let Decision::Route(r) = d else {
            panic!("{d:?}")
        };
        let trace = c.explain(&PolicyConfig::default(), &req(70, 16, &hashes));
        (r.slot, trace)
    };
    let event = |c: &mut Cluster, slot: Slot, ev: CacheEvent| {
        c.apply_report(
            slot,
            Report {
                snapshot: false,
                events: vec![ev],
                ..report(&format!("a{slot}"), 1, 100, 60)
            },
            1,
        );
        c.check_invariants().unwrap();
    };
    // a1 has the most room, a0 keeps the prompt's blocks in its host tier.
    let mut c = cluster(&[(100, 60), (100, 70)]);
    event(&mut c, 0, CacheEvent::HostStored(hashes.to_vec()));
    let (slot, trace) = pick(&mut c);
    assert_eq!(slot, 0, "a host-tier hit beats recomputing: {trace:?}");
    let t0 = trace.iter().find(|t| t.candidate.slot == 0).unwrap();
    assert_eq!(
        (t0.candidate.cached_blocks, t0.candidate.host_blocks),
        (0, 4)
    );
    // The four blocks count as computed there but for their copy's cost (the prior: the
    // report measured no copy).
    let copy = (64.0 * (1.0 - crate::scorer::HOST_BLOCK_COST)) as u64;
    assert_eq!(t0.candidate.prefill_tokens, 70 - copy);
    // Copying them back duplicates nothing; computing them on a1 would.
    assert_eq!(t0.estimate.duplicate_s, 0.0, "{t0:?}");
    let t1 = trace.iter().find(|t| t.candidate.slot == 1).unwrap();
    assert!(t1.estimate.duplicate_s > 0.0, "{t1:?}");
    // A device hit is worth more: a1 caching them on its device wins.
    event(&mut c, 1, CacheEvent::Stored(hashes.to_vec()));
    assert_eq!(pick(&mut c).0, 1);
    // a1 evicts them to its host tier too: both hold them there; the device view is exact.
    event(&mut c, 1, CacheEvent::Removed(hashes.to_vec()));
    event(&mut c, 1, CacheEvent::HostStored(hashes.to_vec()));
    let (_, trace) = pick(&mut c);
    assert!(trace.iter().all(|t| t.candidate.host_blocks == 4));
    // Gone from a0's host tier, and a1 cleared everything: nobody holds them.
    event(&mut c, 0, CacheEvent::HostRemoved(hashes.to_vec()));
    event(&mut c, 1, CacheEvent::AllCleared);
    let (_, trace) = pick(&mut c);
    assert!(trace.iter().all(|t| t.candidate.host_blocks == 0));
    assert_eq!(c.local_prefix_blocks("m", &hashes), 0);
}

#[test]
fn a_host_blocks_cost_is_its_measured_copy_time_over_its_prefill_time() {
    use crate::scorer::{host_block_cost, HOST_BLOCK_COST};
    // Not measured (no copy yet, or no prefill yet): the prior.
    assert_eq!(host_block_cost(0, 400, 16), HOST_BLOCK_COST as f32);
    assert_eq!(host_block_cost(30_000, 0, 16), HOST_BLOCK_COST as f32);
    // 16 tokens at 400 tok/s take 40 ms; a 4 ms copy is a tenth of that.
    assert!((host_block_cost(4_000_000, 400, 16) - 0.1).abs() < 1e-6);
    // A 30 us copy on the CPU is nearly free; a copy slower than the prefill is capped.
    assert!(host_block_cost(30_000, 160, 16) < 0.001);
    assert_eq!(host_block_cost(u32::MAX, 100_000, 16), 1.0);
}

#[test]
fn a_request_waiting_for_its_agent_moves_only_when_the_other_is_cheaper_by_its_recompute() {
    // A conversation: a0 caches its last turn (10 blocks) on its device and has no room; a1 has
    // room and keeps the conversation's older turns (8 blocks) in its host tier.
    let hashes: Vec<u64> = (1..=11).collect();
    let measured = |id: &str, free: u64| Report {
        running_requests: 4,
        prefill_tokens_per_s: 1000,
        decode_step_us: 20_000,
        decode_batch: 4,
        cached_evictable_blocks: 10,
        ..report(id, 1, 100, free)
    };
    let mut c = Cluster::new();
    for (id, free, ev) in [
        ("a0", 0, CacheEvent::Stored(hashes[..10].to_vec())),
        ("a1", 60, CacheEvent::HostStored(hashes[..8].to_vec())),
    ] {
        let s = c.upsert_agent(id);
        c.apply_report(s, measured(id, free), 0);
        c.apply_report(
            s,
            Report {
                snapshot: false,
                events: vec![ev],
                ..measured(id, free)
            },
            1,
        );
    }
    c.check_invariants().unwrap();
    let first = req(180, 64, &hashes);
    let waiting = RouteRequest {
        home: Some(0),
        waited_ms: 0,
        ..first
    };
    // The terms at weight 1 and no stall: the default stall weight prices a1's two recomputed
    // blocks (a stall of a1's four running requests) above waiting for a0 already.
    let cfg = PolicyConfig {
        cost: CostWeights {
            decode: 1.0,
            stall: 0.0,
            ..CostWeights::default()
        },
        ..PolicyConfig::default()
    };
    let decide = |c: &mut Cluster, cfg: &PolicyConfig, r: &RouteRequest<'_>| {
        let d = c.decide(cfg, r, 1, &mut SplitMix64(1));
        (d, c.explain(cfg, r))
    };
    // A new request: a1 now beats waiting for a0 (the two blocks it recomputes cost less).
    let (d, trace) = decide(&mut c, &cfg, &first);
    assert!(
        matches!(d, Decision::Route(r) if r.slot == 1),
        "{d:?} {trace:?}"
    );
    assert!(trace.iter().all(|t| t.estimate.move_s == 0.0));
    // The same request once it waits for a0: recomputing a0's two blocks on a1 is priced `stick`
    // times more, and it keeps waiting there.
    let (d, trace) = decide(&mut c, &cfg, &waiting);
    assert!(
        matches!(d, Decision::Hold(r) if r.slot == 0),
        "{d:?} {trace:?}"
    );
    let t1 = trace.iter().find(|t| t.candidate.slot == 1).unwrap();
    assert_eq!(t1.estimate.move_s, 32.0 / 1000.0, "{t1:?}");
    let t0 = trace.iter().find(|t| t.candidate.slot == 0).unwrap();
    assert_eq!(t0.estimate.move_s, 0.0);
    // Without the stick weight it moves as a new request would.
    let loose = PolicyConfig {
        cost: crate::cost::CostWeights {
            stick: 0.0,
            ..cfg.cost
        },
        ..cfg
    };
    let (d, _) = decide(&mut c, &loose, &waiting);
    assert!(matches!(d, Decision::Route(r) if r.slot == 1), "{d:?}");
    // Once a1 caches the whole conversation on its device, moving recomputes nothing: it goes.
    c.apply_report(
        1,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(hashes[..10].to_vec())],
            ..measured("a1", 60)
        },
        1,
    );
    let (d, trace) = decide(&mut c, &cfg, &waiting);
    assert!(
        matches!(d, Decision::Route(r) if r.slot == 1),
        "{d:?} {trace:?}"
    );
    // A home that is no candidate (gone, excluded) prices nothing.
    let gone = RouteRequest {
        home: Some(7),
        waited_ms: 0,
        ..first
    };
    let (_, trace) = decide(&mut c, &cfg, &gone);
    assert!(trace.iter().all(|t| t.estimate.move_s == 0.0));
}

fn routed_slot(c: &mut Cluster, cfg: &PolicyConfig, r: &RouteRequest<'_>, now: u64) -> Slot {
    match c.decide(cfg, r, now, &mut SplitMix64(7)) {
        Decision::Route(route) => {
            c.dispatch(cfg, &route, r.block_hashes, now);
            route.slot
        }
        d => panic!("{d:?}"),
    }
}

fn loaded(id: &str, running: u32, waiting: u32) -> Report {
    Report {
        running_requests: running,
        waiting_requests: waiting,
        ..report(id, 1, 100, 50)
    }
}

#[test]
fn cache_aware_follows_what_it_sent_and_ignores_what_agents_report() {
    let cfg = PolicyConfig {
        kind: PolicyKind::CacheAware,
        ..PolicyConfig::default()
    };
    let mut c = cluster(&[(100, 50), (100, 50), (100, 50)]);
    // a2 reports the prefix cached: a text-matching router does not look.
    c.apply_report(
        2,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![1, 2, 3])],
            ..report("a2", 1, 100, 50)
        },
        1,
    );
    let group_a = [1, 2, 3, 10];
    let first = routed_slot(&mut c, &cfg, &req(70, 16, &group_a), 1);
    assert_eq!(c.sent_blocks(first), 4);
    // Nothing was sent before: the smallest tree, the lowest slot of the empty ones.
    assert_eq!(first, 0);
    // Same prefix, another question: 3 of 4 blocks (48 of 70 tokens) match, above 0.3.
    let again = routed_slot(&mut c, &cfg, &req(70, 16, &[1, 2, 3, 11]), 2);
    assert_eq!(again, first);
    // Another group: its first block matches nothing, so the smallest tree (a1) takes it.
    let other = routed_slot(&mut c, &cfg, &req(70, 16, &[20, 21, 22, 23]), 3);
    assert_eq!(other, 1);
    // A match below the threshold (1 block of 16 tokens out of 70 = 0.23) does not count:
    // the smallest tree (a2, never sent anything) gets it.
    let weak = routed_slot(&mut c, &cfg, &req(70, 16, &[1, 40, 41, 42]), 4);
    assert_eq!(weak, 2);
}

#[test]
fn cache_aware_goes_to_the_least_loaded_only_when_loads_are_out_of_balance() {
    let mut cfg = PolicyConfig {
        kind: PolicyKind::CacheAware,
        ..PolicyConfig::default()
    };
    let mut c = cluster(&[(100, 50), (100, 50)]);
    let prompt = [5, 6, 7, 8];
    assert_eq!(routed_slot(&mut c, &cfg, &req(64, 16, &prompt), 1), 0);
    // a0 runs 40 more requests than a1: within SGLang's default thresholds (64 apart), so
    // the prefix still wins.
    c.apply_report(0, loaded("a0", 40, 10), 2);
    c.apply_report(1, loaded("a1", 10, 0), 2);
    assert_eq!(routed_slot(&mut c, &cfg, &req(64, 16, &prompt), 3), 0);
    // Tighter thresholds (the bench's tuned variant): 40 apart and 5x is out of balance.
    cfg.cache_aware.balance_abs = 4;
    cfg.cache_aware.balance_rel = 1.2;
    assert_eq!(routed_slot(&mut c, &cfg, &req(64, 16, &prompt), 4), 1);
    // The balanced pick is remembered too: a1 now matches the prompt as well.
    assert_eq!(c.sent_blocks(1), 4);
}

#[test]
fn cache_aware_evicts_an_agents_oldest_prompts_past_its_bound_and_forgets_a_gone_agent() {
    let cfg = PolicyConfig {
        kind: PolicyKind::CacheAware,
        cache_aware: CacheAwareParams {
            tree_tokens: 6 * 16,
            ..CacheAwareParams::default()
        },
        ..PolicyConfig::default()
    };
    let mut c = cluster(&[(100, 50)]);
    routed_slot(&mut c, &cfg, &req(64, 16, &[1, 2, 3, 4]), 1);
    // The shared prefix is used again later, so it outlives the first prompt's tail.
    routed_slot(&mut c, &cfg, &req(64, 16, &[1, 2, 30, 31]), 2);
    assert_eq!(c.sent_blocks(0), 6);
    // Two more blocks: the two least recently used go, the first prompt's tail (3, 4), while
    // the prefix used since stays, so a prompt sharing it still follows to a0.
    c.upsert_agent("a1");
    c.apply_report(1, report("a1", 1, 100, 50), 3);
    assert_eq!(
        routed_slot(&mut c, &cfg, &req(64, 16, &[1, 2, 50, 51]), 3),
        0
    );
    assert_eq!(c.sent_blocks(0), 6);
    assert_eq!(
        routed_slot(&mut c, &cfg, &req(64, 16, &[1, 2, 3, 60]), 4),
        0,
        "1, 2 kept"
    );
    // A prompt starting with an evicted block (4) matches nothing: a1, the smaller tree.
    assert_eq!(
        routed_slot(&mut c, &cfg, &req(64, 16, &[4, 70, 71, 72]), 5),
        1
    );
    c.deactivate(0);
    assert_eq!(c.sent_blocks(0), 0);
}

#[test]
fn llm_d_weighs_reported_prefix_kv_usage_and_queue_and_ignores_room() {
    let cfg = PolicyConfig {
        kind: PolicyKind::LlmD,
        ..PolicyConfig::default()
    };
    // a0 caches the whole prompt but has no room; a1 is empty. llm-d does not look at room:
    // prefix 3 x 1.0 + kv-usage 2 x 0 + queue 2 x 1 = 5 beats 0 + 2 + 2 = 4.
    let mut c = cluster(&[(100, 0), (100, 100)]);
    c.apply_report(
        0,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![1, 2, 3, 4])],
            ..report("a0", 1, 100, 0)
        },
        1,
    );
    let r = req(70, 16, &[1, 2, 3, 4]);
    let Decision::Route(route) = c.decide(&cfg, &r, 1, &mut SplitMix64(1)) else {
        panic!("llm-d routes whatever the room")
    };
    assert_eq!(route.slot, 0);
    assert!((route.score - 5.0).abs() < 1e-9, "{route:?}");
    // With a long queue there (scaled to 0 against a1's empty one), a1 wins: 3 + 0 + 0 < 0 + 2 + 2.
    c.apply_report(
        0,
        Report {
            snapshot: false,
            events: vec![CacheEvent::Stored(vec![1, 2, 3, 4])],
            free_blocks: 0,
            ..loaded("a0", 1, 9)
        },
        2,
    );
    let Decision::Route(route) = c.decide(&cfg, &r, 2, &mut SplitMix64(1)) else {
        panic!("routed")
    };
    assert_eq!(route.slot, 1);
    let trace = c.explain(&cfg, &r);
    let a0 = trace.iter().find(|t| t.candidate.slot == 0).unwrap();
    assert_eq!(a0.values[..3], [1.0, 0.0, 0.0], "{a0:?}");
}

#[test]
fn peer_policies_parse_by_name() {
    for kind in [PolicyKind::CacheAware, PolicyKind::LlmD] {
        assert_eq!(kind.as_str().parse::<PolicyKind>(), Ok(kind));
    }
    let err = "sglang".parse::<PolicyKind>().unwrap_err();
    assert!(
        err.contains("cache-aware") && err.contains("llm-d"),
        "{err}"
    );
}

/// With a time-per-output-token target, an agent whose decode step would grow past it with the
/// request in its batch has no room for it now: the request waits for that agent, or goes to one
/// whose step stays under the target; an idle agent takes it whatever its step.
#[test]
fn a_tpot_target_keeps_requests_off_batches_they_would_slow_past_it() {
    // Four running, 20 ms steps at batch 4, 5 ms per sequence: 25 ms with one more.
    let busy = |id: &str| Report {
        running_requests: 4,
        decode_step_us: 20_000,
        decode_batch: 4,
        decode_step_per_seq_ns: 5_000_000,
        ..report(id, 1, 100, 90)
    };
    let mut c = Cluster::new();
    let s0 = c.upsert_agent("a0");
    c.apply_report(s0, busy("a0"), 0);
    let tight = PolicyConfig {
        tpot_slo_s: 0.024,
        ..PolicyConfig::default()
    };
    let r = req(32, 16, &[]);
    let d = c.decide(&tight, &r, 0, &mut SplitMix64(1));
    assert!(matches!(&d, Decision::Hold(h) if h.slot == 0), "{d:?}");
    for cfg in [
        PolicyConfig {
            tpot_slo_s: 0.026,
            ..tight
        },
        PolicyConfig::default(),
    ] {
        let d = c.decide(&cfg, &r, 0, &mut SplitMix64(1));
        assert!(matches!(&d, Decision::Route(h) if h.slot == 0), "{d:?}");
    }
    // Other policies do not read the target.
    let rr = PolicyConfig {
        kind: PolicyKind::RoundRobin,
        ..tight
    };
    assert!(matches!(
        c.decide(&rr, &r, 0, &mut SplitMix64(1)),
        Decision::Route(_)
    ));
    // An idle agent measured slower than the target still takes it, and is chosen over
    // waiting.
    let s1 = c.upsert_agent("a1");
    c.apply_report(
        s1,
        Report {
            decode_step_us: 40_000,
            decode_batch: 1,
            ..report("a1", 1, 100, 90)
        },
        0,
    );
    let d = c.decide(&tight, &r, 0, &mut SplitMix64(1));
    assert!(matches!(&d, Decision::Route(h) if h.slot == 1), "{d:?}");
    // A request that may not wait is not held for the busy agent either.
    c.apply_report(s1, busy("a1"), 1);
    let no_wait = RouteRequest {
        may_hold: false,
        ..req(32, 16, &[])
    };
    let d = c.decide(&tight, &no_wait, 1, &mut SplitMix64(1));
    assert!(
        !matches!(d, Decision::Route(_) | Decision::Hold(_)),
        "{d:?}"
    );
}

/// The queue pass's order key: requests still within the time-to-first-token target before late
/// ones; within the cache-first window, the ones past it first and the younger by cached blocks;
/// the cache is read only for those; other policies keep the queue's order.
#[test]
fn queue_rank_serves_late_requests_last() {
    let cfg = PolicyConfig {
        ttft_slo_ms: 2_000,
        cache_first_ms: 1_000,
        ..PolicyConfig::default()
    };
    let unread = || -> u64 { panic!("the cache is read only within the window") };
    let young = queue_rank(&cfg, 500, || 7);
    let younger_more_cached = queue_rank(&cfg, 100, || 9);
    let past_window = queue_rank(&cfg, 1_500, unread);
    let late = queue_rank(&cfg, 2_000, unread);
    let later = queue_rank(&cfg, 60_000, unread);
    assert!(past_window < younger_more_cached, "{past_window:?}");
    assert!(younger_more_cached < young);
    assert!(young < late);
    assert_eq!(
        late, later,
        "late ones keep the queue's order among themselves"
    );
    // Without a target nobody is late.
    let no_target = PolicyConfig {
        ttft_slo_ms: 0,
        ..cfg
    };
    assert_eq!(
        queue_rank(&no_target, 60_000, unread),
        queue_rank(&no_target, 1_500, unread)
    );
    let other = PolicyConfig {
        kind: PolicyKind::LlmD,
        ..cfg
    };
    assert_eq!(
        queue_rank(&other, 10, unread),
        queue_rank(&other, 60_000, unread)
    );
}

/// A second request held for the same agent with the same evictable cached prefix is charged
/// only the blocks beyond it: the first takes the prefix out of the free blocks for both.
#[test]
fn held_requests_of_one_cached_prefix_charge_it_once_per_agent() {
    let route = |slot: Slot, cached: u64, shared: u64| Route {
        slot,
        need_blocks: 20,
        cached_blocks: cached,
        shared_blocks: shared,
        score: 0.0,
        prefill_tokens: 64,
        predicted_ttft_s: 0.0,
    };
    let group: Vec<u64> = (1..=20).collect();
    let mut h = HeldPrefixes::default();
    assert_eq!(h.charge(&route(0, 15, 0), &group), 20);
    assert_eq!(h.charge(&route(0, 15, 0), &group), 5);
    assert_eq!(h.charge(&route(0, 15, 0), &group), 5);
    // Another agent, or a shorter cached run (a different last block): charged in full.
    assert_eq!(h.charge(&route(1, 15, 0), &group), 20);
    assert_eq!(h.charge(&route(0, 14, 0), &group), 20);
    // Another prompt whose cached run ends in a different block: in full.
    let other: Vec<u64> = (101..=120).collect();
    assert_eq!(h.charge(&route(0, 15, 0), &other), 20);
    // Blocks running requests hold are shared already and not in the need twice.
    let mut h = HeldPrefixes::default();
    assert_eq!(h.charge(&route(0, 15, 10), &group), 20);
    assert_eq!(h.charge(&route(0, 15, 10), &group), 15);
    // Nothing cached, or hashes shorter than the cached run (not a real prompt): in full.
    assert_eq!(h.charge(&route(0, 0, 0), &group), 20);
    assert_eq!(h.charge(&route(0, 30, 0), &group), 20);
    assert_eq!(h.charge(&route(0, 30, 0), &group), 20);
    // A new pass starts over.
    h.clear();
    assert_eq!(h.charge(&route(0, 15, 10), &group), 20);
}

fn queued<'a>(prompt: u64, output: u64, hashes: &'a [u64], may_hold: bool) -> RouteRequest<'a> {
    RouteRequest {
        may_hold,
        ..req(prompt, output, hashes)
    }
}

#[test]
fn a_queue_pass_keeps_a_waiting_requests_agents_from_a_later_smaller_one() {
    let mut c = cluster(&[(100, 5)]);
    let cfg = PolicyConfig::default();
    let mut pass = crate::queue::QueuePass::default();
    pass.begin(c.agents().len());
    // 10 blocks against 5 free: it waits, and claims the model's only agent.
    let big = queued(144, 16, &[], false);
    let d = pass.decide(&mut c, &cfg, &big, 0, &mut SplitMix64(1));
    assert_eq!(d.decision, Decision::Wait);
    assert!(pass.is_blocked("m"));
    assert!(!pass.is_blocked("other"));
    // 2 blocks would fit, but the room is the first one's.
    let small = queued(16, 16, &[], false);
    let d = pass.decide(&mut c, &cfg, &small, 0, &mut SplitMix64(1));
    assert_eq!(d.decision, Decision::Wait);
    // A new pass forgets the claims: alone, it routes.
    pass.begin(c.agents().len());
    assert!(!pass.is_blocked("m"));
    let d = pass.decide(&mut c, &cfg, &small, 0, &mut SplitMix64(1));
    assert!(
        matches!(d.decision, Decision::Route(r) if r.slot == 0),
        "{d:?}"
    );
}

#[test]
fn a_queue_pass_counts_held_requests_room_for_the_ones_after_them() {
    let hashes = group_hashes();
    let mut c = locality_cluster(0, 60);
    let cfg = PolicyConfig::default();
    let mut pass = crate::queue::QueuePass::default();
    pass.begin(c.agents().len());
    let q = queued(280, 32, &hashes, true);
    let first = pass.decide(&mut c, &cfg, &q, 0, &mut SplitMix64(1));
    let Decision::Hold(r1) = first.decision else {
        panic!("{first:?}")
    };
    assert_eq!((r1.slot, first.held_before), (0, 0));
    assert_eq!(pass.held_mut()[0], r1.need_blocks);
    // The second of the group waits there too, behind the first's blocks.
    let second = pass.decide(&mut c, &cfg, &q, 0, &mut SplitMix64(1));
    let Decision::Hold(r2) = second.decision else {
        panic!("{second:?}")
    };
    assert_eq!((r2.slot, second.held_before), (0, r1.need_blocks));
    assert_eq!(pass.held_mut()[0], r1.need_blocks + r2.need_blocks);
    assert_eq!(pass.held_mut()[1], 0);
    // A new pass starts with nothing held.
    pass.begin(c.agents().len());
    assert_eq!(pass.held_mut(), &[0, 0]);
}

#[test]
fn the_ttft_budget_is_the_target_less_the_time_waited() {
    let hashes = group_hashes();
    let mut c = locality_cluster(0, 60);
    let cfg = PolicyConfig {
        ttft_slo_ms: 100,
        ..PolicyConfig::default()
    };
    let late_on_a0 = |c: &mut Cluster, waited_ms: u64| {
        let r = RouteRequest {
            waited_ms,
            ..req(280, 32, &hashes)
        };
        c.decide(&cfg, &r, 0, &mut SplitMix64(1));
        let trace = c.explain(&cfg, &r);
        let t0 = trace.iter().find(|t| t.candidate.slot == 0).unwrap();
        (t0.estimate.late_s, t0.estimate.ttft_s())
    };
    let (fresh, ttft) = late_on_a0(&mut c, 0);
    assert!(
        ttft > 0.1,
        "a0 has no room: a wait, then the prefill ({ttft} s)"
    );
    assert!((fresh - (ttft - 0.1)).abs() < 1e-9, "{fresh} {ttft}");
    let (waited, _) = late_on_a0(&mut c, 60);
    assert!((waited - (ttft - 0.04)).abs() < 1e-9, "{waited}");
    // Already past the target: it can no longer be made late.
    assert_eq!(late_on_a0(&mut c, 100).0, 0.0);
    assert_eq!(late_on_a0(&mut c, 5_000).0, 0.0);
}

#[test]
fn a_next_turn_may_use_what_is_kept_for_its_agents_other_conversations_but_not_elsewhere() {
    // Two agents with 40 free blocks each. On agent 0, two conversations finished and keep 15
    // blocks each; agent 1 keeps 15 for a third.
    let mut c = cluster(&[(100, 40), (100, 40)]);
    let cfg = PolicyConfig::default();
    let mut pass = crate::queue::QueuePass::default();
    pass.keep(0, 15, 7, 100);
    pass.keep(0, 15, 8, 100);
    pass.keep(1, 15, 9, 100);
    pass.begin(c.agents().len());
    pass.hold_kept(0);
    assert_eq!(pass.held_mut(), &[30, 15]);
    // The first conversation's next turn needs 30 blocks (464 + 16 tokens): with only its own
    // keep let go, agent 0 would show it 25. It takes its history's agent, the other
    // conversation's keep included, and leaves agent 1's keep alone.
    let next_turn = queued(464, 16, &[5, 7], false);
    let d = pass.decide(&mut c, &cfg, &next_turn, 0, &mut SplitMix64(1));
    assert!(
        matches!(d.decision, Decision::Route(r) if r.slot == 0 && r.need_blocks == 30),
        "{d:?}"
    );
    // Its own keep is let go; the other conversation's stays held from the requests after it.
    assert_eq!(pass.held_mut(), &[15, 15]);
    // A stranger is kept out of both agents' kept room: 25 free on each after the keeps.
    let stranger = queued(464, 16, &[1, 2], false);
    let d = pass.decide(&mut c, &cfg, &stranger, 0, &mut SplitMix64(1));
    assert_eq!(d.decision, Decision::Wait, "{d:?}");
    assert_eq!(pass.held_mut(), &[15, 15]);
}

#[test]
fn a_next_turn_waiting_for_room_keeps_keeping_on() {
    // Keeps that end unused turn keeping off, unless a next turn wanted them: waiting for room
    // on a full agent, it shows there are conversations to keep for.
    let mut c = cluster(&[(100, 10)]);
    let cfg = PolicyConfig::default();
    let mut pass = crate::queue::QueuePass::default();
    for i in 0..20u64 {
        pass.keep(0, 5, 1000 + i, 10 * i + 10);
        pass.begin(c.agents().len());
        pass.hold_kept(10 * i);
        // The next turn needs 30 blocks and the agent has 10: it waits, wanting the keep.
        let hashes = [1, 1000 + i];
        let next_turn = queued(464, 16, &hashes, false);
        let d = pass.decide(&mut c, &cfg, &next_turn, 10 * i, &mut SplitMix64(1));
        assert_eq!(d.decision, Decision::Wait, "{d:?}");
    }
    // All twenty ended unused but wanted: the next eight finished requests are kept.
    for i in 0..8u64 {
        pass.keep(0, 1, 2000 + i, 1_000);
    }
    pass.begin(c.agents().len());
    pass.hold_kept(200);
    assert_eq!(pass.held_mut()[0], 8);
}

#[test]
fn a_finished_requests_blocks_are_kept_for_the_request_that_continues_its_prompt() {
    // One agent with 20 free blocks; a finished request's 15 are kept until 100 ms.
    let mut c = cluster(&[(100, 20)]);
    let cfg = PolicyConfig::default();
    let mut pass = crate::queue::QueuePass::default();
    pass.keep(0, 15, 7, 100);
    pass.begin(c.agents().len());
    pass.hold_kept(0);
    assert_eq!(pass.held_mut()[0], 15);
    // A stranger needing 10 blocks (144 + 16 tokens) sees 5: it waits.
    let stranger = queued(144, 16, &[1, 2], false);
    let d = pass.decide(&mut c, &cfg, &stranger, 0, &mut SplitMix64(1));
    assert_eq!(d.decision, Decision::Wait);
    assert_eq!(pass.held_mut()[0], 15);
    // The next turn (its prompt holds the finished prompt's last block) is not kept out.
    pass.begin(c.agents().len());
    pass.hold_kept(0);
    let next_turn = queued(144, 16, &[5, 7], false);
    let d = pass.decide(&mut c, &cfg, &next_turn, 0, &mut SplitMix64(1));
    assert!(
        matches!(d.decision, Decision::Route(r) if r.slot == 0),
        "{d:?}"
    );
    // Routed there, the kept blocks are its own: nothing stays kept, now or in the next pass.
    assert_eq!(pass.held_mut()[0], 0);
    pass.begin(c.agents().len());
    pass.hold_kept(1);
    assert_eq!(pass.held_mut()[0], 0);
    // What nobody continues is let go at its deadline.
    pass.keep(0, 15, 9, 50);
    pass.begin(c.agents().len());
    pass.hold_kept(49);
    assert_eq!(pass.held_mut()[0], 15);
    pass.begin(c.agents().len());
    pass.hold_kept(50);
    assert_eq!(pass.held_mut()[0], 0);
    // Keeping that is never used stops: what finishes now is only watched.
    for i in 0..20 {
        pass.keep(0, 1, 1000 + i, 60);
        pass.begin(c.agents().len());
        pass.hold_kept(60);
    }
    for i in 0..16 {
        pass.keep(0, 1, 2000 + i, 1000);
    }
    pass.begin(c.agents().len());
    pass.hold_kept(61);
    assert_eq!(pass.held_mut()[0], 0);
    // Nothing to keep: no entry.
    pass.keep(0, 0, 3000, 1000);
    pass.begin(c.agents().len());
    pass.hold_kept(61);
    assert_eq!(pass.held_mut()[0], 0);
    // Watched prompts continued by their next turns (routed there) turn keeping on again.
    for i in 0..8 {
        let hashes = [2000 + i, 4000 + i];
        let next_turn = queued(32, 16, &hashes, false);
        pass.begin(c.agents().len());
        pass.hold_kept(62);
        let d = pass.decide(&mut c, &cfg, &next_turn, 62, &mut SplitMix64(1));
        assert!(
            matches!(d.decision, Decision::Route(r) if r.slot == 0),
            "{d:?}"
        );
    }
    pass.keep(0, 4, 5000, 1000);
    pass.begin(c.agents().len());
    pass.hold_kept(63);
    assert_eq!(pass.held_mut()[0], 4);
}
