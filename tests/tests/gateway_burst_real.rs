//! The gateway's burst test with real agents (issue 6): two `kvroute-agent serve` processes on the
//! default model, with KV pools sized (from the model's KV bytes per block) to hold about 50 of
//! the test's requests together, behind a `kvroute gateway` process. 200 requests arrive at once.
//!
//! - `--policy kv` with a bounded queue: every answer is a complete completion (200) or a 429 with
//!   `Retry-After`, at least the pools' worth of requests is served, and the agents' own
//!   `vllm:num_preemptions_total` stays 0: the gateway never over-admits.
//! - `--policy round-robin` with a large queue (the baseline): the same burst makes the agents
//!   preempt, which is what the kv policy avoids (and what makes the first assertion fail-able).
//!
//! - Two, then three `kvroute gateway --policy kv` processes in front of the same two agents,
//!   the burst split across them, some of it sent straight to the agents: still no preemption,
//!   and every gateway's reservations are retired by the agents' acknowledgements of its own
//!   dispatches (back to 0 within 2 s of the burst), also for requests the agent refused.
//!
//! Each request is a short prompt with `ignore_eos`, so it grows to exactly two KV blocks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kvroute_engine::tokenizer::Tokenizer;
use kvroute_tests::{
    call, metric_labels, metric_values, send, try_get_text, Agent, AgentOpts, Gateway, GUARD,
};
use serde_json::{json, Value};

/// Requests fired at once.
const BURST: usize = 200;
/// Requests the two agents' KV pools should hold together.
const ROOM_REQUESTS: u64 = 50;
/// KV blocks each request grows to (prompt + output).
const BLOCKS_PER_REQUEST: u64 = 2;
/// Tokens per KV block on the agents: small, so that each request generates few tokens.
const BLOCK_SIZE: &str = "8";

/// The two bursts share the machine's cores; run them one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prompt(i: usize) -> String {
    format!("Item {i}: a")
}

/// What the pools are sized from, read off a probe agent.
struct Plan {
    block_size: u64,
    block_bytes: u64,
    max_tokens: u64,
}

async fn plan() -> Plan {
    let probe = Agent::spawn(AgentOpts {
        kv_memory: "8MiB",
        extra: vec![
            "--threads".into(),
            "1".into(),
            "--block-size".into(),
            BLOCK_SIZE.into(),
        ],
    });
    let (status, body) = call(probe.http, "GET", "/v1/kvroute/model", Vec::new()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let info: Value = serde_json::from_slice(&body).unwrap();
    let block_size = info["block_size"].as_u64().unwrap();
    let block_bytes = info["block_bytes"].as_u64().unwrap();
    let tok_json = info["tokenizer_json"]
        .as_str()
        .expect("tokenizer_json is the engine's tokenizer as a JSON string");
    let tok = Tokenizer::from_json(tok_json).unwrap();
    let longest = (0..BURST)
        .map(|i| tok.encode(&prompt(i), true).unwrap().len() as u64)
        .max()
        .unwrap();
    assert!(
        longest < block_size,
        "prompts of {longest} tokens do not fit one block of {block_size}"
    );
    // Output fills the request up to exactly BLOCKS_PER_REQUEST blocks.
    let max_tokens = BLOCKS_PER_REQUEST * block_size - longest;
    eprintln!(
        "plan: block_size {block_size}, KV bytes per block {block_bytes}, longest prompt {longest} tokens, max_tokens {max_tokens}"
    );
    Plan {
        block_size,
        block_bytes,
        max_tokens,
    }
}

/// How the agents start requests.
#[derive(Clone, Copy, PartialEq)]
enum Admission {
    /// `--optimistic-admission`: a request starts when its prompt fits and the engine preempts
    /// when the pool runs out (vLLM's way): only the gateway keeps it from over-filling.
    Optimistic,
    /// The default: a request starts only when its whole future fits; the engine never
    /// preempts, whatever it is sent.
    WholeFuture,
}

/// Two agents whose pools hold `ROOM_REQUESTS` requests together; returns them and the number of
/// requests their reported pools hold.
async fn agents(plan: &Plan, admission: Admission) -> (Agent, Agent, u64) {
    let blocks_per_agent = ROOM_REQUESTS / 2 * BLOCKS_PER_REQUEST;
    let kv_memory = (blocks_per_agent * plan.block_bytes).to_string();
    let spawn = |id: &str| {
        Agent::spawn(AgentOpts {
            kv_memory: &kv_memory,
            extra: vec![
                "--threads".into(),
                "1".into(),
                "--block-size".into(),
                BLOCK_SIZE.into(),
                "--agent-id".into(),
                id.into(),
            ]
            .into_iter()
            .chain((admission == Admission::Optimistic).then(|| "--optimistic-admission".into()))
            .collect(),
        })
    };
    let (a, b) = (spawn("burst-a"), spawn("burst-b"));
    let mut room = 0;
    for agent in [&a, &b] {
        let text = try_get_text(agent.http, "/metrics").await.unwrap();
        let labels = metric_labels(&text, "vllm:cache_config_info");
        let get = |k: &str| -> u64 {
            labels
                .iter()
                .find(|(key, _)| key == k)
                .unwrap_or_else(|| panic!("no {k} in vllm:cache_config_info: {labels:?}"))
                .1
                .parse()
                .unwrap()
        };
        let (blocks, bs) = (get("num_gpu_blocks"), get("block_size"));
        assert_eq!(bs, plan.block_size);
        eprintln!(
            "agent {}: --kv-memory {kv_memory} bytes -> {blocks} blocks of {bs} tokens",
            agent.http
        );
        room += blocks / BLOCKS_PER_REQUEST;
    }
    eprintln!("the two pools hold {room} requests of {BLOCKS_PER_REQUEST} blocks");
    (a, b, room)
}

async fn preemptions(agents: [&Agent; 2]) -> f64 {
    let mut sum = 0.0;
    for a in agents {
        let text = try_get_text(a.http, "/metrics").await.unwrap();
        let v = metric_values(&text, "vllm:num_preemptions_total");
        assert_eq!(v.len(), 1, "vllm:num_preemptions_total in:\n{text}");
        sum += v[0];
    }
    sum
}

/// What became of the burst.
#[derive(Debug, Default)]
struct Outcome {
    served: usize,
    refused: usize,
}

/// Fires `BURST` completions at once through the gateway and checks every answer: a complete
/// completion, or a 429 with `Retry-After`. Nothing else, and nothing left hanging.
async fn burst(gateway: SocketAddr, model: &str, max_tokens: u64) -> Outcome {
    burst_via(&[gateway], model, max_tokens).await
}

/// [`burst`], request `i` sent to `targets[i % targets.len()]` (gateways, or agents directly).
async fn burst_via(targets: &[SocketAddr], model: &str, max_tokens: u64) -> Outcome {
    let tasks: Vec<_> = (0..BURST)
        .map(|i| {
            let gateway = targets[i % targets.len()];
            let body = json!({
                "model": model,
                "prompt": prompt(i),
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": true,
            });
            tokio::spawn(async move {
                let resp = send(
                    gateway,
                    "POST",
                    "/v1/completions",
                    serde_json::to_vec(&body).unwrap(),
                )
                .await;
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (status, retry_after, body)
            })
        })
        .collect();
    let mut out = Outcome::default();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, retry_after, body) = tokio::time::timeout(GUARD, t)
            .await
            .unwrap_or_else(|_| panic!("request {i} hung"))
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        match status.as_u16() {
            200 => {
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{text}");
                assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{text}");
                assert!(
                    !v["choices"][0]["text"].as_str().unwrap().is_empty(),
                    "{text}"
                );
                out.served += 1;
            }
            429 => {
                let secs: u64 = retry_after
                    .unwrap_or_else(|| panic!("429 without Retry-After: {text}"))
                    .parse()
                    .unwrap();
                assert!(secs >= 1);
                out.refused += 1;
            }
            other => panic!("request {i}: unexpected status {other}: {text}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_policy_burst_of_200_on_real_agents_serves_queues_or_refuses_without_preemption() {
    let _serial = SERIAL.lock().await;
    let plan = plan().await;
    let (a, b, room) = agents(&plan, Admission::Optimistic).await;
    let gw = Gateway::spawn(
        &[&a, &b],
        &[
            "--policy",
            "kv",
            "--max-queue",
            "60",
            "--queue-timeout",
            "30s",
        ],
    )
    .await;
    let out = burst(gw.addr, &a.model, plan.max_tokens).await;
    let preempted = preemptions([&a, &b]).await;
    let metrics = try_get_text(gw.addr, "/metrics").await.unwrap();
    let queue_full = metric_values(&metrics, "kvroute_gateway_rejected_queue_full_total");
    let deadline = metric_values(&metrics, "kvroute_gateway_rejected_deadline_total");
    eprintln!(
        "kv: {out:?}, room {room}, agent preemptions {preempted}, gateway queue-full {queue_full:?} deadline {deadline:?}"
    );
    assert_eq!(out.served + out.refused, BURST);
    assert!(
        out.served as u64 >= room,
        "only {} served; the pools hold {room}",
        out.served
    );
    assert!(
        out.refused > 0,
        "a queue of 60 cannot hold the rest of a burst of {BURST}"
    );
    assert_eq!(
        preempted,
        0.0,
        "the kv policy let the agents preempt; gateway log:\n{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_burst_of_200_on_real_agents_makes_them_preempt() {
    let _serial = SERIAL.lock().await;
    let plan = plan().await;
    let (a, b, room) = agents(&plan, Admission::Optimistic).await;
    let gw = Gateway::spawn(
        &[&a, &b],
        &[
            "--policy",
            "round-robin",
            "--max-queue",
            "1024",
            "--queue-timeout",
            "300s",
        ],
    )
    .await;
    let out = burst(gw.addr, &a.model, plan.max_tokens).await;
    let preempted = preemptions([&a, &b]).await;
    eprintln!("round-robin: {out:?}, room {room}, agent preemptions {preempted}");
    assert_eq!(out.served, BURST, "round-robin dispatches everything");
    assert!(
        preempted > 0.0,
        "{BURST} requests on pools holding {room} and no preemption"
    );
}

/// Blocks the gateway still reserves on its agents, from its `/metrics`.
async fn reserved_blocks(gateway: SocketAddr) -> f64 {
    let text = try_get_text(gateway, "/metrics").await.unwrap();
    metric_values(&text, "kvroute_gateway_agent_reserved_blocks")
        .iter()
        .sum()
}

/// Waits up to 2 s for every gateway to hold no reservation; panics naming the ones that do.
async fn reservations_drain(gateways: &[&Gateway]) {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let mut left = Vec::new();
        for g in gateways {
            let r = reserved_blocks(g.addr).await;
            if r > 0.0 {
                left.push((g.addr, r));
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < until,
            "reservations left 2 s after the burst: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateways' `kvroute_gateway_no_room_total`, summed.
async fn no_room_refusals(gateways: &[Gateway]) -> f64 {
    let mut sum = 0.0;
    for g in gateways {
        let text = try_get_text(g.addr, "/metrics").await.unwrap();
        sum += metric_values(&text, "kvroute_gateway_no_room_total")
            .iter()
            .sum::<f64>();
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_gateways_and_direct_clients_share_two_agents_without_preemption() {
    let _serial = SERIAL.lock().await;
    let plan = plan().await;
    let flags = [
        "--policy",
        "kv",
        "--max-queue",
        "1024",
        "--queue-timeout",
        "60s",
    ];
    {
        // Agents that would preempt if over-filled: each gateway sees the same free room, so
        // only the agents' refusals (503 no_room, routed again) and the per-gateway
        // acknowledgements keep them from filling it twice or three times.
        let (a, b, room) = agents(&plan, Admission::Optimistic).await;
        let gws = [
            Gateway::spawn(&[&a, &b], &flags).await,
            Gateway::spawn(&[&a, &b], &flags).await,
            Gateway::spawn(&[&a, &b], &flags).await,
        ];
        for n in [2, 3] {
            let targets: Vec<SocketAddr> = gws[..n].iter().map(|g| g.addr).collect();
            let out = burst_via(&targets, &a.model, plan.max_tokens).await;
            let preempted = preemptions([&a, &b]).await;
            let refusals = no_room_refusals(&gws).await;
            eprintln!(
                "{n} gateways: {out:?}, room {room}, agent preemptions {preempted}, no-room refusals so far {refusals}"
            );
            assert_eq!(
                out.served, BURST,
                "a queue of 1024 with 60 s holds the burst"
            );
            assert_eq!(
                preempted,
                0.0,
                "{n} gateways let the agents preempt; first gateway's log:\n{}",
                gws[0].stderr()
            );
            assert!(
                refusals > 0.0,
                "{n} gateways never over-admitted: the test shows nothing"
            );
            reservations_drain(&gws.iter().collect::<Vec<_>>()).await;
        }
        // Requests the agents refuse (temperature out of range) are acknowledged too: nothing
        // stays reserved.
        for i in 0..40 {
            let body =
                json!({"model": a.model, "prompt": prompt(i), "max_tokens": 4, "temperature": 3});
            let resp = send(
                gws[i % 3].addr,
                "POST",
                "/v1/completions",
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
            assert_eq!(resp.status(), 400);
        }
        reservations_drain(&gws.iter().collect::<Vec<_>>()).await;
        let metrics = try_get_text(gws[0].addr, "/metrics").await.unwrap();
        let acked: f64 = metric_values(&metrics, "kvroute_gateway_agent_dispatches_acked_total")
            .iter()
            .sum();
        let expired: f64 =
            metric_values(&metrics, "kvroute_gateway_agent_dispatches_expired_total")
                .iter()
                .sum();
        assert!(acked > 0.0, "no acknowledged dispatch:\n{metrics}");
        assert_eq!(expired, 0.0);
    }
    // Default agents, three gateways, a fifth of the burst sent straight to the agents (which
    // queue it, as vLLM would): still no preemption, and the direct requests retire none of the
    // gateways' reservations.
    let (a, b, _) = agents(&plan, Admission::WholeFuture).await;
    let gws = [
        Gateway::spawn(&[&a, &b], &flags).await,
        Gateway::spawn(&[&a, &b], &flags).await,
        Gateway::spawn(&[&a, &b], &flags).await,
    ];
    let g: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let targets = [
        g[0], g[1], g[2], g[0], a.http, g[1], g[2], g[0], g[1], b.http,
    ];
    let out = burst_via(&targets, &a.model, plan.max_tokens).await;
    let preempted = preemptions([&a, &b]).await;
    eprintln!("3 gateways and direct clients: {out:?}, agent preemptions {preempted}");
    assert_eq!(out.served, BURST);
    assert_eq!(
        preempted, 0.0,
        "direct clients' requests made the agents preempt"
    );
    reservations_drain(&gws.iter().collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_mid_burst_leaves_no_reservation_of_its_old_epoch() {
    let _serial = SERIAL.lock().await;
    let plan = plan().await;
    let (a, _b, _) = agents(&plan, Admission::Optimistic).await;
    // A third agent on fixed ports, restarted in the middle of the burst.
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (http, grpc) = (
        format!("127.0.0.1:{}", port()),
        format!("127.0.0.1:{}", port()),
    );
    let kv_memory = (ROOM_REQUESTS / 2 * BLOCKS_PER_REQUEST * plan.block_bytes).to_string();
    let spawn_c = || {
        Agent::spawn(AgentOpts {
            kv_memory: &kv_memory,
            extra: [
                "--threads",
                "1",
                "--block-size",
                BLOCK_SIZE,
                "--agent-id",
                "restarted",
                "--http",
                &http,
                "--grpc",
                &grpc,
                "--optimistic-admission",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        })
    };
    let c = spawn_c();
    let gw = Gateway::spawn(
        &[&a, &c],
        &[
            "--policy",
            "kv",
            "--max-queue",
            "1024",
            "--queue-timeout",
            "60s",
        ],
    )
    .await;
    let model = a.model.clone();
    let target = gw.addr;
    let max_tokens = plan.max_tokens;
    let burst = tokio::spawn(async move {
        let tasks: Vec<_> = (0..BURST)
            .map(|i| {
                let body = json!({"model": model, "prompt": prompt(i), "max_tokens": max_tokens,
                                  "temperature": 0, "ignore_eos": true});
                tokio::spawn(async move {
                    let resp = send(
                        target,
                        "POST",
                        "/v1/completions",
                        serde_json::to_vec(&body).unwrap(),
                    )
                    .await;
                    let status = resp.status().as_u16();
                    // A stream cut by the restart ends early; either way the answer is read.
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    status
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(tokio::time::timeout(GUARD, t).await.unwrap().unwrap());
        }
        statuses
    });
    // Once the agent runs requests of the burst, restart it where it was.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let text = try_get_text(c.http, "/metrics").await.unwrap();
        if metric_values(&text, "kvroute_requests_running")
            .iter()
            .sum::<f64>()
            > 0.0
        {
            break;
        }
        assert!(Instant::now() < until, "the agent never ran a request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let c = spawn_c();
    let statuses = burst.await.unwrap();
    let served = statuses.iter().filter(|&&s| s == 200).count();
    eprintln!("restart mid-burst: {served} of {BURST} served, statuses {statuses:?}");
    // Requests cut by the restart are sent to the other agent (nothing was answered yet).
    assert!(served >= BURST / 2, "{statuses:?}");
    let metrics = try_get_text(gw.addr, "/metrics").await.unwrap();
    let cut: f64 = metric_values(&metrics, "kvroute_gateway_upstream_failures_total")
        .iter()
        .sum();
    assert!(
        cut > 0.0,
        "the restart cut no request in flight:\n{metrics}"
    );
    reservations_drain(&[&gw]).await;
    // The gateway sees the restarted agent (its new epoch) as eligible again.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = try_get_text(gw.addr, "/metrics").await.unwrap();
        let eligible = text.lines().any(|l| {
            l.starts_with("kvroute_gateway_agent_eligible{agent=\"restarted\"") && l.ends_with(" 1")
        });
        if eligible {
            break;
        }
        assert!(
            Instant::now() < until,
            "the restarted agent never came back:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
}
