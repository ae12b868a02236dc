//! Decision traces (issue 21): `x-kvroute-debug: 1` answers with the routing decision in
//! `x-kvroute-route`, from real agents behind a real `kvroute gateway`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use http_body_util::BodyExt;
use kvroute_tests::{send_with, Agent, AgentOpts, Gateway};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_request_gets_every_candidate_with_the_pick_scoring_best() {
    let a = Agent::spawn(AgentOpts::default());
    let b = Agent::spawn(AgentOpts {
        extra: vec!["--agent-id".into(), "second".into()],
        ..AgentOpts::default()
    });
    let gw = Gateway::spawn(&[&a, &b], &["--policy", "kv"]).await;
    let body = serde_json::to_vec(
        &json!({"model": a.model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .unwrap();
    let ask = |headers: Vec<(&'static str, &'static str)>| {
        let body = body.clone();
        async move {
            let resp = send_with(gw.addr, "POST", "/v1/completions", &headers, body).await;
            let status = resp.status();
            let h = resp.headers().clone();
            let _ = resp.into_body().collect().await.unwrap();
            (status, h)
        }
    };
    let (status, h) = ask(vec![]).await;
    assert_eq!(status, 200);
    assert!(h.get("x-kvroute-route").is_none(), "no trace unless asked");
    // Twice: the second time the first agent caches the prompt's prefix.
    for _ in 0..2 {
        let (status, h) = ask(vec![("x-kvroute-debug", "1")]).await;
        assert_eq!(status, 200);
        let trace: Value =
            serde_json::from_str(h.get("x-kvroute-route").unwrap().to_str().unwrap()).unwrap();
        assert_eq!(trace["policy"], "kv", "{trace}");
        assert_eq!(trace["attempts"], 1, "{trace}");
        let cands = trace["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), 2, "{trace}");
        let mut ids: Vec<&str> = cands.iter().map(|c| c["agent"].as_str().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["process-test", "second"]);
        let best = cands
            .iter()
            .max_by(|x, y| {
                x["score"]
                    .as_f64()
                    .unwrap()
                    .total_cmp(&y["score"].as_f64().unwrap())
            })
            .unwrap();
        assert_eq!(best["agent"], trace["agent"], "{trace}");
        if let Some(served) = h.get("x-kvroute-agent") {
            assert_eq!(served.to_str().unwrap(), trace["agent"].as_str().unwrap());
        }
        for c in cands {
            let ttft = c["predicted_ttft_s"].as_f64().unwrap();
            assert!(ttft >= 0.0 && ttft.is_finite(), "{c}");
            assert!(c["need_blocks"].as_u64().unwrap() >= 1, "{c}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvroute_explain_says_where_a_request_would_go_without_sending_it() {
    let a = Agent::spawn(AgentOpts::default());
    let b = Agent::spawn(AgentOpts {
        extra: vec!["--agent-id".into(), "second".into()],
        ..AgentOpts::default()
    });
    let gw = Gateway::spawn(&[&a, &b], &["--policy", "kv"]).await;
    let received = |agent: &Agent| {
        let addr = agent.http;
        async move {
            let text = kvroute_tests::try_get_text(addr, "/metrics").await.unwrap();
            kvroute_tests::metric_values(&text, "kvroute_requests_received_total")
                .iter()
                .sum::<f64>()
        }
    };
    let before = received(&a).await + received(&b).await;
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(kvroute_tests::bin("kvroute"));
        cmd.args(["explain", "--gateway", &format!("http://{}", gw.addr)])
            .args(["--model", &a.model])
            .args(extra);
        cmd.output().unwrap()
    };
    let out = run(&["--prompt", "The capital of France is", "--max-tokens", "8"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "route", "{v}");
    assert_eq!(v["policy"], "kv", "{v}");
    assert_eq!(v["output_tokens"], 8, "{v}");
    assert!(v["prompt_tokens"].as_u64().unwrap() >= 5, "{v}");
    assert_eq!(v["candidates"].as_array().unwrap().len(), 2, "{v}");
    assert!(["process-test", "second"].contains(&v["agent"].as_str().unwrap()));
    let out = run(&["--chat", "--prompt", "Hello"]);
    assert!(out.status.success());
    // Nothing was sent to any agent, and nothing is left reserved.
    assert_eq!(received(&a).await + received(&b).await, before);
    let text = kvroute_tests::try_get_text(gw.addr, "/metrics")
        .await
        .unwrap();
    let reserved: f64 =
        kvroute_tests::metric_values(&text, "kvroute_gateway_agent_reserved_blocks")
            .iter()
            .sum();
    assert_eq!(reserved, 0.0);
    // Errors are said plainly, with a non-zero exit.
    for (gateway, says) in [
        ("ftp://nowhere", "expected http://HOST:PORT"),
        ("http://127.0.0.1:1", "cannot reach the gateway"),
    ] {
        let out = std::process::Command::new(kvroute_tests::bin("kvroute"))
            .args([
                "explain",
                "--gateway",
                gateway,
                "--model",
                "m",
                "--prompt",
                "x",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{gateway}: {err}");
    }
}

/// Two prefix groups, two requests each, one after another: the dashboard's decision log
/// (`/dashboard/decisions`, newest first) has each request with its candidates, and the second
/// request of each group went where the first did, decided by the prefix cache: under `kv` a
/// prefix term of the cost model (`prefill_s`, or `duplicate_s`: recomputing what the other
/// agent caches), under `kv-score` the `prefix` scorer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_log_shows_the_prefix_deciding_the_second_request_of_each_group() {
    let a = Agent::spawn(AgentOpts::default());
    let b = Agent::spawn(AgentOpts {
        extra: vec!["--agent-id".into(), "second".into()],
        ..AgentOpts::default()
    });
    for (policy, topics, prefix_terms) in [
        (
            "kv",
            ["rivers", "mountains"],
            &["prefill_s", "duplicate_s"][..],
        ),
        ("kv-score", ["deserts", "glaciers"], &["prefix"][..]),
    ] {
        let gw = Gateway::spawn(&[&a, &b], &["--policy", policy]).await;
        let mut sent = Vec::new();
        for round in 0..2 {
            for topic in topics {
                let prompt = format!(
                    "{} Question {round}: name one of the {topic}.",
                    format!("This is a long shared introduction about {topic} of the world. ")
                        .repeat(8)
                );
                let body = serde_json::to_vec(&json!({
                    "model": a.model, "prompt": prompt, "max_tokens": 2, "temperature": 0
                }))
                .unwrap();
                let resp = send_with(gw.addr, "POST", "/v1/completions", &[], body).await;
                assert_eq!(resp.status(), 200, "{policy}");
                let agent = resp.headers()["x-kvroute-agent"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let _ = resp.into_body().collect().await.unwrap();
                sent.push((topic, agent));
            }
        }
        let text = kvroute_tests::try_get_text(gw.addr, "/dashboard/decisions")
            .await
            .unwrap();
        let log: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(log["capacity"], 50, "{log}");
        let mut ds = log["decisions"].as_array().unwrap().clone();
        assert_eq!(ds.len(), 4, "{log}");
        ds.reverse(); // oldest first, as sent
        for (d, (_, agent)) in ds.iter().zip(&sent) {
            assert_eq!(d["status"], 200, "{d}");
            assert_eq!(d["outcome"], "routed", "{d}");
            assert_eq!(d["model"], a.model.as_str(), "{d}");
            assert_eq!(d["route"]["agent"], agent.as_str(), "{d}");
            assert_eq!(d["route"]["policy"], policy, "{d}");
            assert_eq!(d["route"]["candidates"].as_array().unwrap().len(), 2, "{d}");
        }
        for g in 0..2 {
            let (first, second) = (&sent[g], &sent[g + 2]);
            assert_eq!(first.1, second.1, "{policy}: group {g} moved: {sent:?}");
            let route = &ds[g + 2]["route"];
            let term = route["deciding"]["term"].as_str().unwrap_or("none");
            assert!(
                prefix_terms.contains(&term),
                "{policy}: group {g}'s second request decided by {term}: {route}"
            );
            assert!(route["deciding"]["lead"].as_f64().unwrap() > 0.0, "{route}");
            let pick = route["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["agent"] == route["agent"])
                .unwrap();
            assert!(pick["cached_blocks"].as_u64().unwrap() >= 4, "{route}");
        }
        // The page lists them too (rendered on the server).
        let page = kvroute_tests::try_get_text(gw.addr, "/dashboard")
            .await
            .unwrap();
        let rows = page
            .split(r#"id="decision-rows">"#)
            .nth(1)
            .and_then(|t| t.split("</tbody>").next())
            .unwrap();
        assert_eq!(
            rows.matches(r#"<tr class="decision">"#).count(),
            4,
            "{rows}"
        );
    }
}

/// An agent whose whole KV pool cannot hold the prompt (it reports as its `max_model_len` the
/// tokens its pool holds) is left out by the filters, and the trace says so (`filtered`),
/// beside the candidate that served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_names_the_agents_the_filters_left_out_and_why() {
    let a = Agent::spawn(AgentOpts::default());
    let tiny = Agent::spawn(AgentOpts {
        kv_memory: "1MiB",
        extra: vec!["--agent-id".into(), "tiny".into()],
    });
    let gw = Gateway::spawn(&[&a, &tiny], &["--policy", "kv"]).await;
    let prompt = "A long prompt about the sea and its many moods. ".repeat(30);
    let body = serde_json::to_vec(
        &json!({"model": a.model, "prompt": prompt, "max_tokens": 2, "temperature": 0}),
    )
    .unwrap();
    let resp = send_with(
        gw.addr,
        "POST",
        "/v1/completions",
        &[("x-kvroute-debug", "1")],
        body,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let trace: Value =
        serde_json::from_str(resp.headers()["x-kvroute-route"].to_str().unwrap()).unwrap();
    let _ = resp.into_body().collect().await.unwrap();
    assert_eq!(trace["agent"], "process-test", "{trace}");
    assert_eq!(trace["candidates"].as_array().unwrap().len(), 1, "{trace}");
    assert_eq!(
        trace["filtered"],
        json!([{"agent": "tiny", "verdict": "prompt_too_long"}]),
        "{trace}"
    );
    assert!(trace["deciding"].is_null(), "one candidate: {trace}");
}
