//! Draining: after the shutdown signal the agent is not ready, takes no new work, lets in-flight
//! streams finish (or aborts them at the drain timeout), ends capacity streams, and returns Ok.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::StatusCode;
use kvroute_agent::backend::fake::FakeConfig;
use kvroute_proto::{AgentClient, WatchCapacityRequest};
use serde_json::{json, Value};

fn cfg() -> FakeConfig {
    FakeConfig {
        step: Duration::from_millis(10),
        max_model_len: 256,
        ..FakeConfig::default()
    }
}

/// Reads SSE chunks until the first one arrives; returns the body to read the rest.
async fn first_chunk(agent: &TestAgent, max_tokens: u32) -> hyper::Response<hyper::body::Incoming> {
    let body = json!({"model": "fake-model", "prompt": "drain me", "max_tokens": max_tokens, "stream": true});
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        Some(serde_json::to_vec(&body).unwrap()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let mut agent = start_with(cfg(), 4 << 20, Duration::from_secs(60)).await;
    let mut watch = AgentClient::connect(agent.grpc_url())
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
    let mut resp = first_chunk(&agent, 60).await;
    let f = resp.body_mut().frame().await.unwrap().unwrap();
    let mut text = String::from_utf8(f.into_data().unwrap().to_vec()).unwrap();

    agent.signal_shutdown();
    while !agent.state.lifecycle.is_draining() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // New work is refused: a new connection is either not accepted or answered 503.
    let body =
        serde_json::to_vec(&json!({"model": "fake-model", "prompt": "late", "max_tokens": 2}))
            .unwrap();
    if let Ok(stream) = tokio::net::TcpStream::connect(agent.http).await {
        drop(stream);
        let (s, b) = call_or_refused(agent.http, body).await;
        if let Some(s) = s {
            assert_eq!(
                s,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                String::from_utf8_lossy(&b)
            );
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["error"]["code"], "draining");
        }
    }

    // The in-flight stream runs to its end.
    let rest = resp.into_body().collect().await.unwrap().to_bytes();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    let chunks: Vec<&str> = text.split("\n\n").filter(|c| !c.is_empty()).collect();
    assert_eq!(*chunks.last().unwrap(), "data: [DONE]");
    let last: Value =
        serde_json::from_str(chunks[chunks.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let generated: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| {
            let v: Value = serde_json::from_str(c.strip_prefix("data: ").unwrap()).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(generated, fake_text(8, 60));

    // serve returns Ok, and the capacity stream ends cleanly.
    let task = agent.task.take().unwrap();
    tokio::time::timeout(GUARD, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(GUARD, async {
        while let Some(r) = watch.message().await.unwrap() {
            let _ = r;
        }
    })
    .await
    .unwrap();
}

/// A request on a fresh connection, or `None` when the connection is refused or closed.
async fn call_or_refused(
    addr: std::net::SocketAddr,
    body: Vec<u8>,
) -> (Option<StatusCode>, Vec<u8>) {
    use hyper_util::rt::TokioIo;
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return (None, Vec::new());
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return (None, Vec::new());
    };
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/completions")
        .header("host", addr.to_string())
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .unwrap();
    match sender.send_request(req).await {
        Err(_) => (None, Vec::new()),
        Ok(resp) => {
            let s = resp.status();
            let b = resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec();
            (Some(s), b)
        }
    }
}

#[tokio::test]
async fn drain_timeout_aborts_what_remains_and_still_exits_ok() {
    let mut agent = start_with(
        FakeConfig {
            step: Duration::from_millis(50),
            ..cfg()
        },
        4 << 20,
        Duration::from_millis(100),
    )
    .await;
    let resp = first_chunk(&agent, 200).await;
    agent.signal_shutdown();
    let text = String::from_utf8(
        tokio::time::timeout(GUARD, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let chunks: Vec<&str> = text.split("\n\n").filter(|c| !c.is_empty()).collect();
    assert_eq!(*chunks.last().unwrap(), "data: [DONE]");
    let last: Value =
        serde_json::from_str(chunks[chunks.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "abort");
    let task = agent.task.take().unwrap();
    tokio::time::timeout(GUARD, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// While the model loads: liveness 200, readiness and generation 503 `loading`, gRPC
/// UNAVAILABLE; once loaded, all serve.
#[tokio::test]
async fn loading_state_then_ready() {
    use kvroute_agent::backend::fake::FakeBackend;
    use kvroute_agent::backend::InferenceBackend;
    use kvroute_agent::gpu::GpuMonitor;
    use kvroute_agent::server::{serve, ServeEvent, ServeOptions};
    use kvroute_agent::state::AgentState;
    use std::sync::Arc;

    let state = AgentState::new("loading".into(), 1 << 20, GpuMonitor::absent());
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: "127.0.0.1:0".parse().unwrap(),
        drain_timeout: Duration::from_secs(5),
        http_limits: kvroute_serve::Limits::default(),
        max_capacity_subscribers: 256,
    };
    let st = state.clone();
    let task = tokio::spawn(async move {
        serve(
            st,
            opts,
            move || {
                // A slow load: blocks until the test lets it finish.
                let _ = release_rx.recv();
                let b: Arc<dyn InferenceBackend> = FakeBackend::start(cfg());
                Ok(b)
            },
            async move {
                let _ = stop_rx.await;
            },
            {
                let mut addr_tx = Some(addr_tx);
                move |ev| {
                    if let (ServeEvent::Bound(a), Some(tx)) = (ev, addr_tx.take()) {
                        let _ = tx.send(a);
                    }
                }
            },
        )
        .await
    });
    let addrs = addr_rx.await.unwrap();
    assert_eq!(
        call(addrs.http, "GET", "/health", None).await.0,
        StatusCode::OK
    );
    let (s, b) = call(addrs.http, "GET", "/ready", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "loading");
    let (s, v) = post_json(
        addrs.http,
        "/v1/completions",
        &json!({"model": "fake-model", "prompt": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "loading");
    let err = AgentClient::connect(format!("http://{}", addrs.grpc))
        .await
        .unwrap()
        .watch_capacity(WatchCapacityRequest {
            subscriber: "t".into(),
            include_block_events: true,
            dispatcher: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    release_tx.send(()).unwrap();
    while !state.is_ready() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        call(addrs.http, "GET", "/ready", None).await.0,
        StatusCode::OK
    );
    let (s, v) = post_json(
        addrs.http,
        "/v1/completions",
        &json!({"model": "fake-model", "prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(GUARD, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A model that fails to load ends `serve` with the loader's error (the binary exits non-zero).
#[tokio::test]
async fn load_failure_is_an_error() {
    use kvroute_agent::gpu::GpuMonitor;
    use kvroute_agent::server::{serve, ServeError, ServeOptions};
    use kvroute_agent::state::AgentState;

    let state = AgentState::new("broken".into(), 1 << 20, GpuMonitor::absent());
    let opts = ServeOptions {
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: "127.0.0.1:0".parse().unwrap(),
        drain_timeout: Duration::from_secs(5),
        http_limits: kvroute_serve::Limits::default(),
        max_capacity_subscribers: 256,
    };
    let r = serve(
        state,
        opts,
        || Err("no such model file".to_string()),
        std::future::pending(),
        |_| {},
    )
    .await;
    match r {
        Err(ServeError::Load(m)) => assert!(m.contains("no such model file")),
        other => panic!("{other:?}"),
    }
}
