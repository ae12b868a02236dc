//! The CUDA backend's f32 reference forward pass (`kernels::reference::forward_logits`, what the
//! GPU check compares the CUDA forward pass against) on the default model, against llama.cpp's
//! first-step logits in the shared fixture. Runs without a GPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kvroute_engine::config::ModelConfig;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::kernels::reference::{forward_logits, topk};

#[test]
fn reference_forward_matches_llama_cpp_first_step_logits() {
    let g = Gguf::open(common::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let fx = common::fixture();
    let case = &fx["generate"][0];
    let prompt: Vec<u32> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<(u32, f32)> = case["first_step_top10"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
        .collect();
    let logits = forward_logits(&cfg, &g, &prompt, None).unwrap();
    assert_eq!(logits.len(), cfg.vocab_size);
    let ours = topk(&logits, 10);
    eprintln!("ours: {ours:?}\nllama.cpp: {want:?}");
    assert_eq!(
        ours[0].1 as u32, want[0].0,
        "greedy token differs from llama.cpp"
    );
    // llama.cpp quantizes activations to Q8 for its dot products; we stay in f32: allow for that.
    for &(id, v) in &want {
        let got = logits[id as usize];
        assert!(
            (got - v).abs() < 0.4,
            "token {id}: ours {got}, llama.cpp {v}"
        );
    }
}
