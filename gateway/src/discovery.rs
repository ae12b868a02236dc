//! Discovery for `kvroute gateway --kubernetes`: watches ModelDeployments (routing and admission
//! settings per model) and the EndpointSlices of the agents' headless Services, and publishes a
//! [`Snapshot`] — served model name → settings + ready agent endpoints — on a
//! `tokio::sync::watch` channel every time it changes.
//!
//! Owns the mapping from Kubernetes objects to what a router needs; must never route, probe or
//! hold per-request state. [`snapshot`] is pure and unit-tested; [`watch`] runs kube's watchers
//! (LIST + WATCH, re-listing after a `410 Gone`, with backoff on errors). See
//! `docs/k8s-discovery.md`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{stream, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::watch as channel;
use tracing::{debug, warn};

use kvroute_crd::names::{
    agent_selector, GRPC_PORT, GRPC_PORT_NAME, HTTP_PORT, HTTP_PORT_NAME, LABEL_DEPLOYMENT,
};
use kvroute_crd::{AdmissionSpec, ModelDeployment, RoutingSpec};

/// One ready agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentEndpoint {
    /// Pod name (the agent's `--agent-id`), or the address when the slice names no pod.
    pub id: String,
    /// Base URL of the agent's OpenAI-compatible HTTP server, `http://IP:8000`.
    pub http: String,
    /// URL of the agent's gRPC capacity service, `http://IP:50051`.
    pub grpc: String,
}

/// Everything a gateway needs to serve one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEndpoints {
    /// Served model name (`spec.model.name`, the OpenAI `model` field).
    pub model: String,
    /// The ModelDeployment the settings come from.
    pub namespace: String,
    pub deployment: String,
    /// `spec.routing` (`None` when the spec has none: the gateway's flags apply).
    pub routing: Option<RoutingSpec>,
    pub admission: AdmissionSpec,
    /// Ready agents, sorted by id (every ModelDeployment serving this model name).
    pub agents: Vec<AgentEndpoint>,
}

/// Served model name → its settings and agents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub models: BTreeMap<String, ModelEndpoints>,
    /// ModelDeployments ignored because another one already serves the same model name
    /// (`namespace/name`); their agents are still added to the first one's.
    pub conflicts: Vec<String>,
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn port_of(slice: &EndpointSlice, name: &str, default: i32) -> i32 {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| p.port)
        .unwrap_or(default)
}

/// Ready agent endpoints of one slice. A missing `ready` condition counts as ready, as the
/// EndpointSlice API defines it; terminating endpoints are left out.
pub fn slice_agents(slice: &EndpointSlice) -> Vec<AgentEndpoint> {
    let http = port_of(slice, HTTP_PORT_NAME, HTTP_PORT);
    let grpc = port_of(slice, GRPC_PORT_NAME, GRPC_PORT);
    let mut out = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        if !ready || terminating {
            continue;
        }
        for ip in &ep.addresses {
            let id = ep
                .target_ref
                .as_ref()
                .and_then(|t| t.name.clone())
                .unwrap_or_else(|| ip.clone());
            out.push(AgentEndpoint {
                id,
                http: format!("http://{}", host_port(ip, http)),
                grpc: format!("http://{}", host_port(ip, grpc)),
            });
        }
    }
    out
}

/// Builds the snapshot from the current objects (any order).
pub fn snapshot(mds: &[Arc<ModelDeployment>], slices: &[Arc<EndpointSlice>]) -> Snapshot {
    let mut mds: Vec<&Arc<ModelDeployment>> = mds
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .collect();
    mds.sort_by_key(|m| (m.namespace().unwrap_or_default(), m.name_any()));
    // (namespace, deployment name) → model name, for attaching slices.
    let mut owner_of: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut snap = Snapshot::default();
    for md in mds {
        let ns = md.namespace().unwrap_or_default();
        let name = md.name_any();
        let model = md.spec.model.name.clone();
        owner_of.insert((ns.clone(), name.clone()), model.clone());
        if snap.models.contains_key(&model) {
            snap.conflicts.push(format!("{ns}/{name}"));
            continue;
        }
        snap.models.insert(
            model.clone(),
            ModelEndpoints {
                model,
                namespace: ns,
                deployment: name,
                routing: md.spec.routing.clone(),
                admission: md.spec.admission.clone().unwrap_or_default(),
                agents: Vec::new(),
            },
        );
    }
    for slice in slices {
        let Some(dep) = slice.labels().get(LABEL_DEPLOYMENT) else {
            continue;
        };
        let key = (slice.namespace().unwrap_or_default(), dep.clone());
        let Some(model) = owner_of.get(&key) else {
            continue;
        };
        if let Some(entry) = snap.models.get_mut(model) {
            entry.agents.extend(slice_agents(slice));
        }
    }
    for entry in snap.models.values_mut() {
        entry.agents.sort();
        entry.agents.dedup();
    }
    snap
}

/// Where to watch: one namespace or all.
fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

enum Changed {
    Deployments(bool),
    Slices(bool),
}

/// Watches until the returned task is aborted; the receiver sees a new [`Snapshot`] on every
/// change, starting once both kinds have been listed. Errors are retried with backoff (a
/// `410 Gone` re-lists), so the task never ends on its own.
pub fn watch(
    client: Client,
    namespace: Option<String>,
) -> (
    channel::Receiver<Arc<Snapshot>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = channel::channel(Arc::new(Snapshot::default()));
    let task = tokio::spawn(run(client, namespace, tx));
    (rx, task)
}

/// The loop behind [`watch`], for callers that own the sender.
pub async fn run(client: Client, namespace: Option<String>, tx: channel::Sender<Arc<Snapshot>>) {
    let (md_store, md_writer) = reflector::store::<ModelDeployment>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let mds = watcher(
        api::<ModelDeployment>(&client, namespace.as_deref()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(md_writer)
    .map(|ev| Changed::Deployments(is_init_done(&ev)));
    let slices = watcher(
        api::<EndpointSlice>(&client, namespace.as_deref()),
        watcher::Config::default().labels(&agent_selector()),
    )
    .default_backoff()
    .reflect(slice_writer)
    .map(|ev| Changed::Slices(is_init_done(&ev)));
    let mut events = std::pin::pin!(stream::select(mds, slices));
    let (mut md_listed, mut slices_listed) = (false, false);
    while let Some(changed) = events.next().await {
        match changed {
            Changed::Deployments(done) => md_listed |= done,
            Changed::Slices(done) => slices_listed |= done,
        }
        if md_listed && slices_listed {
            publish(&tx, &md_store, &slice_store);
        }
    }
    warn!("discovery watch streams ended");
}

fn is_init_done<K>(ev: &Result<watcher::Event<K>, watcher::Error>) -> bool {
    match ev {
        Ok(watcher::Event::InitDone) => true,
        Ok(_) => false,
        Err(e) => {
            warn!(error = %e, "discovery watch error; retrying with backoff");
            false
        }
    }
}

fn publish(
    tx: &channel::Sender<Arc<Snapshot>>,
    mds: &Store<ModelDeployment>,
    slices: &Store<EndpointSlice>,
) {
    let next = snapshot(&mds.state(), &slices.state());
    tx.send_if_modified(|current| {
        if **current == next {
            return false;
        }
        debug!(models = next.models.len(), "discovery snapshot changed");
        for c in &next.conflicts {
            warn!(model_deployment = %c, "serves a model name another ModelDeployment already serves");
        }
        *current = Arc::new(next);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kvroute_crd::fixtures::ModelDeploymentFixture;
    use kvroute_crd::{RoutingPolicy, RoutingSpec};

    fn slice(
        ns: &str,
        dep: &str,
        eps: &[(&str, Option<bool>, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{dep}-agents-x1")),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(
                    LABEL_DEPLOYMENT.to_string(),
                    dep.to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(ip, ready, terminating)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        terminating: *terminating,
                        serving: None,
                    }),
                    target_ref: Some(ObjectReference {
                        name: Some(format!("pod-{ip}")),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
            ports: Some(vec![
                EndpointPort {
                    name: Some("http".into()),
                    port: Some(8000),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some("grpc".into()),
                    port: Some(50051),
                    ..Default::default()
                },
            ]),
        })
    }

    fn md(ns: &str, name: &str, model: &str) -> Arc<ModelDeployment> {
        let mut m = ModelDeployment::test();
        m.metadata.name = Some(name.into());
        m.metadata.namespace = Some(ns.into());
        m.spec.model.name = model.into();
        m.spec.routing = Some(RoutingSpec {
            policy: RoutingPolicy::LeastRequests,
            weights: None,
            scorers: None,
            slo: None,
        });
        Arc::new(m)
    }

    #[test]
    fn models_get_their_ready_agents() {
        let snap = snapshot(
            &[md("default", "a", "alpha"), md("default", "b", "beta")],
            &[
                slice(
                    "default",
                    "a",
                    &[
                        ("10.0.0.1", Some(true), None),
                        ("10.0.0.2", Some(false), None),
                        ("10.0.0.3", None, None),
                    ],
                ),
                slice("default", "b", &[("10.0.1.1", Some(true), Some(true))]),
                slice("other", "a", &[("10.9.9.9", Some(true), None)]),
            ],
        );
        let alpha = &snap.models["alpha"];
        assert_eq!(
            alpha.routing.as_ref().map(|r| r.policy),
            Some(RoutingPolicy::LeastRequests)
        );
        let ids: Vec<_> = alpha.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(
            ids,
            ["pod-10.0.0.1", "pod-10.0.0.3"],
            "not-ready left out, unset ready counts as ready"
        );
        assert_eq!(alpha.agents[0].http, "http://10.0.0.1:8000");
        assert_eq!(alpha.agents[0].grpc, "http://10.0.0.1:50051");
        assert!(
            snap.models["beta"].agents.is_empty(),
            "terminating endpoints are left out"
        );
        assert!(snap.conflicts.is_empty());
    }

    #[test]
    fn duplicate_model_names_merge_agents_and_report_a_conflict() {
        let snap = snapshot(
            &[md("z", "late", "alpha"), md("a", "early", "alpha")],
            &[
                slice("a", "early", &[("10.0.0.1", None, None)]),
                slice("z", "late", &[("10.0.0.2", None, None)]),
            ],
        );
        let alpha = &snap.models["alpha"];
        assert_eq!(
            (alpha.namespace.as_str(), alpha.deployment.as_str()),
            ("a", "early")
        );
        assert_eq!(alpha.agents.len(), 2);
        assert_eq!(snap.conflicts, ["z/late"]);
    }

    #[test]
    fn ipv6_and_custom_ports() {
        let mut s = (*slice("default", "a", &[("fd00::5", None, None)])).clone();
        s.ports = Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(9000),
            ..Default::default()
        }]);
        let agents = slice_agents(&s);
        assert_eq!(agents[0].http, "http://[fd00::5]:9000");
        assert_eq!(agents[0].grpc, "http://[fd00::5]:50051");
    }
}
