//! The OpenAI-compatible HTTP API over real HTTP on 127.0.0.1, against the fake backend:
//! completions, chat, streaming, models, model info, metrics, and the bad-input table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hyper::StatusCode;
use kvroute_agent::backend::fake::FakeConfig;
use serde_json::{json, Value};

fn cfg() -> FakeConfig {
    FakeConfig {
        max_model_len: 64,
        ..FakeConfig::default()
    }
}

#[tokio::test]
async fn completions_plain_and_streamed_agree() {
    let agent = start(cfg()).await;
    let body = json!({"model": "fake-model", "prompt": "hello", "max_tokens": 7, "temperature": 0});
    let (s, v) = post_json(agent.http, "/v1/completions", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], fake_text(5, 7));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 12);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        Some(serde_json::to_vec(&sbody).unwrap()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    let chunks = &events[..events.len() - 2];
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, fake_text(5, 7));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(chunks.iter().all(|c| c["usage"].is_null()));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn chat_plain_and_streamed_agree() {
    let agent = start(cfg()).await;
    let body = json!({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let (s, v) = post_json(agent.http, "/v1/chat/completions", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The fake template renders "<user>hi<assistant>" (19 tokens).
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], fake_text(19, 5));
    assert_eq!(v["usage"]["prompt_tokens"], 19);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = send(
        agent.http,
        "POST",
        "/v1/chat/completions",
        Some(serde_json::to_vec(&sbody).unwrap()),
    )
    .await;
    let events = read_sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    let chunks = &events[..events.len() - 1];
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, fake_text(19, 5));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    // Without include_usage, no chunk carries a usage field.
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn models_model_info_health_ready() {
    let agent = start(cfg()).await;
    let (s, b) = call(agent.http, "GET", "/v1/models", None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["data"][0]["id"], "fake-model");
    assert_eq!(v["data"][0]["max_model_len"], 64);
    let (s, b) = call(agent.http, "GET", "/v1/kvroute/model", None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["block_size"], 4);
    assert!(v["tokenizer_json"].as_str().unwrap().contains("byte-level"));
    assert!(v["chat_template"].as_str().unwrap().contains("messages"));
    assert_eq!(v["add_bos"], false);
    assert_eq!(
        call(agent.http, "GET", "/health", None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(agent.http, "GET", "/ready", None).await.0,
        StatusCode::OK
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_expose_kvroute_and_vllm_names() {
    let agent = start(cfg()).await;
    let body = json!({"model": "fake-model", "prompt": "abcdefgh", "max_tokens": 4});
    assert_eq!(
        post_json(agent.http, "/v1/completions", &body).await.0,
        StatusCode::OK
    );
    let bad = json!({"model": "nope", "prompt": "x"});
    assert_eq!(
        post_json(agent.http, "/v1/completions", &bad).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, b) = call(agent.http, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    for name in [
        "vllm:kv_cache_usage_perc{",
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:cache_config_info{block_size=\"4\",num_gpu_blocks=\"64\"",
        "vllm:prefix_cache_queries_total{",
        "vllm:prefix_cache_hits_total{",
        "vllm:num_preemptions_total{",
        "vllm:time_to_first_token_seconds_bucket{",
        "vllm:time_per_output_token_seconds_bucket{",
        "kvroute_kv_blocks_free{",
        "kvroute_requests_received_total{model_name=\"fake-model\"} 1\n",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    // One request: one first token, three inter-token gaps, 4 tokens, one 404.
    assert!(
        text.contains("kvroute_time_to_first_token_seconds_count{model_name=\"fake-model\"} 1\n")
    );
    assert!(
        text.contains("kvroute_time_per_output_token_seconds_count{model_name=\"fake-model\"} 3\n")
    );
    assert!(text.contains("kvroute_generation_tokens_total{model_name=\"fake-model\"} 4\n"));
    assert!(text.contains("kvroute_http_errors_total{code=\"404\"} 1\n"));
    assert!(text.contains("vllm:prefix_cache_queries_total{model_name=\"fake-model\"} 8\n"));
    agent.stop().await.unwrap();
}

/// Every bad input gets its status and an OpenAI error body naming the problem.
#[tokio::test]
async fn bad_input_table() {
    let agent = start_with(cfg(), 1024, std::time::Duration::from_secs(5)).await;
    let long_prompt = "x".repeat(64);
    let huge = format!(
        "{{\"model\":\"fake-model\",\"prompt\":\"{}\"}}",
        "y".repeat(2000)
    );
    // (method, path, body, status, error.param, error.code)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<u8>,
        StatusCode,
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/completions",
            b"{\"model\":".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            "POST",
            "/v1/completions",
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","max_tokens":"ten"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","max_tokens":0}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","max_tokens":-1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","temperature":2.1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","top_p":1.5}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","top_p":0}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":{"a":1}}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            format!(r#"{{"model":"fake-model","prompt":"{long_prompt}"}}"#).into_bytes(),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"fake-model","prompt":"x","max_tokens":64}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"model":"fake-model","messages":[]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"model":"fake-model","messages":[{"role":"user"}],"temperature":"warm"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            br#"{"model":"gpt-4","prompt":"x"}"#.to_vec(),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "POST",
            "/v1/chat/completions",
            br#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "POST",
            "/v1/completions",
            huge.into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            Some("request_too_large"),
        ),
        (
            "GET",
            "/v1/nothing",
            Vec::new(),
            StatusCode::NOT_FOUND,
            None,
            Some("not_found"),
        ),
        (
            "GET",
            "/v1/completions",
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            Some("method_not_allowed"),
        ),
    ];
    for (method, path, body, status, param, code) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (s, b) = call(agent.http, method, path, Some(body)).await;
        assert_eq!(s, status, "{method} {path} {shown}");
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|_| {
            panic!(
                "{shown}: not an OpenAI error body: {}",
                String::from_utf8_lossy(&b)
            )
        });
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{shown}: {v}"
        );
        assert!(e["type"].is_string(), "{shown}: {v}");
        assert_eq!(e["param"].as_str(), param, "{shown}: {v}");
        assert_eq!(e["code"].as_str(), code, "{shown}: {v}");
    }
    // The agent still serves after all that.
    let ok = json!({"model": "fake-model", "prompt": "fine", "max_tokens": 2});
    assert_eq!(
        post_json(agent.http, "/v1/completions", &ok).await.0,
        StatusCode::OK
    );
    agent.stop().await.unwrap();
}

/// Bodies past the size parsed inline are parsed on a blocking thread: malformed or invalid,
/// they get the same answers, and a valid one is served.
#[tokio::test]
async fn large_bodies_parsed_off_the_async_workers_get_the_same_answers() {
    let agent = start_with(cfg(), 4 << 20, std::time::Duration::from_secs(5)).await;
    let pad = "a".repeat(kvroute_openai::PARSE_INLINE_MAX_BYTES + 1);
    let cut = format!(r#"{{"model":"fake-model","prompt":"{pad}"#);
    let (s, b) = call(
        agent.http,
        "POST",
        "/v1/completions",
        Some(cut.into_bytes()),
    )
    .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_json", "{v}");
    let bad = json!({"model": "fake-model", "prompt": "x", "user": pad, "max_tokens": "ten"});
    let (s, v) = post_json(agent.http, "/v1/completions", &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    let ok = json!({"model": "fake-model", "prompt": "x", "user": pad, "max_tokens": 2});
    assert_eq!(
        post_json(agent.http, "/v1/completions", &ok).await.0,
        StatusCode::OK
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn full_engine_queue_is_503() {
    let agent = start(FakeConfig {
        max_waiting: 0,
        ..cfg()
    })
    .await;
    let body = json!({"model": "fake-model", "prompt": "x", "max_tokens": 2});
    let (s, v) = post_json(agent.http, "/v1/completions", &body).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "overloaded");
    agent.stop().await.unwrap();
}

/// An engine error is a 500 with an OpenAI error body; mid-stream it is an error event followed
/// by `[DONE]`, never a silently cut stream.
#[tokio::test]
async fn engine_errors_are_answered() {
    let agent = start(FakeConfig {
        fail_after: Some(3),
        ..cfg()
    })
    .await;
    let body = json!({"model": "fake-model", "prompt": "abc", "max_tokens": 10});
    let (s, v) = post_json(agent.http, "/v1/completions", &body).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected fault"));

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let resp = send(
        agent.http,
        "POST",
        "/v1/completions",
        Some(serde_json::to_vec(&sbody).unwrap()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let events = read_sse(resp).await;
    assert_eq!(events.len(), 5, "{events:?}");
    let text: String = events[..3]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, fake_text(3, 3));
    assert!(events[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected fault"));
    assert_eq!(events[4], "[DONE]");
    // Both requests ended: nothing left in flight, every block free again.
    tokio::time::timeout(GUARD, agent.state.lifecycle.wait_idle())
        .await
        .unwrap();
    agent.stop().await.unwrap();
}
