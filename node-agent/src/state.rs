//! State shared by the HTTP and gRPC services: the loaded model (set once), the capacity hub,
//! metrics, and the lifecycle (readiness, draining, in-flight requests).
//!
//! The services start before the model is loaded so liveness answers during a long load; until
//! [`AgentState::set_loaded`] they answer 503 / UNAVAILABLE. This module owns no I/O.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{watch, Notify};

use crate::backend::InferenceBackend;
use crate::capacity::{CapacityHub, StreamTiming};
use crate::gpu::GpuMonitor;
use crate::metrics::Metrics;

/// Everything that exists once the model is loaded.
pub struct Loaded {
    pub backend: Arc<dyn InferenceBackend>,
    pub hub: Arc<CapacityHub>,
    pub metrics: Arc<Metrics>,
}

/// Readiness and draining.
pub struct Lifecycle {
    draining: AtomicBool,
    inflight: AtomicUsize,
    idle: Notify,
    /// Turns true when the agent shuts down: capacity streams end.
    shutdown: watch::Sender<bool>,
    /// Why the engine can no longer serve, once it cannot.
    failed: std::sync::OnceLock<String>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
            shutdown: watch::channel(false).0,
            failed: std::sync::OnceLock::new(),
        }
    }
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until no generation request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// The engine failed: `/health` answers 500 with `reason`, nothing new is accepted and
    /// capacity streams end (gateways stop routing here at once).
    pub fn fail(&self, reason: String) {
        let _ = self.failed.set(reason);
        self.start_draining();
        self.shut_down();
    }

    /// Why the engine failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }
}

/// Counts one generation request in flight for as long as it lives.
pub struct InflightGuard(Arc<AgentState>);

impl InflightGuard {
    pub fn new(state: Arc<AgentState>) -> Self {
        state.lifecycle.inflight.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.lifecycle.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.lifecycle.idle.notify_waiters();
        }
    }
}

/// Shared state of one agent process.
pub struct AgentState {
    loaded: OnceLock<Loaded>,
    pub lifecycle: Lifecycle,
    pub agent_id: String,
    pub max_body_bytes: usize,
    pub timing: StreamTiming,
    pub gpu: GpuMonitor,
    /// The shared bearer token gateways must send (`--auth-token-file`); unset: none needed.
    token: OnceLock<String>,
}

impl AgentState {
    pub fn new(agent_id: String, max_body_bytes: usize, gpu: GpuMonitor) -> Arc<Self> {
        Arc::new(Self {
            loaded: OnceLock::new(),
            lifecycle: Lifecycle::default(),
            agent_id,
            max_body_bytes,
            timing: StreamTiming::default(),
            gpu,
            token: OnceLock::new(),
        })
    }

    /// Requires `token` from every caller from now on (set once, before serving).
    pub fn require_token(&self, token: String) {
        let _ = self.token.set(token);
    }

    /// Whether an `Authorization` header value is let in.
    pub fn authorized(&self, header: Option<&str>) -> bool {
        match self.token.get() {
            None => true,
            Some(t) => kvroute_contract::token::bearer_matches(header, t),
        }
    }

    /// Wires a loaded backend in: capacity observer, hub, metrics. Returns false if a model
    /// was already set.
    pub fn set_loaded(&self, backend: Arc<dyn InferenceBackend>) -> bool {
        let info = backend.info().clone();
        let hub = CapacityHub::new(
            self.agent_id.clone(),
            info.name.clone(),
            self.gpu.clone(),
            backend.stats(),
        );
        backend.set_capacity_observer(hub.observer());
        let metrics = Arc::new(Metrics::new(info.name));
        self.loaded
            .set(Loaded {
                backend,
                hub,
                metrics,
            })
            .is_ok()
    }

    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    /// Loaded and not draining.
    pub fn is_ready(&self) -> bool {
        self.loaded.get().is_some() && !self.lifecycle.is_draining()
    }
}
