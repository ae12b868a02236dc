//! The bad-input table against a real agent with the real tokenizer: each case asserted on
//! status and OpenAI error body; the agent keeps serving afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::{call, post_json, Agent, AgentOpts};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_table() {
    let agent = Agent::spawn(AgentOpts {
        extra: vec![
            "--max-model-len".into(),
            "64".into(),
            "--max-body-bytes".into(),
            "64KiB".into(),
        ],
        ..AgentOpts::default()
    });
    let m = agent.model.clone();
    let long_prompt = "word ".repeat(100); // > 64 tokens
    let too_big = json!({"model": m, "prompt": "z".repeat(70_000)}).to_string();
    // (path, body, status, error.param, error.code)
    type Case = (
        &'static str,
        String,
        u16,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "/v1/completions",
            "{\"model\": ".into(),
            400,
            None,
            Some("invalid_json"),
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": "5"}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": 5}).to_string(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": -5}).to_string(),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "temperature": 2.5}).to_string(),
            400,
            Some("temperature"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "top_p": 0.0}).to_string(),
            400,
            Some("top_p"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "top_p": 1.2}).to_string(),
            400,
            Some("top_p"),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": []}).to_string(),
            400,
            Some("messages"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "not-this-one", "prompt": "x"}).to_string(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "/v1/completions",
            too_big,
            413,
            None,
            Some("request_too_large"),
        ),
    ];
    for (path, body, status, param, code) in cases {
        let shown: String = body.chars().take(80).collect();
        let (s, b) = call(agent.http, "POST", path, body.into_bytes()).await;
        assert_eq!(
            s.as_u16(),
            status,
            "{path} {shown}: {}",
            String::from_utf8_lossy(&b)
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{shown}: {v}");
        assert_eq!(v["error"]["code"].as_str(), code, "{shown}: {v}");
    }
    let (s, v) = post_json(
        agent.http,
        "/v1/completions",
        &json!({"model": m, "prompt": "Hello", "max_tokens": 2, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}
