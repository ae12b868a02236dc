//! Model hyperparameters, read from GGUF metadata (`llama.*`, `qwen2.*`) or a Hugging Face
//! `config.json`. Plain data; validated once when read (every size non-zero, heads divide
//! evenly), so the model code can trust it.

/// How rotary position embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.cpp's convention for GGUF `llama` models, whose
    /// converter permuted the Q/K weights to match.
    Interleaved,
    /// First half with second half (x[i], x[i + d/2]): Hugging Face's `rotate_half`, and
    /// llama.cpp's for `qwen2`.
    Neox,
}

/// Architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
}

use crate::gguf::{Gguf, Value};

/// Why a model's hyperparameters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported model architecture {0:?} (kvroute runs llama and qwen2)")]
    UnsupportedArch(String),
    #[error("model metadata lacks {0:?}")]
    Missing(String),
    #[error("model metadata {key:?} has a bad value {value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("invalid config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("inconsistent model config: {0}")]
    Invalid(String),
}

impl Arch {
    /// The architecture named `name` in GGUF (`general.architecture`) or HF (`model_type`) terms.
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(ConfigError::UnsupportedArch(other.to_owned())),
        }
    }

    /// The GGUF/HF name of the architecture.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

fn bad(key: &str, value: impl std::fmt::Display, why: &'static str) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_owned(),
        value: value.to_string(),
        why,
    }
}

/// Typed look-ups into GGUF metadata for the config reader.
struct Meta<'a>(&'a Gguf);

impl Meta<'_> {
    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(key, v.describe(), "expected a non-negative integer")),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?
            .ok_or_else(|| ConfigError::Missing(key.to_owned()))
    }
    fn f32_opt(&self, key: &str) -> Result<Option<f32>, ConfigError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| bad(key, v.describe(), "expected a float")),
        }
    }
}

impl ModelConfig {
    /// Reads the hyperparameters of a `llama` or `qwen2` GGUF model, the way llama.cpp does:
    /// `{arch}.embedding_length`, `{arch}.block_count`, `{arch}.attention.head_count[_kv]`,
    /// `{arch}.attention.key_length` (else hidden / heads), `{arch}.rope.freq_base`,
    /// `{arch}.attention.layer_norm_rms_epsilon`, `{arch}.context_length`; the vocabulary size from
    /// `{arch}.vocab_size` or the token list; tied embeddings when `output.weight` is absent.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ConfigError> {
        let m = Meta(gguf);
        let arch_name = gguf
            .get("general.architecture")
            .ok_or_else(|| ConfigError::Missing("general.architecture".into()))?;
        let arch_name = arch_name.as_str().ok_or_else(|| {
            bad(
                "general.architecture",
                arch_name.describe(),
                "expected a string",
            )
        })?;
        let arch = Arch::from_name(arch_name)?;
        let p = arch.name();
        let hidden_size = m.usize(&format!("{p}.embedding_length"))?;
        let num_heads = m.usize(&format!("{p}.attention.head_count"))?;
        let num_kv_heads = m
            .usize_opt(&format!("{p}.attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match m.usize_opt(&format!("{p}.attention.key_length"))? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        if let Some(rot) = m.usize_opt(&format!("{p}.rope.dimension_count"))? {
            if rot != head_dim {
                return Err(ConfigError::Invalid(format!(
                    "partial rotary embeddings ({p}.rope.dimension_count = {rot}, head_dim = {head_dim}) are not supported"
                )));
            }
        }
        let vocab_size = match m.usize_opt(&format!("{p}.vocab_size"))? {
            Some(v) => v,
            None => match gguf.get("tokenizer.ggml.tokens") {
                Some(Value::Array(_, items)) => items.len(),
                _ => gguf
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.shape.get(1).copied())
                    .ok_or_else(|| ConfigError::Missing(format!("{p}.vocab_size")))?,
            },
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: m.usize(&format!("{p}.feed_forward_length"))?,
            num_layers: m.usize(&format!("{p}.block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: m
                .f32_opt(&format!("{p}.rope.freq_base"))?
                .unwrap_or(10_000.0),
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            rms_norm_eps: m
                .f32_opt(&format!("{p}.attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| {
                    ConfigError::Missing(format!("{p}.attention.layer_norm_rms_epsilon"))
                })?,
            max_position_embeddings: m.usize(&format!("{p}.context_length"))?,
            tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
        };
        cfg.validate()?;
        if let Some(embd) = gguf.tensor_info("token_embd.weight") {
            if embd.shape != [cfg.hidden_size, cfg.vocab_size] {
                return Err(ConfigError::Invalid(format!(
                    "token_embd.weight has shape {:?}, expected [{}, {}] (hidden, vocab)",
                    embd.shape, cfg.hidden_size, cfg.vocab_size
                )));
            }
        }
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM` / `Qwen2ForCausalLM`). Rotary
    /// embeddings use HF's `rotate_half` (Neox) pairing: HF checkpoints are not permuted.
    pub fn from_hf_config_json(json: &str) -> Result<Self, ConfigError> {
        let v: serde_json::Value = serde_json::from_str(json)?;
        let get = |key: &str| v.get(key).filter(|x| !x.is_null());
        let usize_opt = |key: &str| -> Result<Option<usize>, ConfigError> {
            match get(key) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(key, x, "expected a non-negative integer")),
            }
        };
        let usize_req =
            |key: &str| usize_opt(key)?.ok_or_else(|| ConfigError::Missing(key.to_owned()));
        let f32_opt = |key: &str| -> Result<Option<f32>, ConfigError> {
            match get(key) {
                None => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| bad(key, x, "expected a number")),
            }
        };
        let model_type = get("model_type")
            .ok_or_else(|| ConfigError::Missing("model_type".into()))?
            .as_str()
            .ok_or_else(|| bad("model_type", &v["model_type"], "expected a string"))?;
        let arch = Arch::from_name(model_type)?;
        let hidden_size = usize_req("hidden_size")?;
        let num_heads = usize_req("num_attention_heads")?;
        let head_dim = match usize_opt("head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let tie_word_embeddings = match get("tie_word_embeddings") {
            None => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| bad("tie_word_embeddings", x, "expected a boolean"))?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: usize_req("intermediate_size")?,
            num_layers: usize_req("num_hidden_layers")?,
            num_heads,
            num_kv_heads: usize_opt("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rope_theta: f32_opt("rope_theta")?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Neox,
            rms_norm_eps: f32_opt("rms_norm_eps")?.unwrap_or(1e-6),
            max_position_embeddings: usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what the model code relies on: sizes non-zero, heads divide evenly, head_dim even.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fields = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in fields {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} is 0")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::Invalid(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!(
                "head_dim {} is odd (rotary embeddings rotate pairs)",
                self.head_dim
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "rope theta {} is not a positive number",
                self.rope_theta
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "rms_norm_eps {} is not a positive number",
                self.rms_norm_eps
            )));
        }
        // Guard against absurd sizes that would overflow buffer arithmetic downstream.
        let too_big = self
            .hidden_size
            .checked_mul(self.vocab_size)
            .and_then(|x| x.checked_mul(4))
            .is_none()
            || self
                .num_heads
                .checked_mul(self.head_dim)
                .and_then(|x| x.checked_mul(self.hidden_size))
                .is_none();
        if too_big {
            return Err(ConfigError::Invalid("model dimensions overflow".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;

    fn llama(w: GgufWriter) -> GgufWriter {
        llama_kv(w, 2)
    }

    fn llama_kv(w: GgufWriter, kv_heads: u32) -> GgufWriter {
        w.meta("general.architecture", "llama")
            .meta("llama.embedding_length", 64u32)
            .meta("llama.feed_forward_length", 128u32)
            .meta("llama.block_count", 2u32)
            .meta("llama.attention.head_count", 4u32)
            .meta("llama.attention.head_count_kv", kv_heads)
            .meta("llama.rope.freq_base", 10_000.0f32)
            .meta("llama.attention.layer_norm_rms_epsilon", 1e-5f32)
            .meta("llama.context_length", 256u32)
            .meta("llama.vocab_size", 32u32)
    }

    fn parse(w: GgufWriter) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_gguf(&Gguf::from_bytes(w.to_bytes()).unwrap())
    }

    #[test]
    fn reads_llama_gguf_metadata() {
        let cfg = parse(llama(GgufWriter::new())).unwrap();
        assert_eq!(cfg.arch, Arch::Llama);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.num_kv_heads, 2);
        assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.vocab_size, 32);

        let untied = llama(GgufWriter::new())
            .meta("llama.attention.key_length", 32u32)
            .tensor_f32("output.weight", &[1], &[0.0]);
        let cfg = parse(untied).unwrap();
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.head_dim, 32);
    }

    #[test]
    fn qwen2_uses_neox_rope() {
        let w = GgufWriter::new()
            .meta("general.architecture", "qwen2")
            .meta("qwen2.embedding_length", 64u32)
            .meta("qwen2.feed_forward_length", 128u32)
            .meta("qwen2.block_count", 2u32)
            .meta("qwen2.attention.head_count", 4u32)
            .meta("qwen2.attention.layer_norm_rms_epsilon", 1e-6f32)
            .meta("qwen2.context_length", 256u32)
            .meta_strings("tokenizer.ggml.tokens", &["a", "b", "c"]);
        let cfg = parse(w).unwrap();
        assert_eq!(cfg.arch, Arch::Qwen2);
        assert_eq!(cfg.rope_style, RopeStyle::Neox);
        assert_eq!(cfg.num_kv_heads, 4);
        assert_eq!(cfg.vocab_size, 3);
    }

    #[test]
    fn bad_metadata_is_named() {
        let e = parse(GgufWriter::new().meta("general.architecture", "gpt2")).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedArch(a) if a == "gpt2"));
        let e = parse(GgufWriter::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(k) if k == "general.architecture"));
        let e = parse(llama_kv(GgufWriter::new(), 3)).unwrap_err();
        assert!(e.to_string().contains("num_kv_heads"), "{e}");
        let e = parse(
            GgufWriter::new()
                .meta("general.architecture", "llama")
                .meta("llama.embedding_length", "wide"),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::BadValue { key, .. } if key == "llama.embedding_length"),
            "{e}"
        );
        let e = parse(llama(GgufWriter::new()).tensor_f32(
            "token_embd.weight",
            &[64, 31],
            &[0.0; 64 * 31],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("token_embd.weight"), "{e}");
    }

    #[test]
    fn reads_hf_config_json() {
        let json = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "rope_theta":100000.0,"rms_norm_eps":1e-5,"max_position_embeddings":8192,
            "vocab_size":49152,"tie_word_embeddings":true}"#;
        let cfg = ModelConfig::from_hf_config_json(json).unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.rope_style, RopeStyle::Neox);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.rope_theta, 100_000.0);

        let e = ModelConfig::from_hf_config_json(r#"{"model_type":"mistral"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedArch(_)));
        let e = ModelConfig::from_hf_config_json(r#"{"model_type":"qwen2"}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(_)), "{e}");
        let e = ModelConfig::from_hf_config_json("{").unwrap_err();
        assert!(matches!(e, ConfigError::Json(_)));
        let e = ModelConfig::from_hf_config_json(&json.replace("576", "-1")).unwrap_err();
        assert!(matches!(e, ConfigError::BadValue { .. }), "{e}");
    }
}
