#![allow(clippy::unwrap_used, clippy::expect_used)]
//! No head-of-line blocking through the gateway's HTTP API (stub agents on loopback): a request
//! for a model whose agents are full waits in the admission queue without holding back a later
//! request for another model, and is served once its agent has room.

mod support;

use std::time::Duration;

use support::stub::{StubAgent, StubConfig};
use support::{client, gateway, post, wait_until};

fn cfg(id: &str, model: &str) -> StubConfig {
    StubConfig {
        agent_id: id.into(),
        model: model.into(),
        total_blocks: 100,
        token_delay: Duration::from_millis(1),
        heartbeat: Duration::from_millis(100),
        ..StubConfig::default()
    }
}

fn ask(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 4, "stream": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_one_model_does_not_block_another() {
    let a = StubAgent::start(cfg("agent-a", "model-a")).await;
    let b = StubAgent::start(cfg("agent-b", "model-b")).await;
    let gw = gateway(&[&a, &b], |_| {}).await;
    let router = gw.gateway.router.clone();
    a.state.with(|i| i.free = 0);
    wait_until("agent a full", || {
        router
            .agents()
            .iter()
            .any(|s| s.agent_id == "agent-a" && s.free_blocks == 0)
    })
    .await;
    let c = client();
    let addr = gw.addr;
    let first = {
        let c = c.clone();
        tokio::spawn(async move {
            post(
                &c,
                addr,
                "/v1/completions",
                &ask("model-a"),
                &[("x-kvroute-priority", "high")],
            )
            .await
        })
    };
    wait_until("model-a request queued", || router.queue().depth == 1).await;
    // Behind a higher-priority request that cannot be served, model-b's is served at once.
    let (status, headers, body) = post(&c, addr, "/v1/completions", &ask("model-b"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kvroute-agent"], "agent-b");
    assert_eq!(router.queue().depth, 1, "model-a's request still waits");
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
    a.state.with(|i| i.free = 100);
    let (status, headers, body) = first.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kvroute-agent"], "agent-a");
    assert_eq!(router.queue().depth, 0);
}
