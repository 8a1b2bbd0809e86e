//! The agent container entrypoint, `azp-autoscaler agent`: token → register → run one job → deregister.
//!
//! It replaces the `start.sh` + `az` CLI of the published guides, and differs from it on each point:
//!
//! 1. **Settings** come from flags or the environment the controller sets (`AZP_URL`, `AZP_POOL`,
//!    `AZP_AGENT_NAME`, `AZP_WORK`, `AZP_AGENT_DIR` defaulting to the working directory, …, see
//!    [`AgentArgs`]); every missing or malformed one is reported in one message (exit 10).
//! 2. **Token**: an Entra token for Azure DevOps through the pod's workload identity (the federated token
//!    file re-read at every exchange), or with `AZP_AUTH=pat` a PAT read from `AZP_PAT_FILE` (Azure DevOps
//!    Server). No PAT is needed in Azure DevOps Services, and no `az` CLI is in the image.
//! 3. **Registration**: `config.sh --unattended --url … --auth pat --pool … --agent … --replace --work …`
//!    with the token only in `VSTS_AGENT_INPUT_TOKEN` (never argv, never logged; its output is forwarded
//!    with the token masked). Exit code 2 (the agent's "retryable error") and transient token failures
//!    are retried with exponential backoff within `AZP_REGISTER_TIMEOUT_SECONDS`. After exit code 1 (the
//!    official agent's code for every failure) the entrypoint checks the pool itself: a transient answer
//!    (5xx, 429, timeout) means an ADO outage and is retried like exit 2; otherwise it explains the
//!    failure (pool missing, `TF401444`, 403) and stops.
//! 4. **Listener**: `bin/Agent.Listener run --once`, started directly (not through the `run.sh` bash
//!    wrapper, which does not pass SIGTERM on), as a child in its own process group. SIGTERM/SIGINT are
//!    forwarded to it; it then cancels its job and reports the result (the official listener waits up to
//!    30 s for that). It gets `AZP_LISTENER_GRACE_SECONDS` (default 45) before its whole group is killed.
//! 5. **Deregistration** with a **freshly acquired** token, so a job longer than the first token's
//!    lifetime still ends with the agent removed: `config.sh remove`, falling back to the REST delete by
//!    the agent id read from `.agent` after registration (a 404 means already gone, which is success),
//!    retried within `AZP_DEREGISTER_TIMEOUT_SECONDS` (default 30), on every exit path after a
//!    registration may have happened. When the listener stops on its own before taking a job, the REST
//!    delete goes first: its 404 tells "the controller removed the idle agent" (exit 0) apart from "the
//!    listener failed" (exit 13).
//! 6. **Exit codes** tell the truth: see [`Exit`] for the table (0 job ran and agent removed, or removed
//!    while idle; 10 settings; 11 token; 12 registration; 13 agent; 14 job interrupted by SIGTERM;
//!    15 agent left behind; 20–22 the pipeline job's result with `--exit-with-job-result`). The job's
//!    result is read from the listener's console line `Job <name> completed with result: <Result>` (the
//!    official agent prints it; its own exit code is 0 whatever the job's result).
//! 7. **Environment hygiene**: the agent's processes do not get `AZURE_*`, `AZP_*`, `VSTS_AGENT_INPUT_*`
//!    or the token at all (see [`mod@env`]); `agent.disableupdate=true` stops self-update (the agent is baked
//!    into the image). Limit: the federated token *file* stays readable by job steps in this design.
//!
//! # Settings
//!
//! | variable | flag | default | meaning |
//! |---|---|---|---|
//! | `AZP_URL` | `--url` | required | organization (or collection) URL |
//! | `AZP_POOL` | `--pool` | required | ADO agent pool name |
//! | `AZP_AGENT_NAME` | `--agent-name` | required | agent name, unique across clusters (set by the controller) |
//! | `AZP_CAPABILITIES` | `--capabilities` | none | JSON object of capabilities, exported into the agent's environment (set by the controller) |
//! | `AZP_WORK` | `--work` | `_work` | work folder (relative: inside the agent folder) |
//! | `AZP_AGENT_DIR` | `--agent-dir` | working directory | folder holding `config.sh` and `bin/Agent.Listener` |
//! | `AZP_AUTH` | `--auth` | `workload-identity` | or `pat` (Azure DevOps Server), with `AZP_PAT_FILE` / `--pat-file` |
//! | `AZP_EXIT_WITH_JOB_RESULT` | `--exit-with-job-result` | `false` | exit 20/21/22 when the pipeline job failed / was canceled / other |
//! | `AZP_REGISTER_TIMEOUT_SECONDS` | `--register-timeout` | 300 | registration budget, retries included |
//! | `AZP_LISTENER_GRACE_SECONDS` | `--listener-grace` | 45 | time the listener gets to cancel after SIGTERM |
//! | `AZP_DEREGISTER_TIMEOUT_SECONDS` | `--deregister-timeout` | 30 | deregistration budget, retries included |
//! | `AZP_LOG_FORMAT` | `--log-format` | `text` | or `json`; the filter is `RUST_LOG` (default `info`) |
//!
//! Workload identity reads `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE` and
//! `AZURE_AUTHORITY_HOST`, which the workload-identity webhook injects into pods labelled
//! `azure.workload.identity/use: "true"`; extra CAs come from `SSL_CERT_FILE` / `SSL_CERT_DIR`.
//!
//! # Pod termination budget
//!
//! After Kubernetes sends SIGTERM, the entrypoint needs up to `AZP_LISTENER_GRACE_SECONDS` for the listener
//! to cancel its job and exit, then up to `AZP_DEREGISTER_TIMEOUT_SECONDS` to deregister. The pod's
//! `terminationGracePeriodSeconds` must exceed their sum plus a margin (defaults: 45 + 30 → at least 90),
//! otherwise the kubelet's SIGKILL can land before deregistration and leave an offline agent behind (the
//! controller's cleanup then removes it).

use std::path::PathBuf;
use std::process::ExitCode;

pub mod agent_file;
pub mod backend;
pub mod env;
pub mod exit;
pub mod ops;
pub mod process;
pub mod run;
#[cfg(test)]
mod run_tests;
pub mod settings;
pub mod signals;

pub use exit::{Exit, JobResult, Outcome};
pub use ops::{AdoOps, AgentRef, OpsError, OpsKind, Removal, Secret};
pub use run::{Backoff, Runner};
pub use settings::{AuthMode, Settings, SettingsError};
pub use signals::Termination;

use crate::ado::TokenSource;

/// Settings of `azp-autoscaler agent` (from flags or the environment the controller sets).
///
/// Every value is read as text and validated by [`Settings::resolve`], so that one message lists every
/// problem (clap would stop at the first).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// Organization URL, e.g. `https://dev.azure.com/contoso` (or an Azure DevOps Server collection URL).
    #[arg(long, env = "AZP_URL", hide_env_values = true)]
    pub url: Option<String>,

    /// ADO agent pool name.
    #[arg(long, env = "AZP_POOL", hide_env_values = true)]
    pub pool: Option<String>,

    /// Agent name: unique across clusters (the controller sets it).
    #[arg(long, env = "AZP_AGENT_NAME", hide_env_values = true)]
    pub agent_name: Option<String>,

    /// Work folder for config.sh --work (relative: inside the agent folder) [default: _work].
    #[arg(long, env = "AZP_WORK", hide_env_values = true)]
    pub work: Option<String>,

    /// Folder the official agent was unpacked into [default: the working directory].
    #[arg(long, env = "AZP_AGENT_DIR", hide_env_values = true)]
    pub agent_dir: Option<String>,

    /// `workload-identity` (default) or `pat` (Azure DevOps Server; needs --pat-file).
    #[arg(long, env = "AZP_AUTH", hide_env_values = true)]
    pub auth: Option<String>,

    /// File holding a PAT (only with --auth pat).
    #[arg(long, env = "AZP_PAT_FILE", hide_env_values = true)]
    pub pat_file: Option<String>,

    /// JSON object of capability name → value, exported into the agent's environment (the controller sets
    /// it from the AgentPool, so the agent advertises what routing assumed).
    #[arg(
        long,
        env = "AZP_CAPABILITIES",
        hide_env_values = true,
        value_name = "JSON"
    )]
    pub capabilities: Option<String>,

    /// Folder holding the agent's `.agent`, `.credentials` and `.credentials_rsaparams`, written by the
    /// controller (`registration: controller`; it sets this): the listener starts from them, and the
    /// entrypoint neither registers nor deregisters (the pod holds no identity).
    #[arg(
        long,
        env = "AZP_AGENT_FILES",
        hide_env_values = true,
        value_name = "DIR"
    )]
    pub agent_files: Option<String>,

    /// Exit-code, timing and logging options.
    #[command(flatten)]
    pub tuning: Box<AgentTuning>,
}

/// The less common settings of `azp-autoscaler agent` (boxed: they keep the CLI's enum small).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentTuning {
    /// Exit with the pipeline job's result (20 failed, 21 canceled, 22 other) instead of 0.
    #[arg(
        long,
        env = "AZP_EXIT_WITH_JOB_RESULT",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub exit_with_job_result: Option<String>,

    /// Seconds registration may take, retries included [default: 300].
    #[arg(
        long,
        env = "AZP_REGISTER_TIMEOUT_SECONDS",
        hide_env_values = true,
        value_name = "SECONDS"
    )]
    pub register_timeout: Option<String>,

    /// Seconds the listener gets to cancel its job after SIGTERM before it is killed [default: 45].
    #[arg(
        long,
        env = "AZP_LISTENER_GRACE_SECONDS",
        hide_env_values = true,
        value_name = "SECONDS"
    )]
    pub listener_grace: Option<String>,

    /// Log format of the entrypoint's own lines: `text` (default; they interleave with the agent's console
    /// output) or `json`.
    #[arg(
        long,
        env = "AZP_LOG_FORMAT",
        hide_env_values = true,
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,

    /// Seconds deregistration may take, retries included [default: 30].
    #[arg(
        long,
        env = "AZP_DEREGISTER_TIMEOUT_SECONDS",
        hide_env_values = true,
        value_name = "SECONDS"
    )]
    pub deregister_timeout: Option<String>,
}

/// Runs the entrypoint to completion and returns the process exit code (see [`Exit`]).
pub async fn entrypoint(args: AgentArgs) -> ExitCode {
    // A malformed value is reported with the other settings; logging starts as text meanwhile.
    crate::telemetry::init(
        settings::log_format(&args).unwrap_or(crate::telemetry::LogFormat::Text),
    );
    // First, so that a SIGTERM arriving during start-up is not lost.
    let term = match Termination::install() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("cannot install the SIGTERM/SIGINT handlers: {e}");
            return ExitCode::from(Exit::Agent.code());
        }
    };
    let exit = run(args, term).await;
    tracing::info!(
        exit_code = exit.code(),
        outcome = exit.label(),
        "agent entrypoint done"
    );
    ExitCode::from(exit.code())
}

/// The ADO side of a pod without identity (`registration: controller`): nothing can be asked of ADO.
struct NoIdentity;

impl AdoOps for NoIdentity {
    async fn fresh_token(&self) -> Result<Secret, OpsError> {
        Err(NoIdentity::error())
    }
    async fn delete_agent(&self, _agent: AgentRef) -> Result<Removal, OpsError> {
        Err(NoIdentity::error())
    }
    async fn find_agent(&self, _pool: &str, _name: &str) -> Result<Option<AgentRef>, OpsError> {
        Err(NoIdentity::error())
    }
    async fn diagnose_registration(&self, _pool: &str) -> Option<OpsError> {
        None
    }
}

impl NoIdentity {
    fn error() -> OpsError {
        OpsError {
            kind: OpsKind::Identity,
            transient: false,
            label: "no_identity",
            message: "this pod has no identity (registration: controller): the controller registers and removes the agent".to_owned(),
        }
    }
}

async fn run(args: AgentArgs, term: Termination) -> Exit {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let settings = match Settings::resolve(&args, &cwd) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(label = e.metric_label(), "{e}");
            return Exit::Config;
        }
    };
    if let Some(files) = &settings.agent_files {
        tracing::info!(
            pool = %settings.pool,
            agent = %settings.agent_name,
            agent_dir = %settings.agent_dir.display(),
            files = %files.display(),
            "agent entrypoint starting with the agent files the controller registered (no identity in this pod)"
        );
        if let Err(e) = agent_file::install_agent_files(files, &settings.agent_dir, &settings.work)
        {
            tracing::error!("{e}");
            return Exit::Config;
        }
        let child_env = env::child_env(std::env::vars_os(), &settings.capabilities);
        return Runner::new(&settings, &NoIdentity, term, child_env)
            .run_preregistered()
            .await
            .exit();
    }
    let tokens = match &settings.auth {
        AuthMode::WorkloadIdentity => match TokenSource::workload_identity_from_env(None) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    label = e.metric_label(),
                    "cannot set up workload identity: {e}"
                );
                // An unusable CA bundle is local configuration; anything else is the identity setup.
                return match e {
                    crate::ado::AuthError::Tls(_) => Exit::Config,
                    _ => Exit::Token,
                };
            }
        },
        AuthMode::PatFile(path) => TokenSource::pat_file(path.clone()),
    };
    let backend = backend::AdoBackend::new(settings.url.as_str(), tokens);
    tracing::info!(
        url = %settings.url,
        pool = %settings.pool,
        agent = %settings.agent_name,
        agent_dir = %settings.agent_dir.display(),
        "agent entrypoint starting"
    );
    let child_env = env::child_env(std::env::vars_os(), &settings.capabilities);
    Runner::new(&settings, &backend, term, child_env)
        .run()
        .await
        .exit()
}
