//! The capacity view against stub agents' real gRPC streams: reconnect with backoff, staleness,
//! epochs, mirrored prefix-cache hashes, and reservations retired by the agent's counter.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use kvroute_gateway::types::PromptPlan;
use kvroute_routing::admission::Priority;
use support::stub::{StubAgent, StubConfig};
use support::*;

fn plan(tokens: u64, hashes: Vec<u64>) -> PromptPlan {
    PromptPlan {
        model: "default".into(),
        prompt_tokens: tokens,
        output_tokens: 16,
        block_size: 16,
        block_hashes: hashes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_capacity_service_makes_agent_ineligible_until_it_reconnects() {
    let a = StubAgent::start(StubConfig::default()).await;
    let gw = gateway(&[&a], |_| {}).await;
    let router = gw.gateway.router.clone();
    a.state.with(|i| i.grpc_down = true);
    wait_until("agent ineligible", || !router.agents()[0].eligible).await;
    assert!(!router.agents()[0].connected);
    // While it is down, a request waits rather than going to an agent nobody can see; once the
    // stream is back (the watcher redials with backoff), it is served.
    let c = client();
    let body = completion("hi", 2, false);
    let request = post(&c, gw.addr, "/v1/completions", &body, &[]);
    let state = a.state.clone();
    let r2 = router.clone();
    let revive = async move {
        wait_until("request queued", || r2.queue().depth == 1).await;
        assert_eq!(state.inner.lock().unwrap().received, 0);
        state.with(|i| i.grpc_down = false);
        wait_until("agent reconnected", || r2.agents()[0].eligible).await;
    };
    let ((status, headers, body), ()) = tokio::join!(request, revive);
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kvroute-agent"], "stub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reports_make_agent_ineligible_and_fresh_ones_restore_it() {
    let a = StubAgent::start(StubConfig {
        heartbeat: Duration::from_millis(50),
        ..StubConfig::default()
    })
    .await;
    let gw = gateway(&[&a], |c| c.policy.stale_after_ms = 300).await;
    let router = gw.gateway.router.clone();
    a.state.with(|i| i.reports_paused = true);
    wait_until("agent stale", || !router.agents()[0].eligible).await;
    // Still connected: staleness alone is enough.
    assert!(router.agents()[0].connected);
    let (status, _) = get(&client(), &format!("http://{}/ready", gw.addr)).await;
    assert_eq!(status, 503);
    a.state.with(|i| i.reports_paused = false);
    wait_until("agent fresh again", || router.agents()[0].eligible).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_retires_when_the_agents_counter_covers_it() {
    let a = StubAgent::start(StubConfig::default()).await;
    let gw = gateway(&[&a], |_| {}).await;
    let router = gw.gateway.router.clone();
    let mut admitted = router
        .admit(
            plan(160, vec![]),
            vec![],
            Priority::NORMAL,
            "t",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    admitted.mark_sent();
    assert_eq!(admitted.route.need_blocks, 11);
    assert_eq!(router.agents()[0].reserved_blocks, 11);
    // Heartbeats alone (counter unchanged) never retire it: it is not on a timer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(router.agents()[0].eligible);
    assert_eq!(router.agents()[0].reserved_blocks, 11);
    a.state.with(|i| i.received += 1);
    wait_until("reservation retired", || {
        router.agents()[0].reserved_blocks == 0
    })
    .await;
    drop(admitted);
    // Dropping a sent admission does not touch the books.
    assert_eq!(router.agents()[0].reserved_blocks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsent_admission_is_cancelled() {
    let a = StubAgent::start(StubConfig::default()).await;
    let gw = gateway(&[&a], |_| {}).await;
    let router = gw.gateway.router.clone();
    let admitted = router
        .admit(
            plan(160, vec![]),
            vec![],
            Priority::NORMAL,
            "t",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(router.agents()[0].reserved_blocks, 11);
    admitted.cancel();
    wait_until("cancelled", || router.agents()[0].reserved_blocks == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_epoch_resets_cached_hashes_and_reservations() {
    let a = StubAgent::start(StubConfig::default()).await;
    a.state.with(|i| i.cached = vec![101, 102, 103]);
    let gw = gateway(&[&a], |_| {}).await;
    let router = gw.gateway.router.clone();
    wait_until("snapshot mirrored", || {
        router.agents()[0].prefix_hashes == 3
    })
    .await;
    // The mirrored cache steers the decision: 3 of the prompt's 4 blocks are cached there.
    let mut admitted = router
        .admit(
            plan(64, vec![101, 102, 103, 999]),
            vec![],
            Priority::NORMAL,
            "t",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    admitted.mark_sent();
    assert_eq!(admitted.route.cached_blocks, 3);
    assert_eq!(admitted.route.need_blocks, 5 - 3);
    assert_eq!(router.agents()[0].reserved_blocks, 2);
    let epoch = router.agents()[0].epoch;
    // The agent restarts: new epoch, empty cache but one new block, counter back to zero.
    a.state.with(|i| {
        i.epoch += 1;
        i.received = 0;
        i.cached = vec![7];
    });
    wait_until("new epoch seen", || router.agents()[0].epoch == epoch + 1).await;
    let s = &router.agents()[0];
    assert_eq!(s.reserved_blocks, 0);
    assert_eq!(s.prefix_hashes, 1);
}
