//! kvroute's own engine behind [`InferenceBackend`], and model loading for the subcommands.
//!
//! Loading: `--model default|PATH` is resolved by `engine::fetch` (the default model is fetched
//! and verified into the cache, with a progress bar on a terminal), then the tokenizer and chat
//! template are read ([`ModelText`]). The step loop (`engine::runtime`) is not merged yet: until
//! it is, `load` stops after the text side with [`LoadError::NoRuntime`], and only `tokenize`
//! works end to end.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use kvroute_engine::chat::{ChatMessage as EngineChatMessage, ChatTemplate};
use kvroute_engine::fetch::{self, ModelFormat, ModelRef, Progress, ResolvedModel};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::Tokenizer;

use crate::backend::{ChatMessage, InferenceBackend, TextError};
use crate::config::ServeConfig;

/// Loading failures.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("--model {model:?}: {cause}")]
    Fetch {
        model: String,
        cause: fetch::FetchError,
    },
    #[error("reading {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("the tokenizer of {path}: {cause}")]
    Tokenizer {
        path: PathBuf,
        cause: kvroute_engine::tokenizer::TokenizerError,
    },
    #[error(
        "this build has no engine runtime yet (engine::runtime is not merged); cannot serve {0}"
    )]
    NoRuntime(String),
}

/// Renders fetch progress: an indicatif bar on a terminal, log lines otherwise.
struct FetchProgress {
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
}

impl FetchProgress {
    fn new() -> Self {
        Self {
            bar: Mutex::new(None),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for FetchProgress {
    fn stage(&self, name: &str) {
        tracing::info!(stage = name, "model");
        if self.terminal {
            let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = slot.take() {
                b.finish_and_clear();
            }
            let b = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg:>24} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                b.set_style(style);
            }
            b.set_message(name.to_string());
            *slot = Some(b);
        }
    }

    fn message(&self, line: &str) {
        tracing::debug!(line, "fetch");
    }

    fn bytes(&self, done: u64, total: Option<u64>) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_position(done);
        }
    }
}

/// Finds the model `--model` names, fetching the default model into the cache if needed.
pub fn resolve(model: &str, cache_dir: Option<&Path>) -> Result<ResolvedModel, LoadError> {
    let fetch_err = |cause| LoadError::Fetch {
        model: model.to_string(),
        cause,
    };
    let r: ModelRef = model.parse().map_err(fetch_err)?;
    let cache = match cache_dir {
        Some(c) => c.to_path_buf(),
        None => fetch::cache_dir().map_err(fetch_err)?,
    };
    let progress = FetchProgress::new();
    let resolved = fetch::resolve(&r, &cache, &progress);
    progress.finish();
    resolved.map_err(fetch_err)
}

/// The text side of a model: tokenizer and chat template.
pub struct ModelText {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

impl ModelText {
    pub fn load(model: &ResolvedModel) -> Result<Self, LoadError> {
        let tok_err = |cause| LoadError::Tokenizer {
            path: model.path.clone(),
            cause,
        };
        let tokenizer = match model.format {
            ModelFormat::Gguf => {
                let g = Gguf::open(&model.path).map_err(|e| LoadError::Read {
                    path: model.path.clone(),
                    why: e.to_string(),
                })?;
                Tokenizer::from_gguf(&g).map_err(tok_err)?
            }
            ModelFormat::Safetensors => {
                let cfg = model.path.join("tokenizer_config.json");
                Tokenizer::from_hf_files(
                    &model.path.join("tokenizer.json"),
                    cfg.exists().then_some(cfg.as_path()),
                )
                .map_err(tok_err)?
            }
        };
        let template = match ChatTemplate::from_tokenizer(&tokenizer) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "no usable chat template; /v1/chat/completions will answer 400");
                None
            }
        };
        Ok(Self {
            tokenizer,
            template,
        })
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| TextError::Tokenize(e.to_string()))
    }

    /// The token ids of a rendered chat prompt: special tokens recognised; a BOS the template
    /// already wrote is not doubled.
    pub fn tokenize_chat(&self, rendered: &str) -> Result<Vec<u32>, TextError> {
        let mut ids = self.tokenize(rendered, true)?;
        if let (Some(bos), Some(bos_text)) = (self.tokenizer.bos_id(), self.tokenizer.bos_token()) {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos && rendered.starts_with(&bos_text) {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    /// The chat prompt rendered with the model's template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let t = self.template.as_ref().ok_or_else(|| {
            TextError::ChatTemplate("the model has no chat template; use /v1/completions".into())
        })?;
        let msgs: Vec<EngineChatMessage> = messages
            .iter()
            .map(|m| EngineChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        t.render(&msgs, add_generation_prompt)
            .map_err(|e| TextError::ChatTemplate(e.to_string()))
    }
}

/// Loads `cfg.model` and starts the engine.
pub fn load(cfg: &ServeConfig) -> Result<Arc<dyn InferenceBackend>, LoadError> {
    let resolved = resolve(&cfg.model, cfg.cache_dir.as_deref())?;
    let _text = ModelText::load(&resolved)?;
    Err(LoadError::NoRuntime(resolved.path.display().to_string()))
}

/// The name clients use: `--served-model-name`, else the model file's name without `.gguf`
/// (or the folder's name).
pub fn served_name(flag: Option<&str>, model_path: &Path) -> String {
    if let Some(n) = flag {
        return n.to_string();
    }
    let file = model_path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    file.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_names() {
        let p = Path::new("/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(served_name(None, p), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(served_name(Some("smol"), p), "smol");
        assert_eq!(served_name(None, Path::new("/m/Qwen2-0.5B/")), "Qwen2-0.5B");
    }

    #[test]
    fn missing_model_path_is_a_clear_error() {
        let e = match resolve("/no/such/model.gguf", None) {
            Err(e) => e.to_string(),
            Ok(r) => panic!("{r:?}"),
        };
        assert!(e.starts_with("--model \"/no/such/model.gguf\""), "{e}");
    }
}
