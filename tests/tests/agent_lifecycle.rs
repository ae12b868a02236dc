//! A real agent's lifecycle: a client that disconnects mid-stream frees its KV blocks (seen on
//! the capacity stream), and SIGTERM drains: the in-flight stream finishes, the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http_body_util::BodyExt;
use kvroute_proto::{AgentClient, CapacityReport, WatchCapacityRequest};
use kvroute_tests::{send, Agent, AgentOpts, GUARD};
use serde_json::{json, Value};
use tonic::Streaming;

async fn until(
    s: &mut Streaming<CapacityReport>,
    mut pred: impl FnMut(&CapacityReport) -> bool,
) -> CapacityReport {
    tokio::time::timeout(GUARD, async {
        loop {
            let r = s.message().await.unwrap().expect("stream ended");
            if pred(&r) {
                return r;
            }
        }
    })
    .await
    .unwrap()
}

fn stream_body(model: &str, max_tokens: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
        "ignore_eos": true, "temperature": 0, "stream": true,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_frees_the_blocks() {
    let agent = Agent::spawn(AgentOpts::default());
    let mut s = AgentClient::connect(agent.grpc_url())
        .await
        .unwrap()
        .watch_capacity(WatchCapacityRequest {
            subscriber: "t".into(),
            include_block_events: false,
            dispatcher: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let total = s.message().await.unwrap().unwrap().total_blocks;
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        stream_body(&agent.model, 2000),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));
    until(&mut s, |r| r.running_requests == 1 && r.free_blocks < total).await;
    drop(body);
    let r = until(&mut s, |r| {
        r.running_requests == 0 && r.waiting_requests == 0 && r.free_blocks == total
    })
    .await;
    assert_eq!(r.requests_received, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_and_exits_zero() {
    let mut agent = Agent::spawn(AgentOpts {
        extra: vec!["--drain-timeout".into(), "300s".into()],
        ..AgentOpts::default()
    });
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        stream_body(&agent.model, 48),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    let mut text = String::from_utf8(first.into_data().unwrap().to_vec()).unwrap();
    agent.sigterm();
    let rest = tokio::time::timeout(GUARD, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    let chunks: Vec<&str> = text.split("\n\n").filter(|c| !c.is_empty()).collect();
    assert_eq!(*chunks.last().unwrap(), "data: [DONE]", "{text}");
    let last: Value =
        serde_json::from_str(chunks[chunks.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{text}");
    let status = tokio::task::spawn_blocking(move || {
        let st = agent.wait();
        (st, agent.stderr())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit {:?}; stderr:\n{}",
        status.0,
        status.1
    );
    assert!(status.1.contains("draining"), "{}", status.1);
}
