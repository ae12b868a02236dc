//! Helpers for kvroute's cross-crate process tests: locating the built binaries, spawning them on
//! loopback, waiting for readiness, talking HTTP to them, running the Python `openai` client.
//!
//! Binaries are looked up next to the running test executable (`<target>/debug/`), so
//! `CARGO_TARGET_DIR` is honoured; `scripts/test.sh` builds them first (`cargo build --bins`).
//! Processes are spawned with `127.0.0.1:0` listen addresses and report the bound ports on
//! stdout, so tests never race for ports. Every spawned process is killed when its handle drops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod chromium;
mod kill_on_drop;
pub use kill_on_drop::KillOnDrop;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Long enough for any healthy step on a loaded 2-core machine; a guard against hangs, never a
/// performance assertion.
pub const GUARD: Duration = Duration::from_secs(300);

/// The folder holding the workspace's built binaries (`<target>/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe is known for a test binary");
    // <target>/debug/deps/<test-binary>
    let deps = exe.parent().expect("test binary has a folder");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    dir
}

/// Path of a workspace binary; panics with the build command when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`, or scripts/test.sh)",
        p.display()
    );
    p
}

/// The model the process tests serve: `$KVROUTE_MODEL_PATH` (set by scripts/test.d), else
/// `default` (the agent fetches it into its cache).
pub fn model_arg() -> String {
    std::env::var("KVROUTE_MODEL_PATH").unwrap_or_else(|_| "default".into())
}

/// The Python with the `openai` package: `$KVROUTE_PYTHON` (scripts/test.d/20-python.sh), else
/// the venv that script makes under the cache folder.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("KVROUTE_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("KVROUTE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kvroute")
        });
    let p = cache.join("venv-openai/bin/python");
    assert!(
        p.exists(),
        "no Python with the openai package: run scripts/test.sh (its step 20-python.sh sets KVROUTE_PYTHON)"
    );
    p
}

/// The reference data (`smollm2-reference.json`): `$KVROUTE_FIXTURES`, else `shared/fixtures`
/// beside the repository.
pub fn fixture() -> Value {
    let dir = std::env::var("KVROUTE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let path = dir.join("smollm2-reference.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Folder of the Python snippets (`tests/py`).
pub fn py_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py")
}

/// A running `kvroute-agent serve`.
pub struct Agent {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub model: String,
    stderr: Arc<Mutex<String>>,
}

/// Extra flags for [`Agent::spawn`].
pub struct AgentOpts<'a> {
    pub kv_memory: &'a str,
    pub extra: Vec<String>,
}

impl Default for AgentOpts<'_> {
    fn default() -> Self {
        Self {
            kv_memory: "64MiB",
            extra: Vec::new(),
        }
    }
}

impl Agent {
    /// Starts `kvroute-agent serve` with the test model on free loopback ports and waits until it
    /// says it is ready.
    pub fn spawn(opts: AgentOpts<'_>) -> Agent {
        let mut cmd = Command::new(bin("kvroute-agent"));
        cmd.arg("serve")
            .args(["--model", &model_arg()])
            .args(["--kv-memory", opts.kv_memory])
            .args(["--device", "cpu"])
            .args(&opts.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !opts.extra.iter().any(|a| a == "--agent-id") {
            cmd.args(["--agent-id", "process-test"]);
        }
        // Free ports unless the caller names them (to restart an agent where it was).
        if !opts.extra.iter().any(|a| a == "--http") {
            cmd.args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"]);
        }
        let mut child = cmd.spawn().expect("spawn kvroute-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut http = None;
        let mut grpc = None;
        let mut model = None;
        while model.is_none() {
            let line = match rx.recv_timeout(GUARD) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "kvroute-agent did not become ready; stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            };
            if let Some(rest) = line.strip_prefix("kvroute-agent listening ") {
                for kv in rest.split_whitespace() {
                    if let Some(a) = kv.strip_prefix("http=") {
                        http = Some(a.parse().unwrap());
                    } else if let Some(a) = kv.strip_prefix("grpc=") {
                        grpc = Some(a.parse().unwrap());
                    }
                }
            } else if let Some(rest) = line.strip_prefix("kvroute-agent ready model=") {
                model = Some(rest.to_string());
            }
        }
        Agent {
            child,
            http: http.expect("listening line before ready"),
            grpc: grpc.expect("listening line before ready"),
            model: model.unwrap_or_default(),
            stderr,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        sigterm(self.child.id());
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL kvroute-agent");
        self.child.wait().expect("reap kvroute-agent");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for kvroute-agent")
    }

    /// Everything the agent logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `kvroute-agent` with `args` to completion (for flag-validation tests).
pub fn run_agent(args: &[&str]) -> std::process::Output {
    Command::new(bin("kvroute-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvroute-agent")
}

/// Runs a snippet from `tests/py` with the openai-enabled Python; returns its stdout parsed as
/// JSON. Panics with the script's stderr on failure.
pub fn run_py(script: &str, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(py_dir().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Opens one HTTP/1.1 connection and sends one request; the body is left unread.
pub async fn send(addr: SocketAddr, method: &str, path: &str, body: Vec<u8>) -> Response<Incoming> {
    send_with(addr, method, path, &[], body).await
}

/// [`send`] with extra request headers.
pub async fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    let req = headers
        .iter()
        .fold(req, |r, (k, v)| r.header(*k, *v))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// One request with its whole body read.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    call_with(addr, method, path, &[], body).await
}

/// [`call`] with extra request headers.
pub async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let resp = tokio::time::timeout(GUARD, send_with(addr, method, path, headers, body))
        .await
        .unwrap();
    let status = resp.status();
    let bytes = tokio::time::timeout(GUARD, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, bytes.to_vec())
}

/// POSTs JSON and parses the JSON answer.
pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (StatusCode, Value) {
    let (s, b) = call(addr, "POST", path, serde_json::to_vec(body).unwrap()).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)));
    (s, v)
}

/// A running `kvroute gateway` process in front of agents.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `kvroute gateway` on a free loopback port with one `--agent` per agent and `extra`
    /// flags, and waits until it reports every agent eligible in its `/metrics`.
    pub async fn spawn(agents: &[&Agent], extra: &[&str]) -> Gateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(bin("kvroute"));
        cmd.args(["gateway", "--listen", &addr.to_string()]);
        // Keys off unless the test is about them.
        if !extra.iter().any(|a| *a == "--auth" || *a == "--api-keys") {
            cmd.args(["--auth", "off"]);
        }
        for a in agents {
            cmd.args(["--agent", &format!("http://{},grpc://{}", a.http, a.grpc)]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvroute gateway");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let gw = Gateway {
            child,
            addr,
            stderr,
        };
        let deadline = std::time::Instant::now() + GUARD;
        loop {
            if let Ok(Ok(text)) =
                tokio::time::timeout(Duration::from_secs(10), try_get_text(addr, "/metrics")).await
            {
                let eligible = metric_values(&text, "kvroute_gateway_agent_eligible");
                if eligible.len() == agents.len() && eligible.iter().all(|&v| v == 1.0) {
                    return gw;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway never saw every agent eligible; stderr:\n{}",
                gw.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything the gateway logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        sigterm(self.child.id());
    }

    /// Waits up to `within` for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// Sends SIGTERM to process `pid`.
pub fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM failed");
}

/// Raises this process's open-file limit to its hard limit (at most 65,536), so that it and
/// the processes it starts after can hold many sockets; returns the soft limit now.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max.min(65_536),
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` and return the body as text; any connection error is returned, not a panic (for
/// polling a process that may not listen yet).
pub async fn try_get_text(addr: SocketAddr, path: &str) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("GET {path}: {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The values of every sample of metric `name` (any labels) in Prometheus text.
pub fn metric_values(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// The labels of the first sample of metric `name`, as `(key, value)` pairs.
pub fn metric_labels(text: &str, name: &str) -> Vec<(String, String)> {
    let Some(line) = text
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
    else {
        return Vec::new();
    };
    let inner = &line[name.len() + 1..line.rfind('}').unwrap_or(line.len())];
    inner
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}
