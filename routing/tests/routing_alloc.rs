//! A routing decision allocates nothing once the cluster's scratch buffers are warm: counted by a
//! global allocator that tallies this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvroute_routing::{
    CacheEvent, Cluster, Decision, PolicyConfig, PolicyKind, RandomSource, Report, RouteRequest,
    SplitMix64,
};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

fn h(chain: u64, i: u64) -> u64 {
    SplitMix64(chain.wrapping_mul(1_000_003).wrapping_add(i)).next_u64()
}

/// 300 agents serving "m" (some with tiny pools), each caching prefixes of 3 of 16 chains.
fn cluster() -> Cluster {
    let mut c = Cluster::new();
    let mut rng = SplitMix64(3);
    for i in 0..300u64 {
        let slot = c.upsert_agent(&format!("10.0.0.{i}:8000"));
        let mut stored = Vec::new();
        let mut evictable = Vec::new();
        for _ in 0..3 {
            let chain = rng.below(16);
            let len = 8 + rng.below(56);
            stored.extend((0..len).map(|b| h(chain, b)));
            evictable.extend((rng.below(len + 1)..len).map(|b| h(chain, b)));
        }
        let total = if i % 10 == 0 { 4 } else { 2048 };
        let report = Report {
            agent_id: format!("agent-{i}"),
            epoch: 1,
            model: "m".into(),
            block_size: 16,
            total_blocks: total,
            free_blocks: rng.below(total + 1),
            running_requests: rng.below(8) as u32,
            max_model_len: 8192,
            snapshot: true,
            // Half the agents report block use: decisions walk the in-use index too.
            block_use_events: i % 2 == 0,
            events: vec![CacheEvent::Stored(stored), CacheEvent::Evictable(evictable)],
            ..Report::default()
        };
        c.apply_report(slot, report, 0);
    }
    c
}

#[test]
fn decisions_allocate_nothing_once_warm() {
    let mut c = cluster();
    let prompts: Vec<Vec<u64>> = (0..16)
        .map(|chain| (0..64).map(|b| h(chain, b)).collect())
        .collect();
    let kinds = [
        PolicyKind::Kv,
        PolicyKind::KvScore,
        PolicyKind::RoundRobin,
        PolicyKind::LeastRequests,
        PolicyKind::GpuUtilization,
    ];
    let mut rng = SplitMix64(9);
    let mut decide = |c: &mut Cluster, kind, prompt: &[u64], tokens: u64, model: &str| {
        let cfg = PolicyConfig {
            kind,
            ..PolicyConfig::default()
        };
        let req = RouteRequest {
            model,
            prompt_tokens: tokens,
            output_tokens: 64,
            block_size: 16,
            block_hashes: prompt,
            exclude: &[1, 2],
            claimed: &[],
            held: &[],
            may_hold: true,
            home: None,
            waited_ms: 0,
        };
        c.decide(&cfg, &req, 0, &mut rng)
    };
    // A prompt in flight to agent 0: the kv policy walks the in-flight index too.
    c.track_inflight(0, &prompts[3], 0);
    // Warm-up: the scratch buffers grow to the cluster's size here.
    for kind in kinds {
        decide(&mut c, kind, &prompts[0], 1024, "m");
    }
    let before = allocs();
    let mut outcomes = [0usize; 3];
    for i in 0..400 {
        let kind = kinds[i % kinds.len()];
        // Routable prompts, one larger than most pools have free (some waits), one larger than
        // every pool (a reject), and an unknown model.
        let (tokens, model) = match i % 7 {
            5 => (16 * 4096, "m"),
            6 => (100, "other"),
            _ => (1024 + 512 * (i as u64 % 5), "m"),
        };
        match decide(&mut c, kind, &prompts[i % prompts.len()], tokens, model) {
            Decision::Route(_) => outcomes[0] += 1,
            Decision::Wait | Decision::Hold(_) => outcomes[1] += 1,
            Decision::Reject(_) => outcomes[2] += 1,
        }
    }
    let after = allocs();
    assert_eq!(after - before, 0, "allocations during 400 decisions");
    assert!(outcomes[0] > 0, "no decision routed: {outcomes:?}");
    assert!(outcomes[2] > 0, "no decision rejected: {outcomes:?}");
}
