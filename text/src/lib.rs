//! What the gateway needs of a model besides its weights, shared with the engine so both agree
//! bit for bit:
//!
//! - [`tokenizer`]: the model's tokenizer (byte-level BPE built from GGUF metadata, a Hugging Face
//!   `tokenizer.json`, or the serialized form an agent publishes in its model info);
//! - [`chat`]: the model's Jinja chat template and OpenAI messages;
//! - [`hash`]: the prefix-cache block hash, the wire contract between engine and gateway.
//!
//! No model weights, kernels or file formats beyond the metadata the tokenizer reads (through
//! [`tokenizer::Metadata`], which the engine's GGUF reader implements).

pub mod chat;
pub mod hash;
pub mod tokenizer;
