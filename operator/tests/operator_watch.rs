#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The whole controller (`controller::run`: kube's Controller with its watches of
//! ModelDeployments and owned Deployments / DaemonSets / Services) against a fake API server on
//! 127.0.0.1: it reconciles what the first LIST shows, re-lists after a `410 Gone` and
//! reconciles what only the re-list reveals, and re-applies on a live spec change.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{model_deployment, FakeApiServer};
use kvroute_operator::controller::capacity::GrpcCapacity;
use kvroute_operator::controller::desired::AgentDefaults;
use kvroute_operator::controller::metrics::Metrics;
use kvroute_operator::controller::{run, Context};

/// Polls the fake server's request log until `pred` holds (a hang guard, not a timed assertion).
async fn until(api: &FakeApiServer, what: &str, pred: impl Fn(&[String]) -> bool) {
    let wait = async {
        loop {
            if pred(&api.log()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("operator never did: {what}; requests: {:#?}", api.log()));
}

fn has(log: &[String], line: &str) -> bool {
    log.iter().any(|l| l == line)
}

#[tokio::test]
async fn reconciles_listed_objects_relists_after_410_and_follows_spec_changes() {
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "a", "alpha"),
        1,
    );
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "b", "beta"),
        2,
    );
    api.gone_on_next_watch("modeldeployments", 1);

    let metrics = Arc::new(Metrics::default());
    let ctx = Context::new(
        api.client(),
        AgentDefaults::default(),
        metrics.clone(),
        Arc::new(GrpcCapacity::default()),
        "kvroute-operator".to_string().into(),
    );
    let task = tokio::spawn(run(Arc::new(ctx), Some("default".into())));

    until(&api, "apply a's Deployment and status", |l| {
        has(
            l,
            "PATCH /apis/apps/v1/namespaces/default/deployments/a-agent",
        ) && has(
            l,
            "PATCH /apis/kvroute.dev/v1alpha1/namespaces/default/modeldeployments/a/status",
        )
    })
    .await;
    until(&api, "re-list and reconcile b", |l| {
        has(
            l,
            "PATCH /apis/apps/v1/namespaces/default/deployments/b-agent",
        ) && has(l, "PATCH /api/v1/namespaces/default/services/b-agents")
    })
    .await;
    assert!(
        api.lists("modeldeployments") >= 2,
        "b is only visible to a re-list"
    );
    // Owned kinds are watched too (so a deleted Deployment is recreated).
    for kind in ["deployments", "daemonsets", "services"] {
        assert!(api.lists(kind) >= 1, "no LIST of owned {kind}");
    }

    // A live spec change (replicas 1 → 3) is applied.
    let mut changed = model_deployment("default", "a", "alpha");
    changed["spec"]["replicas"] = 3.into();
    changed["metadata"]["generation"] = 2.into();
    api.event("modeldeployments", "MODIFIED", changed);
    let wait = async {
        loop {
            let client = api.client();
            let deps: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
                kube::Api::namespaced(client, "default");
            if let Ok(d) = deps.get("a-agent").await {
                if d.spec.replicas == Some(3) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the new replica count was never applied");
    assert!(metrics.reconciles() >= 3);
    task.abort();
}
