//! The ModelDeployment controller (`kvroute operator`): reconciles each ModelDeployment into its
//! agent workload, headless Service and PodDisruptionBudget, and writes its status (replicas,
//! conditions, KV capacity from the agents' `GetCapacity`).
//!
//! Owns `Context`, `reconcile`, `error_policy` and `run`. Desired objects come from the pure
//! [`desired::desired`]; status from the pure [`status`]. Must never delete what it does not own
//! (owner references let the garbage collector remove children of a deleted ModelDeployment).

pub mod app;
pub mod autoscale;
pub mod capacity;
pub mod desired;
pub mod metrics;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::k8s::{FIELD_MANAGER, GRPC_PORT};
use capacity::CapacityProbe;
use desired::{desired, selector_string, AgentDefaults, DesiredError, Workload};
use kvroute_crd::ModelDeployment;
use metrics::Metrics;
use status::Observed;

/// Controller errors. Invalid specs are not errors (they become a Degraded status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    MissingMeta(&'static str),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short stable label for `kvroute_operator_reconcile_errors_total{error=...}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "kube_api",
            Error::Kube(_) => "kube_client",
            Error::MissingMeta(_) => "missing_meta",
            Error::Serialize(_) => "serialize",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

/// Requeue intervals.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Refresh of status (KV capacity) when all is well.
    pub resync: Duration,
    /// Refresh while agents are coming up or an agent is unreachable.
    pub progressing: Duration,
    /// First retry after an error; doubles per consecutive failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(30),
            progressing: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// What reconcile and error_policy share.
pub struct Context {
    pub client: Client,
    pub defaults: AgentDefaults,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub capacity: Arc<dyn CapacityProbe>,
    pub timing: Timing,
    /// Consecutive failures per object, for error_policy's backoff; cleared on success.
    failures: Mutex<HashMap<ObjectRef<ModelDeployment>, u32>>,
    /// Each autoscaled object's recent needs (`spec.autoscaling`).
    autoscalers: Mutex<HashMap<ObjectRef<ModelDeployment>, autoscale::Autoscaler>>,
    /// The autoscalers' clock.
    started: Instant,
}

impl Context {
    pub fn new(
        client: Client,
        defaults: AgentDefaults,
        metrics: Arc<Metrics>,
        capacity: Arc<dyn CapacityProbe>,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            capacity,
            timing: Timing::default(),
            failures: Mutex::new(HashMap::new()),
            autoscalers: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    fn clear_failures(&self, obj: &ModelDeployment) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&ObjectRef::from_obj(obj));
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Brings the children of one ModelDeployment to their desired state and writes its status.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed());
    if result.is_ok() {
        ctx.clear_failures(&md);
    }
    result
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action> {
    if md.meta().deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        debug!(name = %md.name_any(), "being deleted; nothing to do");
        return Ok(Action::await_change());
    }
    let ns = md.namespace().ok_or(Error::MissingMeta("namespace"))?;
    let name = md.name_any();
    let client = &ctx.client;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let now = Time(Timestamp::now());

    let desired = match desired(md, &ctx.defaults) {
        Ok(d) => d,
        Err(DesiredError::MissingMeta(what)) => return Err(Error::MissingMeta(what)),
        Err(e) => {
            warn!(%name, namespace = %ns, error = %e, "invalid spec");
            let st = status::invalid_status(md, e.to_string(), &now);
            patch_status(&mds, md, &name, &st, ctx).await?;
            return Ok(Action::requeue(ctx.timing.resync));
        }
    };

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc_name = desired.service.name_any();
    services
        .patch(&svc_name, &apply_params(), &Patch::Apply(&desired.service))
        .await?;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    budgets
        .patch(
            &desired.disruption_budget.name_any(),
            &apply_params(),
            &Patch::Apply(&desired.disruption_budget),
        )
        .await?;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
    let mut observed = match &desired.workload {
        Workload::Deployment(d) => {
            let applied = deployments
                .patch(&d.name_any(), &apply_params(), &Patch::Apply(d.as_ref()))
                .await?;
            delete_stale(&daemonsets, &d.name_any(), md).await?;
            let st = applied.status.unwrap_or_default();
            Observed {
                desired: md.spec.replicas,
                replicas: st.replicas.unwrap_or(0),
                ready: st.ready_replicas.unwrap_or(0),
                updated: st.updated_replicas.unwrap_or(0),
                ..Default::default()
            }
        }
        Workload::DaemonSet(d) => {
            let applied = daemonsets
                .patch(&d.name_any(), &apply_params(), &Patch::Apply(d.as_ref()))
                .await?;
            delete_stale(&deployments, &d.name_any(), md).await?;
            let st = applied.status.unwrap_or_default();
            Observed {
                desired: st.desired_number_scheduled,
                replicas: st.current_number_scheduled,
                ready: st.number_ready,
                updated: st.updated_number_scheduled.unwrap_or(0),
                ..Default::default()
            }
        }
    };

    // KV capacity from every ready agent pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let listed = pods
        .list(&ListParams::default().labels(&selector_string(&name)))
        .await?;
    let targets: Vec<(String, String)> = listed
        .items
        .iter()
        .filter(|p| pod_ready(p))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((
                p.name_any(),
                format!("http://{}", host_port(&ip, GRPC_PORT)),
            ))
        })
        .collect();
    let answers = futures::future::join_all(
        targets
            .iter()
            .map(|(_, endpoint)| ctx.capacity.get_capacity(endpoint.clone())),
    )
    .await;
    for ((pod, endpoint), answer) in targets.into_iter().zip(answers) {
        match answer {
            Ok(report) => observed.reports.push(report),
            Err(e) => {
                debug!(%pod, %endpoint, error = %e, "GetCapacity failed");
                observed.unreachable.push(pod);
            }
        }
    }

    let mut st = status::compute_status(md, &observed, &ctx.defaults, &now);
    if let (Some(spec), Workload::Deployment(_)) = (&md.spec.autoscaling, &desired.workload) {
        st.autoscaling = Some(autoscale_step(md, spec, &observed, &mds, ctx).await?);
    }
    patch_status(&mds, md, &name, &st, ctx).await?;
    info!(
        %name, namespace = %ns, ready = observed.ready, desired = observed.desired,
        free_blocks = st.kv.as_ref().map(|k| k.free_blocks).unwrap_or(0), "reconciled"
    );
    let settled = observed.ready >= observed.desired && observed.unreachable.is_empty();
    Ok(Action::requeue(if settled {
        ctx.timing.resync
    } else {
        ctx.timing.progressing
    }))
}

/// Feeds the agents' reports to the object's autoscaler and applies its decision through the
/// scale subresource (an Event says why). The agents' own queues are what the operator sees;
/// the gateway's queue is in its `kvroute_gateway_model_kv_*` metrics.
async fn autoscale_step(
    md: &ModelDeployment,
    spec: &kvroute_crd::AutoscalingSpec,
    observed: &Observed,
    mds: &Api<ModelDeployment>,
    ctx: &Context,
) -> Result<kvroute_crd::AutoscalingStatus> {
    // Checked by `desired` already; a failure here would be a bug, not bad input.
    let policy = spec
        .policy()
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let signal = autoscale::signal_of(&observed.reports);
    let current = u32::try_from(md.spec.replicas).unwrap_or(0);
    let now = ctx.started.elapsed();
    let decision = {
        let mut all = ctx.autoscalers.lock().unwrap_or_else(|p| p.into_inner());
        let a = all.entry(ObjectRef::from_obj(md)).or_default();
        a.observe(&policy, now, &signal);
        a.decide(&policy, now, current)
    };
    if decision.replicas != current {
        let name = md.name_any();
        info!(%name, from = current, to = decision.replicas, reason = %decision.reason, "autoscaling");
        mds.patch_scale(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": decision.replicas}})),
        )
        .await?;
        let ev = Event {
            type_: EventType::Normal,
            reason: "Scaled".into(),
            note: Some(format!(
                "{current} → {} replicas: {}",
                decision.replicas, decision.reason
            )),
            action: "Autoscale".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
            warn!(%name, error = %e, "publishing event failed");
        }
    }
    Ok(kvroute_crd::AutoscalingStatus {
        desired_replicas: decision.replicas,
        demand_blocks: signal.demand_blocks(),
        shortfall_blocks: signal.shortfall_blocks,
        reason: decision.reason,
    })
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Deletes the workload of the other kind (after a perNode switch) if this deployment owns it.
async fn delete_stale<K>(api: &Api<K>, name: &str, md: &ModelDeployment) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(existing) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = md.uid();
    let owned = existing
        .meta()
        .owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| Some(&r.uid) == uid.as_ref()));
    if owned {
        info!(%name, "deleting workload of the previous placement");
        match api.delete(name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn patch_status(
    api: &Api<ModelDeployment>,
    md: &ModelDeployment,
    name: &str,
    st: &kvroute_crd::ModelDeploymentStatus,
    ctx: &Context,
) -> Result<()> {
    if md.status.as_ref() == Some(st) {
        // Nothing changed: no write, so no watch event that would trigger another reconcile.
        return Ok(());
    }
    let previous = md
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let patch = json!({
        "apiVersion": "kvroute.dev/v1alpha1",
        "kind": "ModelDeployment",
        "status": st,
    });
    api.patch_status(name, &apply_params(), &Patch::Apply(&patch))
        .await?;
    let reference = md.object_ref(&());
    for t in status::transitions(&previous, &st.conditions) {
        let ev = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason,
            note: Some(t.note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event that cannot be written must not fail the reconcile.
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(%name, error = %e, "publishing event failed");
        }
    }
    Ok(())
}

/// Counts the failure and requeues with exponential backoff per object.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.observe_failure(error.metric_label());
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from_obj(md.as_ref())).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(&ctx.timing, n);
    warn!(name = %md.name_any(), error = %error, attempt = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// `base * 2^(attempt-1)`, capped at `max`.
pub fn backoff(t: &Timing, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    t.backoff_base.saturating_mul(factor).min(t.backoff_max)
}

/// Runs the controller until the stream ends (shutdown signal).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (mds, deps, dss, svcs) = match &namespace {
        Some(ns) => (
            Api::<ModelDeployment>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<DaemonSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let owned = watcher::Config::default().labels(&crate::k8s::agent_selector());
    Controller::new(mds, watcher::Config::default())
        .owns(deps, owned.clone())
        .owns(dss, owned.clone())
        .owns(svcs, owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(object = %obj, "reconciled"),
                Err(e) => warn!(error = %e, "controller"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let t = Timing::default();
        assert_eq!(backoff(&t, 1), Duration::from_secs(1));
        assert_eq!(backoff(&t, 2), Duration::from_secs(2));
        assert_eq!(backoff(&t, 5), Duration::from_secs(16));
        assert_eq!(backoff(&t, 20), Duration::from_secs(300));
        assert_eq!(backoff(&t, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn ipv6_targets_are_bracketed() {
        assert_eq!(host_port("10.0.0.1", 50051), "10.0.0.1:50051");
        assert_eq!(host_port("fd00::1", 50051), "[fd00::1]:50051");
    }
}
