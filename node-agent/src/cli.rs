//! The `kvroute-agent` subcommands behind the thin `main`: `serve`, and the by-hand checks
//! `run`, `tokenize` and `bench`.

use std::time::Duration;

use clap::Args;

use crate::config::{DeviceArg, ServeConfig};
use crate::engine_backend;
use crate::gpu::GpuMonitor;
use crate::oneshot;
use crate::server::{self, println_flush, ServeEvent, ServeOptions};
use crate::state::AgentState;

/// `kvroute-agent serve`.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let gpu = GpuMonitor::start(Duration::from_secs(1));
    let state = AgentState::new(config.agent_id.clone(), config.max_body_bytes, gpu);
    match &config.auth_token {
        Some(t) => state.require_token(t.clone()),
        None => tracing::warn!("no --auth-token-file: anyone who reaches this agent's ports may send requests and read its capacity"),
    }
    let opts = ServeOptions {
        http: config.http,
        grpc: config.grpc,
        drain_timeout: config.drain_timeout,
        http_limits: config.http_limits,
        max_capacity_subscribers: config.max_capacity_subscribers,
    };
    tracing::info!(model = %config.model, device = ?config.device, device_choice = %config.device_note, agent_id = %config.agent_id, "starting");
    let load_cfg = config.clone();
    server::serve(
        state,
        opts,
        move || engine_backend::load(&load_cfg).map_err(|e| e.to_string()),
        server::shutdown_signal(),
        |ev| match ev {
            ServeEvent::Bound(b) => println_flush(&format!(
                "kvroute-agent listening http={} grpc={}",
                b.http, b.grpc
            )),
            ServeEvent::Ready(model) => {
                println_flush(&format!("kvroute-agent ready model={model}"))
            }
        },
    )
    .await?;
    Ok(())
}

/// Flags shared by the by-hand subcommands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// `default` or a path to a GGUF file or model folder.
    #[arg(long, env = "KVROUTE_MODEL", default_value = "default")]
    pub model: String,
    /// Compute device.
    #[arg(long, env = "KVROUTE_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Where `--model default` is downloaded to.
    #[arg(long, env = "KVROUTE_CACHE")]
    pub cache_dir: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// A serve configuration for loading the model with defaults elsewhere.
    fn serve_config(&self, kv_memory: Option<String>) -> anyhow::Result<ServeConfig> {
        let args = crate::config::ServeArgs {
            model: self.model.clone(),
            http: "127.0.0.1:0".into(),
            grpc: "127.0.0.1:0".into(),
            device: self.device,
            kv_memory,
            gpu_memory_utilization: None,
            kv_offload_memory: None,
            kv_cache_dtype: "f16".into(),
            block_size: "16".into(),
            max_num_seqs: "256".into(),
            threads: None,
            max_model_len: None,
            served_model_name: None,
            agent_id: Some("cli".into()),
            max_body_bytes: "4MiB".into(),
            drain_timeout: "1s".into(),
            header_read_timeout: "10s".into(),
            body_read_timeout: "60s".into(),
            max_connections: "8192".into(),
            max_capacity_subscribers: "256".into(),
            auth_token_file: None,
            cache_dir: self.cache_dir.clone(),
            log_format: crate::config::LogFormat::Text,
            optimistic_admission: false,
            fault_panic_at_step: None,
        };
        Ok(args.validate()?)
    }
}

/// `kvroute-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, short)]
    pub prompt: String,
    /// Render the prompt as one user message with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `kvroute-agent tokenize`.
#[derive(Debug, Clone, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text.
    pub text: String,
    /// Do not add the BOS token.
    #[arg(long)]
    pub no_special: bool,
}

/// `kvroute-agent bench`.
///
/// By default it measures the forward pass the way llama.cpp's `llama-batched-bench` does
/// (`-npp --prompt-tokens -ntg --gen-tokens -npl --batch`), so `bench/compare-llamacpp.sh` can
/// put the two side by side. With `--requests N` it instead drives the whole engine (scheduler,
/// sampling, KV manager) with N synthetic requests, `--concurrency` at a time.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: u32,
    /// Tokens generated per sequence after its prompt.
    #[arg(long, alias = "output-tokens", default_value_t = 64)]
    pub gen_tokens: u32,
    /// Batch sizes to measure, comma separated (sequences run in parallel).
    #[arg(long, default_value = "1,4,16")]
    pub batch: String,
    /// CPU compute threads (default: every core this process may use).
    #[arg(long)]
    pub threads: Option<String>,
    /// One JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Drive the whole engine with this many requests instead (prints one JSON line).
    #[arg(long)]
    pub requests: Option<u32>,
    /// Concurrent requests (with `--requests`).
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// KV-cache memory (with `--requests`).
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// KV cache element type of the forward-pass benchmark: `f16` or `q8_0`.
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: String,
}

/// Most tokens one forward-pass benchmark may hold in KV at once (batch × (prompt + gen)):
/// bounds its memory (about 3 GB for the default model) whatever the flags say.
const MAX_BENCH_TOKENS: u64 = 1 << 16;
/// Most sequences per batch in the forward-pass benchmark.
const MAX_BENCH_BATCH: usize = 1024;

/// The forward-pass benchmark's shape, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardBench {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub batches: Vec<usize>,
    /// 0 = every core this process may use.
    pub threads: usize,
}

impl BenchArgs {
    /// Checks the forward-pass flags; errors name the flag and the bad value.
    pub fn forward(&self) -> anyhow::Result<ForwardBench> {
        if self.prompt_tokens == 0 {
            anyhow::bail!("--prompt-tokens: must be at least 1, got 0");
        }
        let mut batches = Vec::new();
        for part in self.batch.split(',') {
            let b: usize = part.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "--batch: '{}' is not a comma-separated list of sizes (got '{part}')",
                    self.batch
                )
            })?;
            if b == 0 || b > MAX_BENCH_BATCH {
                anyhow::bail!("--batch: each size must be in 1..={MAX_BENCH_BATCH}, got {b}");
            }
            let tokens = b as u64 * (u64::from(self.prompt_tokens) + u64::from(self.gen_tokens));
            if tokens > MAX_BENCH_TOKENS {
                anyhow::bail!(
                    "--batch {b} × (--prompt-tokens {} + --gen-tokens {}) = {tokens} tokens of KV; \
                     the benchmark holds at most {MAX_BENCH_TOKENS}",
                    self.prompt_tokens,
                    self.gen_tokens
                );
            }
            batches.push(b);
        }
        let threads = match &self.threads {
            None => 0,
            Some(s) => match s.trim().parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => anyhow::bail!("--threads: must be a number in 1..=1024, got '{s}'"),
            },
        };
        Ok(ForwardBench {
            prompt_tokens: self.prompt_tokens as usize,
            gen_tokens: self.gen_tokens as usize,
            batches,
            threads,
        })
    }
}

/// `kvroute-agent run`: loads the model, generates, prints text as it arrives, then a summary
/// on stderr.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = args.model.serve_config(None)?;
    let backend = engine_backend::load(&cfg)?;
    let started = std::time::Instant::now();
    let out = oneshot::run_once(
        backend.as_ref(),
        &args.prompt,
        args.chat,
        kvroute_engine::api::SamplingParams {
            max_tokens: args.max_tokens.max(1),
            temperature: args.temperature,
            seed: args.seed,
            ..Default::default()
        },
        &mut std::io::stdout().lock(),
    )?;
    println_flush("");
    eprintln!(
        "prompt_tokens={} completion_tokens={} finish_reason={} seconds={:.3}",
        out.prompt_tokens,
        out.completion_tokens,
        out.finish_reason,
        started.elapsed().as_secs_f64()
    );
    backend.shutdown();
    Ok(())
}

/// `kvroute-agent tokenize`: prints the token ids as a JSON array on one line. Needs only the
/// tokenizer, not the engine.
pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let resolved = engine_backend::resolve(&args.model.model, args.model.cache_dir.as_deref())?;
    let text = engine_backend::ModelText::load(&resolved)?;
    let ids = text.tokenize(&args.text, !args.no_special)?;
    println_flush(&serde_json::to_string(&ids)?);
    Ok(())
}

/// `kvroute-agent bench`: the forward-pass benchmark (one line per batch size), or with
/// `--requests` synthetic load straight on the engine (no HTTP, one JSON line).
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(requests) = args.requests {
        let cfg = args.model.serve_config(Some(args.kv_memory.clone()))?;
        let backend = engine_backend::load(&cfg)?;
        let report = oneshot::bench(
            backend.clone(),
            oneshot::BenchShape {
                requests,
                concurrency: args.concurrency,
                prompt_tokens: args.prompt_tokens,
                output_tokens: args.gen_tokens,
            },
        )?;
        println_flush(&report.to_json());
        backend.shutdown();
        return Ok(());
    }
    let shape = args.forward()?;
    let kv_cache_dtype: kvroute_engine::model::KvCacheDtype = args
        .kv_cache_dtype
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--kv-cache-dtype: {e}"))?;
    let cfg = args.model.serve_config(None)?;
    // `auto` may pick a GPU; this benchmark measures the CPU forward pass whatever it found.
    if args.model.device == DeviceArg::Cuda {
        anyhow::bail!(
            "--device: the forward-pass benchmark runs on the CPU backend; use --device cpu"
        );
    }
    let resolved = engine_backend::resolve(&cfg.model, cfg.cache_dir.as_deref())?;
    let loaded = kvroute_engine::load::load(&resolved)?;
    let context = loaded.config.max_position_embeddings;
    if shape.prompt_tokens + shape.gen_tokens > context {
        anyhow::bail!(
            "--prompt-tokens {} + --gen-tokens {} exceeds the model's context of {context} tokens",
            shape.prompt_tokens,
            shape.gen_tokens
        );
    }
    let model = loaded.model;
    let isa = model.isa().name();
    if !args.json {
        println_flush(&format!(
            "model {} ({isa}), prompt {} tokens, gen {} tokens, KV cache {}",
            loaded.name,
            shape.prompt_tokens,
            shape.gen_tokens,
            kv_cache_dtype.name()
        ));
        println_flush(
            "batch  prefill tok/s  decode tok/s  prefill tok/CPU-s  decode tok/CPU-s  peak RSS MiB",
        );
    }
    for &batch in &shape.batches {
        let r = kvroute_engine::bench::run(
            model.clone(),
            kvroute_engine::bench::BenchConfig {
                prompt_tokens: shape.prompt_tokens,
                gen_tokens: shape.gen_tokens,
                batch,
                threads: shape.threads,
                kv_cache_dtype,
            },
        )?;
        let per_cpu = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let prefill_cpu = per_cpu(batch * shape.prompt_tokens, r.prefill_cpu_secs);
        let decode_cpu = per_cpu(batch * shape.gen_tokens, r.decode_cpu_secs);
        if args.json {
            println_flush(
                &serde_json::json!({
                    "batch": batch,
                    "prompt_tokens": shape.prompt_tokens,
                    "gen_tokens": shape.gen_tokens,
                    "threads": shape.threads,
                    "isa": isa,
                    "kv_cache_dtype": kv_cache_dtype.name(),
                    "prefill_tok_s": r.prefill_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "prefill_secs": r.prefill_secs,
                    "decode_secs": r.decode_secs,
                    "prefill_tok_per_cpu_s": prefill_cpu,
                    "decode_tok_per_cpu_s": decode_cpu,
                    "peak_rss_bytes": r.peak_rss_bytes,
                })
                .to_string(),
            );
        } else {
            println_flush(&format!(
                "{batch:>5}  {:>13.1}  {:>12.1}  {prefill_cpu:>17.1}  {decode_cpu:>16.1}  {:>12}",
                r.prefill_tok_s,
                r.decode_tok_s,
                r.peak_rss_bytes >> 20
            ));
        }
    }
    Ok(())
}
