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
    let opts = ServeOptions {
        http: config.http,
        grpc: config.grpc,
        drain_timeout: config.drain_timeout,
    };
    tracing::info!(model = %config.model, device = ?config.device, agent_id = %config.agent_id, "starting");
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
            block_size: "16".into(),
            max_num_seqs: "256".into(),
            threads: None,
            max_model_len: None,
            served_model_name: None,
            agent_id: Some("cli".into()),
            max_body_bytes: "4MiB".into(),
            drain_timeout: "1s".into(),
            cache_dir: self.cache_dir.clone(),
            log_format: crate::config::LogFormat::Text,
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
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Concurrent requests.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    pub requests: u32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: u32,
    /// Output length in tokens.
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// KV-cache memory.
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
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

/// `kvroute-agent bench`: synthetic load straight on the engine (no HTTP); prints one JSON line.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = args.model.serve_config(Some(args.kv_memory.clone()))?;
    let backend = engine_backend::load(&cfg)?;
    let report = oneshot::bench(
        backend.clone(),
        oneshot::BenchShape {
            requests: args.requests,
            concurrency: args.concurrency,
            prompt_tokens: args.prompt_tokens,
            output_tokens: args.output_tokens,
        },
    )?;
    println_flush(&report.to_json());
    backend.shutdown();
    Ok(())
}
