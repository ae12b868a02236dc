//! The gateway refuses what the agent would refuse, with the agent's OpenAI error, before it
//! reserves anything (issue 12): out-of-range sampling parameters, prompts plus `max_tokens`
//! over the context, bodies over the shared size limit. The agent never sees them, no KV
//! blocks stay reserved, and valid requests right after are served as usual.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::{call, metric_values, try_get_text, Agent, AgentOpts, Gateway};
use serde_json::{json, Value};

/// Sends a POST on a raw connection, carrying on if the server stops reading the body (as it
/// may once it has answered 413), and returns the answer's status code.
async fn raw_post_status(addr: std::net::SocketAddr, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A write error here is the server closing early; the answer is still to be read.
    let _ = s.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(kvroute_tests::GUARD, s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"))
}

async fn metric_sum(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = try_get_text(addr, "/metrics").await.unwrap();
    metric_values(&text, name).iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_by_the_gateway_and_reserve_nothing() {
    let agent = Agent::spawn(AgentOpts {
        extra: vec!["--max-model-len".into(), "256".into()],
        ..AgentOpts::default()
    });
    let gw = Gateway::spawn(&[&agent], &["--policy", "kv"]).await;
    let post = |body: Vec<u8>| call(gw.addr, "POST", "/v1/completions", body);

    // One valid request first: the gateway learns the model's tokenizer and context length.
    let ok = json!({"model": agent.model, "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let (status, b) = post(serde_json::to_vec(&ok).unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    let received = metric_sum(agent.http, "kvroute_requests_received_total").await;
    let agent_errors = metric_sum(agent.http, "kvroute_http_errors_total").await;

    let check = |status: hyper::StatusCode, b: &[u8], param: Option<&str>, code: Option<&str>| {
        let v: Value = serde_json::from_slice(b).unwrap();
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert_eq!(v["error"]["code"].as_str(), code, "{v}");
    };
    for i in 0..500 {
        let hot = json!({"model": agent.model, "prompt": format!("Item {i}"), "max_tokens": 4, "temperature": 3});
        let (status, b) = post(serde_json::to_vec(&hot).unwrap()).await;
        check(status, &b, Some("temperature"), None);
    }
    for i in 0..500 {
        let long = json!({"model": agent.model, "prompt": format!("Item {i}"), "max_tokens": 300});
        let (status, b) = post(serde_json::to_vec(&long).unwrap()).await;
        check(
            status,
            &b,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        );
    }
    // Bodies over the limit both share (4 MiB).
    let big = json!({"model": agent.model, "prompt": "a".repeat(10 << 20)});
    let big = serde_json::to_vec(&big).unwrap();
    for _ in 0..200 {
        assert_eq!(raw_post_status(gw.addr, &big).await, 413);
    }
    // The agent saw none of them, and nothing is reserved.
    assert_eq!(
        metric_sum(agent.http, "kvroute_http_errors_total").await,
        agent_errors,
        "the gateway passed invalid requests on"
    );
    assert_eq!(
        metric_sum(agent.http, "kvroute_requests_received_total").await,
        received
    );
    assert_eq!(
        metric_sum(gw.addr, "kvroute_gateway_agent_reserved_blocks").await,
        0.0
    );
    // The next 100 valid ones are served.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let body = json!({"model": agent.model, "prompt": format!("Item {i}"), "max_tokens": 2, "temperature": 0});
            let addr = gw.addr;
            tokio::spawn(async move {
                call(addr, "POST", "/v1/completions", serde_json::to_vec(&body).unwrap()).await
            })
        })
        .collect();
    for t in tasks {
        let (status, b) = t.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    }
    assert_eq!(
        metric_sum(agent.http, "kvroute_requests_received_total").await,
        received + 100.0
    );
}
