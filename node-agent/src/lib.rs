//! kvroute node-agent: owns one engine, serves the OpenAI-compatible HTTP API and the gRPC
//! capacity service, and reports NVML telemetry.
//!
//! `main.rs` only parses flags; everything here is testable in process with the fake backend.

pub mod backend;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod engine_backend;
pub mod gpu;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod oneshot;
pub mod openai;
pub mod server;
pub mod state;
pub mod vllm;
