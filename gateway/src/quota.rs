//! Guardrails per API key: prompt and output token caps, tokens per minute, requests in flight.
//!
//! A request's *cost* is its prompt tokens plus the output tokens reserved for it (its
//! `max_tokens`, or what the gateway reserves when it names none); it is charged when the
//! request is admitted, whether or not it generates them all. Tokens per minute is a token
//! bucket of that many tokens, refilled continuously (a full minute's budget may be spent at
//! once). Concurrency counts requests from admission (queued or running) to their end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A key's limits (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyLimits {
    pub max_prompt_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u32>,
}

impl KeyLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == KeyLimits::default()
    }
}

/// Why a request was held back by its key's limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Over {
    /// Can never pass (400): the message names the limit; `param` the request field.
    TooLarge {
        message: String,
        param: &'static str,
    },
    /// Not now (429): retry after this many seconds.
    Busy { message: String, retry_after_s: u64 },
}

#[derive(Debug)]
struct Usage {
    inflight: u32,
    /// Tokens left in the bucket as of `at`.
    tokens: f64,
    at: Instant,
}

/// The usage of every key that has limits, by key name (at most one entry per name ever
/// loaded from the key file, so bounded by it).
#[derive(Debug, Default)]
pub struct Quotas {
    by_key: Mutex<HashMap<String, Usage>>,
}

/// A request admitted under its key's concurrency limit; dropping it ends the request there.
#[derive(Debug)]
pub struct Permit {
    quotas: Arc<Quotas>,
    key: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut map = self.quotas.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get_mut(&self.key) {
            u.inflight = u.inflight.saturating_sub(1);
        }
    }
}

impl Quotas {
    /// Checks a request of `prompt` + `output` tokens from key `key` against `limits` at
    /// `now`; on success charges it and returns its permit (`None` when the key has no limits).
    pub fn admit(
        self: &Arc<Self>,
        key: &str,
        limits: &KeyLimits,
        prompt: u64,
        output: u64,
        now: Instant,
    ) -> Result<Option<Permit>, Over> {
        if limits.is_unlimited() {
            return Ok(None);
        }
        if let Some(m) = limits.max_prompt_tokens.filter(|&m| prompt > m) {
            return Err(Over::TooLarge {
                message: format!(
                    "this prompt has {prompt} tokens; this API key allows at most {m}"
                ),
                param: "messages",
            });
        }
        if let Some(m) = limits.max_output_tokens.filter(|&m| output > m) {
            return Err(Over::TooLarge {
                message: format!(
                    "this request asks for {output} output tokens; this API key allows at most {m}"
                ),
                param: "max_tokens",
            });
        }
        let cost = prompt + output;
        if let Some(tpm) = limits.tokens_per_minute.filter(|&t| cost > t) {
            return Err(Over::TooLarge {
                message: format!(
                    "this request costs {cost} tokens (prompt + max_tokens), more than this API \
                     key's {tpm} tokens per minute"
                ),
                param: "max_tokens",
            });
        }
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let u = map.entry(key.to_string()).or_insert_with(|| Usage {
            inflight: 0,
            tokens: limits.tokens_per_minute.unwrap_or(0) as f64,
            at: now,
        });
        if let Some(m) = limits.max_concurrent.filter(|&m| u.inflight >= m) {
            return Err(Over::Busy {
                message: format!(
                    "this API key has {m} requests in flight, its limit; retry when one ends"
                ),
                retry_after_s: 1,
            });
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let rate = tpm as f64 / 60.0;
            let elapsed = now.saturating_duration_since(u.at).as_secs_f64();
            u.tokens = (u.tokens + elapsed * rate).min(tpm as f64);
            u.at = now;
            let cost = cost as f64;
            if u.tokens < cost {
                let wait = ((cost - u.tokens) / rate).ceil().max(1.0) as u64;
                return Err(Over::Busy {
                    message: format!(
                        "this API key has used its {tpm} tokens per minute; retry in {wait} s"
                    ),
                    retry_after_s: wait,
                });
            }
            u.tokens -= cost;
        }
        u.inflight += 1;
        Ok(Some(Permit {
            quotas: Arc::clone(self),
            key: key.to_string(),
        }))
    }

    /// Requests in flight for `key` under its limits.
    pub fn inflight(&self, key: &str) -> u32 {
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).map_or(0, |u| u.inflight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tpm(n: u64) -> KeyLimits {
        KeyLimits {
            tokens_per_minute: Some(n),
            ..KeyLimits::default()
        }
    }

    #[test]
    fn unlimited_keys_get_no_permit_and_are_not_tracked() {
        let q = Arc::new(Quotas::default());
        let t = Instant::now();
        assert!(q
            .admit("k", &KeyLimits::default(), 1 << 40, 1 << 40, t)
            .unwrap()
            .is_none());
        assert_eq!(q.by_key.lock().unwrap().len(), 0);
    }

    #[test]
    fn token_caps_refuse_for_good() {
        let q = Arc::new(Quotas::default());
        let l = KeyLimits {
            max_prompt_tokens: Some(100),
            max_output_tokens: Some(10),
            ..KeyLimits::default()
        };
        let t = Instant::now();
        assert!(matches!(
            q.admit("k", &l, 101, 1, t),
            Err(Over::TooLarge {
                param: "messages",
                ..
            })
        ));
        assert!(matches!(
            q.admit("k", &l, 1, 11, t),
            Err(Over::TooLarge {
                param: "max_tokens",
                ..
            })
        ));
        assert!(q.admit("k", &l, 100, 10, t).unwrap().is_some());
        assert!(matches!(
            q.admit("k", &tpm(50), 40, 11, t),
            Err(Over::TooLarge { .. })
        ));
    }

    #[test]
    fn a_minute_of_tokens_then_429_with_the_wait_until_the_bucket_refills() {
        let q = Arc::new(Quotas::default());
        let l = tpm(600); // 10 tokens a second
        let t0 = Instant::now();
        for _ in 0..6 {
            drop(q.admit("k", &l, 90, 10, t0).unwrap());
        }
        match q.admit("k", &l, 90, 10, t0) {
            Err(Over::Busy { retry_after_s, .. }) => assert_eq!(retry_after_s, 10),
            other => panic!("{other:?}"),
        }
        // 5 s later: 50 tokens back, still short by 50.
        match q.admit("k", &l, 90, 10, t0 + Duration::from_secs(5)) {
            Err(Over::Busy { retry_after_s, .. }) => assert_eq!(retry_after_s, 5),
            other => panic!("{other:?}"),
        }
        assert!(q
            .admit("k", &l, 90, 10, t0 + Duration::from_secs(10))
            .is_ok());
        // Other keys have their own buckets; a long pause refills no more than one minute.
        assert!(q.admit("other", &l, 500, 100, t0).is_ok());
        let t1 = t0 + Duration::from_secs(3600);
        assert!(q.admit("k", &l, 500, 100, t1).is_ok());
        assert!(q.admit("k", &l, 1, 0, t1).is_err());
    }

    #[test]
    fn concurrency_counts_permits_until_dropped() {
        let q = Arc::new(Quotas::default());
        let l = KeyLimits {
            max_concurrent: Some(2),
            ..KeyLimits::default()
        };
        let t = Instant::now();
        let a = q.admit("k", &l, 1, 1, t).unwrap();
        let _b = q.admit("k", &l, 1, 1, t).unwrap();
        assert!(matches!(
            q.admit("k", &l, 1, 1, t),
            Err(Over::Busy {
                retry_after_s: 1,
                ..
            })
        ));
        assert_eq!(q.inflight("k"), 2);
        drop(a);
        assert_eq!(q.inflight("k"), 1);
        assert!(q.admit("k", &l, 1, 1, t).is_ok());
    }
}
