//! A stand-in for `kvroute-agent serve` with a simulated KV pool and no model: the stub upstream
//! of the proxy-overhead benchmark, and the agent `kvroute up` starts in its process test.
//!
//! Accepts the agent's flags (`serve --http ADDR --grpc ADDR --kv-memory SIZE --block-size N
//! --agent-id ID --model NAME`, others ignored) plus `--token-delay-ms N` (default 0) and
//! `--block-kib N` (KV bytes per block, default 64). Runs until SIGTERM or Ctrl-C.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/stub.rs"]
mod stub;

use std::time::Duration;

use kvroute_operator::up::parse_bytes;
use stub::{StubAgent, StubConfig};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_string))
        })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("serve") {
        eprintln!("usage: stub_agent serve --http ADDR --grpc ADDR [--kv-memory SIZE] [--block-size N] [--agent-id ID] [--model NAME] [--token-delay-ms N]");
        std::process::exit(2);
    }
    let http = flag(&args, "--http").unwrap_or_else(|| "127.0.0.1:8001".into());
    let grpc = flag(&args, "--grpc").unwrap_or_else(|| "127.0.0.1:9001".into());
    let kv = flag(&args, "--kv-memory").map_or(256 << 20, |s| parse_bytes(&s).unwrap());
    let block_kib: u64 = flag(&args, "--block-kib").map_or(64, |s| s.parse().unwrap());
    let cfg = StubConfig {
        agent_id: flag(&args, "--agent-id").unwrap_or_else(|| "stub".into()),
        model: flag(&args, "--model").unwrap_or_else(|| "default".into()),
        block_size: flag(&args, "--block-size").map_or(16, |s| s.parse().unwrap()),
        total_blocks: (kv / (block_kib << 10)).max(1),
        token_delay: Duration::from_millis(
            flag(&args, "--token-delay-ms").map_or(0, |s| s.parse().unwrap()),
        ),
        ..StubConfig::default()
    };
    let http = tokio::net::TcpListener::bind(&http).await.unwrap();
    let grpc = tokio::net::TcpListener::bind(&grpc).await.unwrap();
    let agent = StubAgent::start_on(cfg, http, grpc).await;
    eprintln!("stub agent: http {} grpc {}", agent.http, agent.grpc);
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
