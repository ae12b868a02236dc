//! The gRPC capacity service (`kvroute.v1.Agent`) and `grpc.health.v1`.
//!
//! `WatchCapacity` hands each subscriber its own stream task (see `capacity`); `GetCapacity`
//! answers one report without block events. Before the model is loaded both answer
//! UNAVAILABLE. This module never blocks the engine: it only reads the capacity hub.

use std::sync::Arc;

use kvroute_proto::{Agent, AgentServer, CapacityReport, GetCapacityRequest, WatchCapacityRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::state::AgentState;

/// The `kvroute.v1.Agent` implementation.
pub struct AgentService {
    state: Arc<AgentState>,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    pub fn server(state: Arc<AgentState>) -> AgentServer<Self> {
        AgentServer::new(Self::new(state))
    }
}

/// Refuses a call without the agent's shared token, when it has one.
fn authorize<T>(state: &AgentState, req: &Request<T>) -> Result<(), Status> {
    let header = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if state.authorized(header) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "this agent needs its shared token: authorization: Bearer <token>",
        ))
    }
}

fn loading() -> Status {
    Status::unavailable("the model is loading")
}

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchCapacityStream = ReceiverStream<Result<CapacityReport, Status>>;

    async fn watch_capacity(
        &self,
        request: Request<WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        authorize(&self.state, &request)?;
        let l = self.state.loaded().ok_or_else(loading)?;
        if let Some(reason) = self.state.lifecycle.failure() {
            return Err(Status::unavailable(format!("the engine failed: {reason}")));
        }
        let req = request.into_inner();
        let dispatcher = if req.dispatcher.is_empty() {
            None
        } else {
            kvroute_contract::dispatch::check_dispatcher(&req.dispatcher)
                .map_err(|e| Status::invalid_argument(format!("dispatcher: {e}")))?;
            Some(std::sync::Arc::<str>::from(req.dispatcher.as_str()))
        };
        tracing::info!(subscriber = %req.subscriber, dispatcher = %req.dispatcher, include_block_events = req.include_block_events, "capacity subscriber");
        let rx = l.hub.watch(
            req.include_block_events,
            dispatcher,
            self.state.timing,
            self.state.lifecycle.shutdown_receiver(),
            Ok,
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<CapacityReport>, Status> {
        authorize(&self.state, &request)?;
        let l = self.state.loaded().ok_or_else(loading)?;
        Ok(Response::new(l.hub.report(&l.hub.stats())))
    }
}
