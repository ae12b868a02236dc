//! The autoscaling signal the gateway exports (issue 14): while requests queue for room on a
//! small agent, the model's shortfall and waiting requests show in `/metrics`, and both return
//! to 0 once the queue drains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kvroute_tests::{call, metric_values, try_get_text, Agent, AgentOpts, Gateway};
use serde_json::json;

async fn signal(gw: std::net::SocketAddr, name: &str) -> f64 {
    let text = try_get_text(gw, "/metrics").await.unwrap();
    metric_values(&text, name).iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_shows_as_kv_shortfall_and_clears_when_it_drains() {
    let agent = Agent::spawn(AgentOpts {
        kv_memory: "4MiB",
        ..AgentOpts::default()
    });
    let gw = Gateway::spawn(&[&agent], &[]).await;
    let per_replica = signal(gw.addr, "kvroute_gateway_model_kv_blocks_per_replica").await;
    assert!(per_replica > 0.0, "one replica's pool is known");
    assert_eq!(
        signal(gw.addr, "kvroute_gateway_model_kv_shortfall_blocks").await,
        0.0
    );
    let body = serde_json::to_vec(&json!({"model": agent.model, "prompt": "Tell me a story.",
        "max_tokens": 100, "temperature": 0, "ignore_eos": true}))
    .unwrap();
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (addr, body) = (gw.addr, body.clone());
            tokio::spawn(async move { call(addr, "POST", "/v1/completions", body).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut shortfall, mut waiting, mut demand) = (0.0, 0.0, 0.0);
    while Instant::now() < deadline {
        shortfall = signal(gw.addr, "kvroute_gateway_model_kv_shortfall_blocks").await;
        waiting = signal(gw.addr, "kvroute_gateway_model_waiting_requests").await;
        demand = signal(gw.addr, "kvroute_gateway_model_kv_demand_blocks").await;
        if shortfall > 0.0 && waiting > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shortfall > 0.0 && waiting > 0.0, "{shortfall} {waiting}");
    assert!(
        demand > per_replica,
        "demand {demand} beyond one replica's {per_replica} blocks: more replicas would help"
    );
    for f in flood {
        let (status, _) = f.await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        signal(gw.addr, "kvroute_gateway_model_kv_shortfall_blocks").await,
        0.0
    );
    assert_eq!(
        signal(gw.addr, "kvroute_gateway_model_waiting_requests").await,
        0.0
    );
}
