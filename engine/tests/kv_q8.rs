#![allow(clippy::unwrap_used)]
//! 8-bit KV cache (`q8_0`) against the f16 cache on the default model: how far the logits move
//! and how long greedy continuations stay the same, on the eight llama.cpp reference prompts
//! (`shared/fixtures/smollm2-reference.json`). The test prints what it measured
//! (docs/kv-core.md records it) and bounds it.
//!
//! Why bounds and not equality: q8_0 rounds every K and V value to 1/127 of its 32-value group's
//! largest magnitude (a group holding one of K's outlier channels quantizes the rest coarsely),
//! so attention scores move slightly, and this small model is chaotic under small changes (see
//! reference_llamacpp.rs: kvroute's own scalar and SIMD kernels differ by ~0.3 on these logits,
//! and greedy continuations part after a near-tie). Measured on 2026-12-06 (AVX-512): first-step
//! top-10 logits move by 0.59 at most, 0.20 on average; greedy continuations stay identical for
//! 5, 64, 9, 64, 14, 8, 8 and 22 of 64 tokens. The bounds leave room for other instruction sets:
//! top-10 logits within 1.0 (mean within 0.35), every prompt's first 4 greedy tokens identical,
//! and at least 2 prompts identical for all 64.

mod model_fixture;

use kvroute_engine::config::ModelConfig;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::model::{CpuRunner, KvCacheDtype, KvStorage, Model};
use std::sync::Arc;

fn prompts() -> Vec<Vec<u32>> {
    let f = model_fixture::fixture();
    f["generate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            g["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn q8_0_kv_holds_1_88x_the_blocks_of_f16() {
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let f16 = KvStorage::block_bytes_of(&cfg, 16, KvCacheDtype::F16);
    let q8 = KvStorage::block_bytes_of(&cfg, 16, KvCacheDtype::Q8_0);
    // 2 bytes per value against 34 bytes per 32 values.
    assert_eq!(f16 * 34, q8 * 64, "{f16} vs {q8}");
    let budget = 32usize << 20;
    let ratio = (budget / q8) as f64 / (budget / f16) as f64;
    assert!((ratio - 64.0 / 34.0).abs() < 0.02, "{ratio}");
}

#[test]
fn q8_0_kv_stays_close_to_f16_kv() {
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let model = Arc::new(Model::new(Arc::new(g), cfg).unwrap());
    let mut f16 = CpuRunner::new(model.clone(), 16, 64, 256, 2).unwrap();
    let mut q8 = CpuRunner::new(model, 16, 64, 256, 2).unwrap();
    q8.set_kv_dtype(KvCacheDtype::Q8_0).unwrap();
    assert_eq!(q8.kv().dtype(), KvCacheDtype::Q8_0);
    let n = 64;
    let (mut worst, mut sum, mut count) = (0.0f32, 0.0f64, 0usize);
    let (mut shortest, mut whole) = (n, 0);
    for (i, p) in prompts().iter().enumerate() {
        let (la, ta) = model_fixture::greedy(&mut f16, p, n);
        let (lb, tb) = model_fixture::greedy(&mut q8, p, n);
        let mut idx: Vec<usize> = (0..la.len()).collect();
        idx.sort_by(|&x, &y| la[y].total_cmp(&la[x]));
        for &t in &idx[..10] {
            let d = (la[t] - lb[t]).abs();
            worst = worst.max(d);
            sum += f64::from(d);
            count += 1;
        }
        let same = ta.iter().zip(&tb).take_while(|(a, b)| a == b).count();
        eprintln!("prompt {i}: {same}/{n} greedy tokens identical with q8_0 KV");
        shortest = shortest.min(same);
        whole += usize::from(same == n);
    }
    eprintln!(
        "q8_0 vs f16 KV, first-step top-10 logits: max |diff| {worst:.4}, mean {:.4}",
        sum / count as f64
    );
    let mean = sum / count as f64;
    assert!(worst <= 1.0, "top-10 logits moved by {worst}");
    assert!(mean <= 0.35, "top-10 logits moved by {mean} on average");
    assert!(
        shortest >= 4,
        "a greedy continuation parted after {shortest} tokens"
    );
    assert!(
        whole >= 2,
        "only {whole} of 8 prompts keep all {n} greedy tokens"
    );
}

#[test]
fn host_tier_copies_naming_blocks_or_slots_that_do_not_exist_are_errors() {
    use kvroute_engine::kv::KvCopies;
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    for dtype in [KvCacheDtype::F16, KvCacheDtype::Q8_0] {
        let mut kv = KvStorage::new_of(&cfg, 16, 4, dtype).unwrap();
        kv.set_host_slots(2).unwrap();
        let ok = KvCopies {
            offload: vec![(3, 1)],
            reload: vec![(1, 0)],
        };
        kv.copy_blocks(&ok).unwrap();
        for bad in [
            KvCopies {
                offload: vec![(4, 0)],
                reload: vec![],
            },
            KvCopies {
                offload: vec![(0, 2)],
                reload: vec![],
            },
            KvCopies {
                offload: vec![],
                reload: vec![(0, 9)],
            },
        ] {
            let e = kv.copy_blocks(&bad).unwrap_err().to_string();
            assert!(e.contains("beyond"), "{dtype:?}: {e}");
        }
    }
}
