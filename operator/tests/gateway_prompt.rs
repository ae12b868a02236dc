//! The gateway's prompt planning with the default model's real tokenizer and chat template
//! (served as an agent would in `GET /v1/kvroute/model`): token counts and block hashes equal
//! what the engine computes from the reference rendering, so the router's prefix hashes match
//! the agents' cache bit for bit.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use kvroute_engine::gguf::Gguf;
use kvroute_engine::kv::hash::block_hashes;
use kvroute_engine::tokenizer::Tokenizer;
use kvroute_gateway::prompt::{plan, Endpoint, ModelInfo, ReserveOutput};

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KVROUTE_MODEL_PATH") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("KVROUTE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvroute")))
        .unwrap();
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "default model missing at {}: run scripts/test.sh or set KVROUTE_MODEL_PATH",
        p.display()
    );
    p
}

fn fixture() -> serde_json::Value {
    let dir = std::env::var_os("KVROUTE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2-reference.json")).unwrap())
        .unwrap()
}

#[test]
fn plans_match_the_engines_tokens_and_hashes() {
    let gguf = Gguf::open(model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let fx = fixture();
    let info_json = serde_json::json!({
        "model": "default",
        "block_size": 4,
        "max_model_len": 2048,
        "tokenizer_json": tok.to_json().unwrap(),
        "chat_template": fx["chat_template"],
        "bos_token": tok.bos_token(),
        "eos_token": tok.eos_token(),
        "add_bos": false,
    });
    let info = ModelInfo::from_json(info_json.to_string().as_bytes()).unwrap();

    // Completions: the fixture's token ids, hashed in blocks of 4.
    for case in fx["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let body = serde_json::json!({"model": "default", "prompt": text, "max_tokens": 7});
        let p = plan(
            Endpoint::Completions,
            &body,
            Some(&info),
            ReserveOutput::Full,
        )
        .unwrap();
        assert_eq!(p.prompt_tokens, ids.len() as u64, "{text:?}");
        assert_eq!(p.block_hashes, block_hashes(&ids, 4, b""), "{text:?}");
        assert_eq!(p.output_tokens, 7);
        assert_eq!(p.block_size, 4);
    }

    // Chat: rendered like the reference, then tokenized with special tokens recognised.
    for case in fx["chat"].as_array().unwrap() {
        let rendered = case["rendered"].as_str().unwrap();
        let want = tok.encode(rendered, true).unwrap();
        let body = serde_json::json!({
            "model": "default",
            "messages": case["messages"],
            "add_generation_prompt": case["add_generation_prompt"],
            "max_tokens": 10,
        });
        let p = plan(
            Endpoint::ChatCompletions,
            &body,
            Some(&info),
            ReserveOutput::Full,
        )
        .unwrap();
        assert_eq!(p.prompt_tokens, want.len() as u64, "{rendered:?}");
        assert!(!p.block_hashes.is_empty());
        assert_eq!(p.block_hashes, block_hashes(&want, 4, b""), "{rendered:?}");
    }

    // The same conversation extended keeps the earlier blocks' hashes (prefix affinity).
    let short = serde_json::json!({"model": "default", "messages": [
        {"role": "user", "content": "Tell me about the history of Paris in detail."}]});
    let long = serde_json::json!({"model": "default", "messages": [
        {"role": "user", "content": "Tell me about the history of Paris in detail."},
        {"role": "assistant", "content": "Paris was founded by the Parisii."},
        {"role": "user", "content": "And then?"}]});
    let a = plan(
        Endpoint::ChatCompletions,
        &short,
        Some(&info),
        ReserveOutput::Full,
    )
    .unwrap();
    let b = plan(
        Endpoint::ChatCompletions,
        &long,
        Some(&info),
        ReserveOutput::Full,
    )
    .unwrap();
    let shared = a.block_hashes.len() - 1;
    assert!(shared >= 3);
    assert_eq!(a.block_hashes[..shared], b.block_hashes[..shared]);
}
