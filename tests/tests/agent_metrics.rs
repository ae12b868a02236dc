//! A real agent's `/metrics`, parsed by `prometheus_client`'s parser (Python), after one
//! request: the kvroute and vLLM families are there with the right types, histograms have
//! counts, the KV gauges agree with the block count the capacity service reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_proto::{AgentClient, GetCapacityRequest};
use kvroute_tests::{post_json, run_py, Agent, AgentOpts};
use serde_json::{json, Value};

fn sample<'a>(m: &'a Value, family: &str, name: &str) -> &'a Value {
    let fam = m
        .get(family)
        .unwrap_or_else(|| panic!("family {family} missing"));
    fam["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == name)
        .unwrap_or_else(|| panic!("sample {name} missing in {fam}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_carry_vllm_names() {
    let agent = Agent::spawn(AgentOpts::default());
    let body =
        json!({"model": agent.model, "prompt": "Hello there", "max_tokens": 5, "ignore_eos": true});
    let (s, v) = post_json(agent.http, "/v1/completions", &body).await;
    assert_eq!(s, 200, "{v}");
    let url = format!("http://{}/metrics", agent.http);
    let m = tokio::task::spawn_blocking(move || run_py("scrape_metrics.py", &[&url]))
        .await
        .unwrap();
    assert!(m["_content_type"]
        .as_str()
        .unwrap()
        .starts_with("text/plain"));

    // prometheus_client names counter families without `_total`, histograms without suffixes.
    for (family, kind) in [
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:cache_config_info", "gauge"),
        ("vllm:prefix_cache_queries", "counter"),
        ("vllm:prefix_cache_hits", "counter"),
        ("vllm:num_preemptions", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:time_per_output_token_seconds", "histogram"),
        ("kvroute_kv_blocks_free", "gauge"),
        ("kvroute_requests_received", "counter"),
        ("kvroute_time_to_first_token_seconds", "histogram"),
    ] {
        assert_eq!(m[family]["type"], kind, "{family}");
    }
    let ttft = sample(
        &m,
        "vllm:time_to_first_token_seconds",
        "vllm:time_to_first_token_seconds_count",
    );
    assert_eq!(ttft[2], 1.0);
    let tpot = sample(
        &m,
        "vllm:time_per_output_token_seconds",
        "vllm:time_per_output_token_seconds_count",
    );
    assert_eq!(tpot[2], 4.0);
    let gen = sample(
        &m,
        "kvroute_generation_tokens",
        "kvroute_generation_tokens_total",
    );
    assert_eq!(gen[2], 5.0);
    let recv = sample(
        &m,
        "kvroute_requests_received",
        "kvroute_requests_received_total",
    );
    assert_eq!(recv[2], 1.0);

    let report = AgentClient::connect(agent.grpc_url())
        .await
        .unwrap()
        .get_capacity(GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner();
    let info = sample(&m, "vllm:cache_config_info", "vllm:cache_config_info");
    assert_eq!(info[1]["num_gpu_blocks"], report.total_blocks.to_string());
    assert_eq!(info[1]["block_size"], "16");
    let total = sample(&m, "kvroute_kv_blocks_total", "kvroute_kv_blocks_total");
    assert_eq!(total[2], report.total_blocks as f64);
}
