//! `kvroute-agent`: thin entry point. Parses flags, sets up logging, and hands over to the
//! library (`serve`, `cli`).

use clap::{Parser, Subcommand};
use kvroute_agent::cli;
use kvroute_agent::config::{LogFormat, ServeArgs};

#[derive(Parser)]
#[command(
    name = "kvroute-agent",
    version,
    about = "kvroute node-agent: one engine behind the OpenAI API, KV capacity over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model: OpenAI-compatible HTTP API and the gRPC capacity service.
    Serve(Box<ServeArgs>),
    /// Generate from one prompt and print the text as it comes.
    Run(cli::RunArgs),
    /// Print the token ids of a text.
    Tokenize(cli::TokenizeArgs),
    /// Measure prefill and decode speed per batch size (or engine load with `--requests`).
    Bench(cli::BenchArgs),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, without a backtrace: these are user errors.
            eprintln!("kvroute-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.validate()?;
            init_logs(config.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(cli::serve(config));
            // A model load still running after SIGTERM must not hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Run(args) => {
            init_logs(LogFormat::Text);
            cli::run(args)
        }
        Command::Tokenize(args) => {
            init_logs(LogFormat::Text);
            cli::tokenize(args)
        }
        Command::Bench(args) => {
            init_logs(LogFormat::Text);
            cli::bench(args)
        }
    }
}
