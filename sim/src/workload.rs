//! What arrives: request sizes, shared prefixes, multi-turn sessions, arrival processes, and
//! replay of a trace file. Every draw comes from seeds fixed by the configuration, so a
//! workload is the same for every policy it is run under (sessions excepted: a next turn
//! arrives a think time after its previous one ends, which the policy decides).

use serde::Deserialize;

use kvroute_routing::{RandomSource, SplitMix64};

/// A uniform draw in [0, 1).
pub fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw (Box–Muller).
pub fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = unit(rng).max(f64::MIN_POSITIVE);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Token lengths: log-normal around `median` (`sigma` of the log; 0 = always the median),
/// clamped to `min..=max`. Heavy-tailed for `sigma` ≥ 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lengths {
    pub median: f64,
    #[serde(default)]
    pub sigma: f64,
    #[serde(default = "one")]
    pub min: u32,
    pub max: u32,
}

fn one() -> u32 {
    1
}

impl Lengths {
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if !(self.median.is_finite() && self.median >= 1.0) {
            return Err(format!("{what}.median must be ≥ 1 (got {})", self.median));
        }
        if !(self.sigma.is_finite() && (0.0..=4.0).contains(&self.sigma)) {
            return Err(format!(
                "{what}.sigma must be in 0..=4 (got {})",
                self.sigma
            ));
        }
        if self.min == 0 || self.min > self.max {
            return Err(format!(
                "{what}: need 1 ≤ min ≤ max (got min {} max {})",
                self.min, self.max
            ));
        }
        if self.max > 10_000_000 {
            return Err(format!(
                "{what}.max must be ≤ 10,000,000 (got {})",
                self.max
            ));
        }
        Ok(())
    }

    pub fn draw(&self, rng: &mut SplitMix64) -> u32 {
        let v = self.median * (self.sigma * normal(rng)).exp();
        (v.round() as u64).clamp(u64::from(self.min), u64::from(self.max)) as u32
    }
}

/// When requests (or sessions) arrive.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Exponential gaps at `rate` per second.
    Poisson { rate: f64 },
    /// Poisson at `burst_rate` for the first `burst_s` of every `period_s`, at `rate` otherwise.
    Bursty {
        rate: f64,
        burst_rate: f64,
        burst_s: f64,
        period_s: f64,
    },
    /// A closed loop, as a benchmark client runs (inference-perf's `concurrent` load, vLLM's
    /// `--max-concurrency`): `concurrency` requests (or sessions) start at once, and the next
    /// starts when one ends (served, refused or timed out).
    Closed { concurrency: u32 },
}

/// Largest closed-loop concurrency.
pub const MAX_CONCURRENCY: u32 = 1_000_000;

impl Arrival {
    pub fn validate(&self) -> Result<(), String> {
        let pos = |v: f64, what: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("arrival.{what} must be finite and > 0 (got {v})"))
            }
        };
        match *self {
            Arrival::Closed { concurrency } => {
                if (1..=MAX_CONCURRENCY).contains(&concurrency) {
                    Ok(())
                } else {
                    Err(format!(
                        "arrival.concurrency must be in 1..={MAX_CONCURRENCY} (got {concurrency})"
                    ))
                }
            }
            Arrival::Poisson { rate } => pos(rate, "rate"),
            Arrival::Bursty {
                rate,
                burst_rate,
                burst_s,
                period_s,
            } => {
                pos(rate, "rate")?;
                pos(burst_rate, "burst_rate")?;
                pos(burst_s, "burst_s")?;
                pos(period_s, "period_s")?;
                if burst_s > period_s {
                    return Err(format!(
                        "arrival.burst_s ({burst_s}) must not exceed period_s ({period_s})"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The next arrival after `t` seconds (closed loop: `t`; the simulation starts each one when
    /// another ends, see [`Arrival::in_flight`]).
    pub fn next(&self, t: f64, rng: &mut SplitMix64) -> f64 {
        let gap = |rate: f64, rng: &mut SplitMix64| -(1.0 - unit(rng)).ln() / rate;
        match *self {
            Arrival::Closed { .. } => t,
            Arrival::Poisson { rate } => t + gap(rate, rng),
            Arrival::Bursty {
                rate,
                burst_rate,
                burst_s,
                period_s,
            } => {
                // Thinning: candidates at the higher rate, kept with the current rate's share.
                let top = rate.max(burst_rate);
                let mut t = t;
                loop {
                    t += gap(top, rng);
                    let here = if t % period_s < burst_s {
                        burst_rate
                    } else {
                        rate
                    };
                    if unit(rng) * top < here {
                        return t;
                    }
                }
            }
        }
    }
}

impl Arrival {
    /// A closed loop's concurrency (`None`: arrivals come on their own).
    pub fn in_flight(&self) -> Option<u32> {
        match *self {
            Arrival::Closed { concurrency } => Some(concurrency),
            _ => None,
        }
    }
}

/// Shared system prompts: each request starts with one of `count` prefixes of `prefix_tokens`,
/// picked by a Zipf law of exponent `zipf` (0 = uniform; larger = a few hot prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    pub count: u32,
    pub prefix_tokens: u32,
    #[serde(default)]
    pub zipf: f64,
}

/// Multi-turn sessions: every arrival starts a session of `turns` turns; each turn's prompt is
/// the previous turn's prompt and answer plus a new message (`prompt` lengths), sent
/// `think_s` seconds after the previous answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sessions {
    pub turns: u32,
    pub think_s: f64,
}

/// The workload section of a configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Requests in all (each turn of a session is one).
    pub requests: u64,
    pub arrival: Arrival,
    /// A request's own prompt tokens (after any shared prefix).
    pub prompt: Lengths,
    pub output: Lengths,
    #[serde(default)]
    pub groups: Option<Groups>,
    #[serde(default)]
    pub sessions: Option<Sessions>,
}

impl WorkloadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests == 0 || self.requests > 100_000_000 {
            return Err(format!(
                "workload.requests must be in 1..=100,000,000 (got {})",
                self.requests
            ));
        }
        self.arrival.validate()?;
        self.prompt.validate("workload.prompt")?;
        self.output.validate("workload.output")?;
        if let Some(g) = &self.groups {
            if g.count == 0 || g.count > 10_000_000 {
                return Err(format!(
                    "workload.groups.count must be in 1..=10,000,000 (got {})",
                    g.count
                ));
            }
            if g.prefix_tokens == 0 || g.prefix_tokens > 10_000_000 {
                return Err(format!(
                    "workload.groups.prefix_tokens must be in 1..=10,000,000 (got {})",
                    g.prefix_tokens
                ));
            }
            if !(g.zipf.is_finite() && (0.0..=10.0).contains(&g.zipf)) {
                return Err(format!(
                    "workload.groups.zipf must be in 0..=10 (got {})",
                    g.zipf
                ));
            }
        }
        if let Some(s) = &self.sessions {
            if s.turns == 0 || s.turns > 10_000 {
                return Err(format!(
                    "workload.sessions.turns must be in 1..=10,000 (got {})",
                    s.turns
                ));
            }
            if !(s.think_s.is_finite() && s.think_s >= 0.0) {
                return Err(format!(
                    "workload.sessions.think_s must be finite and ≥ 0 (got {})",
                    s.think_s
                ));
            }
        }
        Ok(())
    }
}

/// One request, before its tokens exist.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSpec {
    pub arrival_s: f64,
    /// Prefix group and the prompt tokens it shares (0: none).
    pub group: u32,
    pub shared_tokens: u32,
    /// The request's own new prompt tokens.
    pub own_tokens: u32,
    pub output_tokens: u32,
    /// Seeds its own tokens and its answer's.
    pub seed: u64,
    /// Session (0: none) and turn.
    pub session: u64,
    pub turn: u32,
}

/// A token id in 100..32,100 from a seed and a position.
pub fn token(seed: u64, i: u64) -> u32 {
    let mut r = SplitMix64(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    100 + (r.next_u64() % 32_000) as u32
}

/// Seed of group `g`'s prefix tokens.
fn group_seed(g: u32) -> u64 {
    0x6A09_E667_F3BC_C909 ^ u64::from(g).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Token `i` of request `seed`'s answer.
pub fn answer_token(seed: u64, i: u64) -> u32 {
    token(seed ^ 0xA5A5_A5A5_A5A5_A5A5, i)
}

/// The prompt of `spec`: its group's prefix, then `history` (a session's earlier turns), then
/// its own tokens.
pub fn prompt_tokens(spec: &RequestSpec, history: &[u32]) -> Vec<u32> {
    let mut v =
        Vec::with_capacity(spec.shared_tokens as usize + history.len() + spec.own_tokens as usize);
    let gs = group_seed(spec.group);
    v.extend((0..u64::from(spec.shared_tokens)).map(|i| token(gs, i)));
    v.extend_from_slice(history);
    v.extend((0..u64::from(spec.own_tokens)).map(|i| token(spec.seed, i)));
    v
}

/// Draws the requests that arrive on their own (first turns), in order.
pub struct Generator {
    cfg: WorkloadConfig,
    arrivals: SplitMix64,
    sizes: SplitMix64,
    /// Zipf CDF over groups (empty: no groups).
    cdf: Vec<f64>,
    t: f64,
    next_session: u64,
}

impl Generator {
    pub fn new(cfg: &WorkloadConfig, seed: u64) -> Generator {
        let cdf = cfg.groups.map_or_else(Vec::new, |g| {
            let w: Vec<f64> = (1..=g.count)
                .map(|k| 1.0 / f64::from(k).powf(g.zipf))
                .collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            w.iter()
                .map(|x| {
                    acc += x / total;
                    acc
                })
                .collect()
        });
        Generator {
            cfg: cfg.clone(),
            arrivals: SplitMix64(seed ^ 0x1111_1111_1111_1111),
            sizes: SplitMix64(seed ^ 0x2222_2222_2222_2222),
            cdf,
            t: 0.0,
            next_session: 1,
        }
    }

    /// The next first-turn request.
    pub fn next_request(&mut self) -> RequestSpec {
        self.t = self.cfg.arrival.next(self.t, &mut self.arrivals);
        let (group, shared_tokens) = match self.cfg.groups {
            Some(g) => {
                let u = unit(&mut self.sizes);
                let k = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
                (k as u32, g.prefix_tokens)
            }
            None => (0, 0),
        };
        let seed = self.sizes.next_u64();
        let session = if self.cfg.sessions.is_some() {
            self.next_session += 1;
            self.next_session - 1
        } else {
            0
        };
        let mut own = SplitMix64(seed);
        RequestSpec {
            arrival_s: self.t,
            group,
            shared_tokens,
            own_tokens: self.cfg.prompt.draw(&mut own),
            output_tokens: self.cfg.output.draw(&mut own),
            seed,
            session,
            turn: 0,
        }
    }

    /// Turn `prev.turn + 1` of `prev`'s session, arriving at `at_s`; None after the last turn.
    pub fn next_turn(&self, prev: &RequestSpec, at_s: f64) -> Option<RequestSpec> {
        let s = self.cfg.sessions?;
        if prev.session == 0 || prev.turn + 1 >= s.turns {
            return None;
        }
        let seed = SplitMix64(prev.seed ^ 0x3333_3333_3333_3333).next_u64();
        let mut own = SplitMix64(seed);
        Some(RequestSpec {
            arrival_s: at_s + s.think_s,
            own_tokens: self.cfg.prompt.draw(&mut own),
            output_tokens: self.cfg.output.draw(&mut own),
            seed,
            turn: prev.turn + 1,
            ..*prev
        })
    }
}

/// Reads a trace: CSV lines `arrival_s,prompt_tokens,output_tokens[,group[,shared_tokens]]`
/// (a header line and `#` comments are skipped). Requests of one group share their first
/// `shared_tokens` prompt tokens (0 when the column is left out).
pub fn parse_trace(text: &str) -> Result<Vec<RequestSpec>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if n == 0 && cols.first().is_some_and(|c| c.parse::<f64>().is_err()) {
            continue;
        }
        let at = |k: usize| format!("trace line {}, column {}", n + 1, k + 1);
        if !(3..=5).contains(&cols.len()) {
            return Err(format!(
                "trace line {}: expected 3 to 5 columns (arrival_s,prompt_tokens,output_tokens[,group[,shared_tokens]]), got {}",
                n + 1,
                cols.len()
            ));
        }
        let arrival_s: f64 = cols[0]
            .parse()
            .map_err(|_| format!("{}: not a number: {:?}", at(0), cols[0]))?;
        if !(arrival_s.is_finite() && arrival_s >= 0.0) {
            return Err(format!("{}: arrival must be ≥ 0", at(0)));
        }
        let int = |k: usize, lo: u32, max: u32| -> Result<u32, String> {
            let v: u32 = cols[k]
                .parse()
                .map_err(|_| format!("{}: not a whole number: {:?}", at(k), cols[k]))?;
            if v < lo || v > max {
                return Err(format!("{}: {v} is outside {lo}..={max}", at(k)));
            }
            Ok(v)
        };
        let prompt = int(1, 1, 10_000_000)?;
        let output = int(2, 1, 10_000_000)?;
        let group = if cols.len() > 3 {
            int(3, 0, u32::MAX)?
        } else {
            0
        };
        let shared = if cols.len() > 4 {
            int(4, 0, prompt)?
        } else {
            0
        };
        if out
            .last()
            .is_some_and(|p: &RequestSpec| p.arrival_s > arrival_s)
        {
            return Err(format!(
                "trace line {}: arrivals must not go back in time",
                n + 1
            ));
        }
        out.push(RequestSpec {
            arrival_s,
            group,
            shared_tokens: shared,
            own_tokens: prompt - shared,
            output_tokens: output,
            seed: SplitMix64(n as u64 ^ 0x4444_4444_4444_4444).next_u64(),
            session: 0,
            turn: 0,
        });
    }
    if out.is_empty() {
        return Err("the trace has no requests".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkloadConfig {
        WorkloadConfig {
            requests: 1000,
            arrival: Arrival::Poisson { rate: 50.0 },
            prompt: Lengths {
                median: 200.0,
                sigma: 1.0,
                min: 10,
                max: 2000,
            },
            output: Lengths {
                median: 50.0,
                sigma: 0.0,
                min: 1,
                max: 100,
            },
            groups: Some(Groups {
                count: 8,
                prefix_tokens: 300,
                zipf: 1.2,
            }),
            sessions: None,
        }
    }

    #[test]
    fn poisson_rate_and_lengths_follow_the_config() {
        let c = cfg();
        let mut g = Generator::new(&c, 1);
        let reqs: Vec<RequestSpec> = (0..20_000).map(|_| g.next_request()).collect();
        let rate = reqs.len() as f64 / reqs[reqs.len() - 1].arrival_s;
        assert!((rate - 50.0).abs() < 2.0, "{rate}");
        let mut own: Vec<u32> = reqs.iter().map(|r| r.own_tokens).collect();
        own.sort_unstable();
        let median = own[own.len() / 2];
        assert!((190..=210).contains(&median), "{median}");
        assert!(own[0] >= 10 && own[own.len() - 1] <= 2000);
        assert!(reqs.iter().all(|r| r.output_tokens == 50));
        // Zipf: group 0 is the most popular, by about 2^1.2 over group 1.
        let count = |k| reqs.iter().filter(|r| r.group == k).count() as f64;
        let ratio = count(0) / count(1);
        assert!((2.0..2.6).contains(&ratio), "{ratio}");
        assert!(reqs.iter().all(|r| r.group < 8 && r.shared_tokens == 300));
    }

    #[test]
    fn same_seed_same_requests_and_shared_prefixes_share_tokens() {
        let c = cfg();
        let a: Vec<RequestSpec> = {
            let mut g = Generator::new(&c, 9);
            (0..100).map(|_| g.next_request()).collect()
        };
        let mut g = Generator::new(&c, 9);
        let b: Vec<RequestSpec> = (0..100).map(|_| g.next_request()).collect();
        assert_eq!(a, b);
        let mut other = Generator::new(&c, 10);
        assert_ne!(a[0], other.next_request());
        let same: Vec<&RequestSpec> = a.iter().filter(|r| r.group == a[0].group).collect();
        assert!(same.len() > 1);
        let p0 = prompt_tokens(same[0], &[]);
        let p1 = prompt_tokens(same[1], &[]);
        assert_eq!(p0[..300], p1[..300]);
        assert_ne!(p0[300..], p1[300..]);
        assert_eq!(p0.len(), 300 + same[0].own_tokens as usize);
    }

    #[test]
    fn sessions_continue_turn_by_turn_and_end() {
        let mut c = cfg();
        c.sessions = Some(Sessions {
            turns: 3,
            think_s: 2.0,
        });
        let mut g = Generator::new(&c, 3);
        let first = g.next_request();
        assert!(first.session > 0);
        let second = g.next_turn(&first, 10.0).unwrap();
        assert_eq!((second.session, second.turn), (first.session, 1));
        assert_eq!(second.arrival_s, 12.0);
        assert_eq!(second.group, first.group);
        let third = g.next_turn(&second, 20.0).unwrap();
        assert!(g.next_turn(&third, 30.0).is_none());
        // The history goes between the shared prefix and the new message.
        let hist = [7u32, 8, 9];
        let p = prompt_tokens(&second, &hist);
        assert_eq!(p[300..303], hist);
    }

    #[test]
    fn bursty_arrivals_come_faster_inside_bursts() {
        let a = Arrival::Bursty {
            rate: 10.0,
            burst_rate: 100.0,
            burst_s: 1.0,
            period_s: 10.0,
        };
        let mut rng = SplitMix64(5);
        let mut t = 0.0;
        let (mut inside, mut outside) = (0, 0);
        while t < 1000.0 {
            t = a.next(t, &mut rng);
            if t % 10.0 < 1.0 {
                inside += 1;
            } else {
                outside += 1;
            }
        }
        // Expected 100 per period inside and 90 outside.
        let ratio = f64::from(inside) / f64::from(outside);
        assert!((0.95..1.3).contains(&ratio), "{inside} {outside}");
    }

    #[test]
    fn bad_configs_are_refused_with_the_field_named() {
        let mut c = cfg();
        c.requests = 0;
        assert!(c.validate().unwrap_err().contains("workload.requests"));
        let mut c = cfg();
        c.prompt.min = 3000;
        assert!(c.validate().unwrap_err().contains("workload.prompt"));
        let mut c = cfg();
        c.arrival = Arrival::Poisson { rate: f64::NAN };
        assert!(c.validate().unwrap_err().contains("arrival.rate"));
        let mut c = cfg();
        c.groups = Some(Groups {
            count: 0,
            prefix_tokens: 1,
            zipf: 0.0,
        });
        assert!(c.validate().unwrap_err().contains("groups.count"));
        let mut c = cfg();
        c.sessions = Some(Sessions {
            turns: 2,
            think_s: -1.0,
        });
        assert!(c.validate().unwrap_err().contains("think_s"));
        assert!(cfg().validate().is_ok());
    }

    #[test]
    fn traces_parse_and_bad_lines_name_their_place() {
        let t = parse_trace("arrival_s,prompt,output,group,shared\n0.5,100,10\n1.0,200,20,3,150\n")
            .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[1].group, t[1].shared_tokens, t[1].own_tokens),
            (3, 150, 50)
        );
        for (text, want) in [
            ("", "no requests"),
            ("1.0,100", "3 to 5 columns"),
            ("x,1,1\n1.0,abc,1", "line 2, column 2"),
            ("1.0,0,1", "outside 1..="),
            ("1.0,10,1,0,11", "outside 0..=10"),
            ("2.0,10,1\n1.0,10,1", "back in time"),
            ("-1,10,1", "arrival must be"),
        ] {
            let e = parse_trace(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
