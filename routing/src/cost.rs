//! The `kv` policy's cost model: the predicted time, in seconds, a request costs on one agent.
//!
//! For each agent that could serve a request the policy predicts
//!
//! ```text
//! cost = wait for room          deficit blocks / the agent's measured room-release rate
//!      + prefill                (queued prompt tokens + this prompt's uncached tokens) / prefill rate
//!      + duplication            prompt tokens another agent holds or is computing / prefill rate
//!      + decode slow-down       output tokens × (sequences × one sequence's share of a step
//!                                                + KV tokens × one token's share of a step),
//!                               the sequences and KV tokens of the requests running or queued there
//!      + stick                  (a queued request, elsewhere than the agent it waits for)
//!                               prompt tokens that agent caches and this one would compute
//!                               / prefill rate, times the `stick` weight
//! ```
//!
//! and sends the request where the cost is lowest. The first two terms are the request's own
//! time to first token there. The third prices the future: a prefix computed a second time also
//! takes cache room a second time, and in a small cache it evicts another group's prefix that a
//! later request must recompute; so a prefix held (or in flight) elsewhere costs its recompute
//! twice. The decode term is what the batch there adds to each of the request's decode steps: its
//! sequences and the KV they read (a GPU's step is bound by the weights and the KV it reads, so
//! ten long conversations slow it more than ten short questions); the same figure, summed the other
//! way, is what the request adds to theirs. The rates come from the agents' capacity reports
//! (what each measures of its own steps) and from the release rate the gateway observes; until an agent has measured anything, the
//! priors below stand in. A request whose best agent has no room *waits for that agent* (it is
//! not sent elsewhere) as long as that is predicted cheaper than recomputing its prefix on an
//! agent with room now: that keeps each prefix group on the agent that caches it, instead of
//! spilling under load until every agent holds every prefix. Once it waits, the `stick` term
//! keeps it there unless the other agent has become much cheaper: a waiting request is
//! re-decided every time any agent's room changes, and without it a conversation whose turn waits
//! for the agent caching it moves as soon as another agent has room, to an agent that may hold
//! its older turns (in a host tier) — the next turn moves back the same way, and every move
//! recomputes the turns since the last visit.
//!
//! Pure arithmetic: no clock, no I/O, no allocation.

/// Fixed cost of a decode step, in sequences: a step of `b` sequences takes time proportional
/// to `DECODE_OVERHEAD_SEQS + b` (weights are read once per step whatever the batch).
pub const DECODE_OVERHEAD_SEQS: f64 = 2.0;

/// Longest wait the model predicts (seconds): an agent that releases nothing is simply far away.
pub const MAX_WAIT_S: f64 = 600.0;

/// Stand-ins for what an agent has not measured yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Priors {
    pub prefill_tokens_per_s: f64,
    /// Seconds per decode step at batch 1.
    pub decode_step_s: f64,
}

impl Default for Priors {
    fn default() -> Self {
        // A small model on one CPU core: conservative, so an unmeasured agent is not favoured.
        Self {
            prefill_tokens_per_s: 400.0,
            decode_step_s: 0.02,
        }
    }
}

/// Weights of the three terms (seconds are added as seconds at weight 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostWeights {
    pub wait: f64,
    pub prefill: f64,
    pub duplicate: f64,
    pub decode: f64,
    /// Extra weight on what a request waiting for one agent would recompute elsewhere.
    pub stick: f64,
    /// Weight of the stall the request's prefill imposes on the requests running or waiting
    /// there (its prefill time, once per such request).
    pub stall: f64,
    /// Weight of each predicted second of time to first token past the request's budget
    /// ([`Ask::ttft_budget_s`]): a request that misses its TTFT target no longer counts toward
    /// goodput, so an agent that would make it miss costs more than its time.
    pub late: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            wait: 1.0,
            prefill: 1.0,
            duplicate: 1.0,
            decode: DECODE,
            stick: STICK,
            stall: STALL,
            late: LATE,
        }
    }
}

/// Default [`CostWeights::stick`]: moving a waiting request off the agent it waits for costs its
/// recompute five times over (its own prefill and the duplicate term count it once each): the
/// prefix is then cached on both agents, and in a conversation the next turns follow it. On
/// `bench/routers.sh`'s multi-turn workload with a host tier (2026-12-06) the prefix hit rate
/// rose with it: 67.3 % at 0, 68.1 % at 1, 68.8 % at 3, against 69.2 % for a router that never
/// moves a conversation.
pub const STICK: f64 = 3.0;

/// Default [`CostWeights::stall`] and [`CostWeights::decode`]: what a request does to the others
/// on the agent (its prefill stalls their steps; its sequence and KV, and theirs, lengthen every
/// step) weighs ten times what its own wait and prefill do. The request's own time to first token
/// is one request's; the stall and the slow-down are paid by every request there, in the time
/// per output token that goodput also counts. Calibrated on `kvroute sim` (bench/sim, three
/// seeds each, 2026-12-07) and checked on `bench/routers.sh`: at 1 and 0 (the earlier defaults)
/// `kv` met both SLOs for 68.4 % of the requests on 100 H100s (bench/sim/h100-100.json) against
/// llm-d's 99.2 %; at 10 and 10, 99.2-99.4 % against 99.2-99.9 %, and on the hotter
/// h100-100-hot.json 74.3-78.6 % against 72.2-76.1 %.
pub const STALL: f64 = 10.0;

/// Default [`CostWeights::late`]: off. It counts only with a TTFT target set (`--slo-ttft`), and
/// on `kvroute sim`'s hot workload (bench/sim/h100-100-hot.json with the TPOT and TTFT targets,
/// seeds 1-3, 2026-12-07) it lost goodput: 164-197 req/s at 10 and 243-270 at 1 (mean 257;
/// TTFT p99 3.1-3.4 s) against 255-285 at 0 (mean 270; 3.9-4.1 s). Moving a request off the
/// agent it waits for, to one with room now, recomputes
/// its prefix and slows that agent's decode steps: more requests then miss the TPOT target than
/// the move saves from missing the TTFT one.
pub const LATE: f64 = 0.0;

/// Default [`CostWeights::decode`] (see [`STALL`]).
pub const DECODE: f64 = 10.0;

/// What the model needs to know of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AgentLoad {
    /// Blocks in the pool.
    pub total_blocks: u64,
    /// Blocks the request may still take now: reported room less this gateway's reservations and
    /// the blocks earlier queued requests are waiting for there (may be negative).
    pub room: i64,
    pub running: u32,
    /// Requests in the engine's waiting queue: they join the running batch before this one.
    pub waiting: u32,
    /// Requests this gateway sent there that the agent has not counted yet (in neither
    /// `running` nor `waiting`): they join the batch before this one too.
    pub pending: u32,
    /// Requests per agent of the model, on average (running, waiting and not yet counted): an
    /// agent with fewer now does not keep fewer while this request's prefill runs, since the
    /// requests that arrive meanwhile go to it too. 0: not known.
    pub mean_requests: f64,
    /// Prompt tokens queued ahead of this request there: the engine's waiting queue plus requests
    /// this gateway sent that the agent has not counted yet.
    pub queued_prefill_tokens: u64,
    /// Measured rates (0: not measured).
    pub prefill_tokens_per_s: f64,
    pub decode_step_s: f64,
    pub decode_batch: f64,
    /// What one more sequence adds to a decode step, as the agent measured it (0: not
    /// measured: the step is taken to grow as `DECODE_OVERHEAD_SEQS + batch`).
    pub decode_per_seq_s: f64,
    /// What one more KV token read adds to a decode step, as the agent measured it (0: not
    /// measured).
    pub decode_per_kv_token_s: f64,
    /// Tokens the running requests hold in the KV cache there.
    pub running_kv_tokens: u64,
    /// Room the agent gives back per second while busy, as observed (0: not observed).
    pub release_blocks_per_s: f64,
    /// Observed over predicted time to first token on this agent ([`TtftScale`]); multiplies
    /// the wait and prefill terms. 0 or 1: not calibrated.
    pub ttft_scale: f64,
}

/// What the model needs to know of the request on that agent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ask {
    /// Blocks the request takes there (prompt + output, less the cached prefix).
    pub need_blocks: u64,
    /// Prompt tokens not cached there (counting prefixes in flight to it as cached).
    pub uncached_tokens: u64,
    /// Of those, tokens another agent holds or is computing (a duplicate if computed here).
    pub duplicate_tokens: u64,
    /// Of those, tokens the agent the request waits for caches (0 there, and for a request not
    /// waiting for an agent).
    pub moved_tokens: u64,
    pub output_tokens: u64,
    /// Seconds left of the request's TTFT target (the target less the time it has waited; 0:
    /// no target, or already missed).
    pub ttft_budget_s: f64,
}

/// The prediction for one agent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Estimate {
    /// Blocks missing now (0: it fits now).
    pub deficit_blocks: u64,
    pub wait_s: f64,
    pub prefill_s: f64,
    pub duplicate_s: f64,
    pub decode_s: f64,
    /// Prefill time of [`Ask::moved_tokens`].
    pub move_s: f64,
    /// The request's own prefill time times the requests running or waiting there: what its
    /// prefill delays them by, together.
    pub stall_s: f64,
    /// Predicted time to first token past [`Ask::ttft_budget_s`] (0 within it, or with none).
    pub late_s: f64,
    /// Weighted sum: what the policy minimises.
    pub cost: f64,
}

impl Estimate {
    /// Predicted time to first token (seconds): the wait for room plus the prefill.
    pub fn ttft_s(&self) -> f64 {
        self.wait_s + self.prefill_s
    }
}

/// Seconds per decode step at batch `b` on an agent measured at `step_s` for batch `at`.
pub fn decode_step_at(load: &AgentLoad, priors: &Priors, b: f64) -> f64 {
    let (step, at) = if load.decode_step_s > 0.0 && load.decode_batch > 0.0 {
        (load.decode_step_s, load.decode_batch)
    } else {
        (priors.decode_step_s, 1.0)
    };
    let b = b.max(1.0);
    if load.decode_per_seq_s > 0.0 && load.decode_step_s > 0.0 {
        // The agent's own fit: a fixed part, and the slope per sequence.
        let fixed = (step - load.decode_per_seq_s * at).max(0.0);
        return fixed + load.decode_per_seq_s * b;
    }
    step * (DECODE_OVERHEAD_SEQS + b) / (DECODE_OVERHEAD_SEQS + at)
}

/// The decode step (seconds) predicted on an agent with `load` once `seqs` more sequences,
/// holding `kv_tokens` more KV tokens, join the requests running and waiting there (whose queued
/// prompts count as KV too).
pub fn step_with(load: &AgentLoad, priors: &Priors, seqs: f64, kv_tokens: u64) -> f64 {
    let batch = f64::from(load.running) + f64::from(load.waiting) + seqs;
    let kv = load.queued_prefill_tokens.saturating_add(kv_tokens) as f64;
    decode_step_at(load, priors, batch) + load.decode_per_kv_token_s.max(0.0) * kv
}

/// The predicted cost of `ask` on an agent with `load`.
pub fn estimate(load: &AgentLoad, ask: &Ask, priors: &Priors, w: &CostWeights) -> Estimate {
    let prefill_rate = if load.prefill_tokens_per_s > 0.0 {
        load.prefill_tokens_per_s
    } else {
        priors.prefill_tokens_per_s
    };
    let running = f64::from(load.running);
    let deficit = (ask.need_blocks as i128 - i128::from(load.room)).max(0) as u64;
    let wait_s = if deficit == 0 {
        0.0
    } else {
        let rate = if load.release_blocks_per_s > 0.0 {
            load.release_blocks_per_s
        } else {
            // Not observed yet: the blocks in use come back as the running requests finish,
            // on average half an output length of steps from now.
            let used = load
                .total_blocks
                .saturating_sub(load.room.max(0) as u64)
                .max(1) as f64;
            let steps = (ask.output_tokens.max(1) as f64 / 2.0).max(1.0);
            used / (steps * decode_step_at(load, priors, running))
        };
        (deficit as f64 / rate).min(MAX_WAIT_S)
    };
    let prefill_s = (load.queued_prefill_tokens + ask.uncached_tokens) as f64 / prefill_rate;
    let duplicate_s = ask.duplicate_tokens.min(ask.uncached_tokens) as f64 / prefill_rate;
    let move_s = ask.moved_tokens.min(ask.uncached_tokens) as f64 / prefill_rate;
    // Every step of this request's decode is longer by each sequence there and the KV it reads:
    // the running ones, and the waiting ones and those sent there but not counted yet, which
    // will be running beside it (an agent busy prefilling a long queue has few running requests
    // now, but not for long), with the prompt tokens queued there as their KV. Leaving out the
    // ones not counted yet made the agent that was just sent a burst look idle until its next
    // report, and the next requests followed the burst there.
    let running = running + f64::from(load.waiting) + f64::from(load.pending);
    let measured = load.decode_step_s > 0.0
        && (load.decode_per_seq_s > 0.0 || load.decode_per_kv_token_s > 0.0);
    let (per_seq, per_token) = if measured {
        (load.decode_per_seq_s, load.decode_per_kv_token_s)
    } else {
        (
            decode_step_at(load, priors, 1.0) / (DECODE_OVERHEAD_SEQS + 1.0),
            0.0,
        )
    };
    let kv_tokens = (load.running_kv_tokens + load.queued_prefill_tokens) as f64;
    let decode_s = ask.output_tokens as f64 * (running * per_seq + kv_tokens * per_token);
    // The requests its prefill stalls: those there now, and on an agent with fewer than the
    // model's mean, for the part of the prompt another agent holds (a recompute a request that
    // stays where its prefix is does not make), the ones that arrive there meanwhile. By
    // Little's law an agent holding the mean receives about `mean / (prefill + decode)` requests
    // per second, the time a request spends there; over this prefill that is `mean * t / (t + d)`
    // of them (on a GPU, whose prefill is short against its decode, hardly any; on a CPU, whose
    // prefill of a long conversation takes as long as its decode, most of the mean). Without it,
    // on bench/routers.sh's multi-turn workload, 6-9 of 33 later turns moved to the idle agent
    // and recomputed their whole history there; with it, 4.
    let own_prefill_s = ask.uncached_tokens as f64 / prefill_rate;
    let own_decode_s =
        ask.output_tokens as f64 * decode_step_at(load, priors, load.mean_requests.max(1.0));
    let arriving = if own_prefill_s + own_decode_s > 0.0 {
        load.mean_requests * own_prefill_s / (own_prefill_s + own_decode_s)
    } else {
        0.0
    };
    let stall_s = running * own_prefill_s + (arriving - running).max(0.0) * duplicate_s;
    let scale = if load.ttft_scale > 0.0 {
        load.ttft_scale
    } else {
        1.0
    };
    let (wait_s, prefill_s) = (wait_s * scale, prefill_s * scale);
    let late_s = if ask.ttft_budget_s > 0.0 {
        (wait_s + prefill_s - ask.ttft_budget_s).max(0.0)
    } else {
        0.0
    };
    Estimate {
        deficit_blocks: deficit,
        wait_s,
        prefill_s,
        duplicate_s,
        decode_s,
        move_s,
        stall_s,
        late_s,
        cost: w.wait * wait_s
            + w.prefill * prefill_s
            + w.duplicate * duplicate_s
            + w.decode * decode_s
            + w.stick * move_s
            + w.stall * stall_s
            + w.late * late_s,
    }
}

/// How an agent's observed times to first token compare with the predicted ones: a moving
/// average of `observed / predicted`, each sample clamped to [`TtftScale::MIN`, `TtftScale::MAX`]
/// (one request stuck behind a long prompt must not swing it), starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TtftScale {
    ratio: f64,
    samples: u32,
}

impl TtftScale {
    pub const MIN: f64 = 0.25;
    pub const MAX: f64 = 4.0;
    const ALPHA: f64 = 0.1;
    /// Predictions shorter than this (seconds) are all overhead: not a sample.
    const SHORTEST_S: f64 = 0.005;

    /// Takes one request's predicted and observed time to first token (seconds).
    pub fn observe(&mut self, predicted_s: f64, observed_s: f64) {
        if !(predicted_s.is_finite() && observed_s.is_finite())
            || predicted_s < Self::SHORTEST_S
            || observed_s < 0.0
        {
            return;
        }
        let r = (observed_s / predicted_s).clamp(Self::MIN, Self::MAX);
        self.ratio = if self.samples == 0 {
            r
        } else {
            self.ratio + Self::ALPHA * (r - self.ratio)
        };
        self.samples = self.samples.saturating_add(1);
    }

    /// The factor predicted times are multiplied by (1 before any sample).
    pub fn scale(&self) -> f64 {
        if self.samples == 0 {
            1.0
        } else {
            self.ratio
        }
    }
}

/// Longest `Retry-After` the gateway answers, in seconds.
pub const MAX_RETRY_AFTER_S: u64 = 60;

/// When a refused request (queue full, or past its queue deadline) may find room: the blocks the
/// requests of its model need (the queue's and its own, `needed`) less the room the model's
/// agents have now, at the rate they were seen giving room back (`release_blocks_per_s`, summed
/// over the agents): `ceil((needed - room) / rate)` seconds, bounded to 1..=60. `None` while no
/// agent's release rate has been observed.
pub fn retry_after_s(needed: u64, room: u64, release_blocks_per_s: f64) -> Option<u64> {
    if needed <= room {
        return Some(1);
    }
    if !(release_blocks_per_s.is_finite() && release_blocks_per_s > 0.0) {
        return None;
    }
    let secs = ((needed - room) as f64 / release_blocks_per_s).ceil();
    Some((secs as u64).clamp(1, MAX_RETRY_AFTER_S))
}

/// The rate at which an agent gives room back while busy, from its `room_released_blocks`
/// counter as reports arrive: counted over windows of at least [`ReleaseRate::WINDOW_MS`] of
/// busy time (time with requests running or waiting), averaged over windows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReleaseRate {
    last_counter: u64,
    last_ms: u64,
    started: bool,
    window_blocks: u64,
    window_ms: u64,
    /// Blocks per second; 0 until a window has closed.
    pub blocks_per_s: f64,
}

impl ReleaseRate {
    pub const WINDOW_MS: u64 = 1_000;
    const ALPHA: f64 = 0.3;

    /// Takes one report's counter at clock `now_ms`; `busy` when the agent had work since the
    /// previous report. A counter that goes back (a restarted agent) starts over.
    pub fn observe(&mut self, counter: u64, now_ms: u64, busy: bool) {
        if !self.started || counter < self.last_counter {
            *self = Self {
                last_counter: counter,
                last_ms: now_ms,
                started: true,
                blocks_per_s: if counter < self.last_counter {
                    0.0
                } else {
                    self.blocks_per_s
                },
                ..Self::default()
            };
            return;
        }
        let released = counter - self.last_counter;
        let dt = now_ms.saturating_sub(self.last_ms);
        self.last_counter = counter;
        self.last_ms = now_ms;
        if !busy && released == 0 {
            // Idle time says nothing about how fast a busy agent frees room.
            return;
        }
        self.window_blocks += released;
        self.window_ms += dt;
        if self.window_ms >= Self::WINDOW_MS {
            let sample = self.window_blocks as f64 * 1000.0 / self.window_ms as f64;
            self.blocks_per_s = if self.blocks_per_s > 0.0 {
                self.blocks_per_s + Self::ALPHA * (sample - self.blocks_per_s)
            } else {
                sample
            };
            self.window_blocks = 0;
            self.window_ms = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> AgentLoad {
        AgentLoad {
            total_blocks: 100,
            room: 50,
            running: 4,
            waiting: 0,
            pending: 0,
            mean_requests: 0.0,
            queued_prefill_tokens: 0,
            prefill_tokens_per_s: 1000.0,
            decode_step_s: 0.012,
            decode_batch: 4.0,
            decode_per_seq_s: 0.0,
            decode_per_kv_token_s: 0.0,
            running_kv_tokens: 0,
            release_blocks_per_s: 20.0,
            ttft_scale: 0.0,
        }
    }

    #[test]
    fn time_past_the_ttft_budget_is_priced_by_the_late_weight_only() {
        // No room: 10 blocks missing at 20 blocks/s (0.5 s), then 500 tokens at 1,000/s (0.5 s).
        let load = AgentLoad {
            room: -10,
            ..measured()
        };
        let ask = |budget: f64| Ask {
            need_blocks: 0,
            uncached_tokens: 500,
            duplicate_tokens: 0,
            moved_tokens: 0,
            output_tokens: 10,
            ttft_budget_s: budget,
        };
        let late = CostWeights { late: 4.0, ..w() };
        let none = estimate(&load, &ask(0.0), &p(), &late);
        assert!((none.ttft_s() - 1.0).abs() < 1e-9, "{none:?}");
        assert_eq!(none.late_s, 0.0, "no budget: no term");
        let within = estimate(&load, &ask(1.5), &p(), &late);
        assert_eq!(within.late_s, 0.0);
        assert!((within.cost - none.cost).abs() < 1e-12);
        let past = estimate(&load, &ask(0.25), &p(), &late);
        assert!((past.late_s - 0.75).abs() < 1e-9, "{past:?}");
        assert!((past.cost - none.cost - 3.0).abs() < 1e-9, "{past:?}");
        // At the default weight (0) the term is reported but costs nothing.
        let off = estimate(&load, &ask(0.25), &p(), &w());
        assert!((off.late_s - 0.75).abs() < 1e-9);
        assert!((off.cost - estimate(&load, &ask(0.0), &p(), &w()).cost).abs() < 1e-12);
    }

    #[test]
    fn the_stall_is_the_own_prefill_once_per_request_there_and_weighs_only_when_asked() {
        let ask = Ask {
            need_blocks: 1,
            uncached_tokens: 500,
            duplicate_tokens: 0,
            moved_tokens: 0,
            output_tokens: 10,
            ttft_budget_s: 0.0,
        };
        let busy = AgentLoad {
            waiting: 2,
            ..measured()
        };
        let off = estimate(&busy, &ask, &p(), &w());
        // 0.5 s of prefill, delaying 4 running + 2 waiting requests.
        assert!((off.stall_s - 3.0).abs() < 1e-9, "{off:?}");
        let on = estimate(&busy, &ask, &p(), &CostWeights { stall: 2.0, ..w() });
        assert!((on.cost - off.cost - 6.0).abs() < 1e-9, "{on:?} {off:?}");
        // Nothing cached to compute, or nobody there to delay: no stall.
        let idle = AgentLoad {
            running: 0,
            ..measured()
        };
        assert_eq!(estimate(&idle, &ask, &p(), &w()).stall_s, 0.0);
        let cached = Ask {
            uncached_tokens: 0,
            ..ask
        };
        assert_eq!(estimate(&busy, &cached, &p(), &w()).stall_s, 0.0);
    }

    #[test]
    fn requests_sent_and_not_yet_counted_weigh_as_running_ones() {
        let ask = Ask {
            need_blocks: 1,
            uncached_tokens: 500,
            output_tokens: 10,
            ..Ask::default()
        };
        let counted = AgentLoad {
            running: 3,
            ..measured()
        };
        // Just sent a burst of three: the agent has reported none of them yet.
        let burst = AgentLoad {
            running: 0,
            pending: 3,
            ..measured()
        };
        let (a, b) = (
            estimate(&counted, &ask, &p(), &w()),
            estimate(&burst, &ask, &p(), &w()),
        );
        assert!(a.decode_s > 0.0 && a.stall_s > 0.0, "{a:?}");
        assert!((a.decode_s - b.decode_s).abs() < 1e-12, "{a:?} {b:?}");
        assert!((a.stall_s - b.stall_s).abs() < 1e-12, "{a:?} {b:?}");
        let idle = AgentLoad {
            running: 0,
            ..measured()
        };
        assert_eq!(estimate(&idle, &ask, &p(), &w()).stall_s, 0.0);
    }

    #[test]
    fn recomputing_a_prefix_held_elsewhere_stalls_the_requests_that_arrive_meanwhile() {
        // A 790-token conversation another agent holds, asked of an idle agent: 0.79 s of
        // prefill at 1,000 tokens/s, then 32 steps of about 12 ms.
        let moved = Ask {
            need_blocks: 1,
            uncached_tokens: 790,
            duplicate_tokens: 790,
            output_tokens: 32,
            ..Ask::default()
        };
        let idle = |mean: f64| AgentLoad {
            running: 0,
            mean_requests: mean,
            ..measured()
        };
        assert_eq!(estimate(&idle(0.0), &moved, &p(), &w()).stall_s, 0.0);
        let e = estimate(&idle(4.0), &moved, &p(), &w());
        let t = 0.79;
        let d = 32.0 * decode_step_at(&idle(4.0), &p(), 4.0);
        let arriving = 4.0 * t / (t + d);
        assert!(
            arriving > 2.0,
            "most of the mean arrives during a CPU's long prefill"
        );
        assert!((e.stall_s - arriving * t).abs() < 1e-9, "{e:?}");
        // A new prompt nobody holds is computed somewhere whatever the choice: only the
        // requests there now count.
        let fresh = Ask {
            duplicate_tokens: 0,
            ..moved
        };
        assert_eq!(estimate(&idle(4.0), &fresh, &p(), &w()).stall_s, 0.0);
        // An agent already holding the mean stalls those it holds, no more.
        let busy = AgentLoad {
            running: 4,
            mean_requests: 4.0,
            ..measured()
        };
        assert!((estimate(&busy, &moved, &p(), &w()).stall_s - 4.0 * t).abs() < 1e-9);
        // A GPU's prefill is short against its decode: hardly anyone arrives meanwhile.
        let gpu = AgentLoad {
            prefill_tokens_per_s: 20_000.0,
            decode_step_s: 0.02,
            ..idle(4.0)
        };
        let long_decode = Ask {
            output_tokens: 300,
            ..moved
        };
        let g = estimate(&gpu, &long_decode, &p(), &w());
        assert!(g.stall_s < 0.01 * e.stall_s, "{g:?} {e:?}");
    }

    #[test]
    fn waiting_requests_count_in_the_decode_slow_down() {
        let ask = Ask {
            need_blocks: 1,
            uncached_tokens: 10,
            output_tokens: 100,
            ..Ask::default()
        };
        let w = CostWeights::default();
        let now = estimate(&measured(), &ask, &p(), &w);
        // Eight requests waiting to prefill there will decode beside this one: three times the
        // batch it slows down (4 running + 8 waiting against 4).
        let queue = AgentLoad {
            waiting: 8,
            ..measured()
        };
        let later = estimate(&queue, &ask, &p(), &w);
        assert!(
            (later.decode_s - 3.0 * now.decode_s).abs() < 1e-12,
            "{later:?} {now:?}"
        );
        assert_eq!(later.prefill_s, now.prefill_s);
    }

    #[test]
    fn an_agent_fitted_slope_replaces_the_overhead_prior() {
        // A GPU: 12 ms at batch 4, but one more sequence adds only 50 µs.
        let gpu = AgentLoad {
            decode_per_seq_s: 50e-6,
            ..measured()
        };
        let at = |load: &AgentLoad, b: f64| decode_step_at(load, &p(), b);
        assert!((at(&gpu, 4.0) - 0.012).abs() < 1e-12);
        assert!((at(&gpu, 100.0) - (0.012 + 96.0 * 50e-6)).abs() < 1e-12);
        // Without the fit, the step grows as (2 + b): 100 sequences would take 17× longer.
        assert!((at(&measured(), 100.0) - 0.012 * 102.0 / 6.0).abs() < 1e-12);
        let ask = Ask {
            need_blocks: 1,
            output_tokens: 100,
            ..Ask::default()
        };
        let w = CostWeights::default();
        let fitted = estimate(&gpu, &ask, &p(), &w);
        assert!(
            (fitted.decode_s - 4.0 * 100.0 * 50e-6).abs() < 1e-12,
            "{fitted:?}"
        );
        let prior = estimate(&measured(), &ask, &p(), &w);
        assert!(prior.decode_s > 10.0 * fitted.decode_s);
        // A slope larger than the whole step cannot make the fixed part negative.
        let odd = AgentLoad {
            decode_per_seq_s: 0.01,
            ..measured()
        };
        assert!((at(&odd, 1.0) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn the_kv_a_batch_reads_slows_every_step_of_the_request() {
        // Two GPUs, four sequences each, a step costing 40 ns per KV token read and nothing per
        // sequence: one holds four long conversations, the other four short questions.
        let gpu = |kv: u64| AgentLoad {
            decode_per_seq_s: 0.0,
            decode_per_kv_token_s: 40e-9,
            running_kv_tokens: kv,
            ..measured()
        };
        let ask = Ask {
            need_blocks: 1,
            output_tokens: 200,
            ..Ask::default()
        };
        let w = CostWeights::default();
        let long = estimate(&gpu(4 * 30_000), &ask, &p(), &w);
        let short = estimate(&gpu(4 * 500), &ask, &p(), &w);
        assert!(
            (long.decode_s - 200.0 * 120_000.0 * 40e-9).abs() < 1e-9,
            "{long:?}"
        );
        assert!(long.cost > short.cost + 0.9, "{long:?} {short:?}");
        // Prompts queued there will be read by the same steps once computed.
        let queued = AgentLoad {
            queued_prefill_tokens: 118_000,
            ..gpu(4 * 500)
        };
        let q = estimate(&queued, &ask, &p(), &w);
        assert!((q.decode_s - long.decode_s).abs() < 1e-9, "{q:?}");
        // An agent that has fitted neither slope falls back on the prior, per sequence only.
        let unfit = AgentLoad {
            decode_per_kv_token_s: 0.0,
            ..gpu(4 * 30_000)
        };
        let prior = estimate(&unfit, &ask, &p(), &w);
        let per_seq = decode_step_at(&unfit, &p(), 1.0) / (DECODE_OVERHEAD_SEQS + 1.0);
        assert!(
            (prior.decode_s - 200.0 * 4.0 * per_seq).abs() < 1e-9,
            "{prior:?}"
        );
    }

    fn p() -> Priors {
        Priors::default()
    }

    /// Every term at weight 1 and the stall off: the terms' arithmetic, whatever the defaults.
    fn w() -> CostWeights {
        CostWeights {
            decode: 1.0,
            stall: 0.0,
            ..CostWeights::default()
        }
    }

    #[test]
    fn fits_now_costs_prefill_of_uncached_tokens_only() {
        let load = measured();
        let e = estimate(
            &load,
            &Ask {
                need_blocks: 10,
                uncached_tokens: 500,
                duplicate_tokens: 0,
                moved_tokens: 0,
                output_tokens: 0,
                ttft_budget_s: 0.0,
            },
            &p(),
            &w(),
        );
        assert_eq!(e.deficit_blocks, 0);
        assert_eq!(e.wait_s, 0.0);
        assert!((e.prefill_s - 0.5).abs() < 1e-9, "{e:?}");
        assert!((e.ttft_s() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn deficit_waits_at_the_release_rate() {
        let mut load = measured();
        load.room = 2;
        let e = estimate(
            &load,
            &Ask {
                need_blocks: 12,
                uncached_tokens: 0,
                duplicate_tokens: 0,
                moved_tokens: 0,
                output_tokens: 0,
                ttft_budget_s: 0.0,
            },
            &p(),
            &w(),
        );
        assert_eq!(e.deficit_blocks, 10);
        // 10 blocks at 20 blocks/s.
        assert!((e.wait_s - 0.5).abs() < 1e-9, "{e:?}");
    }

    #[test]
    fn waiting_for_the_cached_agent_beats_recomputing_elsewhere_until_the_wait_grows() {
        // Agent A caches 240 of 280 prompt tokens but is 5 blocks short; B has room, no cache.
        // Both prefill at 300 tokens/s (one CPU core, the default model).
        let mut a = measured();
        a.room = 0;
        a.prefill_tokens_per_s = 300.0;
        let b = AgentLoad {
            prefill_tokens_per_s: 300.0,
            ..measured()
        };
        let on_a = |room: i64| {
            let mut l = a;
            l.room = room;
            estimate(
                &l,
                &Ask {
                    need_blocks: 5,
                    uncached_tokens: 40,
                    duplicate_tokens: 0,
                    moved_tokens: 0,
                    output_tokens: 32,
                    ttft_budget_s: 0.0,
                },
                &p(),
                &w(),
            )
        };
        let ask_b = Ask {
            need_blocks: 20,
            uncached_tokens: 280,
            duplicate_tokens: 240,
            moved_tokens: 0,
            output_tokens: 32,
            ttft_budget_s: 0.0,
        };
        let on_b = estimate(&b, &ask_b, &p(), &w());
        assert!(on_a(0).cost < on_b.cost, "{:?} vs {on_b:?}", on_a(0));
        assert!((on_b.duplicate_s - 0.8).abs() < 1e-9, "{on_b:?}");
        // Without the duplication term the wait must be shorter than the recompute alone.
        let no_dup = CostWeights {
            duplicate: 0.0,
            ..w()
        };
        let b_alone = estimate(&b, &ask_b, &p(), &no_dup);
        assert_eq!(b_alone.duplicate_s, on_b.duplicate_s);
        assert!(b_alone.cost < on_b.cost);
        // With many requests already waiting there (room far below zero), spilling wins.
        assert!(on_a(-100).cost > on_b.cost, "{:?} vs {on_b:?}", on_a(-100));
        // With the default weights the stall of B's recompute (its 280 tokens delay B's four
        // running requests) keeps the request on A longer: past the 5 s wait, not past 60 s.
        let d = CostWeights::default();
        let at = |room: i64, w: &CostWeights| {
            let mut l = a;
            l.room = room;
            let ask = Ask {
                need_blocks: 5,
                uncached_tokens: 40,
                output_tokens: 32,
                ..Ask::default()
            };
            estimate(&l, &ask, &p(), w).cost
        };
        let b_default = estimate(&b, &ask_b, &p(), &d).cost;
        assert!(at(-100, &d) < b_default, "{} vs {b_default}", at(-100, &d));
        assert!(
            at(-1_200, &d) > b_default,
            "{} vs {b_default}",
            at(-1_200, &d)
        );
    }

    #[test]
    fn busier_batch_costs_more_decode_time() {
        let idle = AgentLoad {
            running: 0,
            ..measured()
        };
        let busy = AgentLoad {
            running: 8,
            ..measured()
        };
        let ask = Ask {
            need_blocks: 4,
            uncached_tokens: 100,
            duplicate_tokens: 0,
            moved_tokens: 0,
            output_tokens: 64,
            ttft_budget_s: 0.0,
        };
        let e0 = estimate(&idle, &ask, &p(), &w());
        let e8 = estimate(&busy, &ask, &p(), &w());
        assert_eq!(e0.decode_s, 0.0);
        assert!(e8.decode_s > 0.0 && e8.cost > e0.cost);
        // Prefill queued ahead counts as well.
        let queued = AgentLoad {
            queued_prefill_tokens: 1000,
            ..idle
        };
        assert!((estimate(&queued, &ask, &p(), &w()).prefill_s - 1.1).abs() < 1e-9);
    }

    #[test]
    fn unmeasured_agent_uses_priors_and_never_divides_by_zero() {
        let load = AgentLoad {
            total_blocks: 10,
            room: -5,
            ..AgentLoad::default()
        };
        let e = estimate(
            &load,
            &Ask {
                need_blocks: 3,
                uncached_tokens: 400,
                duplicate_tokens: 0,
                moved_tokens: 0,
                output_tokens: 0,
                ttft_budget_s: 0.0,
            },
            &p(),
            &w(),
        );
        assert!(e.cost.is_finite() && e.wait_s > 0.0 && e.wait_s <= MAX_WAIT_S);
        assert!((e.prefill_s - 1.0).abs() < 1e-9);
        let zero = estimate(&AgentLoad::default(), &Ask::default(), &p(), &w());
        assert_eq!(zero.cost, 0.0);
    }

    #[test]
    fn decode_step_scales_with_batch_from_the_measured_point() {
        let load = measured();
        let at4 = decode_step_at(&load, &p(), 4.0);
        assert!((at4 - 0.012).abs() < 1e-12);
        assert!(decode_step_at(&load, &p(), 8.0) > at4);
        assert!(decode_step_at(&load, &p(), 0.0) < at4);
    }

    /// A scripted history: 10 blocks every 500 ms while busy → 20 blocks/s; idle gaps and a
    /// restart (counter back to 0) are handled.
    #[test]
    fn release_rate_from_a_scripted_history() {
        let mut r = ReleaseRate::default();
        r.observe(0, 0, true);
        assert_eq!(r.blocks_per_s, 0.0);
        for i in 1..=4u64 {
            r.observe(10 * i, 500 * i, true);
        }
        assert!((r.blocks_per_s - 20.0).abs() < 1e-9, "{r:?}");
        // A long idle gap with nothing released does not dilute the rate.
        r.observe(40, 60_000, false);
        r.observe(50, 60_500, true);
        r.observe(60, 61_000, true);
        assert!((r.blocks_per_s - 20.0).abs() < 1e-6, "{r:?}");
        // Faster draining moves the average up, not all the way at once.
        r.observe(160, 61_500, true);
        r.observe(260, 62_000, true);
        assert!(r.blocks_per_s > 20.0 && r.blocks_per_s < 200.0, "{r:?}");
        // A restarted agent's counter starts over: forget the old rate.
        r.observe(0, 63_000, true);
        assert_eq!(r.blocks_per_s, 0.0);
    }

    #[test]
    fn moved_tokens_cost_their_prefill_times_the_stick_weight_and_no_more_than_computed() {
        let ask = Ask {
            need_blocks: 10,
            uncached_tokens: 300,
            duplicate_tokens: 0,
            moved_tokens: 200,
            output_tokens: 10,
            ttft_budget_s: 0.0,
        };
        let stay = estimate(
            &measured(),
            &Ask {
                moved_tokens: 0,
                ..ask
            },
            &p(),
            &w(),
        );
        let moved = estimate(&measured(), &ask, &p(), &w());
        assert_eq!(moved.move_s, 0.2);
        assert!(
            (moved.cost - stay.cost - STICK * 0.2).abs() < 1e-9,
            "{moved:?}"
        );
        // Not part of the time to first token.
        assert_eq!(moved.ttft_s(), stay.ttft_s());
        let w5 = CostWeights { stick: 5.0, ..w() };
        let heavy = estimate(&measured(), &ask, &p(), &w5);
        assert!((heavy.cost - stay.cost - 1.0).abs() < 1e-9);
        // Never more tokens than it computes there.
        let few = Ask {
            uncached_tokens: 50,
            ..ask
        };
        assert_eq!(estimate(&measured(), &few, &p(), &w()).move_s, 0.05);
    }

    #[test]
    fn a_calibrated_agent_scales_its_time_to_first_token_only() {
        let ask = Ask {
            need_blocks: 60,
            uncached_tokens: 500,
            duplicate_tokens: 200,
            moved_tokens: 0,
            output_tokens: 10,
            ttft_budget_s: 0.0,
        };
        let base = estimate(&measured(), &ask, &p(), &w());
        let slow = estimate(
            &AgentLoad {
                ttft_scale: 2.0,
                ..measured()
            },
            &ask,
            &p(),
            &w(),
        );
        assert!(base.wait_s > 0.0 && base.prefill_s > 0.0, "{base:?}");
        assert!((slow.wait_s - 2.0 * base.wait_s).abs() < 1e-9);
        assert!((slow.prefill_s - 2.0 * base.prefill_s).abs() < 1e-9);
        assert_eq!(slow.duplicate_s, base.duplicate_s);
        assert_eq!(slow.decode_s, base.decode_s);
        assert!((slow.ttft_s() - 2.0 * base.ttft_s()).abs() < 1e-9);
    }

    /// A scripted history of predicted and observed times: the scale follows the ratio, an
    /// outlier is clamped, nonsense is ignored.
    #[test]
    fn ttft_scale_from_a_scripted_history() {
        let mut t = TtftScale::default();
        assert_eq!(t.scale(), 1.0);
        t.observe(0.5, 1.0);
        assert!((t.scale() - 2.0).abs() < 1e-12);
        for _ in 0..200 {
            t.observe(0.5, 0.75);
        }
        assert!((t.scale() - 1.5).abs() < 1e-6, "{t:?}");
        // One request 100x slower moves it by at most ALPHA x (MAX - 1.5).
        t.observe(0.5, 50.0);
        assert!(
            t.scale() <= 1.5 + 0.1 * (TtftScale::MAX - 1.5) + 1e-9,
            "{t:?}"
        );
        let before = t;
        for (p, o) in [
            (f64::NAN, 1.0),
            (0.5, f64::INFINITY),
            (0.0, 1.0),
            (0.001, 1.0),
            (0.5, -1.0),
        ] {
            t.observe(p, o);
        }
        assert_eq!(t, before);
        // Always within bounds.
        for _ in 0..100 {
            t.observe(1.0, 1e-9);
        }
        assert!((t.scale() - TtftScale::MIN).abs() < 1e-3, "{t:?}");
    }
}
