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
    /// Print the ModelDeployment CRD as YAML (what deploy/crd.yaml holds).
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", kvroute_operator::crd::crd_yaml()?);
            Ok(())
        }
    }
}
