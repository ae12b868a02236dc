//! The built-in scorers (registered under these names in every
//! [`ScorerRegistry`](crate::registry::ScorerRegistry)). Each writes one value per candidate,
//! higher is better; the pipeline weighs and adds them.
//!
//! | name | value | used by |
//! |---|---|---|
//! | `cost` | minus the predicted cost in seconds ([`cost`](crate::cost)) | `kv` |
//! | `prefix` | fraction of the prompt's blocks cached there | `kv-score` |
//! | `headroom` | blocks left after the request, as a fraction of the pool | `kv-score` |
//! | `queue` | minus the share of its requests that wait (engine queue + unreported) | `kv-score` |
//! | `requests` | minus running + waiting + unreported requests | `least-requests` |
//! | `gpu` | minus GPU utilisation (KV use where there is no GPU), in percent | `gpu-utilization` |
//! | `kv-usage` | the fraction of the pool not in use, as last reported | `llm-d` |
//! | `waiting` | engine queue (+ unreported) scaled to 0..1 across the candidates, least = 1 | `llm-d` |

use crate::cost;
use crate::cost::{AgentLoad, Ask};
use crate::scorer::{AgentView, Candidate, ScoreContext, Scorer};

/// `cost`: the `kv` policy's prediction (wait for room + prefill + duplication + decode
/// slow-down, and for a waiting request the recompute of what its agent caches).
pub struct Cost;

impl Scorer for Cost {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        // Only while requests of the model queue (in an engine, on their way, or at this
        // gateway) does an agent with fewer requests than the others take the next ones: with
        // none queued, an arrival goes wherever it is cheapest and the mean says nothing.
        let (requests, engine_queued) = candidates.iter().fold((0u64, false), |(n, q), c| {
            let a = ctx.agent(c.slot);
            (n + a.requests(), q || a.waiting > 0 || a.pending > 0)
        });
        let queued =
            ctx.request.waited_ms > 0 || engine_queued || ctx.request.held.iter().any(|&h| h > 0);
        let mean_requests = if queued {
            requests as f64 / candidates.len().max(1) as f64
        } else {
            0.0
        };
        for (o, c) in out.iter_mut().zip(candidates) {
            let a = ctx.agent(c.slot);
            let e = cost::estimate(
                &AgentLoad {
                    mean_requests,
                    ..load_of(a, c)
                },
                &ask_of(ctx, a, c),
                &ctx.config.priors,
                &ctx.config.cost,
            );
            *o = -e.cost;
        }
    }
}

/// `prefix`: the fraction of the prompt's blocks the agent reports cached.
pub struct Prefix;

impl Scorer for Prefix {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        let blocks = ctx.request.block_hashes.len().max(1) as f64;
        for (o, c) in out.iter_mut().zip(candidates) {
            *o = c.cached_blocks as f64 / blocks;
        }
    }
}

/// `headroom`: blocks left after the request, over the pool.
pub struct Headroom;

impl Scorer for Headroom {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            *o = c.headroom() as f64 / ctx.agent(c.slot).total.max(1) as f64;
        }
    }
}

/// `queue`: minus queue pressure, the share of the agent's requests that are not running
/// (waiting in its engine, or sent by this gateway and not reported yet).
pub struct Queue;

impl Scorer for Queue {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            let a = ctx.agent(c.slot);
            let queued = u64::from(a.waiting) + u64::from(a.pending);
            let all = queued + u64::from(a.running) + 1;
            *o = -(queued as f64 / all as f64);
        }
    }
}

/// `requests`: minus the requests the agent has (running, waiting, sent and unreported).
pub struct Requests;

impl Scorer for Requests {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            *o = -(ctx.agent(c.slot).requests() as f64);
        }
    }
}

/// `gpu`: minus GPU utilisation in percent; an agent without a GPU reports its KV use instead.
pub struct Gpu;

impl Scorer for Gpu {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            let a = ctx.agent(c.slot);
            *o = -match a.gpu_util {
                Some(u) => f64::from(u),
                None if a.total > 0 => {
                    100.0 * (a.total - a.free.min(a.total)) as f64 / a.total as f64
                }
                None => 0.0,
            };
        }
    }
}

/// `kv-usage`: 1 minus the fraction of the pool in use (free blocks as last reported; this
/// gateway's reservations not counted), as llm-d's KV-cache-utilisation scorer.
pub struct KvUsage;

impl Scorer for KvUsage {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            let a = ctx.agent(c.slot);
            *o = if a.total > 0 {
                a.free.min(a.total) as f64 / a.total as f64
            } else {
                0.0
            };
        }
    }
}

/// `waiting`: the agent's queue (waiting in its engine, and sent by this gateway but not
/// reported yet) scaled between the candidates' shortest (1) and longest (0), as llm-d's queue
/// scorer; 1 for all when the queues are equal.
pub struct Waiting;

impl Scorer for Waiting {
    fn score(&self, ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        let queue = |c: &Candidate| {
            let a = ctx.agent(c.slot);
            u64::from(a.waiting) + u64::from(a.pending)
        };
        let (min, max) = candidates
            .iter()
            .map(queue)
            .fold((u64::MAX, 0), |(lo, hi), q| (lo.min(q), hi.max(q)));
        for (o, c) in out.iter_mut().zip(candidates) {
            *o = if max > min {
                (max - queue(c)) as f64 / (max - min) as f64
            } else {
                1.0
            };
        }
    }
}

/// The load figures the cost model reads, for one candidate.
pub fn load_of(a: &AgentView, c: &Candidate) -> AgentLoad {
    load_with_room(a, c.room)
}

/// What the cost model is told of agent `a` with `room` blocks left for the request.
pub fn load_with_room(a: &AgentView, room: i64) -> AgentLoad {
    AgentLoad {
        total_blocks: a.total,
        room,
        running: a.running,
        waiting: a.waiting,
        pending: a.pending,
        mean_requests: 0.0,
        queued_prefill_tokens: a.queued_prefill,
        prefill_tokens_per_s: f64::from(a.prefill_tps),
        decode_step_s: f64::from(a.decode_step_us) / 1e6,
        decode_batch: f64::from(a.decode_batch),
        decode_per_seq_s: f64::from(a.decode_per_seq_ns) / 1e9,
        decode_per_kv_token_s: f64::from(a.decode_per_kv_token_ps) / 1e12,
        running_kv_tokens: a.running_kv_tokens,
        release_blocks_per_s: a.release_per_s,
        ttft_scale: a.ttft_scale,
    }
}

/// What the cost model is asked for one candidate.
pub fn ask_of(ctx: &ScoreContext<'_>, a: &AgentView, c: &Candidate) -> Ask {
    // Tokens of a prefix of `blocks` blocks it would compute here: blocks it would copy back from
    // its host tier are not computed again either.
    let recomputed = |blocks: u64| {
        (blocks.saturating_sub(c.local_blocks + c.host_blocks) * u64::from(a.block_size))
            .min(c.prefill_tokens)
    };
    let duplicate_tokens = recomputed(ctx.best_local_blocks);
    // What it would recompute here of the prefix the agent it waits for keeps for it.
    let moved_tokens = match ctx.home {
        Some((home, blocks)) if home != c.slot => recomputed(blocks),
        _ => 0,
    };
    Ask {
        need_blocks: c.need_blocks,
        uncached_tokens: c.prefill_tokens,
        duplicate_tokens,
        moved_tokens,
        output_tokens: ctx.request.output_tokens,
        ttft_budget_s: ctx.config.ttft_slo_ms.saturating_sub(ctx.request.waited_ms) as f64 / 1e3,
    }
}
