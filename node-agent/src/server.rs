//! `kvroute-agent serve`: binds the listeners, serves HTTP and gRPC while the model loads, wires
//! the engine in, and drains on SIGTERM.
//!
//! Lifecycle: listeners are bound first (so `/health` answers during a long load and the chosen
//! ports are printed on stdout); once the backend is ready, `/ready` and `grpc.health.v1` turn
//! serving. On SIGTERM or Ctrl-C: not ready, stop accepting connections, let in-flight requests
//! finish within the drain timeout, abort what remains, end capacity streams, stop the engine,
//! return Ok (exit 0).

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::backend::InferenceBackend;
use crate::grpc::AgentService;
use crate::http;
use crate::state::AgentState;

/// Serving failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {flag} {addr}: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("the engine failed: {0}")]
    EngineFailed(String),
}

/// How often the engine's health is checked.
const ENGINE_CHECK_EVERY: Duration = Duration::from_millis(200);

/// How long a failed agent keeps answering `/health` 500 (for probes and operators to see
/// why) before it exits.
const FAILED_EXIT_DELAY: Duration = Duration::from_secs(2);

/// Resolves with the reason once the backend reports it can no longer serve.
async fn engine_failure(backend: Arc<dyn InferenceBackend>) -> String {
    loop {
        tokio::time::sleep(ENGINE_CHECK_EVERY).await;
        if let Some(reason) = backend.failure() {
            return reason;
        }
    }
}

/// Addresses actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// Milestones `serve` reports to its caller (the binary prints them on stdout).
#[derive(Debug, Clone)]
pub enum ServeEvent {
    /// Both listeners are bound.
    Bound(BoundAddrs),
    /// The model is loaded and the agent is ready; the served model name.
    Ready(String),
}

/// Serving settings beyond the shared state.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub drain_timeout: Duration,
    /// Header, body and connection limits of the HTTP server.
    pub http_limits: kvroute_serve::Limits,
    /// Most concurrent `WatchCapacity` streams.
    pub max_capacity_subscribers: usize,
}

/// The gRPC server's limits: streams per connection, HTTP/2 and TCP keep-alive (a peer that
/// vanished without closing is found and its streams freed).
pub const GRPC_MAX_STREAMS_PER_CONNECTION: u32 = 1024;
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves, then drains. `load` runs on a blocking thread.
/// `on_event` hears when the listeners are bound and when the model is ready.
pub async fn serve<L, S>(
    state: Arc<AgentState>,
    opts: ServeOptions,
    load: L,
    shutdown: S,
    mut on_event: impl FnMut(ServeEvent),
) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<Arc<dyn InferenceBackend>, String> + Send + 'static,
    S: Future<Output = ()> + Send,
{
    let http_listener = TcpListener::bind(opts.http)
        .await
        .map_err(|source| ServeError::Bind {
            flag: "--http",
            addr: opts.http,
            source,
        })?;
    let grpc_listener = TcpListener::bind(opts.grpc)
        .await
        .map_err(|source| ServeError::Bind {
            flag: "--grpc",
            addr: opts.grpc,
            source,
        })?;
    let bound = BoundAddrs {
        http: http_listener.local_addr().map_err(ServeError::Http)?,
        grpc: grpc_listener.local_addr().map_err(ServeError::Http)?,
    };
    tracing::info!(http = %bound.http, grpc = %bound.grpc, "listening");
    on_event(ServeEvent::Bound(bound));

    // HTTP: stops accepting when `stop_http` fires; open connections finish their requests.
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    let app = http::router(state.clone());
    let limits = opts.http_limits;
    let http_task = tokio::spawn(async move {
        kvroute_serve::serve(http_listener, app, limits, async move {
            let _ = stop_http_rx.await;
        })
        .await
    });

    // gRPC with grpc.health.v1.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<kvroute_proto::AgentServer<AgentService>>()
        .await;
    let mut grpc_shutdown = state.lifecycle.shutdown_receiver();
    let grpc_service = AgentService::server(state.clone(), opts.max_capacity_subscribers);
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .max_concurrent_streams(GRPC_MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
            .tcp_keepalive(Some(GRPC_KEEPALIVE_INTERVAL))
            .add_service(health_service)
            .add_service(grpc_service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), async move {
                let _ = grpc_shutdown.wait_for(|v| *v).await;
            })
            .await
    });

    tokio::pin!(shutdown);
    let load_task = tokio::task::spawn_blocking(load);
    let loaded = tokio::select! {
        r = load_task => Some(r),
        _ = &mut shutdown => None,
    };
    let result = match loaded {
        None => {
            tracing::info!("shutdown requested while loading");
            Ok(())
        }
        Some(Err(e)) => Err(ServeError::Load(format!("loader panicked: {e}"))),
        Some(Ok(Err(e))) => Err(ServeError::Load(e)),
        Some(Ok(Ok(backend))) => {
            let info = backend.info().clone();
            state.set_loaded(Arc::clone(&backend));
            health_reporter
                .set_serving::<kvroute_proto::AgentServer<AgentService>>()
                .await;
            tracing::info!(model = %info.name, block_size = info.block_size, max_model_len = info.max_model_len, "ready");
            on_event(ServeEvent::Ready(info.name.clone()));
            tokio::select! {
                _ = &mut shutdown => Ok(()),
                reason = engine_failure(backend) => {
                    tracing::error!(%reason, "the engine failed: /health answers 500, capacity streams end, exiting");
                    state.lifecycle.fail(reason.clone());
                    health_reporter
                        .set_not_serving::<kvroute_proto::AgentServer<AgentService>>()
                        .await;
                    tokio::time::sleep(FAILED_EXIT_DELAY).await;
                    Err(ServeError::EngineFailed(reason))
                }
            }
        }
    };

    // Drain.
    tracing::info!(
        inflight = state.lifecycle.inflight(),
        "draining: not ready, no new connections"
    );
    state.lifecycle.start_draining();
    if let Some(l) = state.loaded() {
        l.hub.set_draining();
    }
    health_reporter
        .set_not_serving::<kvroute_proto::AgentServer<AgentService>>()
        .await;
    let _ = stop_http_tx.send(());
    let drained = tokio::time::timeout(opts.drain_timeout, state.lifecycle.wait_idle())
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            inflight = state.lifecycle.inflight(),
            "drain timeout; aborting the rest"
        );
    }
    if let Some(l) = state.loaded() {
        // Aborts whatever still runs; their streams end with finish_reason "abort".
        let backend = l.backend.clone();
        let _ = tokio::task::spawn_blocking(move || backend.shutdown()).await;
    }
    // Give aborted streams a moment to write their last chunk, then stop everything.
    let _ = tokio::time::timeout(Duration::from_secs(5), state.lifecycle.wait_idle()).await;
    state.lifecycle.shut_down();
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server error"),
        Ok(_) => {}
        Err(_) => tracing::warn!("HTTP connections still open at exit"),
    }
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), grpc_task).await {
        tracing::warn!(error = %e, "gRPC server error");
    }
    tracing::info!("stopped");
    result
}

/// Writes one line on stdout and flushes (tests and scripts read it through a pipe).
pub fn println_flush(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
