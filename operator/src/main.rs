//! `kvroute`: thin entry point; everything testable lives in the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvroute", version, about = "kvroute control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ModelDeployment controller.
    Operator(Box<kvroute_operator::controller::app::OperatorArgs>),
    /// Print the ModelDeployment CRD as YAML (what deploy/crd.yaml holds).
    Crd,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Operator(args) => {
            init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(kvroute_operator::controller::app::serve(*args))?;
            Ok(())
        }
        Command::Crd => {
            print!("{}", kvroute_operator::crd::crd_yaml()?);
            Ok(())
        }
    }
}
