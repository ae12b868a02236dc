//! Shared helpers for the gateway's integration tests.
#![allow(dead_code)]

pub mod stub;

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvroute_gateway::source::StaticAgents;
use kvroute_gateway::{start_with, GatewayConfig, RunningGateway};
use tokio::net::TcpListener;

use stub::StubAgent;

/// Polls `cond` every 10 ms until it holds; panics after 30 s with `what` (so a broken build
/// fails instead of hanging; the bound is never what a test asserts).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held: {what}");
}

pub async fn wait_until_async<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    for _ in 0..3000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held: {what}");
}

/// A gateway in this process in front of `stubs`, once it sees all of them.
pub async fn gateway(
    stubs: &[&StubAgent],
    tweak: impl FnOnce(&mut GatewayConfig),
) -> RunningGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = GatewayConfig::for_agents(
        listener.local_addr().unwrap(),
        stubs.iter().map(|s| s.endpoint()).collect(),
    );
    tweak(&mut cfg);
    let agents = cfg.agents.clone();
    let n = agents.len();
    let gw = start_with(cfg, listener, Box::new(StaticAgents(agents))).unwrap();
    let router = gw.gateway.router.clone();
    wait_until("gateway sees every agent", || {
        router.agents().iter().filter(|a| a.eligible).count() == n
    })
    .await;
    gw
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs JSON and returns the response with its body still streaming.
pub async fn post_stream(
    c: &TestClient,
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut b = hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap()
}

/// POSTs JSON and reads the whole answer.
pub async fn post(
    c: &TestClient,
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let resp = post_stream(c, addr, path, body, headers).await;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

pub async fn get(c: &TestClient, url: &str) -> (StatusCode, String) {
    let resp = c
        .request(
            hyper::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A completion request body.
pub fn completion(prompt: &str, max_tokens: u64, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "default", "prompt": prompt, "max_tokens": max_tokens, "stream": stream})
}
