//! Asking one agent for its KV capacity (`kvroute.v1.Agent/GetCapacity`).
//!
//! Behind a trait so reconcile tests can answer without agents; [`GrpcCapacity`] is the real
//! tonic client, tested against a real gRPC server on 127.0.0.1. Must never block a reconcile for
//! longer than its timeout.

use std::time::Duration;

use futures::future::BoxFuture;
use kvroute_proto::{AgentClient, CapacityReport, GetCapacityRequest};

/// Why an agent's capacity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("bad agent endpoint {0:?}")]
    Endpoint(String),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("GetCapacity: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Reads one agent's capacity report.
pub trait CapacityProbe: Send + Sync {
    /// `endpoint` is `http://IP:PORT` of the agent's gRPC server.
    fn get_capacity(
        &self,
        endpoint: String,
    ) -> BoxFuture<'static, Result<CapacityReport, CapacityError>>;
}

/// The real probe: one short-lived tonic connection per call, bounded by `timeout`.
#[derive(Clone, Debug)]
pub struct GrpcCapacity {
    pub timeout: Duration,
}

impl Default for GrpcCapacity {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
        }
    }
}

impl CapacityProbe for GrpcCapacity {
    fn get_capacity(
        &self,
        endpoint: String,
    ) -> BoxFuture<'static, Result<CapacityReport, CapacityError>> {
        let timeout = self.timeout;
        Box::pin(async move {
            let ep = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .map_err(|_| CapacityError::Endpoint(endpoint))?
                .connect_timeout(timeout)
                .timeout(timeout);
            let call = async move {
                let channel = ep.connect().await?;
                let mut client = AgentClient::new(channel);
                let report = client.get_capacity(GetCapacityRequest {}).await?;
                Ok::<_, CapacityError>(report.into_inner())
            };
            tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| CapacityError::Timeout(timeout))?
        })
    }
}
