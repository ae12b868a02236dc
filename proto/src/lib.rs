//! kvroute's wire protocol: the agent's capacity service (`kvroute.v1.Agent`).
//!
//! Generated from `kvroute/v1/agent.proto` at build time. This crate owns no logic beyond small
//! conveniences on the generated types.

/// `kvroute.v1`: capacity reports, block events and the `Agent` service.
pub mod v1 {
    tonic::include_proto!("kvroute.v1");
}

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};
pub use v1::{BlockEvent, CapacityReport, GetCapacityRequest, GpuStats, WatchCapacityRequest};

impl CapacityReport {
    /// Blocks referenced by at least one request.
    pub fn used_blocks(&self) -> u64 {
        self.total_blocks.saturating_sub(self.free_blocks)
    }

    /// Fraction of blocks in use, 0.0..=1.0 (0.0 for an empty pool).
    pub fn usage(&self) -> f64 {
        if self.total_blocks == 0 {
            0.0
        } else {
            self.used_blocks() as f64 / self.total_blocks as f64
        }
    }
}
