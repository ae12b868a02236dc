#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Two real `kvroute operator --leader-election` processes against one fake API server on
//! 127.0.0.1: exactly one takes the Lease and reconciles; the other stays a follower; each says
//! so on its `/metrics`. On SIGTERM the leader releases the Lease and the follower takes over at
//! once (the Lease lasts an hour here, so only a release can explain the takeover).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{model_deployment, FakeApiServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start(kubeconfig: &std::path::Path, pod: &str, metrics: SocketAddr) -> Operator {
    let child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["operator", "--leader-election", "--lease-seconds", "3600"])
        .arg(format!("--metrics-addr={metrics}"))
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", "kvroute")
        .env("RUST_LOG", "warn")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Operator(child)
}

async fn metrics(addr: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let wait = async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader() {
    let api = FakeApiServer::start().await;
    api.insert_silently(
        "modeldeployments",
        model_deployment("default", "a", "alpha"),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let (m1, m2) = (free_port(), free_port());
    let mut p1 = start(&kubeconfig, "operator-1", m1);
    let mut p2 = start(&kubeconfig, "operator-2", m2);

    until("a reconciled", || {
        let log = api.log();
        async move {
            log.iter()
                .any(|l| l == "PATCH /apis/apps/v1/namespaces/default/deployments/a-agent")
        }
    })
    .await;
    let lease = api
        .get("leases", "kvroute", "kvroute-operator")
        .expect("a Lease was created");
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let (leader, follower) = if holder == "operator-1" {
        (m1, m2)
    } else {
        (m2, m1)
    };
    let (leader_proc, follower_name) = if holder == "operator-1" {
        (&mut p1, "operator-2")
    } else {
        (&mut p2, "operator-1")
    };
    assert!(holder == "operator-1" || holder == "operator-2", "{holder}");

    until("both metrics servers up", || async move {
        metrics(leader).await.is_some() && metrics(follower).await.is_some()
    })
    .await;
    let lm = metrics(leader).await.unwrap();
    assert!(lm.contains("kvroute_operator_leader 1"), "{lm}");
    let fm = metrics(follower).await.unwrap();
    assert!(fm.contains("kvroute_operator_leader 0"), "{fm}");
    assert!(
        fm.contains("kvroute_operator_reconciles_total 0"),
        "the follower must not reconcile: {fm}"
    );
    until("the leader counted its reconcile", || async move {
        metrics(leader)
            .await
            .is_some_and(|m| !m.contains("kvroute_operator_reconciles_total 0"))
    })
    .await;

    // Graceful shutdown of the leader: it exits 0 and hands the Lease over.
    let pid = leader_proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::block_in_place(|| leader_proc.0.wait()).unwrap();
    assert!(
        status.success(),
        "the leader did not shut down cleanly: {status:?}"
    );
    until("the follower takes over", || {
        let holder = api
            .get("leases", "kvroute", "kvroute-operator")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from));
        async move { holder.as_deref() == Some(follower_name) }
    })
    .await;
    until("the new leader says so", || async move {
        metrics(follower)
            .await
            .is_some_and(|m| m.contains("kvroute_operator_leader 1"))
    })
    .await;
}
