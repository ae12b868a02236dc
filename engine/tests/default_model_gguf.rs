//! The GGUF reader and config against the real default model file.
#![allow(clippy::unwrap_used)]

mod model_fixture;

use kvroute_engine::config::{Arch, ModelConfig, RopeStyle};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::quant::GgmlType;
use kvroute_engine::weights::WeightSource;

#[test]
fn reads_every_tensor_of_the_default_model() {
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    let names = g.names();
    // 30 layers x 9 tensors + token_embd + output_norm; tied embeddings, so no output.weight.
    assert_eq!(names.len(), 30 * 9 + 2);
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dtype, GgmlType::Q8_0);
    assert_eq!(embd.shape, &[576, 49152]);
    assert_eq!(embd.data.len(), 576 / 32 * 34 * 49152);
    let q = g.tensor("blk.29.attn_q.weight").unwrap();
    assert_eq!(q.dtype, GgmlType::Q4_1);
    assert_eq!(q.shape, &[576, 576]);
    let k = g.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!(k.shape, &[576, 192]);
    let norm = g.tensor("output_norm.weight").unwrap();
    assert_eq!(norm.dtype, GgmlType::F32);
    assert!(g.tensor("output.weight").is_none());
    for name in &names {
        let t = g.tensor(name).unwrap();
        assert_eq!(
            t.data.len() as u64,
            t.dtype.bytes_for(t.elems() as u64).unwrap(),
            "{name}"
        );
    }
    // The norm weights are real numbers around 1, not garbage: a sanity check that the data
    // offset is right.
    let w: Vec<f32> = norm
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(w.iter().all(|x| x.is_finite() && x.abs() < 100.0));
}

#[test]
fn default_model_config() {
    let g = Gguf::open(model_fixture::model_path()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(cfg.num_layers, 30);
    assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (9, 3, 64));
    assert_eq!((cfg.hidden_size, cfg.intermediate_size), (576, 1536));
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
    assert_eq!(cfg.max_position_embeddings, 8192);
    assert!(cfg.tie_word_embeddings);
    assert!((cfg.rms_norm_eps - 1e-5).abs() < 1e-9);
}

#[test]
fn resolve_default_verifies_the_real_model_against_its_published_sha256() {
    use kvroute_engine::fetch::{self, ModelFormat, ModelRef, NoProgress};
    let cache = tempfile::tempdir().unwrap();
    let models = cache.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    // A link to the real file: resolve must hash it (no marker yet) and accept it, so no fetch.
    std::os::unix::fs::symlink(
        model_fixture::model_path(),
        models.join(fetch::DEFAULT_MODEL_FILE),
    )
    .unwrap();
    let r = fetch::resolve(&ModelRef::Default, cache.path(), &NoProgress).unwrap();
    assert_eq!(r.format, ModelFormat::Gguf);
    assert_eq!(r.path, models.join(fetch::DEFAULT_MODEL_FILE));
    let marker =
        std::fs::read_to_string(models.join(format!("{}.sha256-ok", fetch::DEFAULT_MODEL_FILE)))
            .unwrap();
    assert!(marker.starts_with(fetch::DEFAULT_MODEL_SHA256));
    // And `--model PATH` to the same file is sniffed as GGUF.
    let r = fetch::resolve(
        &ModelRef::Path(model_fixture::model_path()),
        cache.path(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(r.format, ModelFormat::Gguf);
}
