//! KV-aware autoscaling: how many agent replicas a model needs, from the KV blocks its requests
//! use and the blocks its *waiting* requests need and cannot get (the shortfall). Pure: the
//! caller feeds samples with their time and asks for a decision; nothing here reads a clock.
//!
//! ```text
//! demand(t)  = used blocks + blocks reserved for requests on their way + shortfall
//! needed(t)  = ceil(demand(t) / (blocks per replica × target utilisation)), within min..=max
//! scale up   to the highest needed(t) over the last `up_window` when that is above current
//! scale down to the highest needed(t) over the last `down_window` when that is below current
//! ```
//!
//! Up reacts within one window of pressure; down waits until a whole (longer) window has asked
//! for fewer, so a load that comes and goes does not flap. A model with requests waiting and
//! no replica at all gets at least one.

use std::collections::VecDeque;
use std::time::Duration;

/// One model's autoscaling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoscalePolicy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Fraction (0, 1] of each replica's KV blocks demand may fill.
    pub target_utilization: f64,
    /// Scale up to the highest need seen this long ago or later.
    pub up_window: Duration,
    /// Scale down only when every need seen in this window was lower.
    pub down_window: Duration,
}

impl Default for AutoscalePolicy {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 8,
            target_utilization: 0.8,
            up_window: Duration::from_secs(30),
            down_window: Duration::from_secs(300),
        }
    }
}

impl AutoscalePolicy {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_replicas == 0 || self.min_replicas > self.max_replicas {
            return Err(format!(
                "minReplicas {} / maxReplicas {}: need 0 ≤ min ≤ max and max ≥ 1",
                self.min_replicas, self.max_replicas
            ));
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            return Err(format!(
                "targetKvUtilization {}: must be in (0, 1]",
                self.target_utilization
            ));
        }
        if self.down_window < self.up_window {
            return Err("scaleDownWindow must be at least scaleUpWindow".into());
        }
        Ok(())
    }
}

/// What the model's agents and queue say at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvSignal {
    /// Blocks in use on the model's agents.
    pub used_blocks: u64,
    /// Blocks reserved for requests sent and not yet counted by their agent.
    pub reserved_blocks: u64,
    /// Blocks the waiting requests need beyond the room there is (the shortfall).
    pub shortfall_blocks: u64,
    /// Requests waiting for room.
    pub waiting_requests: u64,
    /// KV blocks of one replica (0: unknown, e.g. no replica yet).
    pub blocks_per_replica: u64,
}

impl KvSignal {
    pub fn demand_blocks(&self) -> u64 {
        self.used_blocks + self.reserved_blocks + self.shortfall_blocks
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleDecision {
    pub replicas: u32,
    pub reason: String,
}

/// The needs seen over the longest window, per model.
#[derive(Debug, Clone, Default)]
pub struct Autoscaler {
    /// (time, replicas needed then), oldest first.
    needs: VecDeque<(Duration, u32)>,
}

impl Autoscaler {
    /// Replicas `signal` needs under `policy`, within its bounds.
    pub fn needed(policy: &AutoscalePolicy, signal: &KvSignal) -> u32 {
        let demand = signal.demand_blocks();
        let n = if signal.blocks_per_replica == 0 {
            // No replica to measure: one if anything waits, else the floor.
            u32::from(signal.waiting_requests > 0 || demand > 0)
        } else {
            let per = signal.blocks_per_replica as f64 * policy.target_utilization;
            (demand as f64 / per).ceil().min(f64::from(u32::MAX)) as u32
        };
        let n = if signal.waiting_requests > 0 {
            n.max(1)
        } else {
            n
        };
        n.clamp(policy.min_replicas, policy.max_replicas)
    }

    /// Records the signal seen at `now` (a monotonic time, e.g. since the controller started).
    pub fn observe(&mut self, policy: &AutoscalePolicy, now: Duration, signal: &KvSignal) {
        self.needs.push_back((now, Self::needed(policy, signal)));
        let keep = policy.down_window.max(policy.up_window);
        while self
            .needs
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > keep)
        {
            self.needs.pop_front();
        }
    }

    /// The replicas to run now, given `current`, and why.
    pub fn decide(&self, policy: &AutoscalePolicy, now: Duration, current: u32) -> ScaleDecision {
        let max_in = |w: Duration| {
            self.needs
                .iter()
                .filter(|&&(t, _)| now.saturating_sub(t) <= w)
                .map(|&(_, n)| n)
                .max()
        };
        let bounded = current.clamp(policy.min_replicas, policy.max_replicas);
        if bounded != current {
            return ScaleDecision {
                replicas: bounded,
                reason: format!(
                    "{current} replicas is outside {}..={}",
                    policy.min_replicas, policy.max_replicas
                ),
            };
        }
        match max_in(policy.up_window) {
            Some(up) if up > current => {
                return ScaleDecision {
                    replicas: up,
                    reason: format!(
                        "KV demand needs {up} replicas within the last {}s",
                        policy.up_window.as_secs()
                    ),
                }
            }
            None => {
                return ScaleDecision {
                    replicas: current,
                    reason: "no capacity signal yet".into(),
                }
            }
            _ => {}
        }
        // Down only when the whole down window has been observed and asked for fewer.
        let covered = self
            .needs
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) >= policy.down_window);
        match max_in(policy.down_window) {
            Some(down) if down < current && covered => ScaleDecision {
                replicas: down,
                reason: format!(
                    "KV demand has needed at most {down} replicas for {}s",
                    policy.down_window.as_secs()
                ),
            },
            _ => ScaleDecision {
                replicas: current,
                reason: "KV demand fits the current replicas".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AutoscalePolicy {
        AutoscalePolicy {
            min_replicas: 1,
            max_replicas: 6,
            target_utilization: 0.8,
            up_window: Duration::from_secs(10),
            down_window: Duration::from_secs(60),
        }
    }

    fn sig(used: u64, shortfall: u64, waiting: u64) -> KvSignal {
        KvSignal {
            used_blocks: used,
            reserved_blocks: 0,
            shortfall_blocks: shortfall,
            waiting_requests: waiting,
            blocks_per_replica: 100,
        }
    }

    #[test]
    fn needed_replicas_follow_demand_over_target_capacity() {
        let p = policy();
        // (used, shortfall, waiting) -> replicas
        for (s, want) in [
            (sig(0, 0, 0), 1),     // the floor
            (sig(80, 0, 0), 1),    // exactly at target
            (sig(81, 0, 0), 2),    // just over
            (sig(100, 60, 5), 2),  // 160 / 80
            (sig(100, 300, 9), 5), // 400 / 80
            (sig(100, 900, 9), 6), // capped at max
        ] {
            assert_eq!(Autoscaler::needed(&p, &s), want, "{s:?}");
        }
        let none = KvSignal {
            waiting_requests: 3,
            ..KvSignal::default()
        };
        let zero_floor = AutoscalePolicy {
            min_replicas: 0,
            ..p
        };
        assert_eq!(
            Autoscaler::needed(&zero_floor, &none),
            1,
            "waiting work gets a replica"
        );
        assert_eq!(
            Autoscaler::needed(&zero_floor, &KvSignal::default()),
            0,
            "idle scales to zero when allowed"
        );
    }

    /// A scripted capacity history: (second, used, shortfall, waiting) → replicas after each.
    fn replay(history: &[(u64, u64, u64, u64)]) -> Vec<u32> {
        let p = policy();
        let mut a = Autoscaler::default();
        let mut current = 1;
        history
            .iter()
            .map(|&(t, used, short, wait)| {
                let now = Duration::from_secs(t);
                let mut s = sig(used, short, wait);
                s.blocks_per_replica = 100;
                a.observe(&p, now, &s);
                current = a.decide(&p, now, current).replicas;
                current
            })
            .collect()
    }

    #[test]
    fn a_queue_scales_up_at_once_and_down_only_after_the_window() {
        let mut h = vec![(0, 50, 0, 0), (5, 100, 200, 12)]; // a burst queues: 300/80 → 4
        h.extend((10..=60).step_by(5).map(|t| (t, 70, 0, 0))); // drained, 1 needed
        h.push((70, 70, 0, 0));
        let r = replay(&h);
        assert_eq!(r[0], 1);
        assert_eq!(r[1], 4, "up within one sample");
        // Down waits until no sample in the last 60 s asked for more than 1.
        let first_down_after_burst = h
            .iter()
            .zip(&r)
            .skip(2)
            .find(|(_, &n)| n < 4)
            .map(|(s, _)| s.0);
        assert_eq!(first_down_after_burst, Some(70), "{r:?}");
        assert_eq!(*r.last().unwrap(), 1);
    }

    #[test]
    fn an_oscillating_load_does_not_flap() {
        // Demand swings between 1 and 3 replicas' worth every 10 s for 5 minutes.
        let h: Vec<_> = (0..300)
            .step_by(5)
            .map(|t| {
                if (t / 10) % 2 == 0 {
                    (t, 70, 0, 0)
                } else {
                    (t, 100, 120, 4)
                }
            })
            .collect();
        let r = replay(&h);
        let changes = r.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 1, "one step up to 3, then it holds: {r:?}");
        assert_eq!(*r.last().unwrap(), 3);
    }

    #[test]
    fn bad_settings_are_refused() {
        let p = policy();
        for bad in [
            AutoscalePolicy {
                max_replicas: 0,
                ..p
            },
            AutoscalePolicy {
                min_replicas: 7,
                ..p
            },
            AutoscalePolicy {
                target_utilization: 0.0,
                ..p
            },
            AutoscalePolicy {
                target_utilization: f64::NAN,
                ..p
            },
            AutoscalePolicy {
                target_utilization: 1.5,
                ..p
            },
            AutoscalePolicy {
                down_window: Duration::from_secs(1),
                ..p
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(p.validate().is_ok());
    }

    #[test]
    fn replicas_outside_the_bounds_are_brought_back() {
        let p = policy();
        let a = Autoscaler::default();
        assert_eq!(a.decide(&p, Duration::ZERO, 9).replicas, 6);
        assert_eq!(a.decide(&p, Duration::ZERO, 0).replicas, 1);
        assert_eq!(
            a.decide(&p, Duration::ZERO, 3).replicas,
            3,
            "no signal: hold"
        );
    }
}
