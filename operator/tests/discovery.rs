#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `k8s::discovery::watch` (what `kvroute gateway --kubernetes` uses) against a fake API server
//! on 127.0.0.1: initial LIST, live WATCH events, and a `410 Gone` that forces a re-list which
//! reveals an object the watch never announced.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{endpoint_slice, model_deployment, FakeApiServer};
use kvroute_gateway::discovery::{self, Snapshot};
use tokio::sync::watch;

/// Waits (guarded against hanging, not timed) until the snapshot satisfies `pred`.
async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let wait = async {
        loop {
            let snap = rx.borrow_and_update().clone();
            if pred(&snap) {
                return snap;
            }
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "discovery never reached: {what}; last snapshot {:?}",
                rx.borrow()
            )
        })
}

#[tokio::test]
async fn lists_watches_and_relists_after_410_gone() {
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "alpha", "alpha-model"),
        1,
    );
    // Only the second LIST shows "beta": discovery can learn of it only by re-listing.
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "beta", "beta-model"),
        2,
    );
    api.insert_silently(
        "endpointslices",
        endpoint_slice(
            "default",
            "alpha",
            &[("10.0.0.1", true), ("10.0.0.2", false)],
        ),
        1,
    );
    api.insert_silently(
        "endpointslices",
        endpoint_slice("default", "beta", &[("10.0.1.1", true)]),
        1,
    );
    api.gone_on_next_watch("modeldeployments", 1);

    let (mut rx, task) = discovery::watch(api.client(), None);

    let snap = until(&mut rx, "alpha and beta after the re-list", |s| {
        s.models.contains_key("alpha-model") && s.models.contains_key("beta-model")
    })
    .await;
    assert!(
        api.lists("modeldeployments") >= 2,
        "a 410 Gone must force a re-list"
    );
    let alpha = &snap.models["alpha-model"];
    assert_eq!(alpha.agents.len(), 1, "the not-ready endpoint is left out");
    assert_eq!(alpha.agents[0].http, "http://10.0.0.1:8000");
    assert_eq!(alpha.agents[0].grpc, "http://10.0.0.1:50051");
    assert_eq!(alpha.agents[0].id, "alpha-agent-10-0-0-1");
    assert_eq!(alpha.admission.max_queue, Some(8));
    assert_eq!(snap.models["beta-model"].agents.len(), 1);
    // The EndpointSlice watch used the agent label selector.
    assert!(api
        .log()
        .iter()
        .any(|l| l.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices")));

    // A live WATCH event: the second alpha agent becomes ready.
    api.event(
        "endpointslices",
        "MODIFIED",
        endpoint_slice(
            "default",
            "alpha",
            &[("10.0.0.1", true), ("10.0.0.2", true)],
        ),
    );
    until(&mut rx, "two alpha agents", |s| {
        s.models
            .get("alpha-model")
            .is_some_and(|m| m.agents.len() == 2)
    })
    .await;

    // A deleted ModelDeployment disappears from the snapshot.
    api.event(
        "modeldeployments",
        "DELETED",
        model_deployment("default", "beta", "beta-model"),
    );
    let snap = until(&mut rx, "beta gone", |s| {
        !s.models.contains_key("beta-model")
    })
    .await;
    assert!(snap.models.contains_key("alpha-model"));

    // A new ModelDeployment announced by the watch (no re-list needed).
    let lists_before = api.lists("modeldeployments");
    api.event(
        "modeldeployments",
        "ADDED",
        model_deployment("default", "gamma", "gamma-model"),
    );
    until(&mut rx, "gamma", |s| s.models.contains_key("gamma-model")).await;
    assert_eq!(
        api.lists("modeldeployments"),
        lists_before,
        "a live event needs no re-list"
    );
    task.abort();
}

#[tokio::test]
async fn namespaced_discovery_ignores_other_namespaces() {
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        model_deployment("models", "alpha", "alpha-model"),
        1,
    );
    api.insert_silently(
        "modeldeployments",
        model_deployment("elsewhere", "other", "other-model"),
        1,
    );
    api.insert_silently(
        "endpointslices",
        endpoint_slice("models", "alpha", &[("10.0.0.1", true)]),
        1,
    );
    let (mut rx, task) = discovery::watch(api.client(), Some("models".into()));
    let snap = until(&mut rx, "alpha", |s| s.models.contains_key("alpha-model")).await;
    assert!(!snap.models.contains_key("other-model"));
    assert!(api
        .log()
        .iter()
        .any(|l| l == "GET /apis/kvroute.dev/v1alpha1/namespaces/models/modeldeployments"));
    task.abort();
}
