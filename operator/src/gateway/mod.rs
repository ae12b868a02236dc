//! The gateway: admits requests and routes each to the agent with the most useful free KV memory.
//!
//! `policy` is the pure core (no I/O, clock or randomness of its own); `capacity` keeps it fed from
//! the agents' `WatchCapacity` streams; `admission` holds requests no agent has room for;
//! `proxy` streams responses through; `server` wires the HTTP endpoints.

pub mod policy;
