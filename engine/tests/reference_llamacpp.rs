#![allow(clippy::unwrap_used)]
//! The CPU forward pass on the default model (SmolLM2-135M-Instruct, Q4_1) against llama.cpp's
//! own output on the same file (`shared/fixtures/smollm2-reference.json`).
//!
//! Tolerance: llama.cpp does not compute exact f32 products. Its quantized matmuls round every
//! activation row to 8 bits per 32-value block (Q8_1 for the Q4_1 weights, Q8_0 for the Q8_0
//! embedding/output matrix) and it keeps K/V (and its attention accumulator) in f16. kvroute
//! rounds the same way (same block formats, scales and rounding mode), but float summation
//! order and a few library functions (exp, silu) still differ in the last bit — and this model
//! is chaotic under 8-bit activation rounding: a last-bit difference flips an integer rounding
//! in some block, and the flip grows over 30 layers. kvroute's own scalar and SIMD kernels,
//! which differ only in summation order, disagree by up to ~0.3 on these logits. So the
//! first-step logits (values around 10–20) agree to a few tenths, not exactly: 0.5 is the bound
//! the issue sets, and the test prints the largest difference seen. For the same reason greedy
//! continuations can diverge after a near-tie, which is why the bar is ≥ 16 identical tokens on
//! ≥ 6 of the 8 prompts rather than all 32 on all.

mod model_fixture;

use kvroute_engine::config::ModelConfig;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::model::{CpuRunner, Model, SeqInput};
use kvroute_engine::quant::Isa;
use kvroute_engine::sample::argmax;
use std::sync::Arc;

fn load(isa: Option<Isa>) -> Arc<Model> {
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let m = Model::new(Arc::new(g), cfg).unwrap();
    Arc::new(match isa {
        Some(i) => m.with_isa(i),
        None => m,
    })
}

struct Case {
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
    top10: Vec<(u32, f32)>,
}

fn cases() -> Vec<Case> {
    let f = model_fixture::fixture();
    f["generate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| Case {
            prompt_ids: g["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            greedy: g["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            top10: g["first_step_top10"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect(),
        })
        .collect()
}

#[test]
fn first_step_logits_and_greedy_continuations_match_llamacpp() {
    let model = load(None);
    let mut runner = CpuRunner::new(model, 16, 64, 256, 2).unwrap();
    let cases = cases();
    assert_eq!(cases.len(), 8);
    let mut worst = 0.0f32;
    let mut matching = 0;
    for (i, c) in cases.iter().enumerate() {
        let (logits, toks) = model_fixture::greedy(&mut runner, &c.prompt_ids, c.greedy.len());
        assert_eq!(
            argmax(&logits),
            c.top10[0].0,
            "prompt {i}: first-step top-1 differs"
        );
        for &(id, want) in &c.top10 {
            let d = (logits[id as usize] - want).abs();
            worst = worst.max(d);
            assert!(
                d <= 0.5,
                "prompt {i}: logit of token {id} is {} vs llama.cpp {want}",
                logits[id as usize]
            );
        }
        let same = toks
            .iter()
            .zip(&c.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "prompt {i}: {same}/{} greedy tokens identical",
            c.greedy.len()
        );
        if same >= 16 {
            matching += 1;
        }
    }
    eprintln!("largest top-10 logit difference from llama.cpp: {worst:.4}");
    assert!(
        matching >= 6,
        "only {matching} of 8 prompts match llama.cpp for 16 greedy tokens"
    );
}

/// The same check on the scalar reference kernels (first step only: the scalar path is slow).
#[test]
fn scalar_kernels_match_llamacpp_first_step() {
    let model = load(Some(Isa::scalar()));
    let mut runner = CpuRunner::new(model, 16, 64, 256, 2).unwrap();
    for (i, c) in cases().iter().enumerate().take(3) {
        let table: Vec<u32> = (0..8).collect();
        let logits = runner
            .step(&[SeqInput {
                tokens: &c.prompt_ids,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }])
            .unwrap();
        assert_eq!(argmax(logits), c.top10[0].0, "prompt {i}");
        for &(id, want) in &c.top10 {
            assert!(
                (logits[id as usize] - want).abs() <= 0.5,
                "prompt {i} token {id}"
            );
        }
    }
}
