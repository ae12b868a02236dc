//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas are safe:
//! only the holder reconciles.
//!
//! [`decide`] is the pure rule (who may take the lease, when); [`LeaseLock::try_acquire`] does one
//! round trip with optimistic concurrency (`resourceVersion`), so two candidates never both win.
//! Must never hold the lease past `lease_duration` without renewing it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

/// Lease errors other than losing a race (a lost race is just "not leader").
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("lost the lease {0}")]
    Lost(String),
}

/// What a candidate should do with the lease as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it but let it expire (or it has no holder): take it over.
    TakeOver,
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// The election rule, from the lease's spec and the clock.
pub fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let secs = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    let last = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    let expired = match last {
        None => true,
        Some(t) => {
            // |age| > duration: too old, or so far in the future that the clock is not trusted.
            now.duration_since(t).unsigned_abs() > secs
        }
    };
    if expired {
        Decision::TakeOver
    } else {
        Decision::Follow {
            holder: holder.to_string(),
        }
    }
}

/// One candidate's handle on the lease.
#[derive(Clone)]
pub struct LeaseLock {
    pub api: Api<Lease>,
    pub name: String,
    pub holder: String,
    pub duration: Duration,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    fn spec(&self, now: Timestamp, previous: Option<&LeaseSpec>, transition: bool) -> LeaseSpec {
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if transition {
                Some(MicroTime(now))
            } else {
                previous
                    .and_then(|p| p.acquire_time.clone())
                    .or(Some(MicroTime(now)))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if transition {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..Default::default()
        }
    }

    /// One election round: returns whether this candidate holds the lease afterwards.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, LeaseError> {
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.holder,
            now,
            self.duration,
        );
        match decision {
            Decision::Follow { .. } => Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, false)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Decision::Renew | Decision::TakeOver => {
                let Some(mut lease) = current else {
                    return Ok(false);
                };
                let transition = decision == Decision::TakeOver;
                lease.spec = Some(self.spec(now, lease.spec.as_ref(), transition));
                // `replace` carries metadata.resourceVersion: a concurrent writer makes it 409.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Gives the lease up (on graceful shutdown) so another candidate takes over at once
    /// instead of after `duration`. Does nothing unless this candidate holds it.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                info!(lease = %self.name, holder = %self.holder, "released leadership");
                Ok(())
            }
            // Someone else wrote it meanwhile: it is not ours to release any more.
            Err(e) if conflict(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks until this candidate holds the lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) -> Result<(), LeaseError> {
        loop {
            match self.try_acquire(Timestamp::now()).await {
                Ok(true) => {
                    info!(lease = %self.name, holder = %self.holder, "became leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => warn!(lease = %self.name, error = %e, "lease round failed"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every `every` while leading; returns `Lost` once a renewal fails to hold the lease
    /// or errors persist past the lease duration (the caller must stop reconciling).
    pub async fn keep(&self, every: Duration) -> LeaseError {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.try_acquire(Timestamp::now()).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return LeaseError::Lost(self.name.clone()),
                Err(e) => {
                    warn!(lease = %self.name, error = %e, "renewing lease failed");
                    if last_ok.elapsed() > self.duration {
                        return LeaseError::Lost(self.name.clone());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(ts(renewed))),
            ..Default::default()
        }
    }

    #[test]
    fn election_rule() {
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", ts(100), d), Decision::Create);
        assert_eq!(
            decide(Some(&held("a", 10)), "a", ts(100), d),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held("b", 95)), "a", ts(100), d),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&held("b", 80)), "a", ts(100), d),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&held("", 99)), "a", ts(100), d),
            Decision::TakeOver
        );
        // A renew time slightly in the future (clock skew) is live; far in the future is not.
        assert_eq!(
            decide(Some(&held("b", 105)), "a", ts(100), d),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&held("b", 200)), "a", ts(100), d),
            Decision::TakeOver
        );
        let no_time = LeaseSpec {
            holder_identity: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(decide(Some(&no_time), "a", ts(100), d), Decision::TakeOver);
    }
}
