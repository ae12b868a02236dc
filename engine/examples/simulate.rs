//! A deterministic simulation of one engine's KV cache under load: requests with shared
//! prefixes and varied lengths arrive, a fake model "generates" their tokens, and the capacity
//! the agent would report is printed as requests come and go.
//!
//! Run: `cargo run -p kvroute-engine --example simulate -- [--steps N] [--seed S] [--blocks B]
//! [--every K]`. Same arguments, same output.

use std::collections::HashSet;

use kvroute_engine::kv::BlockEvent;
use kvroute_engine::sched::{SchedConfig, Scheduler, SeqSpec};

/// A small deterministic generator (SplitMix64): the simulation must not depend on anything
/// outside its arguments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

struct Args {
    steps: u64,
    seed: u64,
    blocks: usize,
    every: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        steps: 1200,
        seed: 7,
        blocks: 512,
        every: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = val
            .parse()
            .map_err(|_| format!("{flag}: not a number: {val:?}"))?;
        match flag.as_str() {
            "--steps" => a.steps = n,
            "--seed" => a.seed = n,
            "--blocks" => a.blocks = n as usize,
            "--every" => a.every = n.max(1),
            _ => {
                return Err(format!(
                    "unknown flag {flag} (--steps, --seed, --blocks, --every)"
                ))
            }
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulate: {e}");
            std::process::exit(2);
        }
    };
    let cfg = SchedConfig {
        block_size: 16,
        num_blocks: args.blocks,
        max_num_seqs: 32,
        max_num_batched_tokens: 512,
        max_model_len: 2048,
        enable_chunked_prefill: true,
        enable_prefix_caching: true,
        enable_events: true,
        admit_whole_future: false,
        share_inflight_prefixes: true,
    };
    let mut sched = match Scheduler::new(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulate: {e}");
            std::process::exit(2);
        }
    };
    let mut rng = Rng(args.seed);
    // Four "system prompts" that many requests start with.
    let systems: Vec<Vec<u32>> = (0..4)
        .map(|k| {
            (0..rng.range(64, 320))
                .map(|i| (k * 10_000 + i) as u32)
                .collect()
        })
        .collect();
    println!(
        "kvroute engine simulation: {} blocks x {} tokens, max {} running, {} tokens/step, seed {}",
        cfg.num_blocks, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, args.seed
    );
    println!(
        "{:>5} {:>4} {:>4} | {:>5} {:>6} {:>5} | {:>7} {:>7} | {:>6} {:>7} {:>6}",
        "step",
        "run",
        "wait",
        "free",
        "cached",
        "used",
        "preempt",
        "hit%",
        "arrive",
        "finish",
        "reject"
    );
    let (mut next_id, mut arrived, mut finished, mut rejected, mut generated) =
        (0u64, 0, 0, 0, 0u64);
    let mut cached_hashes: HashSet<u64> = HashSet::new();
    let mut sampled = Vec::new();
    for step in 1..=args.steps {
        // Arrivals: a burst in the first quarter, a trickle until half-time, then none, so
        // the run shows the pool filling, preemptions, and the queue draining.
        let burst = match step * 4 / args.steps.max(1) {
            0 => 3,
            1 => 1,
            _ => 0,
        };
        for _ in 0..rng.below(burst + 1) {
            if rng.below(3) == 0 {
                continue;
            }
            let mut prompt = if rng.below(5) < 4 {
                systems[rng.below(systems.len() as u64) as usize].clone()
            } else {
                Vec::new()
            };
            let user = rng.range(8, 400);
            prompt.extend((0..user).map(|_| 40_000 + rng.below(8_000) as u32));
            let spec = SeqSpec {
                id: next_id,
                prompt,
                max_tokens: rng.range(8, 300) as u32,
                extra_key: Vec::new(),
            };
            next_id += 1;
            match sched.add(spec) {
                Ok(()) => arrived += 1,
                Err(_) => rejected += 1,
            }
        }
        // One model step.
        sampled.clear();
        let view = sched.schedule();
        for e in view.seqs() {
            if e.sample {
                let tok = (rng.next() % 32_000) as u32;
                sampled.push((e.id, tok));
            }
        }
        if let Err(e) = sched.complete_step(&sampled) {
            eprintln!("simulate: {e}");
            std::process::exit(1);
        }
        generated += sampled.len() as u64;
        // Stop criteria: an "EOS" now and then, or the length cap.
        for &(id, tok) in &sampled {
            let stop = tok % 97 == 0 || sched.is_length_capped(id) == Some(true);
            if stop && sched.finish(id).is_ok() {
                finished += 1;
            }
        }
        // What a router would learn from the block events.
        for ev in sched.take_events() {
            match ev {
                BlockEvent::Stored(hs) => cached_hashes.extend(hs),
                BlockEvent::Removed(hs) => hs.iter().for_each(|h| {
                    cached_hashes.remove(h);
                }),
                BlockEvent::AllCleared => cached_hashes.clear(),
                // Which cached blocks are in use does not change the cached set; this
                // simulation has no host tier.
                BlockEvent::InUse(_)
                | BlockEvent::Evictable(_)
                | BlockEvent::HostStored(_)
                | BlockEvent::HostRemoved(_) => {}
            }
        }
        if step % args.every == 0 || step == args.steps {
            let st = sched.stats();
            let c = st.capacity;
            let hit = if c.prefix_query_tokens == 0 {
                0.0
            } else {
                100.0 * c.prefix_hit_tokens as f64 / c.prefix_query_tokens as f64
            };
            println!(
                "{:>5} {:>4} {:>4} | {:>5} {:>6} {:>5} | {:>7} {:>6.1}% | {:>6} {:>7} {:>6}",
                step,
                st.running,
                st.waiting,
                c.free,
                c.cached_evictable,
                c.used,
                st.preemptions,
                hit,
                arrived,
                finished,
                rejected
            );
        }
    }
    let st = sched.stats();
    println!(
        "done: {} requests received, {} finished, {} still live, {} tokens generated, {} \
         preemptions, {} of {} prompt tokens from the prefix cache, {} hashes cached (router \
         view from events: {}), {} blocks the waiting queue needs",
        st.requests_received,
        finished,
        sched.len(),
        generated,
        st.preemptions,
        st.capacity.prefix_hit_tokens,
        st.capacity.prefix_query_tokens,
        sched.kv().pool().cached(),
        cached_hashes.len(),
        st.waiting_prompt_blocks,
    );
    if let Err(e) = sched.check_invariants() {
        eprintln!("simulate: invariant broken: {e}");
        std::process::exit(1);
    }
}
