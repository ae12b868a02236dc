//! The capacity stream of a real agent read by a real gRPC (tonic) client: free blocks fall
//! while a long request runs and return when it ends, cached-evictable blocks rise after, and
//! the STORED events carry the hashes `kvroute_engine::kv::hash::block_hashes` gives for the
//! prompt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use kvroute_proto::v1::block_event::Kind;
use kvroute_proto::{AgentClient, CapacityReport, WatchCapacityRequest};
use kvroute_tests::{post_json, Agent, AgentOpts, GUARD};
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
