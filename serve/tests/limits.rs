//! `kvroute_serve::serve` against raw TCP clients on 127.0.0.1: every limit it claims.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use axum::routing::{get, post};
use bytes::Bytes;
use kvroute_serve::{serve, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

fn app() -> axum::Router {
    axum::Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Bytes| async move { format!("{}", body.len()) }),
        )
        .route(
            "/slow",
            get(|| async {
                let chunks = futures_chunks();
                axum::body::Body::from_stream(chunks)
            }),
        )
}

/// Five chunks 100 ms apart.
fn futures_chunks() -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx
                .send(Ok(Bytes::from(format!("chunk{i};"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app(), limits, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
    }
}

fn limits(header_ms: u64) -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(header_ms),
        ..Limits::default()
    }
}

/// Sends one request on a fresh connection and returns the whole response (connection: close).
async fn request(addr: std::net::SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

const GET_OK: &str = "GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// Reads until the peer closes; Ok(elapsed) when it did within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(t.elapsed()),
            Ok(Ok(_)) => {} // an error response before the close is fine
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_close_within_the_header_timeout_while_others_are_served() {
    // Client and server sockets both live in this process: 2 × 400 fit the usual 1,024
    // descriptors (the real-process tests open 2,000).
    let n = 400;
    let srv = start(limits(1500)).await;
    let mut lorises = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        // Half a request header and then nothing; every tenth sends no byte at all.
        if i % 10 != 0 {
            s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .unwrap();
        }
        lorises.push(s);
    }
    let opened = Instant::now();
    // A normal client is served meanwhile.
    for _ in 0..20 {
        let r = request(srv.addr, GET_OK).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let mut latest = Duration::ZERO;
    for s in &mut lorises {
        closed_within(s, Duration::from_secs(10))
            .await
            .expect("a slowloris connection is closed");
        latest = latest.max(opened.elapsed());
    }
    eprintln!("{n} slowloris connections all closed {latest:?} after the last opened");
    assert!(latest < Duration::from_secs(10));
    let r = request(srv.addr, GET_OK).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let srv = start(limits(400)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Kept alive, then nothing more is sent.
    let t = closed_within(&mut s, Duration::from_secs(5)).await.unwrap();
    assert!(t >= Duration::from_millis(300), "closed too early: {t:?}");
}

#[tokio::test]
async fn a_connection_that_keeps_sending_requests_stays_open() {
    let srv = start(limits(400)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 256];
    for _ in 0..6 {
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "kept alive");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_body_slower_than_the_body_timeout_is_cut() {
    let srv = start(Limits {
        body_read_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    // A whole body is fine.
    let r = request(
        srv.addr,
        "POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n5"),
        "{r}"
    );
    // 10 of 100 announced bytes, then nothing: an error answer, then the close.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answered within 5 s")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 4") || out.starts_with("HTTP/1.1 5"),
        "{out}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn connections_over_the_cap_get_503_with_retry_after() {
    let srv = start(Limits {
        max_connections: 3,
        ..Limits::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let r = request(srv.addr, GET_OK).await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("retry-after: 1\r\n"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).expect("the 503 body is JSON");
    assert_eq!(v["error"]["code"], "too_many_connections");
    // A closed connection frees its place.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        if request(srv.addr, GET_OK).await.starts_with("HTTP/1.1 200") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a place freed by a close is reused");
}

#[tokio::test]
async fn shutdown_finishes_an_open_stream_and_accepts_nothing_new() {
    let mut srv = start(Limits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Wait for the response head, then shut down mid-stream.
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let _ = srv.stop.take().map(|tx| tx.send(()));
    let mut rest = buf[..n].to_vec();
    s.read_to_end(&mut rest).await.unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("chunk4;"), "the stream completed: {text}");
    let served = tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .expect("serve returns once drained");
    served.unwrap().unwrap();
    assert!(
        TcpStream::connect(srv.addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn an_http2_client_is_served() {
    let srv = start(Limits::default()).await;
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/ok", srv.addr))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
}
