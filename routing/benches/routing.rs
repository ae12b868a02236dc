//! Routing-decision latency at 10, 100 and 1,000 agents with 4,096-token prompts (agents report
//! which cached blocks are in use, so a decision walks both prefix indexes).
//!
//! Criterion reports mean/median; after it, a plain sample loop prints p50/p99/max per size
//! (criterion does not report tail percentiles), both wall-clock and the thread's own CPU time
//! (so a loaded machine's scheduling shows as the gap between the two), `/proc/loadavg`, and the
//! heap allocations per decision once warm (a counting global allocator; the target is 0).
//! Run: `cargo bench -p kvroute-routing --bench routing`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::{BenchmarkId, Criterion};
use kvroute_routing::{
    CacheEvent, Cluster, Decision, PolicyConfig, RandomSource, Report, RouteRequest, SplitMix64,
};

/// The system allocator, counting allocations (and reallocations) so the sample loop can report
/// how many a warm decision makes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed through as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BLOCK: u32 = 16;
const PROMPT_TOKENS: u64 = 4096;
const CHAINS: u64 = 64;

/// Hash of block `i` of conversation chain `c` (distinct per chain and position).
fn h(c: u64, i: u64) -> u64 {
    let mut r = SplitMix64(c.wrapping_mul(1_000_003).wrapping_add(i));
    r.next_u64()
}

/// `n` agents with 8,192-block pools, each caching prefixes of a few of 64 shared conversations.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new();
    let mut rng = SplitMix64(7);
    for i in 0..n {
        let slot = c.upsert_agent(&format!("10.0.{}.{}:8000", i / 250, i % 250));
        let mut stored = Vec::new();
        let mut evictable = Vec::new();
        for _ in 0..4 {
            let chain = rng.below(CHAINS);
            let len = 32 + rng.below(224);
            stored.extend((0..len).map(|b| h(chain, b)));
            // Running requests hold a leading run of each prefix; the rest is evictable (so the
            // decision walks the in-use index too).
            let used = rng.below(len + 1);
            evictable.extend((used..len).map(|b| h(chain, b)));
        }
        let report = Report {
            agent_id: format!("agent-{i}"),
            epoch: 1,
            model: "default".into(),
            block_size: BLOCK,
            total_blocks: 8192,
            free_blocks: 1000 + rng.below(7000),
            running_requests: rng.below(16) as u32,
            waiting_requests: rng.below(4) as u32,
            max_model_len: 32_768,
            snapshot: true,
            block_use_events: true,
            events: vec![CacheEvent::Stored(stored), CacheEvent::Evictable(evictable)],
            ..Report::default()
        };
        c.apply_report(slot, report, 0);
    }
    c
}

fn prompt(chain: u64) -> Vec<u64> {
    (0..PROMPT_TOKENS / u64::from(BLOCK))
        .map(|b| h(chain, b))
        .collect()
}

fn request(hashes: &[u64]) -> RouteRequest<'_> {
    RouteRequest {
        model: "default",
        prompt_tokens: PROMPT_TOKENS,
        output_tokens: 256,
        block_size: BLOCK,
        block_hashes: hashes,
        exclude: &[],
        claimed: &[],
        held: &[],
        may_hold: true,
        home: None,
        waited_ms: 0,
    }
}

fn decide(c: &mut Cluster, cfg: &PolicyConfig, hashes: &[u64], rng: &mut SplitMix64) -> Decision {
    c.decide(cfg, &request(hashes), 0, rng)
}

fn bench(cr: &mut Criterion) {
    let cfg = PolicyConfig::default();
    let mut group = cr.benchmark_group("routing_decision_4096_tokens");
    for n in [10usize, 100, 1000] {
        let mut c = cluster(n);
        let prompts: Vec<Vec<u64>> = (0..CHAINS).map(prompt).collect();
        let mut rng = SplitMix64(1);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % prompts.len();
                black_box(decide(&mut c, &cfg, &prompts[i], &mut rng))
            })
        });
    }
    group.finish();
}

/// This thread's CPU time in nanoseconds (time it actually ran, not time it waited for a core).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn percentiles() {
    let cfg = PolicyConfig::default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average (/proc/loadavg): {}", load.trim());
    println!("routing decision latency, 4,096-token prompts (own sample loop, 20,000 decisions):");
    for n in [10usize, 100, 1000] {
        let mut c = cluster(n);
        let prompts: Vec<Vec<u64>> = (0..CHAINS).map(prompt).collect();
        let mut rng = SplitMix64(1);
        let mut wall = Vec::with_capacity(20_000);
        let mut cpu = Vec::with_capacity(20_000);
        // Warm the scratch buffers, then count what the measured decisions allocate.
        for p in &prompts {
            black_box(decide(&mut c, &cfg, p, &mut rng));
        }
        let allocs0 = ALLOCATIONS.load(Ordering::Relaxed);
        for i in 0..20_000usize {
            let p = &prompts[i % prompts.len()];
            let c0 = thread_cpu_ns();
            let t = Instant::now();
            black_box(decide(&mut c, &cfg, p, &mut rng));
            wall.push(t.elapsed().as_nanos() as u64);
            cpu.push(thread_cpu_ns().saturating_sub(c0));
        }
        let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs0;
        let mean_cpu = cpu.iter().sum::<u64>() as f64 / cpu.len() as f64 / 1000.0;
        wall.sort_unstable();
        cpu.sort_unstable();
        let pct = |s: &[u64], q: f64| s[((s.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
        println!(
            "  agents={n:5}  wall p50={:8.2} us  p99={:8.2} us  max={:8.2} us | thread CPU mean={:8.2} us  p50={:8.2} us  p99={:8.2} us | allocations/decision={:.3}",
            pct(&wall, 0.5),
            pct(&wall, 0.99),
            pct(&wall, 1.0),
            mean_cpu,
            pct(&cpu, 0.5),
            pct(&cpu, 0.99),
            allocs as f64 / 20_000.0,
        );
        // What a traced decision adds (the gateway's decision log and debug header): explain
        // and the filter verdicts right after decide.
        let mut explain = Vec::with_capacity(2_000);
        let cfg_ref = &cfg;
        for i in 0..2_000usize {
            let hashes = &prompts[i % prompts.len()];
            black_box(decide(&mut c, cfg_ref, hashes, &mut rng));
            let req = request(hashes);
            let t = Instant::now();
            black_box(c.explain(cfg_ref, &req));
            black_box(c.filter_verdicts(cfg_ref, &req, 0));
            explain.push(t.elapsed().as_nanos() as u64);
        }
        explain.sort_unstable();
        println!(
            "  agents={n:5}  trace (explain + filter verdicts, a traced decision's extra) p50={:8.2} us  p99={:8.2} us",
            pct(&explain, 0.5),
            pct(&explain, 0.99),
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    percentiles();
}
