//! The generated service works end to end over a real loopback gRPC connection.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;

use kvroute_proto::v1::block_event::Kind;
use kvroute_proto::{
    Agent, AgentClient, AgentServer, BlockEvent, CapacityReport, GetCapacityRequest,
    WatchCapacityRequest,
};
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

fn report(sequence: u64, free: u64) -> CapacityReport {
    CapacityReport {
        agent_id: "a".into(),
        epoch: 7,
        sequence,
        model: "m".into(),
        block_size: 16,
        total_blocks: 100,
        free_blocks: free,
        events: vec![BlockEvent {
            kind: Kind::Stored as i32,
            block_hashes: vec![sequence, u64::MAX],
            ..BlockEvent::default()
        }],
        ..Default::default()
    }
}

struct Fake;

#[tonic::async_trait]
impl Agent for Fake {
    type WatchCapacityStream = Pin<Box<dyn Stream<Item = Result<CapacityReport, Status>> + Send>>;

    async fn watch_capacity(
        &self,
        _req: Request<WatchCapacityRequest>,
    ) -> Result<Response<Self::WatchCapacityStream>, Status> {
        let reports = (0..3).map(|i| Ok(report(i, 100 - i * 10)));
        Ok(Response::new(Box::pin(tokio_stream::iter(reports))))
    }

    async fn get_capacity(
        &self,
        _req: Request<GetCapacityRequest>,
    ) -> Result<Response<CapacityReport>, Status> {
        Ok(Response::new(report(0, 42)))
    }
}

#[test]
fn report_encodes_and_decodes() {
    let r = report(3, 25);
    let bytes = r.encode_to_vec();
    let back = CapacityReport::decode(bytes.as_slice()).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.used_blocks(), 75);
    assert!((back.usage() - 0.75).abs() < 1e-9);
    assert!(CapacityReport::decode(&b"\xff\xff\xff"[..]).is_err());
}

#[tokio::test]
async fn watch_and_get_over_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let one = client.get_capacity(GetCapacityRequest {}).await.unwrap();
    assert_eq!(one.into_inner().free_blocks, 42);
    let mut stream = client
        .watch_capacity(WatchCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seqs = vec![];
    while let Some(r) = stream.next().await {
        let r = r.unwrap();
        assert_eq!(r.free_blocks, 100 - r.sequence * 10);
        seqs.push(r.sequence);
    }
    assert_eq!(seqs, vec![0, 1, 2]);
}
