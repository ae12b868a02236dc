//! The dashboard's memory: one sample a second of what the gateway sees, in a fixed-size ring
//! (the last [`HISTORY_LEN`] seconds, 15 minutes), served as `GET /dashboard/history` and drawn
//! by the page as charts. Bounded: the ring never grows past its length, and each sample holds
//! at most [`MAX_AGENTS_PER_SAMPLE`] agents.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

use super::types::AgentSnapshot;

/// Samples kept (one a second: 15 minutes).
pub const HISTORY_LEN: usize = 900;

/// Agents recorded per sample (the page draws one line each).
pub const MAX_AGENTS_PER_SAMPLE: usize = 64;

/// One agent at one instant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentPoint {
    pub agent: String,
    pub used: u64,
    pub cached: u64,
    pub free: u64,
    pub reserved: u64,
    pub preemptions: u64,
}

/// The gateway at one instant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Unix time, milliseconds.
    pub t_ms: u64,
    pub queue_depth: usize,
    /// Requests answered so far, by outcome (cumulative: the page draws per-second rates).
    pub ok: u64,
    pub rejected: u64,
    pub errors: u64,
    /// Time to first token over the requests observed since the previous sample (seconds;
    /// `None` when none was).
    pub ttft_p50_s: Option<f64>,
    pub ttft_p99_s: Option<f64>,
    pub agents: Vec<AgentPoint>,
}

/// The ring.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Adds a sample, dropping the oldest beyond [`HISTORY_LEN`].
    pub fn push(&self, s: Sample) {
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == HISTORY_LEN {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// Every sample, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The agents' points of a sample.
pub fn agent_points(agents: &[AgentSnapshot]) -> Vec<AgentPoint> {
    agents
        .iter()
        // Not reported yet: no id to draw a line under.
        .filter(|a| !a.agent_id.is_empty())
        .take(MAX_AGENTS_PER_SAMPLE)
        .map(|a| {
            let cached = a.cached_blocks.min(a.free_blocks);
            AgentPoint {
                agent: a.agent_id.clone(),
                used: a.used_blocks,
                cached,
                free: a.free_blocks - cached,
                reserved: a.reserved_blocks,
                preemptions: a.preemptions,
            }
        })
        .collect()
}

/// The p-th quantile (0..=1) of `v` (sorted in place); `None` when empty.
pub fn quantile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v.get(i.min(v.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64) -> Sample {
        Sample {
            t_ms: t,
            queue_depth: 0,
            ok: t,
            rejected: 0,
            errors: 0,
            ttft_p50_s: None,
            ttft_p99_s: None,
            agents: Vec::new(),
        }
    }

    #[test]
    fn the_ring_keeps_the_last_fifteen_minutes_only() {
        let h = History::default();
        for t in 0..(HISTORY_LEN as u64 + 100) {
            h.push(sample(t));
        }
        let s = h.samples();
        assert_eq!(s.len(), HISTORY_LEN);
        assert_eq!(s[0].t_ms, 100);
        assert_eq!(s.last().map(|x| x.t_ms), Some(HISTORY_LEN as u64 + 99));
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&mut [], 0.5), None);
        let mut v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), Some(3.0));
        assert_eq!(quantile(&mut v, 0.99), Some(5.0));
        assert_eq!(quantile(&mut v, 0.0), Some(1.0));
    }
}
