//! `azp-autoscaler`: wiring only. Every subcommand's logic lives in the library; `anyhow` lives only here.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
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
    /// Delete the selected AgentPools and wait until the controller drained them (Helm pre-delete hook).
    Drain(azp_autoscaler::cli::drain::DrainArgs),
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
    /// Seconds one of our agents may stay in ADO with no unfinished agent Job (pod OOM-killed, evicted,
    /// deregistration failed) and no request before it is deleted.
    #[arg(long, env = "AZP_ORPHAN_GRACE_SECONDS", default_value_t = 120)]
    orphan_grace_seconds: u64,
    /// Run as one of several replicas: only the holder of a coordination.k8s.io/v1 Lease polls and writes.
    #[arg(long, env = "AZP_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: POD_NAMESPACE, else --namespace).
    #[arg(long, env = "AZP_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "azp-autoscaler-leader")]
    lease_name: String,
    /// Seconds a leader's Lease lasts without renewal (renewed every third of it).
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Log format.
    #[arg(long, env = "AZP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Allow-list file (YAML): which organizations / ADO pools the AgentPools of each namespace may use with
    /// the controller's identity. Without it, any namespace may use any organization.
    #[arg(long, env = "AZP_ALLOW_LIST")]
    allow_list: Option<PathBuf>,
    #[command(flatten)]
    hooks: HookArgs,
}

/// The ADO service-hook endpoint (off unless `--hooks-addr` is set). Credentials come from files (a
/// mounted Secret) or from `AZP_HOOKS_USERNAME`, `AZP_HOOKS_PASSWORD`, `AZP_HOOKS_TOKEN` (never argv).
#[derive(Debug, clap::Args)]
struct HookArgs {
    /// Serve `POST /hooks/ado` on this address (its own port: expose only it, through an HTTPS Ingress).
    #[arg(long, env = "AZP_HOOKS_ADDR")]
    hooks_addr: Option<SocketAddr>,
    /// File holding the Basic-auth username ADO sends (`basicAuthUsername` of the subscription).
    #[arg(long, env = "AZP_HOOKS_USERNAME_FILE")]
    hooks_username_file: Option<PathBuf>,
    /// File holding the Basic-auth password (`basicAuthPassword`).
    #[arg(long, env = "AZP_HOOKS_PASSWORD_FILE")]
    hooks_password_file: Option<PathBuf>,
    /// File holding the shared secret sent in `--hooks-token-header` (`httpHeaders` of the subscription).
    #[arg(long, env = "AZP_HOOKS_TOKEN_FILE")]
    hooks_token_file: Option<PathBuf>,
    /// Header carrying the shared secret.
    #[arg(long, env = "AZP_HOOKS_TOKEN_HEADER", default_value = azp_autoscaler::hooks::DEFAULT_TOKEN_HEADER)]
    hooks_token_header: String,
    /// Largest hook body accepted, in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    hooks_max_body_bytes: usize,
    /// Hook requests admitted per second (all callers together).
    #[arg(long, default_value_t = NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN))]
    hooks_rate_per_second: NonZeroU32,
    /// Hook requests admitted in a burst above the rate.
    #[arg(long, default_value_t = NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN))]
    hooks_burst: NonZeroU32,
    /// Hooks within this many milliseconds wake the polls once.
    #[arg(long, default_value_t = 1000)]
    hooks_min_wake_interval_ms: u64,
}

impl HookArgs {
    fn settings(&self) -> Result<azp_autoscaler::hooks::Settings, azp_autoscaler::hooks::Error> {
        use azp_autoscaler::hooks::{CredentialSources, Credentials, Settings};
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = Credentials::load(&CredentialSources {
            username_file: self.hooks_username_file.clone(),
            password_file: self.hooks_password_file.clone(),
            token_file: self.hooks_token_file.clone(),
            username: env("AZP_HOOKS_USERNAME"),
            password: env("AZP_HOOKS_PASSWORD"),
            token: env("AZP_HOOKS_TOKEN"),
            token_header: self.hooks_token_header.clone(),
        })?;
        Ok(Settings {
            max_body_bytes: self.hooks_max_body_bytes,
            rate_per_second: self.hooks_rate_per_second,
            burst: self.hooks_burst,
            min_wake_interval: Duration::from_millis(self.hooks_min_wake_interval_ms),
            ..Settings::new(credentials)
        })
    }
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
            Command::Drain(args) => azp_autoscaler::cli::drain::run(args).await,
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
    // Configuration errors first: a bad allow-list stops the controller before it touches anything.
    let allow_list = args
        .allow_list
        .as_deref()
        .map(azp_autoscaler::controller::allow::AllowList::load)
        .transpose()?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let leader_election = if args.leader_elect {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| args.namespace.clone())
            .context("--leader-elect needs the Lease's namespace: set --lease-namespace or POD_NAMESPACE")?;
        let instance = std::env::var("POD_NAME").unwrap_or_else(|_| "azp-autoscaler".to_owned());
        Some(azp_autoscaler::controller::leader::LeaderConfig {
            namespace,
            name: args.lease_name.clone(),
            // Unique per process: a restarted pod with the same name must not inherit the old lease blindly.
            identity: format!(
                "{instance}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            duration: Duration::from_secs(args.lease_duration_seconds.max(3)),
        })
    } else {
        None
    };
    let config = azp_autoscaler::controller::Config {
        namespace: args.namespace,
        cluster_id: args.cluster_id,
        admin_addr: args.admin_addr,
        agents_every: Duration::from_secs(args.agents_every_seconds.max(1)),
        orphan_grace: Duration::from_secs(args.orphan_grace_seconds),
        allow_list,
        leader_election,
        ..azp_autoscaler::controller::Config::default()
    };
    let metrics = azp_autoscaler::metrics::Metrics::new();
    let hooks = match args.hooks.hooks_addr {
        Some(addr) => {
            let settings = args
                .hooks
                .settings()
                .context("the service-hook endpoint is misconfigured")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for service hooks on {addr}"))?;
            Some(azp_autoscaler::hooks::serve(
                listener,
                settings,
                config.wake.clone(),
                metrics.clone(),
            ))
        }
        None => None,
    };
    let hooks = async move {
        match hooks {
            Some(serve) => serve.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        res = azp_autoscaler::controller::run(client, config, metrics) => res.context("controller failed")?,
        res = hooks => res.context("the service-hook endpoint failed")?,
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
