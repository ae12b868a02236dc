#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kvroute gateway --kubernetes`'s agent source against a fake API server on 127.0.0.1: the
//! gateway's agent set follows the ready endpoints of ModelDeployments' agent EndpointSlices.

mod common;

use std::time::Duration;

use common::{endpoint_slice, model_deployment, FakeApiServer};
use kvroute_operator::gateway::source::KubernetesAgents;
use kvroute_operator::gateway::{start_with, GatewayConfig};

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_agents_follow_endpoint_slices() {
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "alpha", "alpha-model"),
        1,
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = GatewayConfig::for_agents(listener.local_addr().unwrap(), Vec::new());
    cfg.kubernetes = true;
    let gw = start_with(
        cfg,
        listener,
        Box::new(KubernetesAgents {
            client: api.client(),
            namespace: Some("default".into()),
        }),
    )
    .unwrap();
    let router = gw.gateway.router.clone();
    let endpoints = || {
        let mut e: Vec<String> = router.agents().into_iter().map(|a| a.endpoint).collect();
        e.sort();
        e
    };
    until("first agent discovered", || {
        endpoints() == ["10.0.0.1:8000"]
    })
    .await;
    // The same MODIFIED event is re-sent until seen: it is idempotent, and a watch that is not
    // subscribed yet when an event is sent would miss it.
    let two = endpoint_slice(
        "default",
        "alpha",
        &[("10.0.0.1", true), ("10.0.0.2", true)],
    );
    let mut seen = false;
    for _ in 0..60 {
        api.event("endpointslices", "MODIFIED", two.clone());
        for _ in 0..50 {
            if endpoints() == ["10.0.0.1:8000", "10.0.0.2:8000"] {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if seen {
            break;
        }
    }
    assert!(seen, "second agent never discovered: {:?}", endpoints());
    api.event(
        "endpointslices",
        "MODIFIED",
        endpoint_slice("default", "alpha", &[("10.0.0.2", true)]),
    );
    until("first agent gone", || endpoints() == ["10.0.0.2:8000"]).await;
    // Unreachable addresses are never eligible: nothing is routed to them.
    assert!(router.agents().iter().all(|a| !a.eligible));
}
