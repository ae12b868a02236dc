//! The gateway's HTTP side against stub agents on loopback: streaming pass-through, routing by
//! room, retry before the first byte, mid-stream failure, admission (queue, deadline, 429, 400),
//! client disconnects, bursts, metrics and the dashboard's JSON.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use kvroute_gateway::types::AgentEndpoint;
use kvroute_routing::PolicyKind;
use support::stub::{StubAgent, StubConfig};
use support::*;

fn cfg(id: &str, blocks: u64) -> StubConfig {
    StubConfig {
        agent_id: id.into(),
        total_blocks: blocks,
        ..StubConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_sse_through_and_names_the_agent() {
    let a = StubAgent::start(cfg("a1", 1000)).await;
    let gw = gateway(&[&a], |_| {}).await;
    let c = client();
    let (status, headers, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hello world", 20, true),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-kvroute-agent"], "a1");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 21, "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(events[0].contains("\"t0 \""));

    let chat = serde_json::json!({"model": "default", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, body) = post(&c, gw.addr, "/v1/chat/completions", &chat, &[]).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "t0 t1 t2 t3 t4 ");

    let (status, models) = get(&c, &format!("http://{}/v1/models", gw.addr)).await;
    assert_eq!(status, 200);
    assert!(models.contains("\"id\":\"default\""), "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_agent_with_room() {
    let small = StubAgent::start(cfg("small", 20)).await;
    let big = StubAgent::start(cfg("big", 400)).await;
    let gw = gateway(&[&small, &big], |_| {}).await;
    let c = client();
    // 3000 bytes ≈ 1000 tokens ≈ 63 blocks: only "big" has room.
    let prompt = "x".repeat(3000);
    for _ in 0..3 {
        let (status, headers, body) = post(
            &c,
            gw.addr,
            "/v1/completions",
            &completion(&prompt, 10, false),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["x-kvroute-agent"], "big");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_the_next_agent_when_the_connection_is_refused() {
    let a = StubAgent::start(cfg("preferred", 5000)).await;
    let b = StubAgent::start(cfg("fallback", 1000)).await;
    // "preferred" reports the most room, but its HTTP port accepts no connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let broken = AgentEndpoint {
        http: dead_addr.to_string(),
        grpc: format!("http://{}", a.grpc),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = kvroute_gateway::GatewayConfig::for_agents(
        listener.local_addr().unwrap(),
        vec![broken.clone(), b.endpoint()],
    );
    config.max_retries = 2;
    let gw = kvroute_gateway::start_with(
        config,
        listener,
        Box::new(kvroute_gateway::source::StaticAgents(vec![
            broken,
            b.endpoint(),
        ])),
    )
    .unwrap();
    let router = gw.gateway.router.clone();
    wait_until("both eligible", || {
        router.agents().iter().filter(|a| a.eligible).count() == 2
    })
    .await;
    let c = client();
    let (status, headers, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 8, true),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kvroute-agent"], "fallback");
    assert!(body.ends_with("data: [DONE]\n\n"));
    // The failed attempt's reservation was released at once.
    let agents = router.agents();
    let pref = agents.iter().find(|s| s.agent_id == "preferred").unwrap();
    assert_eq!(pref.reserved_blocks, 0);
    let (_, metrics) = get(&c, &format!("http://{}/metrics", gw.addr)).await;
    assert!(
        metrics.contains("kvroute_gateway_retries_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dying_mid_stream_ends_with_an_sse_error_event() {
    let a = StubAgent::start(cfg("dies", 1000)).await;
    a.state.with(|i| i.fail_after_chunks = Some(3));
    let gw = gateway(&[&a], |_| {}).await;
    let c = client();
    let (status, _, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 50, true),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "three tokens, then the error: {body}");
    let last: serde_json::Value =
        serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "api_error");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("failed mid-stream"));
    assert!(!body.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_upstream_request() {
    let a = StubAgent::start(StubConfig {
        token_delay: Duration::from_millis(20),
        ..cfg("slow", 1000)
    })
    .await;
    let gw = gateway(&[&a], |_| {}).await;
    let c = client();
    let resp = post_stream(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 1000, true),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    assert_eq!(a.state.inner.lock().unwrap().running, 1);
    drop(body);
    let state = a.state.clone();
    wait_until("agent sees the request end", || {
        state.inner.lock().unwrap().running == 0
    })
    .await;
    // It ended because the client left, not because it finished its 1000 tokens.
    assert_eq!(a.state.inner.lock().unwrap().served, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_bigger_than_any_kv_pool_is_400_at_once() {
    let a = StubAgent::start(cfg("tiny", 10)).await;
    let b = StubAgent::start(cfg("tiny2", 12)).await;
    let gw = gateway(&[&a, &b], |_| {}).await;
    let c = client();
    let (status, _, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion(&"y".repeat(1000), 1, false),
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("more than any agent's whole KV cache (12 blocks)"),
        "{msg}"
    );
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let a = StubAgent::start(cfg("a", 1000)).await;
    let gw = gateway(&[&a], |c| c.max_body_bytes = 4096).await;
    let c = client();
    let raw = |body: &'static str| {
        let c = c.clone();
        let addr = gw.addr;
        async move {
            let resp = c
                .request(
                    hyper::Request::post(format!("http://{addr}/v1/completions"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&b).unwrap(),
            )
        }
    };
    let (s, v) = raw("{not json").await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let (s, v) = raw("[1,2]").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = raw(r#"{"prompt":"x"}"#).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "model");
    let (s, v) = raw(r#"{"model":"default","prompt":"x","max_tokens":0}"#).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = raw(r#"{"model":"default","prompt":"x","stream":"yes"}"#).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = raw(r#"{"model":"nope","prompt":"x"}"#).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    let big = format!(r#"{{"model":"default","prompt":"{}"}}"#, "z".repeat(5000));
    let (s, v) = raw(Box::leak(big.into_boxed_str())).await;
    assert_eq!(s, 413, "{v}");
    let (s, body) = get(&c, &format!("http://{}/v1/nothing", gw.addr)).await;
    assert_eq!(s, 404);
    assert!(body.contains("\"error\""));
    let resp = post_stream(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("x", 1, false),
        &[("x-kvroute-priority", "urgent!!")],
    )
    .await;
    assert_eq!(resp.status(), 400);
    // Nothing reached the agent.
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
    // Past the size parsed inline (parsed on a blocking thread), with the default body limit:
    // the same answer, and still nothing reaches the agent.
    let gw = gateway(&[&a], |_| {}).await;
    let cut = format!(
        r#"{{"model":"default","prompt":"{}"#,
        "a".repeat(kvroute_openai::PARSE_INLINE_MAX_BYTES + 1)
    );
    let resp = c
        .request(
            hyper::Request::post(format!("http://{}/v1/completions", gw.addr))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(axum::body::Bytes::from(cut)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{v}"
    );
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_in_the_queue_until_room_then_is_served() {
    let a = StubAgent::start(cfg("busy", 100)).await;
    let gw = gateway(&[&a], |_| {}).await;
    a.state.with(|i| i.free = 0);
    let router = gw.gateway.router.clone();
    wait_until("gateway sees a full agent", || {
        router.agents()[0].free_blocks == 0
    })
    .await;
    let c = client();
    let addr = gw.addr;
    let pending = tokio::spawn(async move {
        post(
            &c,
            addr,
            "/v1/completions",
            &completion("hi", 8, false),
            &[("x-kvroute-tenant", "team-a")],
        )
        .await
    });
    wait_until("request queued", || router.queue().depth == 1).await;
    let q = router.queue();
    assert_eq!(q.entries[0].tenant, "team-a");
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
    a.state.with(|i| i.free = 100);
    let (status, headers, body) = pending.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kvroute-agent"], "busy");
    assert_eq!(router.queue().depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_passed_deadline_answer_429_with_retry_after() {
    let a = StubAgent::start(cfg("full", 100)).await;
    let gw = gateway(&[&a], |c| {
        c.max_queue = 1;
        c.queue_timeout = Duration::from_millis(400);
    })
    .await;
    a.state.with(|i| i.free = 0);
    let router = gw.gateway.router.clone();
    wait_until("full agent", || router.agents()[0].free_blocks == 0).await;
    let c = client();
    let addr = gw.addr;
    let c2 = c.clone();
    let waiting = tokio::spawn(async move {
        post(
            &c2,
            addr,
            "/v1/completions",
            &completion("hi", 8, false),
            &[],
        )
        .await
    });
    wait_until("one queued", || router.queue().depth == 1).await;
    let (status, headers, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 8, false),
        &[],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("queue is full"));
    let (status, headers, body) = waiting.await.unwrap();
    assert_eq!(status, 429, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
}

/// 200 requests at once against two agents with room for about 50 in total: with the kv policy
/// nobody is preempted and every request is answered (served after queueing, or 429); the same
/// burst under round-robin over-admits (which shows the test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_never_over_admits_with_kv_policy() {
    async fn burst(kind: PolicyKind) -> (u64, usize, usize) {
        let mk = |id: &str| StubConfig {
            token_delay: Duration::from_millis(1),
            ..cfg(id, 125)
        };
        let a = StubAgent::start(mk("b1")).await;
        let b = StubAgent::start(mk("b2")).await;
        let gw = gateway(&[&a, &b], |c| {
            c.policy.kind = kind;
            c.queue_timeout = Duration::from_secs(60);
        })
        .await;
        let c = client();
        // ~20 prompt tokens + 60 output = 80 tokens = 5 blocks: 25 fit per agent.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let c = c.clone();
            let addr = gw.addr;
            tasks.push(tokio::spawn(async move {
                let prompt = format!("request number {i:04} of the burst");
                post(
                    &c,
                    addr,
                    "/v1/completions",
                    &completion(&prompt, 60, i % 2 == 0),
                    &[],
                )
                .await
                .0
            }));
        }
        let mut ok = 0;
        let mut limited = 0;
        for t in tasks {
            match t.await.unwrap().as_u16() {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        let preempted =
            a.state.inner.lock().unwrap().preemptions + b.state.inner.lock().unwrap().preemptions;
        (preempted, ok, limited)
    }
    let (preempted, ok, limited) = burst(PolicyKind::Kv).await;
    assert_eq!(preempted, 0, "kv policy over-admitted");
    assert_eq!(ok + limited, 200);
    assert!(ok > 50, "served only {ok}");
    let (rr_preempted, _, _) = burst(PolicyKind::RoundRobin).await;
    assert!(rr_preempted > 0, "round-robin should over-admit this burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_dashboard_state_show_agents_and_requests() {
    let a = StubAgent::start(cfg("m1", 321)).await;
    let gw = gateway(&[&a], |_| {}).await;
    let c = client();
    let (status, _, _) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 4, false),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (_, m) = get(&c, &format!("http://{}/metrics", gw.addr)).await;
    assert!(
        m.contains(r#"kvroute_gateway_requests_total{model="default",policy="kv",status="200"} 1"#),
        "{m}"
    );
    assert!(
        m.contains("kvroute_gateway_agent_total_blocks{agent=\"m1\""),
        "{m}"
    );
    assert!(
        m.contains("kvroute_gateway_routing_decision_seconds_count"),
        "{m}"
    );
    assert!(m.contains("kvroute_gateway_queue_depth 0"), "{m}");
    let (_, s) = get(&c, &format!("http://{}/dashboard/state", gw.addr)).await;
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["policy"], "kv");
    assert_eq!(v["agents"][0]["agent_id"], "m1");
    assert_eq!(v["agents"][0]["total_blocks"], 321);
    let (status, page) = get(&c, &format!("http://{}/dashboard", gw.addr)).await;
    assert_eq!(status, 200);
    assert!(page.contains("of 321 blocks"), "{page}");
    let (status, _) = get(&c, &format!("http://{}/ready", gw.addr)).await;
    assert_eq!(status, 200);
    let _ = Arc::clone(&gw.gateway);
}

/// `--admin-listen`: `/metrics` and `/dashboard*` move to their own listener (404 on the API's
/// port), the OpenAI API stays on the API's port only, and both answer `/health` and `/ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_listener_takes_the_metrics_and_dashboard_off_the_api_port() {
    use kvroute_gateway::server::start_with_admin;
    use kvroute_gateway::source::StaticAgents;
    use kvroute_gateway::GatewayConfig;
    let a = StubAgent::start(StubConfig::default()).await;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = GatewayConfig::for_agents(api.local_addr().unwrap(), vec![a.endpoint()]);
    cfg.admin_listen = Some(admin.local_addr().unwrap());
    let agents = cfg.agents.clone();
    let gw = start_with_admin(cfg, api, Some(admin), Box::new(StaticAgents(agents))).unwrap();
    let admin_addr = gw.admin_addr.unwrap();
    let router = gw.gateway.router.clone();
    wait_until("gateway sees the agent", || {
        router.agents().iter().any(|x| x.eligible)
    })
    .await;
    let c = client();
    let on = |addr: std::net::SocketAddr, path: &str| format!("http://{addr}{path}");
    for path in [
        "/metrics",
        "/dashboard",
        "/dashboard/state",
        "/dashboard/decisions",
    ] {
        assert_eq!(
            get(&c, &on(gw.addr, path)).await.0,
            404,
            "{path} on the API port"
        );
        assert_eq!(
            get(&c, &on(admin_addr, path)).await.0,
            200,
            "{path} on the admin port"
        );
    }
    for path in ["/health", "/ready"] {
        assert_eq!(get(&c, &on(gw.addr, path)).await.0, 200, "{path}");
        assert_eq!(get(&c, &on(admin_addr, path)).await.0, 200, "{path}");
    }
    assert_eq!(get(&c, &on(admin_addr, "/v1/models")).await.0, 404);
    let (status, _, body) = post(
        &c,
        gw.addr,
        "/v1/completions",
        &completion("hi", 1, false),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = get(&c, &on(admin_addr, "/metrics")).await;
    assert!(
        metrics.contains("kvroute_gateway_requests_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_policy_and_its_scorers_whatever_it_decides() {
    let a = StubAgent::start(cfg("a1", 40)).await;
    let gw = gateway(&[&a], |c| c.policy.kind = PolicyKind::KvScore).await;
    let c = client();
    let explain = |prompt: String| {
        let c = c.clone();
        async move {
            let (status, _, body) = post(
                &c,
                gw.addr,
                "/v1/kvroute/explain",
                &completion(&prompt, 1, false),
                &[],
            )
            .await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    let routed = explain("hello".into()).await;
    // Too long for the 40-block pool: rejected, and still named under the same policy.
    let rejected = explain("y".repeat(3000)).await;
    assert_eq!(routed["decision"], "route", "{routed}");
    assert_eq!(rejected["decision"], "reject", "{rejected}");
    for v in [&routed, &rejected] {
        assert_eq!(v["policy"], "kv-score", "{v}");
        let names: Vec<&str> = v["scorers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["prefix", "headroom", "queue"], "{v}");
    }
    assert_eq!(a.state.inner.lock().unwrap().received, 0);
}
