//! [`InferenceBackend`] for kvroute's own engine, and model loading for the subcommands.
//!
//! Waiting on `engine::runtime` / `engine::load`: until they are merged this module reports a
//! clear error instead of loading.

use std::sync::Arc;

use crate::backend::InferenceBackend;
use crate::cli::BenchArgs;
use crate::config::ServeConfig;

/// Loading failures.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this build has no engine runtime yet; cannot load {0}")]
    NoRuntime(String),
}

/// Loads `cfg.model` and starts the engine.
pub fn load(cfg: &ServeConfig) -> Result<Arc<dyn InferenceBackend>, LoadError> {
    Err(LoadError::NoRuntime(cfg.model.clone()))
}

/// Generates once and prints the text as it comes.
pub fn run_once(
    _backend: &dyn InferenceBackend,
    _prompt: &str,
    _chat: bool,
    _max_tokens: u32,
    _temperature: f32,
    _seed: Option<u64>,
) -> anyhow::Result<()> {
    anyhow::bail!("no engine runtime")
}

/// Runs the synthetic benchmark and returns its report.
pub fn bench(_backend: Arc<dyn InferenceBackend>, _args: &BenchArgs) -> anyhow::Result<String> {
    anyhow::bail!("no engine runtime")
}
