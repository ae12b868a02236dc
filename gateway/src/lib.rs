//! The gateway: admits requests and routes each to the agent with the most useful free KV memory.
//!
//! The pure core (the cluster view, the routing pipeline, the cost model, the admission queue)
//! is the crate `kvroute-routing`; `router` puts it behind one lock; `capacity` keeps it fed from the agents'
//! `WatchCapacity` streams; `source` says which agents exist (a static list, or [`discovery`]'s watch of ModelDeployments
//! and agent EndpointSlices); `prompt` turns request bodies into
//! token counts and block hashes; `proxy` streams responses through; `server` wires the HTTP
//! endpoints, `metrics` and `dashboard` show what happens.

pub mod auth;
pub mod capacity;
pub mod config;
pub mod dashboard;
pub mod decisions;
pub mod discovery;
pub mod error;
pub mod history;
pub mod metrics;
pub mod prompt;
pub mod proxy;
pub mod quota;
pub mod router;
pub mod server;
pub mod source;
pub mod types;

pub use config::{GatewayArgs, GatewayConfig};
pub use server::{start, start_with, Drained, Gateway, RunningGateway};
