//! Status of a `ModelDeployment`: conditions, replica counts and KV capacity, computed purely
//! from what `reconcile` observed, plus the Events worth emitting on a transition.
//!
//! Must never do I/O; the clock comes in as an argument.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kvroute_proto::CapacityReport;

use crate::controller::desired::{selector_string, AgentDefaults};
use kvroute_crd::{KvStatus, ModelDeployment, ModelDeploymentStatus};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What `reconcile` saw of the agent workload and the agents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Agents the workload wants (Deployment replicas, DaemonSet desiredNumberScheduled).
    pub desired: i32,
    /// Agent pods that exist.
    pub replicas: i32,
    /// Agent pods that are ready.
    pub ready: i32,
    /// Agent pods on the current template.
    pub updated: i32,
    /// `GetCapacity` answers of ready agents.
    pub reports: Vec<CapacityReport>,
    /// Ready agents that did not answer `GetCapacity`.
    pub unreachable: Vec<String>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    md: &ModelDeployment,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: md.metadata.generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change.
fn carry_transition_times(previous: &[Condition], next: &mut [Condition]) {
    for c in next.iter_mut() {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_) {
            if p.status == c.status {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }
}

fn previous_conditions(md: &ModelDeployment) -> &[Condition] {
    md.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[])
}

/// Sums the agents' reports (agents of one deployment share a block size; the first one wins
/// if they somehow differ).
pub fn aggregate_kv(reports: &[CapacityReport]) -> Option<KvStatus> {
    let first = reports.first()?;
    let total: u64 = reports
        .iter()
        .map(|r| r.total_blocks)
        .fold(0, u64::saturating_add);
    let free: u64 = reports
        .iter()
        .map(|r| r.free_blocks.min(r.total_blocks))
        .fold(0, u64::saturating_add);
    let usage = if total == 0 {
        0.0
    } else {
        100.0 * (total - free) as f64 / total as f64
    };
    Some(KvStatus {
        block_size: first.block_size,
        total_blocks: total,
        free_blocks: free,
        usage: format!("{usage:.1}%"),
        agents_reporting: u32::try_from(reports.len()).unwrap_or(u32::MAX),
    })
}

/// Status of a valid deployment from what was observed.
pub fn compute_status(
    md: &ModelDeployment,
    obs: &Observed,
    defaults: &AgentDefaults,
    now: &Time,
) -> ModelDeploymentStatus {
    let name = md.metadata.name.clone().unwrap_or_default();
    let ready_ok = obs.desired > 0 && obs.ready >= obs.desired;
    let (ready_reason, ready_msg) = if ready_ok {
        (
            "AgentsReady",
            format!("{}/{} agents ready", obs.ready, obs.desired),
        )
    } else if obs.desired == 0 {
        ("ScaledToZero", "no agents wanted".to_string())
    } else {
        (
            "AgentsNotReady",
            format!("{}/{} agents ready", obs.ready, obs.desired),
        )
    };
    let rolling =
        obs.updated < obs.desired || obs.replicas != obs.desired || obs.ready < obs.desired;
    let (prog_reason, prog_msg) = if rolling {
        (
            "RollingOut",
            format!(
                "{} updated, {} ready of {}",
                obs.updated, obs.ready, obs.desired
            ),
        )
    } else {
        ("Complete", "all agents are on the current spec".to_string())
    };
    let degraded = !obs.unreachable.is_empty();
    let (deg_reason, deg_msg) = if degraded {
        (
            "CapacityUnreachable",
            format!("GetCapacity failed for: {}", obs.unreachable.join(", ")),
        )
    } else {
        ("AsExpected", String::new())
    };
    let mut conditions = vec![
        condition(READY, ready_ok, ready_reason, ready_msg, md, now),
        condition(PROGRESSING, rolling, prog_reason, prog_msg, md, now),
        condition(DEGRADED, degraded, deg_reason, deg_msg, md, now),
    ];
    carry_transition_times(previous_conditions(md), &mut conditions);
    ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        conditions,
        replicas: obs.replicas,
        ready_replicas: obs.ready,
        selector: Some(selector_string(&name)),
        kv: aggregate_kv(&obs.reports),
        endpoint: defaults.gateway_endpoint.clone(),
        autoscaling: None,
    }
}

/// Status of a deployment whose spec cannot be turned into objects: Degraded, not Ready.
pub fn invalid_status(md: &ModelDeployment, message: String, now: &Time) -> ModelDeploymentStatus {
    let prev = md.status.clone().unwrap_or_default();
    let mut conditions = vec![
        condition(READY, false, "InvalidSpec", message.clone(), md, now),
        condition(PROGRESSING, false, "InvalidSpec", message.clone(), md, now),
        condition(DEGRADED, true, "InvalidSpec", message, md, now),
    ];
    carry_transition_times(&prev.conditions, &mut conditions);
    ModelDeploymentStatus {
        observed_generation: md.metadata.generation,
        conditions,
        ..prev
    }
}

/// An Event to publish on a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

fn status_of<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Events for the condition changes between `previous` and `next` (none when nothing changed).
pub fn transitions(previous: &[Condition], next: &[Condition]) -> Vec<Transition> {
    let mut out = Vec::new();
    let changed = |t: &str| -> Option<&Condition> {
        let n = status_of(next, t)?;
        let was = status_of(previous, t);
        (was.map(|p| (&p.status, &p.reason)) != Some((&n.status, &n.reason))).then_some(n)
    };
    if let Some(c) = changed(READY) {
        if c.status == "True" {
            out.push(Transition {
                warning: false,
                reason: "Ready".into(),
                note: c.message.clone(),
            });
        } else if status_of(previous, READY).is_some_and(|p| p.status == "True") {
            out.push(Transition {
                warning: true,
                reason: "NotReady".into(),
                note: c.message.clone(),
            });
        }
    }
    if let Some(c) = changed(DEGRADED) {
        if c.status == "True" {
            out.push(Transition {
                warning: true,
                reason: c.reason.clone(),
                note: c.message.clone(),
            });
        } else if status_of(previous, DEGRADED).is_some_and(|p| p.status == "True") {
            out.push(Transition {
                warning: false,
                reason: "Recovered".into(),
                note: "no longer degraded".into(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use kvroute_crd::fixtures::ModelDeploymentFixture;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn report(total: u64, free: u64) -> CapacityReport {
        CapacityReport {
            block_size: 16,
            total_blocks: total,
            free_blocks: free,
            ..Default::default()
        }
    }

    fn cond<'a>(s: &'a ModelDeploymentStatus, t: &str) -> &'a Condition {
        status_of(&s.conditions, t).unwrap()
    }

    #[test]
    fn kv_is_summed_and_clamped() {
        let kv = aggregate_kv(&[report(100, 25), report(300, 400)]).unwrap();
        assert_eq!(
            (kv.total_blocks, kv.free_blocks, kv.agents_reporting),
            (400, 325, 2)
        );
        assert_eq!(kv.usage, "18.8%");
        assert_eq!(aggregate_kv(&[]), None);
        assert_eq!(aggregate_kv(&[report(0, 0)]).unwrap().usage, "0.0%");
    }

    #[test]
    fn ready_progressing_degraded() {
        let md = ModelDeployment::test().with_replicas(2).with_generation(4);
        let d = AgentDefaults {
            gateway_endpoint: Some("http://gw:8080".into()),
            ..Default::default()
        };
        let half = Observed {
            desired: 2,
            replicas: 2,
            ready: 1,
            updated: 2,
            reports: vec![report(10, 5)],
            unreachable: vec![],
        };
        let s = compute_status(&md, &half, &d, &at(100));
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(cond(&s, PROGRESSING).status, "True");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.selector.as_deref(), Some("app.kubernetes.io/component=agent,app.kubernetes.io/part-of=kvroute,kvroute.dev/model-deployment=smollm"));
        assert_eq!(s.endpoint.as_deref(), Some("http://gw:8080"));

        let mut md2 = md.clone();
        md2.status = Some(s.clone());
        let full = Observed {
            ready: 2,
            reports: vec![report(10, 5), report(10, 10)],
            unreachable: vec!["p1".into()],
            ..half
        };
        let s2 = compute_status(&md2, &full, &d, &at(200));
        assert_eq!(cond(&s2, READY).status, "True");
        assert_eq!(cond(&s2, READY).last_transition_time, at(200));
        assert_eq!(cond(&s2, PROGRESSING).status, "False");
        assert_eq!(cond(&s2, DEGRADED).status, "True");
        assert_eq!(cond(&s2, DEGRADED).reason, "CapacityUnreachable");
        assert_eq!(s2.kv.as_ref().unwrap().free_blocks, 15);

        let ev = transitions(&s.conditions, &s2.conditions);
        assert_eq!(
            ev.iter().map(|t| t.reason.as_str()).collect::<Vec<_>>(),
            ["Ready", "CapacityUnreachable"]
        );
        assert!(
            transitions(&s2.conditions, &s2.conditions).is_empty(),
            "no change, no event"
        );

        // An unchanged status keeps its transition time.
        md2.status = Some(s2.clone());
        let s3 = compute_status(&md2, &full, &d, &at(300));
        assert_eq!(cond(&s3, READY).last_transition_time, at(200));
    }

    #[test]
    fn scaled_to_zero_is_not_ready_and_not_a_warning() {
        let md = ModelDeployment::test().with_replicas(0);
        let s = compute_status(&md, &Observed::default(), &AgentDefaults::default(), &at(1));
        assert_eq!(cond(&s, READY).reason, "ScaledToZero");
        assert!(transitions(&[], &s.conditions).is_empty());
    }

    #[test]
    fn invalid_spec_is_degraded_with_event() {
        let md = ModelDeployment::test();
        let s = invalid_status(&md, "exactly one source".into(), &at(5));
        assert_eq!(cond(&s, DEGRADED).reason, "InvalidSpec");
        let ev = transitions(&[], &s.conditions);
        assert_eq!(
            ev,
            vec![Transition {
                warning: true,
                reason: "InvalidSpec".into(),
                note: "exactly one source".into()
            }]
        );
    }
}
