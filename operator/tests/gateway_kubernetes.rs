#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kvroute gateway --kubernetes`'s agent source against a fake API server on 127.0.0.1: the
//! gateway's agent set follows the ready endpoints of ModelDeployments' agent EndpointSlices, and
//! each model's `spec.routing` / `spec.admission` hold for its requests (stub agents).

mod common;
mod support;

use std::time::Duration;

use common::{endpoint_slice, model_deployment, FakeApiServer};
use kvroute_gateway::source::KubernetesAgents;
use kvroute_gateway::{start_with, GatewayConfig};
use kvroute_routing::PolicyKind;
use support::stub::{StubAgent, StubConfig};

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

/// A ModelDeployment whose spec carries `routing` / `admission` (JSON, `null` for none).
fn deployment_with(
    name: &str,
    model: &str,
    routing: serde_json::Value,
    admission: serde_json::Value,
) -> serde_json::Value {
    let mut md = model_deployment("default", name, model);
    let spec = md["spec"].as_object_mut().unwrap();
    spec.remove("admission");
    if !routing.is_null() {
        spec.insert("routing".into(), routing);
    }
    if !admission.is_null() {
        spec.insert("admission".into(), admission);
    }
    md
}

/// One stub agent's own EndpointSlice (its loopback ports) for deployment `dep`.
fn stub_slice(dep: &str, n: usize, stub: &StubAgent) -> serde_json::Value {
    let mut s = endpoint_slice("default", dep, &[("127.0.0.1", true)]);
    s["metadata"]["name"] = format!("{dep}-agents-{n}").into();
    s["endpoints"][0]["targetRef"]["name"] = format!("{dep}-agent-{n}").into();
    s["ports"] = serde_json::json!([
        {"name": "http", "port": stub.http.port(), "protocol": "TCP"},
        {"name": "grpc", "port": stub.grpc.port(), "protocol": "TCP"},
    ]);
    s
}

async fn stub(id: &str, model: &str, total_blocks: u64) -> StubAgent {
    StubAgent::start(StubConfig {
        agent_id: id.into(),
        model: model.into(),
        total_blocks,
        token_delay: Duration::from_millis(1),
        heartbeat: Duration::from_millis(100),
        ..StubConfig::default()
    })
    .await
}

/// Each model's ModelDeployment settings hold for its requests, the flags for the rest: `alpha`
/// says round-robin (and nothing about admission), `beta` says nothing about routing and a queue
/// of 0 with a 45 s timeout; the gateway's flags say kv and a 30 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_settings_from_model_deployments() {
    let alpha = [
        stub("alpha-big", "alpha-model", 1000).await,
        stub("alpha-small", "alpha-model", 100).await,
    ];
    let beta = [
        stub("beta-big", "beta-model", 1000).await,
        stub("beta-small", "beta-model", 100).await,
    ];
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        deployment_with(
            "alpha",
            "alpha-model",
            serde_json::json!({"policy": "roundRobin"}),
            serde_json::Value::Null,
        ),
        1,
    );
    api.insert_silently(
        "modeldeployments",
        deployment_with(
            "beta",
            "beta-model",
            serde_json::Value::Null,
            serde_json::json!({"maxQueue": 0, "queueTimeout": "45s"}),
        ),
        1,
    );
    for (dep, stubs) in [("alpha", &alpha), ("beta", &beta)] {
        for (n, s) in stubs.iter().enumerate() {
            api.insert_silently("endpointslices", stub_slice(dep, n, s), 1);
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = GatewayConfig::for_agents(listener.local_addr().unwrap(), Vec::new());
    cfg.kubernetes = true;
    let flags_timeout = cfg.queue_timeout;
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
    until("all four agents eligible", || {
        router.agents().iter().filter(|a| a.eligible).count() == 4
    })
    .await;
    until("beta's settings applied", || {
        router.settings("beta-model").max_queue == 0
    })
    .await;
    let (alpha_s, beta_s) = (
        router.settings("alpha-model"),
        router.settings("beta-model"),
    );
    assert_eq!(alpha_s.policy.kind, PolicyKind::RoundRobin);
    assert_eq!(alpha_s.queue_timeout, flags_timeout);
    assert_eq!(alpha_s.max_queue, 1024, "the flags' bound");
    assert_eq!(beta_s.policy.kind, PolicyKind::Kv, "the flags' policy");
    assert_eq!(beta_s.queue_timeout, Duration::from_secs(45));

    let client = support::client();
    let ask = |model: &str| serde_json::json!({"model": model, "prompt": "hello there", "max_tokens": 2, "stream": false});
    let agent_of = |headers: &hyper::HeaderMap| {
        headers
            .get("x-kvroute-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    // Routing: alpha takes turns (round-robin); beta (kv) keeps choosing the agent with the
    // larger free fraction.
    let mut alpha_agents = Vec::new();
    let mut beta_agents = Vec::new();
    for _ in 0..4 {
        let (status, headers, body) = support::post(
            &client,
            gw.addr,
            "/v1/completions",
            &ask("alpha-model"),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        alpha_agents.push(agent_of(&headers));
        let (status, headers, body) =
            support::post(&client, gw.addr, "/v1/completions", &ask("beta-model"), &[]).await;
        assert_eq!(status, 200, "{body}");
        beta_agents.push(agent_of(&headers));
    }
    // Strict turns, whichever agent comes first in slot order.
    assert!(
        alpha_agents.windows(2).all(|w| w[0] != w[1]),
        "{alpha_agents:?}"
    );
    alpha_agents.sort();
    alpha_agents.dedup();
    assert_eq!(alpha_agents, ["alpha-big", "alpha-small"]);
    beta_agents.dedup();
    assert_eq!(beta_agents, ["beta-big"]);

    // Admission: with no room anywhere, beta (maxQueue 0) is refused at once as queue-full,
    // while alpha, round-robin, ignores KV room and is still served.
    for s in alpha.iter().chain(&beta) {
        s.state.with(|i| i.free = 0);
    }
    until("no room seen", || {
        router.agents().iter().all(|a| a.free_blocks == 0)
    })
    .await;
    let (status, _, body) =
        support::post(&client, gw.addr, "/v1/completions", &ask("beta-model"), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("queue is full"), "{body}");
    let (status, _, body) = support::post(
        &client,
        gw.addr,
        "/v1/completions",
        &ask("alpha-model"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}
