//! What a run comes to: goodput, latency percentiles, preemptions, refusals, prefix hits, KV
//! use over time, and how fast the simulation ran.

use serde_json::{json, Value};

use crate::config::Slo;
use crate::run::{Outcome, RequestRecord, RunResult};

/// The `q` quantile (0..=1) of sorted `v`, nearest rank; 0 for none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    v[i]
}

/// Figures of one policy's run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub policy: &'static str,
    pub requests: usize,
    pub completed: usize,
    pub queue_full: usize,
    pub queue_timeout: usize,
    pub rejected: usize,
    /// Completed requests within both SLOs per simulated second (first arrival to last end).
    pub goodput_rps: f64,
    /// Share of all requests (refused ones included) completed within both SLOs: unlike
    /// `goodput_rps` it does not depend on when the slowest request ended, which with a fixed
    /// number of requests decides the span.
    pub slo_met: f64,
    pub output_tok_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub tpot_p50_s: f64,
    pub tpot_p99_s: f64,
    /// Time in the gateway's queue (arrival to dispatch) of completed requests.
    pub queue_wait_p50_s: f64,
    pub queue_wait_p99_s: f64,
    pub preemptions: u64,
    /// Prompt tokens served from the prefix cache / prompt tokens of completed requests.
    pub prefix_hit_rate: f64,
    pub kv_use_mean: f64,
    pub sim_s: f64,
    pub wall_s: f64,
    pub decisions: u64,
    pub decision_mean_us: f64,
    pub reports: u64,
    pub steps: u64,
    /// TTFT of completed requests at the quantiles 0, 0.01, …, 1 (empty: none completed).
    pub ttft_quantiles: Vec<f64>,
}

/// TTFT (from arrival at the gateway) and TPOT of a completed request.
fn latencies(r: &RequestRecord) -> (f64, f64) {
    let ttft = r.first_token_ns.saturating_sub(r.arrival_ns) as f64 / 1e9;
    let out = r.output_tokens;
    let tpot = if out > 1 {
        r.done_ns.saturating_sub(r.first_token_ns) as f64 / 1e9 / f64::from(out - 1)
    } else {
        0.0
    };
    (ttft, tpot)
}

impl Summary {
    pub fn of(result: &RunResult, slo: &Slo) -> Summary {
        let recs = &result.records;
        let done: Vec<&RequestRecord> =
            recs.iter().filter(|r| r.outcome == Outcome::Done).collect();
        let count = |o: Outcome| recs.iter().filter(|r| r.outcome == o).count();
        let mut ttft = Vec::with_capacity(done.len());
        let mut tpot = Vec::with_capacity(done.len());
        let mut waits = Vec::with_capacity(done.len());
        let mut good = 0usize;
        let mut out_tokens = 0u64;
        let (mut prompt, mut cached) = (0u64, 0u64);
        for r in &done {
            let (t, p) = latencies(r);
            ttft.push(t);
            tpot.push(p);
            waits.push(r.dispatched_ns.saturating_sub(r.arrival_ns) as f64 / 1e9);
            if t <= slo.ttft_s && p <= slo.tpot_s {
                good += 1;
            }
            out_tokens += u64::from(r.output_tokens);
            prompt += u64::from(r.prompt_tokens);
            cached += u64::from(r.cached_tokens);
        }
        ttft.sort_by(f64::total_cmp);
        tpot.sort_by(f64::total_cmp);
        waits.sort_by(f64::total_cmp);
        let start = recs.iter().map(|r| r.arrival_ns).min().unwrap_or(0);
        let end = recs.iter().map(|r| r.done_ns).max().unwrap_or(0);
        let span = (end.saturating_sub(start) as f64 / 1e9).max(1e-9);
        let timeline = &result.stats.kv_timeline;
        let kv_use_mean = if timeline.is_empty() {
            0.0
        } else {
            timeline.iter().map(|t| t.1).sum::<f64>() / timeline.len() as f64
        };
        Summary {
            policy: result.policy.as_str(),
            requests: recs.len(),
            completed: done.len(),
            queue_full: count(Outcome::QueueFull),
            queue_timeout: count(Outcome::QueueTimeout),
            rejected: count(Outcome::Rejected),
            goodput_rps: good as f64 / span,
            slo_met: good as f64 / recs.len().max(1) as f64,
            output_tok_s: out_tokens as f64 / span,
            ttft_p50_s: quantile(&ttft, 0.5),
            ttft_p99_s: quantile(&ttft, 0.99),
            tpot_p50_s: quantile(&tpot, 0.5),
            tpot_p99_s: quantile(&tpot, 0.99),
            queue_wait_p50_s: quantile(&waits, 0.5),
            queue_wait_p99_s: quantile(&waits, 0.99),
            preemptions: result.stats.preemptions,
            prefix_hit_rate: if prompt > 0 {
                cached as f64 / prompt as f64
            } else {
                0.0
            },
            kv_use_mean,
            sim_s: result.sim_ns as f64 / 1e9,
            wall_s: result.wall_s,
            decisions: result.stats.decisions,
            decision_mean_us: if result.stats.decisions > 0 {
                result.stats.decision_wall_ns as f64 / result.stats.decisions as f64 / 1e3
            } else {
                0.0
            },
            reports: result.stats.reports,
            steps: result.stats.steps,
            ttft_quantiles: if ttft.is_empty() {
                Vec::new()
            } else {
                (0..=100)
                    .map(|k| quantile(&ttft, f64::from(k) / 100.0))
                    .collect()
            },
        }
    }

    /// The figures as JSON, with the KV-use timeline of `result`.
    pub fn to_json(&self, result: &RunResult) -> Value {
        json!({
            "policy": self.policy,
            "requests": self.requests,
            "completed": self.completed,
            "queue_full": self.queue_full,
            "queue_timeout": self.queue_timeout,
            "rejected": self.rejected,
            "goodput_rps": self.goodput_rps,
            "slo_met": self.slo_met,
            "output_tok_s": self.output_tok_s,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p99_s": self.ttft_p99_s,
            "tpot_p50_s": self.tpot_p50_s,
            "tpot_p99_s": self.tpot_p99_s,
            "queue_wait_p50_s": self.queue_wait_p50_s,
            "queue_wait_p99_s": self.queue_wait_p99_s,
            "preemptions": self.preemptions,
            "prefix_hit_rate": self.prefix_hit_rate,
            "kv_use_mean": self.kv_use_mean,
            "sim_s": self.sim_s,
            "wall_s": self.wall_s,
            "speedup": self.sim_s / self.wall_s.max(1e-9),
            "decisions": self.decisions,
            "decision_mean_us": self.decision_mean_us,
            "reports": self.reports,
            "steps": self.steps,
            "ttft_quantiles": self.ttft_quantiles,
            "kv_timeline": result.stats.kv_timeline.iter()
                .map(|&(t, mean, max, queued)| json!([t, mean, max, queued]))
                .collect::<Vec<_>>(),
        })
    }
}

/// A table of summaries, one line each, for a terminal.
pub fn table(rows: &[Summary]) -> String {
    let mut s = format!(
        "{:<16} {:>9} {:>8} {:>6} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>8}\n",
        "policy",
        "completed",
        "429",
        "400",
        "goodput/s",
        "SLO met",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "queue p50",
        "preem",
        "hit rate",
        "KV use"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<16} {:>9} {:>8} {:>6} {:>10.2} {:>7.1}% {:>10.1} {:>8.3}s {:>8.3}s {:>8.4}s {:>8.4}s {:>8.3}s {:>6} {:>7.1}% {:>7.1}%\n",
            r.policy,
            r.completed,
            r.queue_full + r.queue_timeout,
            r.rejected,
            r.goodput_rps,
            100.0 * r.slo_met,
            r.output_tok_s,
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.tpot_p50_s,
            r.tpot_p99_s,
            r.queue_wait_p50_s,
            r.preemptions,
            100.0 * r.prefix_hit_rate,
            100.0 * r.kv_use_mean,
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[3.0], 2.0), 3.0);
    }
}
