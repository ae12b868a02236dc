//! vLLM interoperability: its `sha256_cbor` block hash ([`hash`]) and its KV-cache events
//! ([`events`], read with [`msgpack`]) translated into kvroute's block hashes. The groundwork
//! of `kvroute-agent attach` (a sidecar in front of a vLLM server) and of publishing
//! vLLM-format events from `serve`; see docs/vllm.md.

pub mod events;
pub mod hash;
pub mod msgpack;
