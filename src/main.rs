//! `azp-autoscaler`: wiring only. Every subcommand's logic lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "azp-autoscaler",
    version,
    about = "Scale-to-zero, run-once Azure DevOps agents on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The agent container entrypoint: get a token, register the agent, run one job, deregister.
    Agent(azp_autoscaler::agent::AgentArgs),
    /// Print the AgentPool CustomResourceDefinition (YAML), as the Helm chart ships it.
    Crd,
}

fn main() -> ExitCode {
    azp_autoscaler::tls::install_crypto_provider();
    let cli = Cli::parse();
    if let Command::Crd = cli.command {
        return match azp_autoscaler::k8s::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("azp-autoscaler crd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("azp-autoscaler: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Agent(args) => azp_autoscaler::agent::entrypoint(args).await,
            Command::Crd => unreachable!("handled before the runtime starts"),
        }
    })
}
