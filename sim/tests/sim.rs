//! Whole simulations: determinism, what the policies do to preemptions and prefix hits, sessions,
//! trace replay, CPU-measured agents, and configurations that must be refused.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use kvroute_routing::PolicyKind;
use kvroute_sim::run::{run, Outcome};
use kvroute_sim::{SimConfig, Summary};

fn resolve(json: &str) -> kvroute_sim::Resolved {
    SimConfig::parse(json)
        .unwrap()
        .resolve(Path::new("."))
        .unwrap()
}

/// 4 H100 agents with small pools, shared prefixes, `rate` requests a second.
fn config(rate: f64, whole_future: bool, requests: u64) -> String {
    format!(
        r#"{{
        "seed": 7,
        "agents": {{"count": 4, "gpu": "h100", "model": "llama-3.1-8b", "kv_blocks": 600,
                    "admit_whole_future": {whole_future}}},
        "workload": {{
            "requests": {requests},
            "arrival": {{"poisson": {{"rate": {rate}}}}},
            "prompt": {{"median": 300, "sigma": 0.8, "max": 3000}},
            "output": {{"median": 200, "sigma": 0.5, "max": 800}},
            "groups": {{"count": 6, "prefix_tokens": 1200, "zipf": 1.0}}
        }},
        "policies": ["kv", "round-robin"]
    }}"#
    )
}

fn summary(r: &kvroute_sim::Resolved, p: PolicyKind) -> Summary {
    Summary::of(&run(r, p).unwrap(), &r.cfg.slo)
}

#[test]
fn same_seed_same_result() {
    let r = resolve(&config(30.0, true, 400));
    let a = run(&r, PolicyKind::Kv).unwrap();
    let b = run(&r, PolicyKind::Kv).unwrap();
    assert_eq!(a.sim_ns, b.sim_ns);
    assert_eq!(a.records.len(), b.records.len());
    for (x, y) in a.records.iter().zip(&b.records) {
        assert_eq!(
            (
                x.agent,
                x.first_token_ns,
                x.done_ns,
                x.cached_tokens,
                x.outcome
            ),
            (
                y.agent,
                y.first_token_ns,
                y.done_ns,
                y.cached_tokens,
                y.outcome
            )
        );
    }
    assert_eq!(a.stats.kv_timeline, b.stats.kv_timeline);
    assert_eq!(a.stats.steps, b.stats.steps);
    // Another seed is another workload.
    let mut other = r.clone();
    other.cfg.seed = 8;
    let c = run(&other, PolicyKind::Kv).unwrap();
    assert_ne!(
        a.records.iter().map(|x| x.arrival_ns).collect::<Vec<_>>(),
        c.records.iter().map(|x| x.arrival_ns).collect::<Vec<_>>()
    );
}

#[test]
fn every_request_ends_and_the_figures_add_up() {
    let r = resolve(&config(4.0, true, 300));
    let res = run(&r, PolicyKind::Kv).unwrap();
    assert_eq!(res.records.len(), 300);
    assert!(res.records.iter().all(|x| x.outcome != Outcome::Pending));
    let s = Summary::of(&res, &r.cfg.slo);
    assert_eq!(
        s.completed + s.queue_full + s.queue_timeout + s.rejected,
        300
    );
    assert_eq!(s.completed, 300, "{s:?}");
    for x in &res.records {
        assert!(x.arrival_ns <= x.dispatched_ns && x.dispatched_ns < x.first_token_ns);
        assert!(x.first_token_ns <= x.done_ns);
        assert!(x.cached_tokens <= x.prompt_tokens);
        assert!((x.agent as usize) < 4);
    }
    // Under light load every request meets a 2 s TTFT.
    assert!(s.ttft_p99_s < 2.0, "{s:?}");
    assert!(s.goodput_rps > 0.0 && s.output_tok_s > 0.0);
    // The share within both SLOs: those with both latencies inside them, of all 300.
    let met = res
        .records
        .iter()
        .filter(|x| {
            let ttft = (x.first_token_ns - x.arrival_ns) as f64 / 1e9;
            let tpot = (x.done_ns - x.first_token_ns) as f64
                / 1e9
                / f64::from(x.output_tokens.saturating_sub(1).max(1));
            ttft <= r.cfg.slo.ttft_s && tpot <= r.cfg.slo.tpot_s
        })
        .count();
    assert!(s.slo_met > 0.0 && s.slo_met <= 1.0, "{s:?}");
    assert!(
        (s.slo_met - met as f64 / 300.0).abs() < 0.02,
        "{} against {met} of 300",
        s.slo_met
    );
    assert!(s.kv_use_mean > 0.0 && s.kv_use_mean <= 1.0);
}

#[test]
fn on_preempting_engines_kv_never_overfills_a_pool_and_round_robin_and_the_peers_do() {
    // vLLM-style agents (start a request when its prompt fits), overloaded.
    let r = resolve(&config(60.0, false, 500));
    let kv = summary(&r, PolicyKind::Kv);
    let rr = summary(&r, PolicyKind::RoundRobin);
    assert_eq!(kv.preemptions, 0, "{kv:?}");
    assert!(rr.preemptions > 0, "{rr:?}");
    // Placing by prefix keeps more of each prompt cached.
    assert!(
        kv.prefix_hit_rate > rr.prefix_hit_rate,
        "{} vs {}",
        kv.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    // The peers' policies run through the same pipeline: they ignore room, so they are
    // preempted like round-robin, and both place by prefix, so they hit the cache more.
    for p in [PolicyKind::CacheAware, PolicyKind::LlmD] {
        let s = summary(&r, p);
        assert_eq!(s.completed, s.requests, "{s:?}");
        assert_eq!(s.policy, p.as_str());
        assert!(s.preemptions > 0, "{s:?}");
        assert!(
            s.prefix_hit_rate > rr.prefix_hit_rate,
            "{p:?}: {} vs round-robin {}",
            s.prefix_hit_rate,
            rr.prefix_hit_rate
        );
    }
}

#[test]
fn kv_scorers_replace_the_cost_scorer_of_kv_only() {
    let base = config(30.0, true, 300);
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["kv_scorers"] = serde_json::json!([["requests", 1.0]]);
    let scored = resolve(&v.to_string());
    let plain = resolve(&base);
    let agents = |r: &kvroute_sim::Resolved, p: PolicyKind| -> Vec<u32> {
        run(r, p).unwrap().records.iter().map(|x| x.agent).collect()
    };
    assert_ne!(
        agents(&plain, PolicyKind::Kv),
        agents(&scored, PolicyKind::Kv),
        "kv with the requests scorer places differently from kv with cost"
    );
    assert_eq!(
        agents(&plain, PolicyKind::RoundRobin),
        agents(&scored, PolicyKind::RoundRobin),
        "other policies keep their own scorers"
    );
}

#[test]
fn sessions_run_every_turn_and_later_turns_hit_their_history() {
    let json = r#"{
        "agents": {"count": 3, "gpu": "h200", "model": "llama-3.1-8b", "kv_blocks": 4000},
        "workload": {
            "requests": 90,
            "arrival": {"poisson": {"rate": 2}},
            "prompt": {"median": 200, "max": 400},
            "output": {"median": 100, "max": 200},
            "sessions": {"turns": 3, "think_s": 1.0}
        },
        "policies": ["kv"]
    }"#;
    let r = resolve(json);
    let res = run(&r, PolicyKind::Kv).unwrap();
    assert_eq!(res.records.len(), 90);
    assert!(res.records.iter().all(|x| x.outcome == Outcome::Done));
    for turn in 0..3u32 {
        let n = res.records.iter().filter(|x| x.spec.turn == turn).count();
        assert_eq!(n, 30, "turn {turn}");
    }
    // A later turn's prompt holds the earlier turns, and the agent that served them has them.
    let later: Vec<_> = res.records.iter().filter(|x| x.spec.turn == 2).collect();
    for x in &later {
        assert!(x.prompt_tokens >= 2 * 100 + x.spec.own_tokens);
    }
    let hit = later
        .iter()
        .map(|x| u64::from(x.cached_tokens))
        .sum::<u64>() as f64
        / later
            .iter()
            .map(|x| u64::from(x.prompt_tokens))
            .sum::<u64>() as f64;
    assert!(hit > 0.5, "{hit}");
}

#[test]
fn a_closed_loop_keeps_its_concurrency_in_flight_and_starts_each_request_as_one_ends() {
    for (sessions, requests) in [
        ("", 60u64),
        (r#", "sessions": {"turns": 3, "think_s": 0}"#, 60),
    ] {
        let json = format!(
            r#"{{
            "agents": {{"count": 2, "gpu": "h100", "model": "llama-3.1-8b", "kv_blocks": 3000}},
            "workload": {{
                "requests": {requests},
                "arrival": {{"closed": {{"concurrency": 4}}}},
                "prompt": {{"median": 300, "sigma": 0.5, "max": 1000}},
                "output": {{"median": 50, "max": 100}},
                "groups": {{"count": 4, "prefix_tokens": 400}}{sessions}
            }},
            "policies": ["kv", "round-robin", "cache-aware"]
        }}"#
        );
        let r = resolve(&json);
        for p in [
            PolicyKind::Kv,
            PolicyKind::RoundRobin,
            PolicyKind::CacheAware,
        ] {
            let res = run(&r, p).unwrap();
            assert_eq!(res.records.len(), requests as usize, "{sessions}");
            assert!(res.records.iter().all(|x| x.outcome == Outcome::Done));
            // The first four start at once, once both agents have reported (a benchmark starts
            // when its servers are ready); every later first turn starts when a request ends (the
            // last turn of its session, with sessions).
            let firsts: Vec<_> = res.records.iter().filter(|x| x.spec.turn == 0).collect();
            let start = firsts[0].arrival_ns;
            assert!(start > 0 && start < 100_000_000, "{start}");
            assert!(
                firsts[..4].iter().all(|x| x.arrival_ns == start),
                "{sessions}"
            );
            // Both agents serve (a loop started before the second agent reported sent every
            // first request to the first one).
            let on_first = res.records.iter().filter(|x| x.agent == 0).count();
            assert!(
                on_first > 0 && on_first < res.records.len(),
                "{sessions} {p:?}"
            );
            let ends: std::collections::HashSet<u64> =
                res.records.iter().map(|x| x.done_ns).collect();
            for x in &firsts[4..] {
                assert!(
                    x.arrival_ns > 0 && ends.contains(&x.arrival_ns),
                    "{sessions}"
                );
            }
            // In flight at any arrival: never more than four (requests, or sessions).
            let mut events: Vec<(u64, i32)> = Vec::new();
            for x in &res.records {
                let last = sessions.is_empty() || x.spec.turn == 2;
                if x.spec.turn == 0 {
                    events.push((x.arrival_ns, 1));
                }
                if last {
                    events.push((x.done_ns, -1));
                }
            }
            events.sort();
            let (mut open, mut most) = (0, 0);
            for (_, d) in events {
                open += d;
                most = most.max(open);
            }
            assert_eq!(most, 4, "{sessions}");
        }
    }
}

#[test]
fn several_gateways_each_route_with_their_own_view() {
    let mut r = resolve(&config(30.0, true, 300));
    r.cfg.gateways.replicas = 3;
    let res = run(&r, PolicyKind::Kv).unwrap();
    for g in 0..3 {
        assert_eq!(
            res.records.iter().filter(|x| x.gateway == g).count(),
            100,
            "requests are spread over the gateways in turn"
        );
    }
    let s = Summary::of(&res, &r.cfg.slo);
    assert_eq!(s.completed, 300);
    assert_eq!(s.preemptions, 0);
}

#[test]
fn a_trace_and_cpu_measured_agents_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut trace = String::from("arrival_s,prompt_tokens,output_tokens,group,shared_tokens\n");
    for i in 0..40 {
        trace.push_str(&format!(
            "{},{},{},{},{}\n",
            f64::from(i) * 0.5,
            200,
            8,
            i % 2,
            160
        ));
    }
    std::fs::write(dir.path().join("t.csv"), trace).unwrap();
    std::fs::write(
        dir.path().join("cpu.jsonl"),
        "{\"batch\":1,\"prefill_tok_s\":500,\"decode_tok_s\":40}\n\
         {\"batch\":8,\"prefill_tok_s\":500,\"decode_tok_s\":160}\n",
    )
    .unwrap();
    let cfg = dir.path().join("sim.json");
    std::fs::write(
        &cfg,
        r#"{"agents": {"count": 2, "cpu_bench": "cpu.jsonl", "kv_blocks": 400},
            "trace": "t.csv", "policies": ["kv"]}"#,
    )
    .unwrap();
    let r = SimConfig::load(&cfg).unwrap();
    let res = run(&r, PolicyKind::Kv).unwrap();
    assert_eq!(res.records.len(), 40);
    assert!(res.records.iter().all(|x| x.outcome == Outcome::Done));
    // 200-token prompts at 500 tok/s: at least 0.4 s to the first token when nothing is cached;
    // the shared 160 tokens (10 blocks) hit after the first of each group.
    let s = Summary::of(&res, &r.cfg.slo);
    assert!(s.prefix_hit_rate > 0.6, "{s:?}");
    assert!(s.ttft_p50_s < 0.4, "{s:?}");
    assert!(res.records[0].first_token_ns - res.records[0].arrival_ns >= 400_000_000);
}

#[test]
fn bad_configurations_are_refused_with_what_is_wrong() {
    let good = config(10.0, true, 10);
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let with = |path: &[&str], value: serde_json::Value| {
        let mut v = v.clone();
        let mut at = &mut v;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = value;
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "configuration"),
        ("[]".into(), "configuration"),
        (with(&["colour"], "blue".into()), "unknown field"),
        (with(&["agents", "count"], 0.into()), "agents.count"),
        (with(&["agents", "count"], (-1).into()), "configuration"),
        (with(&["agents", "gpu"], "a100".into()), "unknown preset"),
        (with(&["agents", "model"], "gpt-5".into()), "unknown preset"),
        (with(&["agents", "cpu_bench"], "x.jsonl".into()), "not both"),
        (with(&["agents", "block_size"], 0.into()), "block_size"),
        (
            with(&["agents", "memory_efficiency"], 1.5.into()),
            "memory_efficiency",
        ),
        (with(&["agents", "kv_blocks"], 0.into()), "KV blocks"),
        (
            with(&["gateways"], serde_json::json!({"replicas": 0})),
            "replicas",
        ),
        (
            with(&["gateways"], serde_json::json!({"report_interval_ms": 0})),
            "report_interval_ms",
        ),
        (with(&["policies"], serde_json::json!([])), "policies"),
        (
            with(&["kv_cost"], serde_json::json!({"cache_first_s": -1})),
            "kv_cost.cache_first_s",
        ),
        (
            with(
                &["workload", "arrival"],
                serde_json::json!({"closed": {"concurrency": 0}}),
            ),
            "arrival.concurrency",
        ),
        (
            with(
                &["workload", "arrival"],
                serde_json::json!({"closed": {"concurrency": -3}}),
            ),
            "configuration",
        ),
        (
            with(&["policies"], serde_json::json!(["fastest"])),
            "unknown policy",
        ),
        (with(&["trace"], "t.csv".into()), "exactly one"),
        (
            with(&["workload", "requests"], 0.into()),
            "workload.requests",
        ),
        (with(&["workload", "prompt", "sigma"], 9.into()), "sigma"),
        (
            with(&["slo"], serde_json::json!({"ttft_s": 0, "tpot_s": 1})),
            "slo",
        ),
        (with(&["sample_s"], 0.into()), "sample_s"),
        (
            with(&["kv_cost"], serde_json::json!({"decode": -1})),
            "kv_cost.decode",
        ),
        (
            with(&["kv_cost"], serde_json::json!({"speed": 1})),
            "unknown field",
        ),
        (
            with(&["kv_cost"], serde_json::json!({"stall": -1})),
            "kv_cost.stall",
        ),
        (
            with(&["kv_cost"], serde_json::json!({"tpot_slo_s": -0.05})),
            "kv_cost.tpot_slo_s",
        ),
        (
            with(&["kv_cost"], serde_json::json!({"ttft_slo_s": 1e9})),
            "kv_cost.ttft_slo_s",
        ),
        (
            with(&["kv_scorers"], serde_json::json!([["fastest", 1]])),
            "unknown scorer",
        ),
        (
            with(&["kv_scorers"], serde_json::json!([["prefix", -3]])),
            "weight of prefix",
        ),
        (with(&["kv_scorers"], serde_json::json!([])), "kv_scorers"),
        (
            with(
                &["kv_scorers"],
                serde_json::Value::Array(vec![serde_json::json!(["prefix", 1]); 9]),
            ),
            "at most 8",
        ),
        (
            with(&["kv_scorers"], serde_json::json!({"prefix": 1})),
            "configuration",
        ),
    ];
    for (text, want) in cases {
        let e = match SimConfig::parse(&text) {
            Err(e) => e,
            Ok(c) => c.resolve(Path::new(".")).unwrap_err(),
        };
        assert!(e.contains(want), "{text}\n→ {e}");
    }
    // A missing file, and a cpu_bench agent without its pool size.
    let e = SimConfig::load(Path::new("/nonexistent/sim.json")).unwrap_err();
    assert!(e.contains("/nonexistent/sim.json"), "{e}");
    let e = SimConfig::parse(r#"{"agents": {"count": 1, "cpu_bench": "missing.jsonl"}, "trace": "t.csv", "policies": ["kv"]}"#)
        .unwrap()
        .resolve(Path::new("."))
        .unwrap_err();
    assert!(e.contains("missing.jsonl"), "{e}");
}

#[test]
fn the_committed_cpu_validation_configurations_load_and_run() {
    // bench/sim/cpu-2-*.json: the two-agent benchmark's workloads on CPU-measured agents, in a
    // closed loop (see bench/sim/results-2026-12-07-cpu-validation.txt).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/sim");
    for (name, requests) in [
        ("cpu-2-shared-prefix.json", 64),
        ("cpu-2-multi-turn.json", 48),
    ] {
        let r = SimConfig::load(&dir.join(name)).unwrap();
        let res = run(&r, PolicyKind::Kv).unwrap();
        assert_eq!(res.records.len(), requests, "{name}");
        assert!(
            res.records.iter().all(|x| x.outcome == Outcome::Done),
            "{name}"
        );
        // Prefixes are reused: the groups' system prompts, or the conversations' history.
        let s = Summary::of(&res, &r.cfg.slo);
        assert!(s.prefix_hit_rate > 0.2, "{name}: {s:?}");
    }
}
