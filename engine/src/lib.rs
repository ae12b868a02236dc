//! kvroute's inference engine.
//!
//! A pure core (`kv`, `sched`) that accounts for every KV-cache block and decides what runs each
//! step, and the model side (loading, tokenizing, the forward pass, sampling) that a backend runs.
//! This crate does no network I/O; the agent and gateway binaries own that.

pub mod api;
pub mod bench;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fetch;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod model;
pub mod quant;
pub mod runtime;
pub mod safetensors;
pub mod sample;
pub mod sched;
pub mod weights;

/// The tokenizer, chat templates and block hash live in the light crate `kvroute-text` (what a
/// gateway needs of a model without its weights); the engine's paths name them too.
pub use kvroute_text::{chat, tokenizer};
