//! The gRPC capacity service read by a real tonic client over 127.0.0.1: snapshot first, free
//! blocks fall while a request runs and return after, cached blocks and STORED hashes appear,
//! a disconnected streaming client frees its blocks, many subscribers, health; the subscriber
//! cap and the request size limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::StatusCode;
use kvroute_agent::backend::fake::{fake_block_hashes, FakeConfig};
use kvroute_proto::v1::block_event::Kind;
use kvroute_proto::{AgentClient, CapacityReport, GetCapacityRequest, WatchCapacityRequest};
use serde_json::json;
use tonic::Streaming;

fn cfg() -> FakeConfig {
    FakeConfig {
        total_blocks: 64,
        block_size: 4,
        max_model_len: 256,
        step: Duration::from_millis(5),
        ..FakeConfig::default()
    }
}

async fn watch(agent: &TestAgent, events: bool) -> Streaming<CapacityReport> {
    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    client
        .watch_capacity(WatchCapacityRequest {
            subscriber: "test".into(),
            include_block_events: events,
            dispatcher: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Reads reports until `pred` holds for one; returns every report read (the match last).
async fn until(
    s: &mut Streaming<CapacityReport>,
    mut pred: impl FnMut(&CapacityReport) -> bool,
) -> Vec<CapacityReport> {
    let mut seen = Vec::new();
    tokio::time::timeout(GUARD, async {
        loop {
            let r = s.message().await.unwrap().expect("stream ended");
            let done = pred(&r);
            seen.push(r);
            if done {
                return;
            }
        }
    })
    .await
    .unwrap();
    seen
}

#[tokio::test]
async fn free_blocks_fall_while_running_and_prompt_hashes_are_stored() {
    let agent = start(cfg()).await;
    let mut s = watch(&agent, true).await;
    let first = s.message().await.unwrap().unwrap();
    assert!(first.snapshot);
    assert_eq!(first.sequence, 1);
    assert_eq!(first.agent_id, "test-agent");
    assert_eq!(first.model, "fake-model");
    assert_eq!(first.block_size, 4);
    assert_eq!(first.total_blocks, 64);
    assert_eq!(first.free_blocks, 64);
    assert_eq!(first.cached_evictable_blocks, 0);
    assert_eq!(first.requests_received, 0);
    assert!(first.events.is_empty());
    assert!(first.gpu.is_none());

    let prompt = "The quick brown fox jumps over"; // 30 tokens: 7 full blocks
    let body = json!({"model": "fake-model", "prompt": prompt, "max_tokens": 40});
    let http = agent.http;
    let req = tokio::spawn(async move { post_json(http, "/v1/completions", &body).await });

    let during = until(&mut s, |r| r.running_requests == 1).await;
    let busy = during.last().unwrap();
    assert!(busy.free_blocks < 64, "{busy:?}");
    assert_eq!(busy.requests_received, 1);
    let (status, v) = req.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");

    let after = until(&mut s, |r| r.running_requests == 0 && r.free_blocks == 64).await;
    let last = after.last().unwrap();
    assert_eq!(last.cached_evictable_blocks, 7);
    let stored: Vec<u64> = during
        .iter()
        .chain(after.iter())
        .flat_map(|r| r.events.iter())
        .filter(|e| e.kind == Kind::Stored as i32)
        .flat_map(|e| e.block_hashes.iter().copied())
        .collect();
    let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
    assert_eq!(stored, fake_block_hashes(&tokens, 4));
    // Sequences increase by one on the stream.
    let seqs: Vec<u64> = during
        .iter()
        .chain(after.iter())
        .map(|r| r.sequence)
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(seqs[0], 2);

    // A new subscriber's snapshot carries the whole cache as one STORED event.
    let mut s2 = watch(&agent, true).await;
    let snap = s2.message().await.unwrap().unwrap();
    assert!(snap.snapshot);
    assert_eq!(snap.epoch, first.epoch);
    let mut want = fake_block_hashes(&tokens, 4);
    want.sort_unstable();
    assert_eq!(snap.events.len(), 1);
    assert_eq!(snap.events[0].kind, Kind::Stored as i32);
    assert_eq!(snap.events[0].block_hashes, want);

    // Without block events, the same counters and no events.
    let mut s3 = watch(&agent, false).await;
    let snap3 = s3.message().await.unwrap().unwrap();
    assert!(snap3.events.is_empty());
    assert_eq!(snap3.cached_evictable_blocks, 7);

    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    let one = client
        .get_capacity(GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.free_blocks, 64);
    assert_eq!(one.requests_received, 1);
    assert!(one.events.is_empty());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn disconnect_mid_stream_frees_the_blocks() {
    let agent = start(FakeConfig {
        step: Duration::from_millis(20),
        ..cfg()
    })
    .await;
    let mut s = watch(&agent, false).await;
    assert!(s.message().await.unwrap().unwrap().snapshot);
    let body = json!({"model": "fake-model", "prompt": "a prompt of some length", "max_tokens": 200, "stream": true});
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        Some(serde_json::to_vec(&body).unwrap()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Wait for the first token, then hang up.
    use http_body_util::BodyExt;
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));
    let busy = until(&mut s, |r| r.running_requests == 1).await;
    assert!(busy.last().unwrap().free_blocks < 64);
    drop(body);
    let after = until(&mut s, |r| r.running_requests == 0 && r.free_blocks == 64).await;
    // Aborted: its blocks are freed, not cached.
    assert_eq!(after.last().unwrap().cached_evictable_blocks, 0);
    // Nothing left in flight on the agent.
    tokio::time::timeout(GUARD, agent.state.lifecycle.wait_idle())
        .await
        .unwrap();
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn many_subscribers_see_the_same_state_and_health_is_serving() {
    let agent = start(cfg()).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = watch(&agent, true).await;
        assert!(s.message().await.unwrap().unwrap().snapshot);
        streams.push(s);
    }
    for i in 0..3 {
        let body = json!({"model": "fake-model", "prompt": format!("prompt number {i} here"), "max_tokens": 3});
        assert_eq!(
            post_json(agent.http, "/v1/completions", &body).await.0,
            StatusCode::OK
        );
    }
    for s in &mut streams {
        let seen = until(s, |r| r.requests_received == 3 && r.running_requests == 0).await;
        assert_eq!(seen.last().unwrap().free_blocks, 64);
    }

    let channel = tonic::transport::Channel::from_shared(agent.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kvroute.v1.Agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    agent.stop().await.unwrap();
}

/// A router's dispatches come back on its own stream: the one the backend took in with the
/// counters that include it, one the agent refused (bad temperature, bad JSON) at once; another
/// dispatcher's stream and a stream without a dispatcher hear none of them. A malformed dispatch
/// header or dispatcher id is refused clearly.
#[tokio::test]
async fn dispatches_are_acknowledged_on_their_routers_stream_only() {
    let agent = start(cfg()).await;
    let open = |dispatcher: &str| {
        let url = agent.grpc_url();
        let dispatcher = dispatcher.to_string();
        async move {
            AgentClient::connect(url)
                .await
                .unwrap()
                .watch_capacity(WatchCapacityRequest {
                    subscriber: "ack-test".into(),
                    include_block_events: false,
                    dispatcher,
                })
                .await
        }
    };
    let mut mine = open("gw-a").await.unwrap().into_inner();
    let mut other = open("gw-b").await.unwrap().into_inner();
    let first = mine.message().await.unwrap().unwrap();
    assert!(first.dispatch_acks && first.acked_dispatches.is_empty());
    assert!(other.message().await.unwrap().unwrap().snapshot);

    let post = |seq: &str, body: Vec<u8>| {
        let http = agent.http;
        let header = format!("gw-a:{seq}");
        async move {
            let resp = send_with(
                http,
                "POST",
                "/v1/completions",
                &[("x-kvroute-dispatch", &header)],
                Some(body),
            )
            .await;
            let status = resp.status();
            let _ = resp.into_body().collect().await.unwrap();
            status
        }
    };
    let good =
        serde_json::to_vec(&json!({"model": "fake-model", "prompt": "abcdefgh", "max_tokens": 4}))
            .unwrap();
    let hot = serde_json::to_vec(
        &json!({"model": "fake-model", "prompt": "abcdefgh", "max_tokens": 4, "temperature": 3}),
    )
    .unwrap();
    assert_eq!(post("1", good).await, StatusCode::OK);
    assert_eq!(post("2", hot).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        post("3", b"{not json".to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    let seen = until(&mut mine, |r| r.acked_dispatches.contains(&3)).await;
    let mut acked: Vec<u64> = seen
        .iter()
        .flat_map(|r| r.acked_dispatches.clone())
        .collect();
    // Dispatch 1 is acknowledged in a report that counts its request.
    let with_1 = seen
        .iter()
        .find(|r| r.acked_dispatches.contains(&1))
        .unwrap();
    assert_eq!(with_1.requests_received, 1, "{with_1:?}");
    acked.sort_unstable();
    assert_eq!(acked, vec![1, 2, 3]);
    // gw-b's stream saw the counter move but no acknowledgement.
    let theirs = until(&mut other, |r| r.requests_received == 1).await;
    assert!(theirs.iter().all(|r| r.acked_dispatches.is_empty()));
    // A reconnecting gw-a hears its recent acknowledgements in the snapshot.
    let mut again = open("gw-a").await.unwrap().into_inner();
    let snap = again.message().await.unwrap().unwrap();
    assert!(snap.snapshot);
    assert_eq!(snap.acked_dispatches, vec![1, 2, 3]);

    // Malformed input: a clear error, nothing panics.
    for bad in ["gw-a", "gw-a:x", ":1", "gw a:1", "gw-a:-1"] {
        let resp = send_with(
            agent.http,
            "POST",
            "/v1/completions",
            &[("x-kvroute-dispatch", bad)],
            Some(b"{}".to_vec()),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("x-kvroute-dispatch"),
            "{v}"
        );
    }
    for bad in ["a:b", &"x".repeat(129), "tab\t"] {
        let err = open(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
}

#[tokio::test]
async fn subscribers_beyond_the_cap_are_refused_until_one_leaves() {
    let agent = start_limited(cfg(), 2).await;
    let mut a = watch(&agent, false).await;
    let b = watch(&agent, false).await;
    assert!(a.message().await.unwrap().unwrap().snapshot);
    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    let req = || WatchCapacityRequest {
        subscriber: "third".into(),
        include_block_events: false,
        dispatcher: String::new(),
    };
    let e = client.watch_capacity(req()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("--max-capacity-subscribers"), "{e}");
    // One-shot reads are not streams: still answered.
    assert!(client.get_capacity(GetCapacityRequest {}).await.is_ok());
    // The second subscriber leaves: its place is given back once the agent sees it gone.
    drop(b);
    let third = tokio::time::timeout(GUARD, async {
        loop {
            match client.watch_capacity(req()).await {
                Ok(s) => return s.into_inner(),
                Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    drop(third);
    // The first is still served.
    assert!(a.message().await.unwrap().is_some());
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_the_agent_keeps_serving() {
    let agent = start(cfg()).await;
    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    let e = client
        .watch_capacity(WatchCapacityRequest {
            subscriber: "x".repeat(kvroute_agent::grpc::MAX_REQUEST_BYTES + 1),
            include_block_events: false,
            dispatcher: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    // The refused stream holds no subscriber place and the agent still answers.
    let mut s = watch(&agent, false).await;
    assert!(s.message().await.unwrap().unwrap().snapshot);
}
