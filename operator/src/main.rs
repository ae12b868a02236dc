//! `kvroute`: thin entry point; everything testable lives in the library.

use clap::{Parser, Subcommand};
use kvroute_gateway::GatewayArgs;
use kvroute_operator::up::UpArgs;

#[derive(Parser)]
#[command(
    name = "kvroute",
    version,
    about = "kvroute: serve LLMs, placing requests by free KV-cache memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: admit and route OpenAI requests to agents by free KV blocks.
    Gateway(Box<GatewayArgs>),
    /// Start N agents and a gateway on this machine; Ctrl-C stops them all.
    Up(Box<UpArgs>),
    /// Run the ModelDeployment controller.
    Operator(Box<kvroute_operator::controller::app::OperatorArgs>),
    /// Print the ModelDeployment CRD as YAML (what deploy/crd.yaml holds).
    Crd,
    /// Ask a running gateway where it would send a request now, and why (sends nothing).
    Explain(Box<kvroute_operator::explain::ExplainArgs>),
    /// Simulate agents and gateways at scale with the real router and KV block manager.
    Sim(Box<kvroute_operator::sim::SimArgs>),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Gateway(args) => {
            init_tracing();
            let config = args.into_config()?;
            runtime()?.block_on(async move {
                let drain_timeout = config.drain_timeout;
                let mut gw = kvroute_gateway::start(config).await?;
                tracing::info!(addr = %gw.addr, admin = ?gw.admin_addr, "gateway listening");
                tokio::select! {
                    r = &mut gw.task => r??,
                    _ = shutdown_signal() => {
                        tracing::info!(deadline = ?drain_timeout, "draining: no new connections, open requests finish");
                        let how = gw.drain(drain_timeout).await?;
                        tracing::info!(?how, "stopped");
                    }
                }
                Ok(())
            })
        }
        Command::Up(mut args) => {
            if args.verbose {
                init_tracing();
            } else {
                // The gateway's log goes beside the agents' (the folder is printed at start).
                let dir = kvroute_operator::up::log_dir(&args)?;
                let file = std::fs::File::create(dir.join("gateway.log"))?;
                args.log_dir = Some(dir);
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(file))
                    .init();
            }
            runtime()?.block_on(kvroute_operator::up::run(*args))?;
            Ok(())
        }
        Command::Operator(args) => {
            init_tracing();
            runtime()?.block_on(kvroute_operator::controller::app::serve(*args))?;
            Ok(())
        }
        Command::Explain(args) => {
            let v = runtime()?.block_on(kvroute_operator::explain::run(&args))?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Sim(args) => kvroute_operator::sim::run(&args),
        Command::Crd => {
            print!("{}", kvroute_crd::crd_yaml()?);
            Ok(())
        }
    }
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
