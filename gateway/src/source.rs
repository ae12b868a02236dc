//! Where the gateway learns which agents exist: a static list from flags now, Kubernetes
//! discovery (EndpointSlices of `ModelDeployment` agents) behind the same [`AgentSource`] seam.
//!
//! A source publishes the full current set of agents (and, from Kubernetes, each model's own
//! routing and admission settings) whenever it changes; [`track_agents`] turns set changes into
//! router slots, capacity-stream tasks and per-model settings. Sources never talk to agents.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::capacity::{watch_agent, WatchSettings};
use super::router::Router;
use super::types::{AgentEndpoint, ModelSpecSettings};

/// What a source publishes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentSet {
    pub agents: Vec<AgentEndpoint>,
    /// Served model name → its spec's settings (empty for a static list: the flags hold).
    pub models: BTreeMap<String, ModelSpecSettings>,
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("agent discovery: {0}")]
    Discovery(String),
}

/// Publishes the set of agents the gateway should route to.
pub trait AgentSource: Send + 'static {
    /// Sends the current set on `tx` at once and again on every change; runs until the set can
    /// no longer change (a static list returns at once).
    fn run(
        self: Box<Self>,
        tx: watch::Sender<AgentSet>,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// A fixed list (the `--agent` flags, or the agents `kvroute up` started).
#[derive(Debug, Clone)]
pub struct StaticAgents(pub Vec<AgentEndpoint>);

impl AgentSource for StaticAgents {
    fn run(
        self: Box<Self>,
        tx: watch::Sender<AgentSet>,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let _ = tx.send(AgentSet {
                agents: self.0,
                models: BTreeMap::new(),
            });
            Ok(())
        })
    }
}

/// Agents discovered in Kubernetes: the ready endpoints of every ModelDeployment's agent
/// Service (`k8s::discovery`), for `kvroute gateway --kubernetes`.
pub struct KubernetesAgents {
    pub client: kube::Client,
    /// Only this namespace (`None`: all the client may list).
    pub namespace: Option<String>,
}

/// The gateway's agent set from a discovery snapshot: every model's ready agents and settings.
pub fn agent_set_of(snap: &crate::discovery::Snapshot) -> AgentSet {
    AgentSet {
        agents: endpoints_of(snap),
        models: snap
            .models
            .iter()
            .map(|(name, m)| {
                let admission = (m.admission != kvroute_crd::AdmissionSpec::default())
                    .then(|| m.admission.clone());
                (
                    name.clone(),
                    ModelSpecSettings {
                        routing: m.routing.clone(),
                        admission,
                    },
                )
            })
            .collect(),
    }
}

/// The gateway's agents from a discovery snapshot (every model's ready agents).
pub fn endpoints_of(snap: &crate::discovery::Snapshot) -> Vec<AgentEndpoint> {
    let mut out: Vec<AgentEndpoint> = snap
        .models
        .values()
        .flat_map(|m| m.agents.iter())
        .map(|a| AgentEndpoint {
            http: a
                .http
                .strip_prefix("http://")
                .unwrap_or(&a.http)
                .trim_end_matches('/')
                .to_string(),
            grpc: a.grpc.clone(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

impl AgentSource for KubernetesAgents {
    fn run(
        self: Box<Self>,
        tx: watch::Sender<AgentSet>,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let (stx, mut srx) = watch::channel(Arc::new(crate::discovery::Snapshot::default()));
            let task = tokio::spawn(crate::discovery::run(self.client, self.namespace, stx));
            // The first (empty) snapshot is skipped: it means "not listed yet", not "no agents".
            while srx.changed().await.is_ok() {
                let snap = srx.borrow_and_update().clone();
                let _ = tx.send(agent_set_of(&snap));
            }
            task.abort();
            Err(SourceError::Discovery("the Kubernetes watch ended".into()))
        })
    }
}

/// Keeps the router's agents, their capacity streams and the per-model settings in step with the
/// source's set.
pub async fn track_agents(
    router: Arc<Router>,
    mut rx: watch::Receiver<AgentSet>,
    settings: WatchSettings,
) {
    /// Aborts every capacity stream when the tracker itself is stopped.
    struct Streams(HashMap<AgentEndpoint, (usize, JoinHandle<()>)>);
    impl Drop for Streams {
        fn drop(&mut self) {
            for (_, task) in self.0.values() {
                task.abort();
            }
        }
    }
    let mut streams = Streams(HashMap::new());
    let running = &mut streams.0;
    loop {
        let AgentSet {
            agents: want,
            models,
        } = rx.borrow_and_update().clone();
        router.set_model_settings(&models);
        running.retain(|ep, (slot, task)| {
            let keep = want.contains(ep);
            if !keep {
                tracing::info!(http = %ep.http, "agent removed");
                task.abort();
                router.remove_agent(*slot);
            }
            keep
        });
        for ep in want {
            if let std::collections::hash_map::Entry::Vacant(e) = running.entry(ep) {
                let ep = e.key();
                tracing::info!(http = %ep.http, grpc = %ep.grpc, "agent added");
                let slot = router.add_agent(&ep.http);
                let task = tokio::spawn(watch_agent(
                    Arc::clone(&router),
                    slot,
                    ep.grpc.clone(),
                    settings,
                ));
                e.insert((slot, task));
            }
        }
        if rx.changed().await.is_err() {
            // The source finished: the set is final; keep the streams running.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_flags() {
        let a: AgentEndpoint = "http://127.0.0.1:8001,grpc://127.0.0.1:9001"
            .parse()
            .unwrap();
        assert_eq!(a.http, "127.0.0.1:8001");
        assert_eq!(a.grpc, "http://127.0.0.1:9001");
        let b: AgentEndpoint = "grpc://h:9,http://h:8/".parse().unwrap();
        assert_eq!(b.http, "h:8");
        for bad in [
            "",
            "http://a:1",
            "http://a:1,http://b:2",
            "http://a,grpc://b:2",
            "http://a:99999,grpc://b:2",
            "ftp://a:1,grpc://b:2",
        ] {
            assert!(bad.parse::<AgentEndpoint>().is_err(), "{bad}");
        }
    }
}
