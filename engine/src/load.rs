//! Glue from a model on disk to a [`LoadedModel`] the runtime starts from: weights (GGUF: read
//! once into huge-page memory; safetensors: memory mapped; never dequantized or copied again),
//! config, tokenizer and chat template, for a GGUF file or a Hugging Face safetensors folder.

use crate::chat::{ChatError, ChatTemplate};
use crate::config::{ConfigError, ModelConfig};
use crate::fetch::{FetchError, ModelFormat, ResolvedModel};
use crate::gguf::{Gguf, GgufError};
use crate::model::{Model, ModelError};
use crate::safetensors::{SafetensorsError, SafetensorsModel};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::WeightSource;
use std::path::Path;
use std::sync::Arc;

/// A model ready to run.
pub struct LoadedModel {
    pub model: Arc<Model>,
    /// The weights `model` reads, for backends that upload them elsewhere.
    pub weights: Arc<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    /// The model's chat template, if it has one.
    pub chat_template: Option<ChatTemplate>,
    pub config: ModelConfig,
    /// A display name (the file or folder name).
    pub name: String,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("model config: {0}")]
    Config(#[from] ConfigError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Loads a local GGUF file or safetensors folder (format sniffed).
pub fn load_path(path: &Path) -> Result<LoadedModel, LoadError> {
    load(&crate::fetch::detect(path)?)
}

/// Loads a resolved model.
pub fn load(resolved: &ResolvedModel) -> Result<LoadedModel, LoadError> {
    let path = &resolved.path;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| path.display().to_string());
    let (weights, tokenizer, config): (Arc<dyn WeightSource>, _, _) = match resolved.format {
        ModelFormat::Gguf => {
            let g = Gguf::open(path)?;
            let config = ModelConfig::from_gguf(&g)?;
            let tokenizer = Tokenizer::from_gguf(&g)?;
            (Arc::new(g), tokenizer, config)
        }
        ModelFormat::Safetensors => {
            let st = SafetensorsModel::open(path)?;
            let config = st.config().clone();
            let tokenizer = st.tokenizer()?;
            (Arc::new(st), tokenizer, config)
        }
    };
    let model = Model::new(weights.clone(), config.clone())?;
    let chat_template = match ChatTemplate::from_tokenizer(&tokenizer) {
        Ok(t) => Some(t),
        Err(ChatError::NoTemplate) => None,
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        model = %name,
        arch = ?config.arch,
        layers = config.num_layers,
        hidden = config.hidden_size,
        weight_bytes = model.weight_bytes(),
        kernels = model.isa().name(),
        "model loaded"
    );
    Ok(LoadedModel {
        model: Arc::new(model),
        weights,
        tokenizer,
        chat_template,
        config,
        name,
    })
}
