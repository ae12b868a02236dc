//! An agent killed mid-stream, with real agents: two `kvroute-agent serve` processes on the
//! default model behind a `kvroute gateway` process; the official `openai` client streams a long
//! completion through the gateway, the agent serving it is SIGKILLed after the third chunk, and
//! the client's stream ends with an error (never hangs). The next request is served by the other
//! agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use kvroute_tests::{
    metric_values, py_dir, python, try_get_text, Agent, AgentOpts, Gateway, GUARD,
};
use serde_json::Value;

fn agent(id: &str) -> Agent {
    Agent::spawn(AgentOpts {
        kv_memory: "64MiB",
        extra: vec![
            "--threads".into(),
            "1".into(),
            "--agent-id".into(),
            id.into(),
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_serving_agent_mid_stream_ends_the_clients_stream_and_the_next_request_is_served(
) {
    let mut agents = [agent("failover-a"), agent("failover-b")];
    let model = agents[0].model.clone();
    let gw = Gateway::spawn(&[&agents[0], &agents[1]], &["--policy", "kv"]).await;

    let mut py = Command::new(python())
        .arg(py_dir().join("stream_through_kill.py"))
        .args([&format!("http://{}/v1", gw.addr), &model])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = py.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str| -> Value {
        let line = rx
            .recv_timeout(GUARD)
            .unwrap_or_else(|_| panic!("the client printed no {what} (hung or failed)"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line}"))
    };

    // The stream is running: kill the agent serving it.
    let first = next_line("first chunks");
    let serving = first["streaming_from"].as_str().unwrap().to_string();
    let (doomed, other) = match serving.as_str() {
        "failover-a" => (0, "failover-b"),
        "failover-b" => (1, "failover-a"),
        s => panic!("x-kvroute-agent {s:?} names neither agent"),
    };
    agents[doomed].kill();
    let mut stdin = py.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    drop(stdin);

    let out = next_line("outcome");
    eprintln!("client: {first} then {out}");
    let status = py.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = py.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).unwrap();
    }
    assert!(status.success(), "client failed: {err}");

    // The stream ended with an error the client raises, not a clean end and not a hang.
    assert_eq!(out["stream"]["error"], "APIError", "{out}");
    let message = out["stream"]["message"].as_str().unwrap();
    assert!(message.contains("failed mid-stream"), "{out}");
    assert!(out["stream"]["chunks"].as_u64().unwrap() >= 3, "{out}");
    // The next request is served, by the agent still alive.
    assert_eq!(out["next"]["status"], 200, "{out}");
    assert_eq!(out["next"]["agent"], other, "{out}");
    assert_eq!(out["next"]["completion_tokens"], 8, "{out}");
    assert!(!out["next"]["text"].as_str().unwrap().is_empty(), "{out}");

    let metrics = try_get_text(gw.addr, "/metrics").await.unwrap();
    let midstream = metric_values(&metrics, "kvroute_gateway_midstream_failures_total");
    assert_eq!(midstream, vec![1.0], "{metrics}");
}
