//! The gateway: admits requests and routes each to the agent with the most useful free KV memory.
//!
//! `policy` is the pure core (no I/O, clock or randomness of its own), `cost` its model of a
//! request's time on each agent, and `admission` the pure queue; `router` puts both behind one lock; `capacity` keeps it fed from the agents'
//! `WatchCapacity` streams; `source` says which agents exist; `prompt` turns request bodies into
//! token counts and block hashes; `proxy` streams responses through; `server` wires the HTTP
//! endpoints, `metrics` and `dashboard` show what happens.

pub mod admission;
pub mod capacity;
pub mod config;
pub mod cost;
pub mod dashboard;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod prompt;
pub mod proxy;
pub mod router;
pub mod server;
pub mod source;

pub use config::{GatewayArgs, GatewayConfig};
pub use server::{start, start_with, Gateway, RunningGateway};
