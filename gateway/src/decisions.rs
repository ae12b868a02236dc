//! The last routing decisions: what the dashboard lists and `x-kvroute-route` carries.
//!
//! A decision trace names the policy, its scorers with their weights, the agent picked, the
//! attempts, the queue wait, every candidate (at most [`TRACE_MAX_CANDIDATES`]) with its
//! score, each scorer's value, its blocks and the cost model's terms, and the **deciding term**:
//! of what separates the pick from the best other candidate, the part that counts most (for
//! the `kv` policy a cost term, e.g. `prefill_s` when the pick caches the prompt's prefix; for
//! a weighted list of scorers, the scorer). The gateway keeps the last `--decision-log`
//! requests' traces with their outcome in a fixed-size ring (`GET /dashboard/decisions`).
//! No prompt text is kept.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use kvroute_routing::cost::CostWeights;

/// A routing decision's candidates, and the agents of its model the filters left out (agent id,
/// why: [`kvroute_routing::pipeline::Verdict`]).
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub candidates: Vec<TraceEntry>,
    pub filtered: Vec<(String, &'static str)>,
    /// The policy the decision was made under, and its scorers with their weights (taken
    /// under the same router lock as the decision).
    pub policy: kvroute_routing::PolicyConfig,
    pub scorers: Vec<ScorerInfo>,
}

/// One candidate agent of a routing decision, for a decision trace.
#[derive(Debug, Clone)]
pub struct TraceEntry {
    pub agent_id: String,
    pub trace: kvroute_routing::pipeline::CandidateTrace,
}

/// Decisions kept by default.
pub const DEFAULT_LEN: u16 = 50;

/// Most decisions `--decision-log` may keep (each holds up to [`TRACE_MAX_CANDIDATES`]).
pub const MAX_LEN: u16 = 1000;

/// Most candidates a decision trace lists (the header stays a few KiB).
pub const TRACE_MAX_CANDIDATES: usize = 32;

/// The policy's scorers, as a trace names them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerInfo {
    pub name: String,
    pub weight: f64,
}

/// What a trace is built from besides the candidates.
#[derive(Debug, Clone)]
pub struct TraceHead<'a> {
    pub policy: &'a str,
    pub scorers: &'a [ScorerInfo],
    /// The `kv` policy's cost weights (to weigh its terms for the deciding one).
    pub cost: CostWeights,
    pub agent: &'a str,
    pub attempts: u32,
    pub no_room_retries: u32,
    pub waited: Duration,
}

fn r3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// The routing decision of a request as JSON.
pub fn trace_json(head: &TraceHead<'_>, t: &Trace) -> Value {
    let trace = &t.candidates;
    json!({
        "policy": head.policy,
        "scorers": head.scorers.iter().map(|s| json!({"name": s.name, "weight": s.weight})).collect::<Vec<_>>(),
        "agent": head.agent,
        "attempts": head.attempts,
        "no_room_retries": head.no_room_retries,
        "queue_wait_ms": head.waited.as_millis() as u64,
        "deciding": deciding(head, trace),
        "candidates": candidates_json(trace, head.scorers.len()),
        "candidates_total": trace.len(),
        "filtered": filtered_json(&t.filtered),
    })
}

/// The agents the filters left out, with why (at most [`TRACE_MAX_CANDIDATES`]).
pub fn filtered_json(filtered: &[(String, &'static str)]) -> Vec<Value> {
    filtered
        .iter()
        .take(TRACE_MAX_CANDIDATES)
        .map(|(agent, why)| json!({"agent": agent, "verdict": why}))
        .collect()
}

/// The candidates of a decision trace, best score first (at most [`TRACE_MAX_CANDIDATES`]: a
/// trace of a large cluster shows the pick and its closest rivals).
pub fn candidates_json(trace: &[TraceEntry], scorers: usize) -> Vec<Value> {
    let mut order: Vec<&TraceEntry> = trace.iter().collect();
    order.sort_by(|a, b| b.trace.score.total_cmp(&a.trace.score));
    order
        .into_iter()
        .take(TRACE_MAX_CANDIDATES)
        .map(|t| {
            let (c, e) = (&t.trace.candidate, &t.trace.estimate);
            json!({
                "agent": t.agent_id,
                "score": r3(t.trace.score),
                "values": t.trace.values.iter().take(scorers).map(|&v| r3(v)).collect::<Vec<_>>(),
                "need_blocks": c.need_blocks,
                "cached_blocks": c.cached_blocks,
                "local_blocks": c.local_blocks,
                "host_blocks": c.host_blocks,
                "room_blocks": c.room,
                "prefill_tokens": c.prefill_tokens,
                "predicted_ttft_s": r3(e.ttft_s()),
                "wait_s": r3(e.wait_s),
                "prefill_s": r3(e.prefill_s),
                "duplicate_s": r3(e.duplicate_s),
                "decode_s": r3(e.decode_s),
                "move_s": r3(e.move_s),
            })
        })
        .collect()
}

/// What decided between the pick and the best-scoring other candidate: the term (a cost term
/// of the `kv` policy's `cost` scorer, weighted; else a scorer, weighted) in which the pick is
/// ahead by the most, with that lead and the other agent. `None` with one candidate, or when
/// the pick is ahead in no term (a tie broken by room or at random).
pub fn deciding(head: &TraceHead<'_>, trace: &[TraceEntry]) -> Option<Value> {
    let pick = trace.iter().position(|t| t.agent_id == head.agent)?;
    let other = trace
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != pick)
        .max_by(|a, b| a.1.trace.score.total_cmp(&b.1.trace.score))
        .map(|(_, t)| t)?;
    let pick = &trace[pick];
    let leads: Vec<(&str, f64)> = if head.scorers.len() == 1 && head.scorers[0].name == "cost" {
        // Lower cost is better: the lead is the other's weighted term minus the pick's.
        let w = head.cost;
        let (p, o) = (&pick.trace.estimate, &other.trace.estimate);
        vec![
            ("wait_s", w.wait * (o.wait_s - p.wait_s)),
            ("prefill_s", w.prefill * (o.prefill_s - p.prefill_s)),
            ("duplicate_s", w.duplicate * (o.duplicate_s - p.duplicate_s)),
            ("decode_s", w.decode * (o.decode_s - p.decode_s)),
            ("move_s", w.stick * (o.move_s - p.move_s)),
        ]
    } else {
        head.scorers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = |t: &TraceEntry| t.trace.values.get(i).copied().unwrap_or(0.0);
                (s.name.as_str(), s.weight * (v(pick) - v(other)))
            })
            .collect()
    };
    let (term, lead) = leads
        .into_iter()
        .filter(|(_, lead)| lead.is_finite() && *lead > 1e-12)
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    // Microseconds: a lead of a fraction of a millisecond still decides.
    let lead = (lead * 1e6).round() / 1e6;
    Some(json!({"term": term, "lead": lead, "over": other.agent_id}))
}

/// One request as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Unix time, milliseconds, when its answer began (or it was refused).
    pub t_ms: u64,
    pub model: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// The HTTP status the client got.
    pub status: u16,
    /// `routed`, `queue_full`, `queue_timeout`, `rejected` or `upstream_failed`.
    pub outcome: &'static str,
    /// The routing decision ([`trace_json`]), when one routed it.
    pub route: Option<Value>,
}

/// The ring of the last decisions.
#[derive(Debug, Default)]
pub struct Decisions {
    len: usize,
    ring: Mutex<VecDeque<DecisionRecord>>,
}

impl Decisions {
    /// A ring of `len` decisions (0: keeps nothing).
    pub fn new(len: usize) -> Self {
        Self {
            len,
            ring: Mutex::new(VecDeque::with_capacity(len)),
        }
    }

    /// Whether decisions are kept (so requests must be traced).
    pub fn enabled(&self) -> bool {
        self.len > 0
    }

    /// How many it keeps.
    pub fn capacity(&self) -> usize {
        self.len
    }

    /// Adds one, dropping the oldest beyond the length.
    pub fn push(&self, r: DecisionRecord) {
        if self.len == 0 {
            return;
        }
        let mut q = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= self.len {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// The kept decisions, newest first.
    pub fn recent(&self) -> Vec<DecisionRecord> {
        let q = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().rev().cloned().collect()
    }
}

/// Now as Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_routing::cost::Estimate;
    use kvroute_routing::pipeline::CandidateTrace;
    use kvroute_routing::Candidate;

    fn entry(agent: &str, score: f64, values: &[f64], e: Estimate) -> TraceEntry {
        let mut v = [0.0; kvroute_routing::policy::MAX_SCORERS];
        v[..values.len()].copy_from_slice(values);
        TraceEntry {
            agent_id: agent.into(),
            trace: CandidateTrace {
                candidate: Candidate::default(),
                score,
                values: v,
                estimate: e,
            },
        }
    }

    fn head<'a>(scorers: &'a [ScorerInfo], agent: &'a str) -> TraceHead<'a> {
        TraceHead {
            policy: "kv",
            scorers,
            cost: CostWeights::default(),
            agent,
            attempts: 1,
            no_room_retries: 0,
            waited: Duration::from_millis(12),
        }
    }

    fn record(n: u16) -> DecisionRecord {
        DecisionRecord {
            t_ms: u64::from(n),
            model: "m".into(),
            prompt_tokens: 1,
            output_tokens: 1,
            status: 200,
            outcome: "routed",
            route: None,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_n_newest_first_and_nothing_at_zero() {
        let d = Decisions::new(3);
        for n in 0..5 {
            d.push(record(n));
        }
        let t: Vec<u64> = d.recent().iter().map(|r| r.t_ms).collect();
        assert_eq!(t, [4, 3, 2]);
        let off = Decisions::new(0);
        off.push(record(1));
        assert!(off.recent().is_empty() && !off.enabled());
    }

    #[test]
    fn a_cached_prefix_decides_through_the_prefill_term() {
        let cost = [ScorerInfo {
            name: "cost".into(),
            weight: 1.0,
        }];
        let est = |prefill_s, wait_s| Estimate {
            prefill_s,
            wait_s,
            cost: prefill_s + wait_s,
            ..Estimate::default()
        };
        let trace = [
            entry("b", -0.9, &[-0.9], est(0.8, 0.1)),
            entry("a", -0.3, &[-0.3], est(0.1, 0.2)),
        ];
        let d = deciding(&head(&cost, "a"), &trace).unwrap_or_default();
        assert_eq!(d["term"], "prefill_s", "{d}");
        assert_eq!(d["over"], "b", "{d}");
        assert_eq!(d["lead"], 0.7, "{d}");
        // One candidate, an unknown pick, or a pick ahead in nothing: no deciding term.
        assert!(deciding(&head(&cost, "a"), &trace[1..]).is_none());
        assert!(deciding(&head(&cost, "z"), &trace).is_none());
        let tie = [
            entry("a", -0.5, &[-0.5], est(0.5, 0.0)),
            entry("b", -0.5, &[-0.5], est(0.5, 0.0)),
        ];
        assert!(deciding(&head(&cost, "a"), &tie).is_none());
    }

    #[test]
    fn with_several_scorers_the_weighted_scorer_with_the_biggest_lead_decides() {
        let scorers = [
            ScorerInfo {
                name: "prefix".into(),
                weight: 2.0,
            },
            ScorerInfo {
                name: "headroom".into(),
                weight: 1.0,
            },
        ];
        let trace = [
            entry("a", 2.0 * 0.9 + 0.2, &[0.9, 0.2], Estimate::default()),
            entry("b", 0.0 + 0.8, &[0.0, 0.8], Estimate::default()),
        ];
        let d = deciding(&head(&scorers, "a"), &trace).unwrap_or_default();
        assert_eq!(d["term"], "prefix", "{d}");
        assert_eq!(d["lead"], 1.8, "{d}");
        let v = trace_json(
            &head(&scorers, "a"),
            &Trace {
                candidates: trace.to_vec(),
                filtered: vec![("c".into(), "stale")],
                ..Trace::default()
            },
        );
        assert_eq!(v["filtered"], json!([{"agent": "c", "verdict": "stale"}]));
        assert_eq!(v["scorers"][0], json!({"name": "prefix", "weight": 2.0}));
        assert_eq!(v["candidates"][1]["values"], json!([0.0, 0.8]));
        // Best score first, whatever order the pipeline scored them in.
        let mut many: Vec<TraceEntry> = (0..40)
            .map(|i| {
                entry(
                    &format!("x{i}"),
                    f64::from(i),
                    &[f64::from(i)],
                    Estimate::default(),
                )
            })
            .collect();
        many.reverse();
        many.rotate_left(7);
        let listed = candidates_json(&many, 1);
        assert_eq!(listed.len(), TRACE_MAX_CANDIDATES);
        assert_eq!(listed[0]["agent"], "x39");
        assert_eq!(listed[31]["agent"], "x8");
        assert_eq!(v["queue_wait_ms"], 12);
        assert_eq!(v["deciding"]["over"], "b");
    }
}
