//! The hot paths do not touch the heap: block allocate / free / touch, and a steady-state
//! scheduler step (plan + completion) over 256 decoding sequences. A counting global allocator
//! counts this thread's allocations around the measured code.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvroute_engine::kv::{BlockPool, KvConfig, KvManager};
use kvroute_engine::sched::{SchedConfig, Scheduler, SeqSpec};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn pool_operations_do_not_allocate() {
    let mut pool = BlockPool::new(1024, false);
    let mut held = Vec::with_capacity(1024);
    let before = allocs();
    for round in 0..50u64 {
        for i in 0..1024u64 {
            let b = pool.allocate().unwrap();
            if i % 3 == 0 {
                pool.register(b, round * 10_000 + i);
            }
            held.push(b);
        }
        for &b in held.iter().rev() {
            pool.release(b);
        }
        held.clear();
        // Touch a cached free block and release it again.
        if let Some(b) = pool.lookup(round * 10_000) {
            pool.touch(b);
            pool.release(b);
        }
    }
    assert_eq!(allocs() - before, 0);
    pool.check().unwrap();
}

#[test]
fn manager_sequences_reuse_their_slots() {
    let mut kv = KvManager::new(&KvConfig {
        block_size: 16,
        num_blocks: 4096,
        enable_prefix_caching: true,
        enable_events: false,
    })
    .unwrap();
    let tokens: Vec<u32> = (0..1024).collect();
    // Warm up the slots' buffers once.
    let s = kv.open(b"");
    kv.reserve(&s, 1024);
    kv.close(s);
    let before = allocs();
    for _ in 0..20 {
        let s = kv.open(b"");
        kv.update_hashes(&s, &tokens);
        let hit = kv.lookup_prefix(&s, tokens.len());
        kv.allocate_slots(&s, tokens.len(), Some(hit)).unwrap();
        kv.cache_computed(&s, &tokens, tokens.len());
        kv.close(s);
    }
    assert_eq!(allocs() - before, 0);
    kv.check_invariants().unwrap();
}

#[test]
fn steady_state_scheduler_steps_do_not_allocate() {
    let mut cfg = SchedConfig::new(16, 16_384);
    cfg.max_num_seqs = 256;
    cfg.max_num_batched_tokens = 8192;
    cfg.max_model_len = 2048;
    let mut s = Scheduler::new(cfg).unwrap();
    for id in 0..256u64 {
        let mut prompt: Vec<u32> = (0..64).collect();
        prompt.extend((0..40).map(|i| (id * 97 + i) as u32));
        s.add(SeqSpec {
            id,
            prompt,
            max_tokens: 1000,
            extra_key: Vec::new(),
        })
        .unwrap();
    }
    let mut sampled = Vec::with_capacity(256);
    let mut step = |s: &mut Scheduler| {
        sampled.clear();
        let v = s.schedule();
        for e in v.seqs() {
            if e.sample {
                sampled.push((e.id, e.start as u32));
            }
        }
        s.complete_step(&sampled).unwrap();
    };
    // Prefill (allocates nothing either, but is not the steady state being measured).
    for _ in 0..8 {
        step(&mut s);
    }
    assert_eq!(s.stats().running, 256);
    let before = allocs();
    for _ in 0..300 {
        step(&mut s);
    }
    let n = allocs() - before;
    assert_eq!(s.plan().seqs().len(), 256);
    assert_eq!(n, 0, "{n} allocations in 300 decode steps of 256 sequences");
    s.check_invariants().unwrap();
}
