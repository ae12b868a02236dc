#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The controller's real edges on loopback: `GrpcCapacity` against a real tonic `Agent` server,
//! and the metrics HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvroute_operator::controller::capacity::{CapacityError, CapacityProbe, GrpcCapacity};
use kvroute_operator::controller::metrics::{serve_on, Metrics};
use kvroute_proto::{Agent, AgentServer, CapacityReport, GetCapacityRequest, WatchCapacityRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

struct FakeAgent {
    report: CapacityReport,
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    type WatchCapacityStream = futures::stream::Pending<Result<CapacityReport, Status>>;

    async fn watch_capacity(
        &self,
        _: Request<WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        Err(Status::unimplemented("not used by the operator"))
    }

    async fn get_capacity(
        &self,
        _: Request<GetCapacityRequest>,
    ) -> Result<Response<CapacityReport>, Status> {
        Ok(Response::new(self.report.clone()))
    }
}

async fn agent(report: CapacityReport) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(FakeAgent { report }))
            .serve_with_incoming(incoming),
    );
    addr
}

#[tokio::test]
async fn grpc_capacity_reads_a_real_agent() {
    let report = CapacityReport {
        agent_id: "a-0".into(),
        block_size: 16,
        total_blocks: 4096,
        free_blocks: 1024,
        ..Default::default()
    };
    let addr = agent(report.clone()).await;
    let got = GrpcCapacity::default()
        .get_capacity(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(got, report);
}

#[tokio::test]
async fn grpc_capacity_fails_cleanly() {
    let probe = GrpcCapacity {
        timeout: Duration::from_secs(2),
    };
    // Nothing listens on this port (bound then dropped).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let e = probe
        .get_capacity(format!("http://{closed}"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, CapacityError::Connect(_) | CapacityError::Timeout(_)),
        "{e:?}"
    );
    let e = probe.get_capacity("not a url\n".into()).await.unwrap_err();
    assert!(matches!(e, CapacityError::Endpoint(_)), "{e:?}");
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let metrics = Arc::new(Metrics::default());
    metrics.observe_reconcile(Duration::from_millis(3));
    metrics.observe_failure("kube_api");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_on(listener, metrics));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let m = get("/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("text/plain; version=0.0.4"));
    assert!(m.contains("kvroute_operator_reconciles_total 1"));
    assert!(m.contains("kvroute_operator_reconcile_errors_total{error=\"kube_api\"} 1"));
    assert!(get("/healthz").await.ends_with("ok"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
}
