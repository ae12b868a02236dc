//! The gRPC capacity service (`kvroute.v1.Agent`) and `grpc.health.v1`.
//!
//! `WatchCapacity` hands each subscriber its own stream task (see `capacity`); `GetCapacity`
//! answers one report without block events. Before the model is loaded both answer
//! UNAVAILABLE. This module never blocks the engine: it only reads the capacity hub.
//!
//! Limits: at most `--max-capacity-subscribers` streams at once (more: RESOURCE_EXHAUSTED; a
//! stream's slot is freed when its client goes away), and requests of at most
//! [`MAX_REQUEST_BYTES`] (they are a few names; larger: OUT_OF_RANGE before any work).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use kvroute_proto::{Agent, AgentServer, CapacityReport, GetCapacityRequest, WatchCapacityRequest};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::state::AgentState;

/// Largest request message decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The `kvroute.v1.Agent` implementation.
pub struct AgentService {
    state: Arc<AgentState>,
    /// Capacity streams open now.
    subscribers: Arc<AtomicUsize>,
    max_subscribers: usize,
}

impl AgentService {
    pub fn new(state: Arc<AgentState>, max_subscribers: usize) -> Self {
        Self {
            state,
            subscribers: Arc::new(AtomicUsize::new(0)),
            max_subscribers,
        }
    }

    pub fn server(state: Arc<AgentState>, max_subscribers: usize) -> AgentServer<Self> {
        AgentServer::new(Self::new(state, max_subscribers))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// One capacity stream's place in the count; given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A subscriber's reports; tonic drops it when the client goes away, which frees its slot.
pub struct SubscriberStream {
    inner: ReceiverStream<Result<CapacityReport, Status>>,
    _slot: Slot,
}

impl Stream for SubscriberStream {
    type Item = Result<CapacityReport, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
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
    type WatchCapacityStream = SubscriberStream;

    async fn watch_capacity(
        &self,
        request: Request<WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        authorize(&self.state, &request)?;
        let l = self.state.loaded().ok_or_else(loading)?;
        if let Some(reason) = self.state.lifecycle.failure() {
            return Err(Status::unavailable(format!("the engine failed: {reason}")));
        }
        let slot = Slot(Arc::clone(&self.subscribers));
        if self.subscribers.fetch_add(1, Ordering::SeqCst) >= self.max_subscribers {
            // `slot` gives the place back.
            return Err(Status::resource_exhausted(format!(
                "this agent already streams capacity to {} subscribers (--max-capacity-subscribers)",
                self.max_subscribers
            )));
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
        Ok(Response::new(SubscriberStream {
            inner: ReceiverStream::new(rx),
            _slot: slot,
        }))
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
