//! Prometheus metrics of the agent, in the text exposition format (0.0.4, written with
//! [`kvroute_contract::prom`]).
//!
//! Two families of names: `kvroute_*`, and the names vLLM exposes (`vllm:*`) so schedulers built
//! for vLLM (Gateway API Inference Extension, llm-d) read a kvroute agent unchanged. vLLM's
//! counters come from `prometheus_client`, which appends `_total` on the wire; we expose them as
//! they appear on the wire (`vllm:prefix_cache_queries_total`, ...). Gauges are read from the
//! capacity hub at scrape time; request counters and latency histograms are updated by the HTTP
//! layer. Recording never blocks for long: a short uncontended mutex per histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvroute_contract::prom::{counter, gauge, header, sample, Histogram};

use crate::backend::CapacityStats;
use crate::gpu::GpuSample;

/// Upper bounds (seconds) of the time-to-first-token buckets (vLLM's).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
/// Upper bounds (seconds) of the time-per-output-token buckets (vLLM's).
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Upper bounds (seconds) of the end-to-end latency buckets.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0,
];

/// Outcome label of a finished HTTP generation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stop,
    Length,
    Abort,
    Error,
}

/// The agent's metrics registry.
pub struct Metrics {
    model: String,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    finished: [AtomicU64; 4],
    /// HTTP answers by status class of errors: 400, 404, 413, 503, 500.
    errors: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Routed requests refused for lack of room (`x-kvroute-require-room`).
    no_room: AtomicU64,
}

impl Metrics {
    pub fn new(model: String) -> Self {
        Self {
            model,
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            errors: Mutex::new(Default::default()),
            no_room: AtomicU64::new(0),
        }
    }

    /// A routed request was refused: admitting it would have made the engine preempt.
    pub fn count_no_room(&self) {
        self.no_room.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, outcome: Outcome) {
        self.finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, status: u16) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// The exposition text, with gauges taken from `stats` and `gpu` now.
    pub fn render(&self, stats: &CapacityStats, gpu: Option<GpuSample>, ready: bool) -> String {
        let mut o = String::with_capacity(16 * 1024);
        let m = [("model_name", self.model.as_str())];
        let usage = if stats.total_blocks == 0 {
            0.0
        } else {
            (stats.total_blocks - stats.free_blocks) as f64 / stats.total_blocks as f64
        };

        // kvroute_*
        gauge(
            &mut o,
            "kvroute_ready",
            "1 when the model is loaded and the agent is not draining.",
            &m,
            f64::from(u8::from(ready)),
        );
        gauge(
            &mut o,
            "kvroute_kv_blocks_total",
            "KV-cache blocks in the pool.",
            &m,
            stats.total_blocks as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_blocks_free",
            "KV-cache blocks referenced by no request (includes cached-evictable).",
            &m,
            stats.free_blocks as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_blocks_cached_evictable",
            "Free KV-cache blocks still holding a cached prefix.",
            &m,
            stats.cached_evictable_blocks as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_block_size_tokens",
            "Tokens per KV-cache block.",
            &m,
            f64::from(stats.block_size),
        );
        gauge(
            &mut o,
            "kvroute_kv_block_bytes",
            "Bytes of KV cache per block.",
            &m,
            stats.block_bytes as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_usage_ratio",
            "Fraction of KV-cache blocks in use (0..1).",
            &m,
            usage,
        );
        gauge(
            &mut o,
            "kvroute_requests_running",
            "Requests being computed.",
            &m,
            f64::from(stats.running),
        );
        gauge(
            &mut o,
            "kvroute_requests_waiting",
            "Requests queued in the engine.",
            &m,
            f64::from(stats.waiting),
        );
        counter(
            &mut o,
            "kvroute_requests_received_total",
            "Requests the engine accepted since start.",
            &m,
            stats.requests_received as f64,
        );
        counter(
            &mut o,
            "kvroute_preemptions_total",
            "Requests preempted (to be recomputed) since start.",
            &m,
            stats.preemptions as f64,
        );
        counter(
            &mut o,
            "kvroute_prefix_cache_query_tokens_total",
            "Prompt tokens looked up in the prefix cache.",
            &m,
            stats.prefix_query_tokens as f64,
        );
        counter(
            &mut o,
            "kvroute_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the prefix cache.",
            &m,
            stats.prefix_hit_tokens as f64,
        );
        counter(
            &mut o,
            "kvroute_prefix_cache_host_hit_tokens_total",
            "Of the prompt tokens found in the prefix cache, those copied back from the host tier.",
            &m,
            stats.prefix_host_hit_tokens as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_host_blocks",
            "Slots of the KV host tier (--kv-offload-memory; 0: none).",
            &m,
            stats.host_total_blocks as f64,
        );
        gauge(
            &mut o,
            "kvroute_kv_host_blocks_used",
            "Slots of the KV host tier holding an evicted prefix block.",
            &m,
            stats.host_used_blocks as f64,
        );
        counter(
            &mut o,
            "kvroute_kv_offloaded_blocks_total",
            "Prefix blocks copied to the host tier as the KV cache evicted them.",
            &m,
            stats.offloaded_blocks as f64,
        );
        counter(
            &mut o,
            "kvroute_kv_reloaded_blocks_total",
            "Prefix blocks copied back from the host tier instead of recomputed.",
            &m,
            stats.reloaded_blocks as f64,
        );
        counter(
            &mut o,
            "kvroute_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            &m,
            self.prompt_tokens.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut o,
            "kvroute_generation_tokens_total",
            "Tokens generated.",
            &m,
            self.generation_tokens.load(Ordering::Relaxed) as f64,
        );
        header(
            &mut o,
            "kvroute_requests_finished_total",
            "Generation requests finished, by reason.",
            "counter",
        );
        for (i, reason) in ["stop", "length", "abort", "error"].iter().enumerate() {
            sample(
                &mut o,
                "kvroute_requests_finished_total",
                &[("model_name", &self.model), ("finished_reason", reason)],
                self.finished[i].load(Ordering::Relaxed) as f64,
            );
        }
        header(
            &mut o,
            "kvroute_no_room_refusals_total",
            "Routed requests refused (503 no_room) because admitting them would have made the engine preempt.",
            "counter",
        );
        sample(
            &mut o,
            "kvroute_no_room_refusals_total",
            &[],
            self.no_room.load(Ordering::Relaxed) as f64,
        );
        header(
            &mut o,
            "kvroute_http_errors_total",
            "HTTP error answers, by status code.",
            "counter",
        );
        for (code, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            sample(
                &mut o,
                "kvroute_http_errors_total",
                &[("code", &code.to_string())],
                *n as f64,
            );
        }
        self.ttft.write(
            &mut o,
            "kvroute_time_to_first_token_seconds",
            "Time from request arrival to its first output token.",
            &m,
        );
        self.tpot.write(
            &mut o,
            "kvroute_time_per_output_token_seconds",
            "Time between consecutive output tokens of a request.",
            &m,
        );
        self.e2e.write(
            &mut o,
            "kvroute_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            &m,
        );
        if let Some(g) = gpu {
            gauge(
                &mut o,
                "kvroute_gpu_memory_total_bytes",
                "GPU memory, total (NVML).",
                &[],
                g.memory_total_bytes as f64,
            );
            gauge(
                &mut o,
                "kvroute_gpu_memory_used_bytes",
                "GPU memory, used (NVML).",
                &[],
                g.memory_used_bytes as f64,
            );
            gauge(
                &mut o,
                "kvroute_gpu_memory_free_bytes",
                "GPU memory, free (NVML).",
                &[],
                g.memory_free_bytes as f64,
            );
            gauge(
                &mut o,
                "kvroute_gpu_utilization_percent",
                "GPU utilization over NVML's last sample period, 0..100.",
                &[],
                f64::from(g.utilization_percent),
            );
        }

        // vLLM's names, for schedulers that read vLLM metrics.
        gauge(
            &mut o,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            &m,
            usage,
        );
        gauge(
            &mut o,
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage (vLLM's older name). 1 means 100 percent usage.",
            &m,
            usage,
        );
        gauge(
            &mut o,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            &m,
            f64::from(stats.running),
        );
        gauge(
            &mut o,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            &m,
            f64::from(stats.waiting),
        );
        let bs = stats.block_size.to_string();
        let nb = stats.total_blocks.to_string();
        gauge(
            &mut o,
            "vllm:cache_config_info",
            "Information of the KV-cache config.",
            &[
                ("block_size", &bs),
                ("num_gpu_blocks", &nb),
                ("model_name", &self.model),
            ],
            1.0,
        );
        counter(
            &mut o,
            "vllm:prefix_cache_queries_total",
            "Prefix-cache queries, in terms of number of queried tokens.",
            &m,
            stats.prefix_query_tokens as f64,
        );
        counter(
            &mut o,
            "vllm:prefix_cache_hits_total",
            "Prefix-cache hits, in terms of number of cached tokens.",
            &m,
            stats.prefix_hit_tokens as f64,
        );
        counter(
            &mut o,
            "vllm:num_preemptions_total",
            "Cumulative number of preemptions.",
            &m,
            stats.preemptions as f64,
        );
        counter(
            &mut o,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            &m,
            self.prompt_tokens.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut o,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            &m,
            self.generation_tokens.load(Ordering::Relaxed) as f64,
        );
        self.ttft.write(
            &mut o,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &m,
        );
        self.tpot.write(
            &mut o,
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            &m,
        );
        self.tpot.write(
            &mut o,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &m,
        );
        self.e2e.write(
            &mut o,
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            &m,
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf_sum_count() {
        let m = Metrics::new("we\"ird\\name\n".into());
        m.ttft.observe(0.0005);
        m.ttft.observe(0.03);
        m.ttft.observe(1000.0);
        let text = m.render(&CapacityStats::default(), None, true);
        let name = "kvroute_time_to_first_token_seconds";
        let label = r#"model_name="we\"ird\\name\n""#;
        assert!(
            text.contains(&format!("{name}_bucket{{{label},le=\"0.001\"}} 1\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{name}_bucket{{{label},le=\"0.02\"}} 1\n")));
        assert!(text.contains(&format!("{name}_bucket{{{label},le=\"0.04\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{{label},le=\"80\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{{label},le=\"+Inf\"}} 3\n")));
        assert!(text.contains(&format!("{name}_count{{{label}}} 3\n")));
        assert!(text.contains(&format!("{name}_sum{{{label}}} 1000.0305\n")));
    }

    #[test]
    fn every_family_has_help_and_type_once_and_samples_parse() {
        let m = Metrics::new("m".into());
        m.error(400);
        let stats = CapacityStats {
            block_size: 16,
            total_blocks: 10,
            free_blocks: 4,
            ..Default::default()
        };
        let gpu = GpuSample {
            memory_total_bytes: 10,
            memory_used_bytes: 4,
            memory_free_bytes: 6,
            utilization_percent: 50,
        };
        let text = m.render(&stats, Some(gpu), true);
        let mut types = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(types.insert(name.to_string()), "duplicate TYPE {name}");
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {line}"));
                let base = series.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| base.strip_suffix(s).filter(|f| types.contains(*f)))
                    .unwrap_or(base);
                assert!(types.contains(family), "sample before its TYPE: {line}");
            }
        }
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"m\"} 0.6\n"));
        assert!(text.contains(
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"10\",model_name=\"m\"} 1\n"
        ));
        assert!(text.contains("kvroute_gpu_utilization_percent 50\n"));
        assert!(text.contains("kvroute_http_errors_total{code=\"400\"} 1\n"));
    }
}
