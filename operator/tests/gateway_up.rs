//! `kvroute up` as a real process tree: it starts agents (the stub agent here, via
//! `KVROUTE_AGENT_BIN`), serves through its gateway, and on SIGTERM leaves no agent behind.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::*;

fn stub_agent_bin() -> PathBuf {
    let kvroute = PathBuf::from(env!("CARGO_BIN_EXE_kvroute"));
    let p = kvroute
        .parent()
        .unwrap()
        .join("examples")
        .join("stub_agent");
    if !p.is_file() {
        // `cargo test --test gateway_up` alone does not build examples.
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "kvroute-operator", "--example", "stub_agent"])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    p
}

#[path = "../../tests/src/kill_on_drop.rs"]
mod kill_on_drop;
use kill_on_drop::KillOnDrop;

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_and_sigterm_leaves_no_orphans() {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_kvroute"))
            .args([
                "up",
                "--agents",
                "2",
                "--listen",
                "127.0.0.1:0",
                "--kv-memory",
                "64MiB",
            ])
            // Logs into the test's own folder, not the user's cache.
            .arg("--log-dir")
            .arg(
                PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                    .join(format!("up-logs-{}", std::process::id())),
            )
            .env("KVROUTE_AGENT_BIN", stub_agent_bin())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut pids = Vec::new();
    let mut url = None;
    let mut lines = stdout.lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("agent ") {
            let pid: i32 = rest.split_whitespace().nth(2).unwrap().parse().unwrap();
            pids.push(pid);
        }
        if let Some(u) = line.strip_prefix("READY ") {
            url = Some(u.to_string());
            break;
        }
    }
    let url = url.expect("kvroute up printed READY");
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| alive(p)));
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    let c = client();
    let (status, headers, body) = post(
        &c,
        addr,
        "/v1/completions",
        &completion("hello", 4, true),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers["x-kvroute-agent"]
        .to_str()
        .unwrap()
        .starts_with("agent-"));
    let (_, state) = get(&c, &format!("{url}/dashboard/state")).await;
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    // 64 MiB split in two, 64 KiB blocks: 512 blocks each.
    assert_eq!(v["agents"][0]["total_blocks"], 512);

    // SAFETY: plain signal to the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "kvroute up exited with {status}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    for pid in pids {
        assert!(!alive(pid), "agent {pid} outlived kvroute up");
    }
}
