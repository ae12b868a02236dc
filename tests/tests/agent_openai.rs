//! The official `openai` Python client against a real `kvroute-agent serve` with the default
//! model: completions and chat, plain and streamed, greedy. Streamed text equals the plain
//! text, and the greedy completion starts with llama.cpp's first token (reference fixture; the
//! engine's own tests hold the longer continuations).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::{fixture, run_py, Agent, AgentOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_completions_and_chat_plain_and_streamed() {
    let agent = Agent::spawn(AgentOpts::default());
    let (s, b) = kvroute_tests::call(agent.http, "GET", "/v1/kvroute/model", Vec::new()).await;
    assert_eq!(s, 200);
    let info: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let tok =
        kvroute_engine::tokenizer::Tokenizer::from_json(info["tokenizer_json"].as_str().unwrap())
            .unwrap();
    let reference = &fixture()["generate"][0];
    let prompt = reference["prompt"].as_str().unwrap();
    let (url, model) = (agent.base_url(), agent.model.clone());
    let p = prompt.to_string();
    let out = tokio::task::spawn_blocking(move || {
        run_py("openai_roundtrip.py", &[&url, &model, &p, "16"])
    })
    .await
    .unwrap();
    assert_eq!(out["models"], serde_json::json!([agent.model]));

    let c = &out["completion"];
    let text = c["text"].as_str().unwrap();
    assert_eq!(c["completion_tokens"], 16, "{out}");
    assert_eq!(
        c["prompt_tokens"],
        reference["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(c["finish_reason"], "length");
    let first_id = reference["greedy_ids"][0].as_u64().unwrap() as u32;
    let first = tok.decode(&[first_id]);
    assert!(
        !first.is_empty() && text.starts_with(&first),
        "greedy completion {text:?} does not start with llama.cpp's first token {first:?}"
    );
    assert_eq!(out["completion_stream"]["text"], c["text"]);
    assert_eq!(out["completion_stream"]["finish_reason"], "length");
    assert_eq!(out["completion_stream"]["completion_tokens"], 16);

    let chat = &out["chat"];
    assert_eq!(chat["role"], "assistant");
    assert!(!chat["text"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(out["chat_stream"]["text"], chat["text"]);
    assert_eq!(out["chat_stream"]["role"], "assistant");
    assert_eq!(out["chat_stream"]["finish_reason"], chat["finish_reason"]);
    assert_eq!(
        out["chat_stream"]["completion_tokens"],
        chat["completion_tokens"]
    );

    assert_eq!(out["bad_model"]["status"], 404);
    assert_eq!(out["bad_model"]["code"], "model_not_found");
    assert_eq!(out["bad_model"]["param"], "model");
}

/// What a gateway fetches once per model: the serialized tokenizer rebuilds to the same ids as
/// the reference, and the chat template is the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_carries_a_working_tokenizer_and_template() {
    let agent = Agent::spawn(AgentOpts::default());
    let (s, b) = kvroute_tests::call(agent.http, "GET", "/v1/kvroute/model", Vec::new()).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let f = fixture();
    assert_eq!(v["model"], agent.model.as_str());
    assert_eq!(v["block_size"], 16);
    assert_eq!(v["chat_template"], f["chat_template"]);
    let tok =
        kvroute_engine::tokenizer::Tokenizer::from_json(v["tokenizer_json"].as_str().unwrap())
            .unwrap();
    for c in f["tokenize"].as_array().unwrap() {
        let ids = tok
            .encode(c["text"].as_str().unwrap(), c["special"] != false)
            .unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "{}", c["text"]);
    }
}

/// Log-probabilities and penalties through a gateway, as the `openai` client asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_penalties_through_the_gateway_with_the_openai_client() {
    let agent = Agent::spawn(AgentOpts::default());
    let gw = kvroute_tests::Gateway::spawn(&[&agent], &[]).await;
    let (url, model) = (format!("http://{}/v1", gw.addr), agent.model.clone());
    let out = tokio::task::spawn_blocking(move || {
        run_py(
            "openai_logprobs.py",
            &[&url, &model, "The capital of France is", "12"],
        )
    })
    .await
    .unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let c = &out["completion"];
    let tokens: Vec<&str> = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(!tokens.is_empty(), "{out}");
    assert_eq!(tokens.concat(), c["text"].as_str().unwrap(), "{out}");
    let lps = c["token_logprobs"].as_array().unwrap();
    let tops = c["top_logprobs"].as_array().unwrap();
    let offsets = c["text_offset"].as_array().unwrap();
    assert_eq!(
        (lps.len(), tops.len(), offsets.len()),
        (tokens.len(), tokens.len(), tokens.len())
    );
    assert_eq!(offsets[0], 0);
    for i in 0..tokens.len() {
        let lp = f(&lps[i]);
        assert!(lp <= 0.0 && lp.is_finite(), "{out}");
        let top = tops[i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{out}");
        // Greedy: the sampled token is the most likely one.
        let best = top.values().map(f).fold(f64::MIN, f64::max);
        assert!(lp >= best - 1e-4, "token {i}: {lp} < {best}: {out}");
        if i > 0 {
            assert_eq!(
                offsets[i].as_u64().unwrap(),
                offsets[i - 1].as_u64().unwrap() + tokens[i - 1].len() as u64
            );
        }
    }
    let s = &out["completion_stream"];
    assert_eq!(s["text"], c["text"], "{out}");
    assert_eq!(s["tokens"], c["tokens"], "{out}");
    assert_eq!(s["token_logprobs"], c["token_logprobs"], "{out}");
    let chat = &out["chat"];
    let n = chat["tokens"].as_array().unwrap().len();
    assert!(n > 0, "{out}");
    assert_eq!(chat["bytes_ok"], true);
    assert!(chat["top"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_array().unwrap().len() <= 2));
    assert_eq!(out["chat_stream"]["text"], chat["text"], "{out}");
    assert_eq!(out["chat_stream"]["logprob_tokens"], n, "{out}");
    let p = &out["penalties"];
    assert_ne!(
        p["plain"], p["penalized"],
        "strong penalties change a repeating greedy output: {out}"
    );
    assert_eq!(out["bad_penalty"], "presence_penalty", "{out}");
    let echoed = format!(
        "The capital of France is{}",
        out["no_echo"].as_str().unwrap()
    );
    assert_eq!(out["echo"], echoed.as_str(), "{out}");
    assert_eq!(out["echo_stream"], out["echo"], "{out}");
}
