//! Hugging Face checkpoints: a folder with `config.json`, `*.safetensors` (one file, or shards
//! listed in `model.safetensors.index.json`), `tokenizer.json` and optionally
//! `tokenizer_config.json`, served through the same [`WeightSource`] as GGUF.
//!
//! Owns opening and memory-mapping the shards, validating their headers (the `safetensors` crate
//! parses them), and mapping Hugging Face tensor names onto GGUF's canonical names with shapes in
//! ggml order (the reverse of safetensors' row-major shape). F32, F16 and BF16 tensors are
//! supported; anything else is an error naming the tensor. Tensor data is never copied. HF
//! checkpoints keep Q/K in `rotate_half` layout, so their config says [`RopeStyle::Neox`].
//!
//! [`RopeStyle::Neox`]: crate::config::RopeStyle::Neox

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Dtype, SafeTensors};
use memmap2::Mmap;
use tracing::debug;

use crate::config::{ConfigError, ModelConfig};
use crate::quant::GgmlType;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{TensorView, WeightSource};

/// Why a Hugging Face folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid safetensors file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: no *.safetensors files")]
    NoWeights(PathBuf),
    #[error("{index}: weight_map names {file:?}, which is not a file in the folder")]
    BadShard { index: PathBuf, file: String },
    #[error("tensor {name:?} has dtype {dtype}; kvroute loads F32, F16 and BF16 checkpoints")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tensor {name:?} appears in more than one shard")]
    Duplicate { name: String },
    #[error("config.json: {0}")]
    Config(#[from] ConfigError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("{0} is missing: a checkpoint folder needs its tokenizer.json")]
    NoTokenizer(PathBuf),
}

/// Maps a Hugging Face Llama/Qwen2 tensor name to its GGUF name, or `None` for tensors the model
/// does not use (e.g. `rotary_emb.inv_freq`).
pub fn canonical_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let suffix = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{suffix}"))
}

struct Entry {
    shard: usize,
    dtype: GgmlType,
    /// ggml order: innermost dimension first.
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened Hugging Face checkpoint folder.
pub struct SafetensorsModel {
    dir: PathBuf,
    shards: Vec<Mmap>,
    tensors: HashMap<String, Entry>,
    order: Vec<String>,
    config: ModelConfig,
}

impl std::fmt::Debug for SafetensorsModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsModel")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.order.len())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, SafetensorsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SafetensorsError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SafetensorsError::Json {
        path: path.to_owned(),
        source,
    })
}

impl SafetensorsModel {
    /// Opens the folder: reads `config.json`, maps every shard and indexes its tensors.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SafetensorsError> {
        let dir = dir.as_ref().to_owned();
        let config_path = dir.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|source| SafetensorsError::Io {
                path: config_path.clone(),
                source,
            })?;
        let mut config = ModelConfig::from_hf_config_json(&config_text)?;

        let files = shard_files(&dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        let mut order = Vec::new();
        for (shard, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|source| SafetensorsError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: read-only private map; checkpoint files are not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| SafetensorsError::Io {
                path: path.clone(),
                source,
            })?;
            let invalid = |reason: String| SafetensorsError::Invalid {
                path: path.clone(),
                reason,
            };
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| invalid(e.to_string()))?;
            let base = 8usize
                .checked_add(header_len)
                .ok_or_else(|| invalid("header length overflows".into()))?;
            // Offset order is file order; names are sorted within a shard for stable listing.
            let mut infos: Vec<_> = meta.tensors().into_iter().collect();
            infos.sort_by(|a, b| a.0.cmp(&b.0));
            for (hf_name, info) in infos {
                let Some(name) = canonical_name(&hf_name) else {
                    debug!(tensor = %hf_name, "ignoring tensor the model does not use");
                    continue;
                };
                let dtype = match info.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(SafetensorsError::UnsupportedDtype {
                            name: hf_name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let (s, e) = info.data_offsets;
                let (Some(start), Some(end)) = (base.checked_add(s), base.checked_add(e)) else {
                    return Err(invalid(format!("tensor {hf_name:?} offsets overflow")));
                };
                // read_metadata checked the offsets against the file; check again locally so
                // slicing can never panic whatever the parser accepted.
                if start > end || end > mmap.len() {
                    return Err(invalid(format!("tensor {hf_name:?} lies outside the file")));
                }
                let shape: Vec<usize> = info.shape.iter().rev().copied().collect();
                if tensors.contains_key(&name) {
                    return Err(SafetensorsError::Duplicate { name: hf_name });
                }
                order.push(name.clone());
                tensors.insert(
                    name,
                    Entry {
                        shard,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            shards.push(mmap);
        }
        // Checkpoints without lm_head reuse the embeddings whatever config.json says.
        config.tie_word_embeddings = !tensors.contains_key("output.weight");
        debug!(dir = %dir.display(), shards = shards.len(), tensors = order.len(), "opened safetensors checkpoint");
        Ok(SafetensorsModel {
            dir,
            shards,
            tensors,
            order,
            config,
        })
    }

    /// The model's hyperparameters from `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The folder's tokenizer (`tokenizer.json`, plus `tokenizer_config.json` when present).
    pub fn tokenizer(&self) -> Result<Tokenizer, SafetensorsError> {
        let json = self.dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(SafetensorsError::NoTokenizer(json));
        }
        let config = self.dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        Ok(Tokenizer::from_hf_files(&json, config.as_deref())?)
    }
}

/// The shard files: those named by `model.safetensors.index.json`, else every `*.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, SafetensorsError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| SafetensorsError::Invalid {
                path: index.clone(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let mut names = BTreeSet::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| SafetensorsError::Invalid {
                path: index.clone(),
                reason: format!("weight_map value {file} is not a file name"),
            })?;
            // Only plain file names inside the folder: an index must not point elsewhere.
            let plain = Path::new(file)
                .file_name()
                .map(|f| f == file)
                .unwrap_or(false);
            if !plain || !dir.join(file).is_file() {
                return Err(SafetensorsError::BadShard {
                    index: index.clone(),
                    file: file.to_owned(),
                });
            }
            names.insert(file.to_owned());
        }
        if names.is_empty() {
            return Err(SafetensorsError::NoWeights(dir.to_owned()));
        }
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| SafetensorsError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(SafetensorsError::NoWeights(dir.to_owned()));
    }
    Ok(files)
}

impl WeightSource for SafetensorsModel {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let e = self.tensors.get(name)?;
        let data = self.shards.get(e.shard)?.get(e.start..e.end)?;
        Some(TensorView {
            dtype: e.dtype,
            shape: &e.shape,
            data,
        })
    }

    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
}

#[cfg(test)]
mod tests;
