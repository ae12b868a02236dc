//! `kvroute`: thin entry point; everything testable lives in the library.

use clap::{Parser, Subcommand};
use kvroute_operator::gateway::GatewayArgs;
use kvroute_operator::up::UpArgs;

#[derive(Debug, Parser)]
#[command(
    name = "kvroute",
    version,
    about = "kvroute: serve LLMs, placing requests by free KV-cache memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: admit and route OpenAI requests to agents by free KV blocks.
    Gateway(GatewayArgs),
    /// Start N agents and a gateway on this machine; Ctrl-C stops them all.
    Up(UpArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Gateway(args) => {
                let config = args.into_config()?;
                let gw = kvroute_operator::gateway::start(config).await?;
                tracing::info!(addr = %gw.addr, "gateway listening");
                tokio::select! {
                    r = gw.task => r??,
                    _ = shutdown_signal() => tracing::info!("shutting down"),
                }
                Ok(())
            }
            Command::Up(args) => Ok(kvroute_operator::up::run(args).await?),
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
