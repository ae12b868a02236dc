//! Token sampling with OpenAI semantics: greedy at temperature 0; otherwise temperature, then
//! top-k, then top-p (nucleus), drawn with a per-request seeded PRNG so a seed reproduces the
//! same tokens. Also log-probabilities (log-softmax of the raw logits) and top-N alternatives.
//!
//! Owns only reusable buffers: nothing is allocated per token once a [`Sampler`] has seen one
//! vocabulary. Never looks at text: stop strings are the runtime's job.

use crate::api::SamplingParams;
use std::hash::{BuildHasher, Hasher};

/// xoshiro256** — small, fast, and good enough for sampling; seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// A seed nobody chose (for requests without one).
    pub fn random_seed() -> u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Reusable sampling buffers.
#[derive(Debug, Default)]
pub struct Sampler {
    idx: Vec<u32>,
    probs: Vec<f32>,
}

/// Index of the largest logit (the first one on ties, as llama.cpp picks).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new() -> Sampler {
        Sampler::default()
    }

    /// Picks the next token from `logits` under `p`.
    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
        let v = logits.len();
        if v == 0 {
            return 0;
        }
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let top_k = if p.top_k == 0 {
            v
        } else {
            (p.top_k as usize).min(v)
        };
        let top_p = if p.top_p > 0.0 && p.top_p < 1.0 {
            p.top_p
        } else {
            1.0
        };
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if top_k == v && top_p >= 1.0 {
            // Plain temperature sampling: one pass, no sort.
            let mut z = 0.0f64;
            for &l in logits {
                z += (((l - max) * inv_t) as f64).exp();
            }
            let mut u = rng.next_f64() * z;
            for (i, &l) in logits.iter().enumerate() {
                u -= (((l - max) * inv_t) as f64).exp();
                if u < 0.0 {
                    return i as u32;
                }
            }
            return argmax(logits);
        }
        // Candidates: the top `k` by logit. For top-p without top-k, grow k until the kept mass
        // reaches p (the mass is usually in a few dozen tokens), so the full vocabulary is never
        // sorted.
        self.idx.clear();
        self.idx.extend(0..v as u32);
        let mut z = 0.0f64;
        for &l in logits {
            z += (((l - max) * inv_t) as f64).exp();
        }
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let mut k = if top_k < v { top_k } else { 64.min(v) };
        loop {
            if k < v {
                self.idx.select_nth_unstable_by(k - 1, by_logit);
            }
            let mass: f64 = self.idx[..k]
                .iter()
                .map(|&i| (((logits[i as usize] - max) * inv_t) as f64).exp())
                .sum::<f64>()
                / z;
            if k >= top_k || mass >= top_p as f64 || k == v {
                break;
            }
            k = (k * 4).min(v);
        }
        let k = k.min(top_k);
        let cand = &mut self.idx[..k];
        cand.sort_unstable_by(by_logit);
        self.probs.clear();
        let mut zk = 0.0f32;
        for &i in cand.iter() {
            let e = ((logits[i as usize] - max) * inv_t).exp();
            self.probs.push(e);
            zk += e;
        }
        // Nucleus: keep the smallest prefix whose probability reaches top_p (at least one).
        let mut keep = k;
        if top_p < 1.0 {
            let mut cum = 0.0f32;
            for (j, &e) in self.probs.iter().enumerate() {
                cum += e / zk;
                if cum >= top_p {
                    keep = j + 1;
                    break;
                }
            }
        }
        let total: f32 = self.probs[..keep].iter().sum();
        let mut u = rng.next_f64() as f32 * total;
        for (&tok, &e) in cand.iter().zip(&self.probs[..keep]) {
            u -= e;
            if u < 0.0 {
                return tok;
            }
        }
        cand[keep - 1]
    }

    /// Log-probability of `token` under the model (log-softmax of the raw logits) and the `n`
    /// most likely tokens with theirs, most likely first, written into `top`.
    pub fn logprobs(
        &mut self,
        logits: &[f32],
        token: u32,
        n: usize,
        top: &mut Vec<(u32, f32)>,
    ) -> f32 {
        top.clear();
        let v = logits.len();
        if v == 0 {
            return 0.0;
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max + z.ln() as f32;
        let n = n.min(v);
        if n > 0 {
            self.idx.clear();
            self.idx.extend(0..v as u32);
            let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
            if n < v {
                self.idx.select_nth_unstable_by(n - 1, by_logit);
            }
            self.idx[..n].sort_unstable_by(by_logit);
            top.extend(self.idx[..n].iter().map(|&i| (i, logits[i as usize] - lse)));
        }
        logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: u32, p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            ..SamplingParams::default()
        }
    }

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect()
    }

    #[test]
    fn greedy_and_top_k_1_pick_the_argmax() {
        let l = logits(1000, 1);
        let best = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        let mut s = Sampler::new();
        let mut rng = Rng::new(0);
        assert_eq!(s.sample(&l, &params(0.0, 0, 1.0), &mut rng), best);
        assert_eq!(s.sample(&l, &params(1.5, 1, 1.0), &mut rng), best);
        assert_eq!(s.sample(&l, &params(1.0, 0, 1e-6), &mut rng), best);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn a_seed_reproduces_its_tokens_and_other_seeds_differ() {
        let l = logits(500, 2);
        let mut s = Sampler::new();
        for p in [
            params(1.0, 0, 1.0),
            params(0.8, 40, 0.9),
            params(1.2, 0, 0.95),
        ] {
            let draw = |seed: u64, s: &mut Sampler| -> Vec<u32> {
                let mut rng = Rng::new(seed);
                (0..50).map(|_| s.sample(&l, &p, &mut rng)).collect()
            };
            let a = draw(42, &mut s);
            assert_eq!(a, draw(42, &mut s));
            assert_ne!(a, draw(43, &mut s));
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let l = logits(300, 3);
        let mut order: Vec<u32> = (0..300).collect();
        order.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]));
        let mut s = Sampler::new();
        let mut rng = Rng::new(9);
        for _ in 0..500 {
            let t = s.sample(&l, &params(2.0, 5, 1.0), &mut rng);
            assert!(order[..5].contains(&t));
        }
        // top-p: the nucleus at temperature 1.
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = l.iter().map(|v| (v - max).exp()).sum();
        let mut cum = 0.0;
        let mut nucleus = 0;
        for &i in &order {
            cum += (l[i as usize] - max).exp() / z;
            nucleus += 1;
            if cum >= 0.5 {
                break;
            }
        }
        for _ in 0..500 {
            let t = s.sample(&l, &params(1.0, 0, 0.5), &mut rng);
            assert!(order[..nucleus].contains(&t));
        }
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        let l = [0.0f32, 1.0, 2.0, -1.0];
        let z: f32 = l.iter().map(|v| v.exp()).sum();
        let mut counts = [0usize; 4];
        let mut s = Sampler::new();
        let mut rng = Rng::new(123);
        let n = 40_000;
        for _ in 0..n {
            counts[s.sample(&l, &params(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        for i in 0..4 {
            let want = l[i].exp() / z;
            let got = counts[i] as f32 / n as f32;
            assert!((want - got).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let l = logits(200, 4);
        let mut s = Sampler::new();
        let mut top = Vec::new();
        let lp = s.logprobs(&l, 7, 5, &mut top);
        let total: f32 = (0..200)
            .map(|i| s.logprobs(&l, i, 0, &mut Vec::new()).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert!(lp < 0.0);
        assert_eq!(top.len(), 5);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(top[0].0, argmax(&l));
        assert!((top[0].1 - s.logprobs(&l, top[0].0, 0, &mut Vec::new())).abs() < 1e-6);
    }
}
