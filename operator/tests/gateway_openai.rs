//! The `kvroute gateway` binary as a process, in front of stub-agent processes, driven by the
//! official `openai` Python client: streaming and plain completions, OpenAI errors as the client
//! raises them, and an agent killed (SIGKILL) mid-stream ending the client's stream with an error
//! instead of a hang. Python comes from `$KVROUTE_PYTHON` (scripts/test.d/20-python.sh).
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use support::*;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KVROUTE_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("KVROUTE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvroute")))
        .unwrap();
    let p = cache.join("venv-openai/bin/python");
    assert!(
        p.is_file(),
        "no Python with `openai`: run scripts/test.sh (scripts/test.d/20-python.sh) or set KVROUTE_PYTHON"
    );
    p
}

fn stub_agent_bin() -> PathBuf {
    let kvroute = PathBuf::from(env!("CARGO_BIN_EXE_kvroute"));
    let p = kvroute
        .parent()
        .unwrap()
        .join("examples")
        .join("stub_agent");
    if !p.is_file() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "kvroute-operator", "--example", "stub_agent"])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process when dropped (a failing test leaves nothing behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a stub agent process; returns it and its `--agent` value.
fn stub(id: &str, token_delay_ms: u64) -> (Proc, String) {
    let (h, g) = (free_port(), free_port());
    let child = Command::new(stub_agent_bin())
        .args(["serve", "--agent-id", id, "--kv-memory", "64MiB"])
        .args(["--http", &format!("127.0.0.1:{h}")])
        .args(["--grpc", &format!("127.0.0.1:{g}")])
        .args(["--token-delay-ms", &token_delay_ms.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (
        Proc(child),
        format!("http://127.0.0.1:{h},grpc://127.0.0.1:{g}"),
    )
}

/// Starts `kvroute gateway` for `agents` and waits until it is ready.
async fn gateway_proc(agents: &[&str]) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    cmd.args([
        "gateway",
        "--auth",
        "off",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    for a in agents {
        cmd.args(["--agent", a]);
    }
    let child = cmd.stderr(Stdio::null()).spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let c = client();
    let ready = format!("{url}/ready");
    wait_until_async("gateway ready", || {
        let c = c.clone();
        let ready = ready.clone();
        async move {
            let req = hyper::Request::get(ready.as_str())
                .body(http_body_util::Full::new(axum::body::Bytes::new()))
                .unwrap();
            matches!(c.request(req).await, Ok(r) if r.status() == 200)
        }
    })
    .await;
    (Proc(child), url)
}

const CLIENT_SCRIPT: &str = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-test", max_retries=0)
out = {}
s = c.chat.completions.create(model="default", stream=True, max_tokens=5,
    messages=[{"role": "user", "content": "Hello!"}])
out["chat_stream"] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
r = c.completions.create(model="default", prompt="Once upon a time", max_tokens=3)
out["completion"] = r.choices[0].text
try:
    c.completions.create(model="default", prompt="x", max_tokens=0)
except openai.BadRequestError as e:
    out["bad_request"] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
try:
    c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
except openai.NotFoundError as e:
    out["not_found"] = [e.status_code, e.body.get("code") if isinstance(e.body, dict) else None]
out["models"] = [m.id for m in c.models.list()]
print(json.dumps(out))
"#;

const KILL_SCRIPT: &str = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-test", max_retries=0)
n = 0
try:
    for ch in c.completions.create(model="default", prompt="long story", max_tokens=2000, stream=True):
        n += 1
        if n == 3:
            print("GOT3", flush=True)
    print("ENDED", n, flush=True)
except openai.APIError as e:
    print("ERROR", n, e.message, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_through_the_gateway_process() {
    let (_a, a) = stub("py-a", 1);
    let (_b, b) = stub("py-b", 1);
    let (_gw, url) = gateway_proc(&[&a, &b]).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-c", CLIENT_SCRIPT, &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chat_stream"], "t0 t1 t2 t3 t4 ");
    assert_eq!(v["completion"], "t0 t1 t2 ");
    assert_eq!(v["bad_request"][0], 400);
    assert_eq!(v["bad_request"][1], "max_tokens");
    assert_eq!(v["not_found"], serde_json::json!([404, "model_not_found"]));
    assert_eq!(v["models"], serde_json::json!(["default"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_mid_stream_ends_the_clients_stream_with_an_error() {
    let (mut agent, a) = stub("doomed", 20);
    let (_gw, url) = gateway_proc(&[&a]).await;
    let mut py = Proc(
        Command::new(python())
            .args(["-c", KILL_SCRIPT, &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = py.0.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().unwrap().unwrap();
        (first, lines)
    })
    .await
    .unwrap();
    assert_eq!(lines.0, "GOT3");
    // The agent dies while the stream is running.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let mut rest = lines.1;
    let last = tokio::task::spawn_blocking(move || rest.next().unwrap().unwrap())
        .await
        .unwrap();
    assert!(last.starts_with("ERROR"), "{last}");
    assert!(last.contains("failed mid-stream"), "{last}");
    let status = py.0.wait().unwrap();
    assert!(status.success());
}
