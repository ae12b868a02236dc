//! The capacity stream of a real agent read by a real gRPC (tonic) client: free blocks fall
//! while a long request runs and return when it ends, cached-evictable blocks rise after, and
//! the STORED events carry the hashes `kvroute_engine::kv::hash::block_hashes` gives for the
//! prompt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use kvroute_proto::v1::block_event::Kind;
use kvroute_proto::{AgentClient, CapacityReport, WatchCapacityRequest};
use kvroute_tests::{call, call_with, post_json, Agent, AgentOpts, GUARD};
use serde_json::json;
use tonic::Streaming;

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

/// A prompt of known token ids (the reference tokenization of a code snippet): 27 tokens, six
/// full blocks of 4.
fn prompt_ids() -> Vec<u32> {
    vec![
        1604, 3987, 24, 94, 727, 472, 1003, 304, 585, 304, 2067, 216, 34, 1745, 3987, 24, 94, 29,
        33, 25, 1232, 3987, 24, 94, 29, 34, 25,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_blocks_fall_and_return_and_stored_hashes_match_the_engine() {
    let agent = Agent::spawn(AgentOpts {
        extra: vec!["--block-size".into(), "4".into()],
        ..AgentOpts::default()
    });
    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    let mut s = client
        .watch_capacity(WatchCapacityRequest {
            subscriber: "process-test".into(),
            include_block_events: true,
            dispatcher: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(first.snapshot);
    assert_eq!(first.agent_id, "process-test");
    assert_eq!(first.model, agent.model);
    assert_eq!(first.block_size, 4);
    assert!(first.total_blocks > 0);
    assert_eq!(first.free_blocks, first.total_blocks);
    assert_eq!(first.requests_received, 0);
    let total = first.total_blocks;

    let ids = prompt_ids();
    let body = json!({"model": agent.model, "prompt": ids, "max_tokens": 40, "ignore_eos": true, "temperature": 0});
    let http = agent.http;
    let req = tokio::spawn(async move { post_json(http, "/v1/completions", &body).await });

    let during = until(&mut s, |r| r.running_requests == 1 && r.free_blocks < total).await;
    assert_eq!(during.last().unwrap().requests_received, 1);
    let (status, v) = req.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40);

    let after = until(&mut s, |r| {
        r.running_requests == 0 && r.free_blocks == total
    })
    .await;
    let last = after.last().unwrap();
    assert!(last.cached_evictable_blocks >= 6, "{last:?}");
    let mut stored = Vec::new();
    let mut removed = HashSet::new();
    for r in during.iter().chain(after.iter()) {
        for e in &r.events {
            if e.kind == Kind::Stored as i32 {
                stored.extend(e.block_hashes.iter().copied());
            } else if e.kind == Kind::Removed as i32 {
                removed.extend(e.block_hashes.iter().copied());
            }
        }
    }
    let want = kvroute_engine::kv::hash::block_hashes(&ids, 4, &[]);
    assert_eq!(want.len(), 6);
    for h in &want {
        assert!(
            stored.contains(h),
            "prompt block hash {h:#x} never STORED: {stored:x?}"
        );
        assert!(
            !removed.contains(h),
            "prompt block hash {h:#x} REMOVED with a nearly empty pool"
        );
    }
}

/// A prefix hold keeps a finished request's cached prompt blocks from eviction: they leave the
/// evictable (free) blocks while held, a request naming the hold hits all of them, and the hold
/// is let go once that request is admitted. Malformed holds are refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_hold_keeps_blocks_until_its_request_is_admitted() {
    let agent = Agent::spawn(AgentOpts {
        extra: vec!["--block-size".into(), "4".into()],
        ..AgentOpts::default()
    });
    let mut client = AgentClient::connect(agent.grpc_url()).await.unwrap();
    let mut s = client
        .watch_capacity(WatchCapacityRequest {
            subscriber: "hold-test".into(),
            include_block_events: true,
            dispatcher: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let total = s.message().await.unwrap().unwrap().total_blocks;
    let ids = prompt_ids();
    let body = json!({"model": agent.model, "prompt": ids, "max_tokens": 2, "ignore_eos": true, "temperature": 0});
    let (status, v) = post_json(agent.http, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    // Reports sent before the request arrived are idle too; wait for one that shows its blocks.
    let idle = until(&mut s, |r| {
        r.running_requests == 0 && r.free_blocks == total && r.cached_evictable_blocks > 0
    })
    .await;
    let evictable = idle.last().unwrap().cached_evictable_blocks;
    assert!(evictable >= 6, "{evictable}");

    let hashes = kvroute_engine::kv::hash::block_hashes(&ids, 4, &[]);
    let (status, v) = post_json(
        agent.http,
        "/v1/kvroute/hold",
        &json!({"block_hashes": hashes, "ttl_ms": 30_000}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["blocks"], 6, "{v}");
    let hold = v["hold_id"].as_u64().unwrap();
    let held = until(&mut s, |r| r.cached_evictable_blocks == evictable - 6).await;
    let last = held.last().unwrap();
    assert_eq!(last.free_blocks, total - 6, "held blocks are not free");
    let in_use: usize = held
        .iter()
        .flat_map(|r| &r.events)
        .filter(|e| e.kind == Kind::InUse as i32)
        .map(|e| e.block_hashes.len())
        .sum();
    assert_eq!(in_use, 6, "the held blocks are reported in use");

    // The request the prefix was held for hits all 6 blocks (24 tokens) and lets the hold go.
    let mut longer = ids.clone();
    longer.extend([29, 33, 25]);
    let body = json!({"model": agent.model, "prompt": longer, "max_tokens": 2, "ignore_eos": true, "temperature": 0});
    let hold_s = hold.to_string();
    let (status, b) = call_with(
        agent.http,
        "POST",
        "/v1/completions",
        &[("x-kvroute-hold", &hold_s)],
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 24,
        "{v}"
    );
    until(&mut s, |r| {
        r.running_requests == 0 && r.free_blocks == total && r.cached_evictable_blocks >= evictable
    })
    .await;
    // Releasing it again (or any unknown hold) is harmless.
    let (status, _) = call(
        agent.http,
        "DELETE",
        &format!("/v1/kvroute/hold/{hold}"),
        vec![],
    )
    .await;
    assert_eq!(status, 204);

    // A hold let go by DELETE returns its blocks to the evictable ones.
    let (status, v) = post_json(
        agent.http,
        "/v1/kvroute/hold",
        &json!({"block_hashes": &hashes[..3], "ttl_ms": 30_000}),
    )
    .await;
    assert_eq!(
        (status.as_u16(), v["blocks"].as_u64()),
        (200, Some(3)),
        "{v}"
    );
    let before = until(&mut s, |r| r.free_blocks == total - 3).await;
    let ev = before.last().unwrap().cached_evictable_blocks;
    let id = v["hold_id"].as_u64().unwrap();
    let (status, _) = call(
        agent.http,
        "DELETE",
        &format!("/v1/kvroute/hold/{id}"),
        vec![],
    )
    .await;
    assert_eq!(status, 204);
    until(&mut s, |r| {
        r.free_blocks == total && r.cached_evictable_blocks == ev + 3
    })
    .await;

    // Bad input: a clear 400, nothing held.
    let too_many: Vec<u64> = (0..=total).collect();
    for (bad, what) in [
        (json!({"block_hashes": hashes, "ttl_ms": 0}), "ttl_ms"),
        (json!({"block_hashes": hashes, "ttl_ms": 60_001}), "ttl_ms"),
        (json!({"block_hashes": [], "ttl_ms": 10}), "block_hashes"),
        (
            json!({"block_hashes": too_many, "ttl_ms": 10}),
            "block_hashes",
        ),
        (json!({"block_hashes": [-1], "ttl_ms": 10}), "Invalid"),
        (json!({"block_hashes": hashes}), "ttl_ms"),
        (
            json!({"block_hashes": hashes, "ttl_ms": 10, "pin": true}),
            "unknown field",
        ),
    ] {
        let (status, v) = post_json(agent.http, "/v1/kvroute/hold", &bad).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(what),
            "{bad}: {v}"
        );
    }
    let (status, _) = call(
        agent.http,
        "POST",
        "/v1/kvroute/hold",
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(agent.http, "DELETE", "/v1/kvroute/hold/x1", vec![]).await;
    assert_eq!(status, 400);
    let (status, _) = call_with(
        agent.http,
        "POST",
        "/v1/completions",
        &[("x-kvroute-hold", "-3")],
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(status, 400, "a malformed hold header is refused");
    let r = s.message().await.unwrap().unwrap();
    assert_eq!(r.free_blocks, total, "bad holds hold nothing");
}
