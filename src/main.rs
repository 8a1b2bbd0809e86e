//! `azp-autoscaler`: wiring only. Every subcommand's logic lives in the library; `anyhow` lives only here.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use azp_autoscaler::telemetry::{self, LogFormat};

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
    /// Watch AgentPools and create one run-once agent Job per waiting ADO request.
    Controller(ControllerArgs),
    /// The agent container entrypoint: get a token, register the agent, run one job, deregister.
    Agent(azp_autoscaler::agent::AgentArgs),
    /// Dry run: what the controller would do for these AgentPool manifests right now. Creates nothing.
    Plan(azp_autoscaler::cli::plan::PlanArgs),
    /// Print the AgentPool CustomResourceDefinition (YAML), as the Helm chart ships it.
    Crd,
}

#[derive(Debug, clap::Args)]
struct ControllerArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "AZP_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// This cluster's identity in agent names and owner capabilities (default: the kube-system namespace UID).
    #[arg(long, env = "AZP_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "AZP_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Seconds between two listings of an ADO pool's agents (job requests are read every poll).
    #[arg(long, default_value_t = 30)]
    agents_every_seconds: u64,
    /// Log format.
    #[arg(long, env = "AZP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
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
            Command::Controller(args) => report(controller(args).await),
            Command::Plan(args) => azp_autoscaler::cli::plan::run(args).await,
            Command::Crd => unreachable!("handled before the runtime starts"),
        }
    })
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "azp-autoscaler stopped");
            eprintln!("azp-autoscaler: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let config = azp_autoscaler::controller::Config {
        namespace: args.namespace,
        cluster_id: args.cluster_id,
        admin_addr: args.admin_addr,
        agents_every: Duration::from_secs(args.agents_every_seconds.max(1)),
        ..azp_autoscaler::controller::Config::default()
    };
    let metrics = azp_autoscaler::metrics::Metrics::new();
    tokio::select! {
        res = azp_autoscaler::controller::run(client, config, metrics) => res.context("controller failed")?,
        _ = shutdown_signal() => tracing::info!("stopping on signal"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
