use super::*;
use crate::gguf::writer::GgufWriter;
use crate::gguf::Gguf;
use ::safetensors::tensor::TensorView as StView;
use std::collections::BTreeMap;

const CONFIG: &str = r#"{"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16,
  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
  "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
  "vocab_size": 4, "tie_word_embeddings": false}"#;

fn f32_bytes(n: usize, seed: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (seed + i as f32).to_le_bytes())
        .collect()
}

/// HF name, dtype, row-major shape and bytes of a one-layer model.
fn tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let bf16 = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
            .collect()
    };
    let f16 = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
            .collect()
    };
    vec![
        (
            "model.embed_tokens.weight",
            Dtype::F32,
            vec![4, 8],
            f32_bytes(32, 0.0),
        ),
        ("model.norm.weight", Dtype::F32, vec![8], f32_bytes(8, 1.0)),
        ("lm_head.weight", Dtype::BF16, vec![4, 8], bf16(32)),
        (
            "model.layers.0.input_layernorm.weight",
            Dtype::F32,
            vec![8],
            f32_bytes(8, 2.0),
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            Dtype::F32,
            vec![8],
            f32_bytes(8, 3.0),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            vec![8, 8],
            f16(64),
        ),
        (
            "model.layers.0.self_attn.q_proj.bias",
            Dtype::F32,
            vec![8],
            f32_bytes(8, 4.0),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            Dtype::F16,
            vec![4, 8],
            f16(32),
        ),
        (
            "model.layers.0.self_attn.v_proj.weight",
            Dtype::F16,
            vec![4, 8],
            f16(32),
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            Dtype::F16,
            vec![8, 8],
            f16(64),
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            Dtype::F32,
            vec![16, 8],
            f32_bytes(128, 5.0),
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            Dtype::F32,
            vec![16, 8],
            f32_bytes(128, 6.0),
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            Dtype::F32,
            vec![8, 16],
            f32_bytes(128, 7.0),
        ),
        (
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            Dtype::F32,
            vec![2],
            f32_bytes(2, 0.0),
        ),
    ]
}

fn serialize(items: &[(&'static str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: BTreeMap<&str, StView<'_>> = items
        .iter()
        .map(|(n, d, s, b)| (*n, StView::new(*d, s.clone(), b).unwrap()))
        .collect();
    ::safetensors::serialize(views, None).unwrap()
}

/// A HF tokenizer.json: the `tokenizers` JSON inside our serialized form of a synthetic tokenizer.
fn tokenizer_json() -> String {
    let g = Gguf::from_bytes(
        GgufWriter::new()
            .byte_level_tokenizer("smollm", &["<s>", "</s>"], &["h i"])
            .to_bytes(),
    )
    .unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&Tokenizer::from_gguf(&g).unwrap().to_json().unwrap()).unwrap();
    ours["tokenizer"].to_string()
}

fn folder(sharded: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let all = tensors();
    if sharded {
        let (a, b) = all.split_at(5);
        std::fs::write(
            dir.path().join("model-00001-of-00002.safetensors"),
            serialize(a),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("model-00002-of-00002.safetensors"),
            serialize(b),
        )
        .unwrap();
        let mut map = serde_json::Map::new();
        for (i, (n, ..)) in all.iter().enumerate() {
            let f = if i < 5 {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            map.insert((*n).into(), f.into());
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    } else {
        std::fs::write(dir.path().join("model.safetensors"), serialize(&all)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": "{{ bos_token }}"}"#,
    )
    .unwrap();
    dir
}

#[test]
fn maps_hf_names_and_reverses_shapes() {
    for sharded in [false, true] {
        let dir = folder(sharded);
        let m = SafetensorsModel::open(dir.path()).unwrap();
        let cfg = m.config();
        assert_eq!(cfg.arch, crate::config::Arch::Qwen2);
        assert_eq!(cfg.rope_style, crate::config::RopeStyle::Neox);
        assert!(!cfg.tie_word_embeddings);
        let names = m.names();
        assert_eq!(names.len(), 13, "{names:?}");
        assert!(!names.iter().any(|n| n.contains("inv_freq")));

        let embd = m.tensor("token_embd.weight").unwrap();
        assert_eq!((embd.dtype, embd.shape), (GgmlType::F32, &[8usize, 4][..]));
        assert_eq!(&embd.data[4..8], &1.0f32.to_le_bytes());
        let out = m.tensor("output.weight").unwrap();
        assert_eq!(out.dtype, GgmlType::BF16);
        assert_eq!(
            half::bf16::from_le_bytes([out.data[6], out.data[7]]).to_f32(),
            3.0
        );
        let down = m.tensor("blk.0.ffn_down.weight").unwrap();
        assert_eq!(down.shape, &[16, 8]);
        assert_eq!(&down.data[..4], &7.0f32.to_le_bytes());
        let k = m.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!((k.dtype, k.shape), (GgmlType::F16, &[8usize, 4][..]));
        assert_eq!(m.tensor("blk.0.attn_q.bias").unwrap().shape, &[8]);
        assert!(m.tensor("blk.0.attn_norm.weight").is_some());
        assert!(m.tensor("blk.0.ffn_norm.weight").is_some());
        assert!(m.tensor("output_norm.weight").is_some());
        assert!(m.tensor("model.norm.weight").is_none());

        let t = m.tokenizer().unwrap();
        assert_eq!((t.bos_id(), t.eos_id()), (Some(0), Some(1)));
        assert_eq!(t.chat_template(), Some("{{ bos_token }}"));
        assert_eq!(
            t.encode("hi", true).unwrap(),
            vec![t.token_id("hi").unwrap()]
        );
    }
}

#[test]
fn missing_lm_head_means_tied_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let all: Vec<_> = tensors()
        .into_iter()
        .filter(|t| t.0 != "lm_head.weight")
        .collect();
    std::fs::write(dir.path().join("model.safetensors"), serialize(&all)).unwrap();
    let m = SafetensorsModel::open(dir.path()).unwrap();
    assert!(m.config().tie_word_embeddings);
    assert!(m.tensor("output.weight").is_none());
    assert!(matches!(
        m.tokenizer(),
        Err(SafetensorsError::NoTokenizer(_))
    ));
}

#[test]
fn canonical_names() {
    assert_eq!(
        canonical_name("model.layers.12.mlp.up_proj.weight").as_deref(),
        Some("blk.12.ffn_up.weight")
    );
    assert_eq!(canonical_name("model.layers.x.mlp.up_proj.weight"), None);
    assert_eq!(
        canonical_name("model.layers.3.self_attn.rotary_emb.inv_freq"),
        None
    );
    assert_eq!(canonical_name("model.layers.3"), None);
    assert_eq!(
        canonical_name("lm_head.weight").as_deref(),
        Some("output.weight")
    );
}

#[test]
fn broken_folders_are_errors() {
    // No config.json.
    let dir = tempfile::tempdir().unwrap();
    let e = SafetensorsModel::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, SafetensorsError::Io { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    // Config but no weights.
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::NoWeights(_))
    ));
    // Bad config.
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::Config(_))
    ));
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();

    // Truncated and garbage shards.
    let good = serialize(&tensors());
    for bytes in [
        good[..good.len() - 3].to_vec(),
        good[..5].to_vec(),
        b"\xff\xff\xff\xff\xff\xff\xff\xff{}".to_vec(),
    ] {
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let e = SafetensorsModel::open(dir.path()).unwrap_err();
        assert!(matches!(e, SafetensorsError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }

    // Unsupported dtype.
    let ints = serialize(&[("model.norm.weight", Dtype::I32, vec![8], vec![0; 32])]);
    std::fs::write(dir.path().join("model.safetensors"), ints).unwrap();
    let e = SafetensorsModel::open(dir.path()).unwrap_err();
    assert!(
        matches!(&e, SafetensorsError::UnsupportedDtype { name, .. } if name == "model.norm.weight"),
        "{e}"
    );

    // The same tensor in two shards.
    std::fs::write(
        dir.path().join("model.safetensors"),
        serialize(&tensors()[..2]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("other.safetensors"),
        serialize(&tensors()[..1]),
    )
    .unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::Duplicate { .. })
    ));
}

#[test]
fn bad_indexes_are_errors() {
    let dir = folder(true);
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"lm_head.weight": "missing.safetensors"}}"#,
    )
    .unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::BadShard { .. })
    ));
    std::fs::write(
        &index,
        r#"{"weight_map": {"lm_head.weight": "../config.json"}}"#,
    )
    .unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::BadShard { .. })
    ));
    std::fs::write(&index, r#"{"weight_map": 3}"#).unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::Invalid { .. })
    ));
    std::fs::write(&index, "{").unwrap();
    assert!(matches!(
        SafetensorsModel::open(dir.path()),
        Err(SafetensorsError::Json { .. })
    ));
}

proptest::proptest! {
    /// Corrupted shard bytes give an error or a model, never a panic.
    #[test]
    fn mutated_shards_never_panic(
        edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..6),
        cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
    ) {
        static GOOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        let path = dir.path().join("model.safetensors");
        let mut b = GOOD.get_or_init(|| serialize(&tensors())).clone();
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        std::fs::write(&path, b).unwrap();
        if let Ok(m) = SafetensorsModel::open(dir.path()) {
            for n in m.names() {
                let t = m.tensor(&n).unwrap();
                proptest::prop_assert_eq!(t.data.len(), t.elems() * t.dtype.block_bytes());
            }
        }
    }
}
