//! Stand-in for the official Azure Pipelines agent (`microsoft/azure-pipelines-agent`), with its interface
//! and behaviour, for tests of the product's agent entrypoint. See tests/testbed/README.md for the contract
//! with the simulator.
//!
//! An install folder made by [`layout`] holds `config.sh`, `run.sh`, `env.sh` and `bin/Agent.Listener`, a
//! symlink to the `azp-testbed` binary, which acts as the listener when invoked under that name
//! ([`listener_main`]). Behaviour copied from the official agent (by reading its source, not its code):
//!
//! - `configure`/`remove`/`run` (`--once`), flags from argv or `VSTS_AGENT_INPUT_<NAME>` (removed from the
//!   listener's environment before anything else; flags parse as .NET `bool`, `true`/`false`).
//! - `configure` refuses an already configured folder; reuses an existing `.credentials_rsaparams`; every
//!   configure or remove failure exits **1** (`Agent.ExecuteCommand` maps any configuration exception to
//!   `ReturnCode.TerminatedError`); transient HTTP failures (502/503/504, connection errors, timeouts) are
//!   first retried like the VSS HTTP client does (`VSTS_HTTP_RETRY`, default 3 retries).
//! - `run`: 0 after the run-once job, after SIGTERM/SIGINT (idle or while a job runs, which is finished
//!   `canceled`) and when the agent's token is revoked (agent deleted); 1 when the session cannot be created
//!   for a non-retryable reason (not configured, agent or pool not found, unauthorized); 2 for other errors
//!   escaping the loop (e.g. the session expired and could not be recreated because the agent is gone).
//! - Capabilities: every environment variable (minus the agent's well-known ignores, `VSO_AGENT_IGNORE`,
//!   values of 1024 characters or more) plus `Agent.*` system capabilities.
//!
//! Knobs for tests (none of them exists in the real agent), read from the listener's environment or, as
//! the real agent reads `.env`, from `KEY=VALUE` lines in the agent folder's `.env` (which survives an
//! entrypoint that clears the listener's environment): [`ENV_CANCEL_DELAY_MS`],
//! [`ENV_EMPTY_POLL_DELAY_MS`], [`ENV_RETRY_INTERVAL_MS`], [`ENV_RENEW_INTERVAL_MS`],
//! [`ENV_HTTP_RETRY_BACKOFF_MS`]. Variables starting with [`KNOB_PREFIX`] are not reported as
//! capabilities, so the stand-in's capabilities stay those the real agent would report.

mod args;
mod capabilities;
mod client;
mod configure;
mod diag;
mod files;
mod key;
mod layout;
mod remove;
mod run;

use std::path::PathBuf;

pub use args::{Command, CommandLine};
pub use capabilities::{WELL_KNOWN_IGNORED, capabilities_from_env};
pub use diag::{DIAG_EVENTS_FILE, DiagEvent, read_events};
pub use files::{AgentSettings, CredentialData, LISTENER_LOCK_FILE};
pub use key::RsaParams;
pub use layout::{append_dot_env, layout};
pub use run::{ProbeReport, probe_step_main};

/// The agent version the stand-in reports (`Agent.Version` capability, `TaskAgent.version`, sessions).
/// Matches the agent version the product's examples pin.
pub const AGENT_VERSION: &str = "4.261.0";

/// Return codes of `Agent.Listener`, as `Constants.Agent.ReturnCode` of the official agent.
pub mod return_code {
    /// The command finished (including: run-once job done, SIGTERM, token revoked).
    pub const SUCCESS: i32 = 0;
    /// A non-retryable failure (any configure/remove failure; session creation refused).
    pub const TERMINATED_ERROR: i32 = 1;
    /// A failure the service host would retry by relaunching the listener.
    pub const RETRYABLE_ERROR: i32 = 2;
}

/// Prefix of the stand-in's own knobs.
pub const KNOB_PREFIX: &str = "STANDIN_";
/// Base backoff, in ms, between the HTTP client's retries of transient failures (default 10000, the VSS
/// client's minimum backoff; the n-th retry waits n times this).
pub const ENV_HTTP_RETRY_BACKOFF_MS: &str = "STANDIN_HTTP_RETRY_BACKOFF_MS";
/// Delay, in ms, the stand-in's "job" takes to cancel after SIGTERM/SIGINT or a `JobCancellation` message
/// (the real agent allows the job up to its cancel timeout; default here 200 ms). The job's
/// `workload.cancelDelayMs` overrides it.
pub const ENV_CANCEL_DELAY_MS: &str = "STANDIN_CANCEL_DELAY_MS";
/// Pause, in ms, after an empty long poll before polling again (real agent: random 5–15 s; default 5000).
pub const ENV_EMPTY_POLL_DELAY_MS: &str = "STANDIN_EMPTY_POLL_DELAY_MS";
/// Interval, in ms, between retries of session creation and message polls after a retryable error
/// (real agent: 30 s for sessions, 5–15 s random for polls; default here: the same as real, 30000).
pub const ENV_RETRY_INTERVAL_MS: &str = "STANDIN_RETRY_INTERVAL_MS";
/// Interval, in ms, between job-request lock renewals while a job runs (real agent: 60 s).
pub const ENV_RENEW_INTERVAL_MS: &str = "STANDIN_RENEW_INTERVAL_MS";

/// Errors of the stand-in agent. Messages say what went wrong and what to do, like the agent's own.
#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error("{0}")]
    Usage(String),
    #[error("Invalid configuration provided for {0}. Terminating unattended configuration.")]
    MissingInput(&'static str),
    #[error(
        "Cannot configure the agent because it is already configured. To reconfigure the agent, run 'config.sh remove' first."
    )]
    AlreadyConfigured,
    #[error("Agent is not configured: {0} is missing. Run config.sh first.")]
    NotConfigured(PathBuf),
    #[error("Agent pool not found: '{0}'. Check --pool, and that the identity can see the pool.")]
    PoolNotFound(String),
    #[error(
        "Pool {pool} already contains an agent with name {agent}. Use --replace to take it over, or pick another --agent name."
    )]
    AgentExists { pool: String, agent: String },
    #[error(
        "An Agent.Listener (pid {0}) is running in this agent folder; stop it first ('config.sh remove' and a second listener are refused while it runs)."
    )]
    AgentRunning(u32),
    #[error("RSA key: {0}")]
    Key(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed agent file ({message}); run config.sh again")]
    BadFile { path: PathBuf, message: String },
    #[error("TLS setup: {0}. Check SSL_CERT_FILE.")]
    Tls(String),
    #[error(
        "{call}: cannot connect to {url}: {message}. Check --url and that the server is reachable."
    )]
    Connect {
        call: &'static str,
        url: String,
        message: String,
    },
    #[error("{call}: HTTP {status}{}: {message}", type_key.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Http {
        call: &'static str,
        status: u16,
        type_key: Option<String>,
        message: String,
    },
    #[error("{call}: unexpected response: {message}")]
    Protocol { call: &'static str, message: String },
}

impl StandinError {
    /// A stable label for metrics and test assertions.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StandinError::Usage(_) => "usage",
            StandinError::MissingInput(_) => "missing_input",
            StandinError::AlreadyConfigured => "already_configured",
            StandinError::NotConfigured(_) => "not_configured",
            StandinError::PoolNotFound(_) => "pool_not_found",
            StandinError::AgentExists { .. } => "agent_exists",
            StandinError::AgentRunning(_) => "agent_running",
            StandinError::Key(_) => "key",
            StandinError::Io { .. } => "io",
            StandinError::BadFile { .. } => "bad_file",
            StandinError::Tls(_) => "tls",
            StandinError::Connect { .. } => "connect",
            StandinError::Http { status: 401, .. } => "http_401",
            StandinError::Http { status: 403, .. } => "http_403",
            StandinError::Http { status: 404, .. } => "http_404",
            StandinError::Http { status: 409, .. } => "http_409",
            StandinError::Http { status: 429, .. } => "http_429",
            StandinError::Http { status, .. } if *status >= 500 => "http_5xx",
            StandinError::Http { .. } => "http_other",
            StandinError::Protocol { .. } => "protocol",
        }
    }

    /// Whether the VSS HTTP client (and the listener's loops) would retry this failure.
    pub fn is_transient(&self) -> bool {
        match self {
            StandinError::Connect { .. } => true,
            StandinError::Http { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }

    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StandinError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Entry point of `bin/Agent.Listener`: `argv` without the program name. Returns the process exit code.
pub fn listener_main(argv: Vec<String>) -> i32 {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let root = match agent_root() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("Error: {e}");
            return return_code::TERMINATED_ERROR;
        }
    };
    // Program.cs: variables from the agent folder's .env file are added before the command line is parsed.
    files::apply_dot_env(&root, &mut env);
    let command = CommandLine::parse(&argv, &mut env);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return return_code::RETRYABLE_ERROR;
        }
    };
    let ctx = Context {
        root,
        env,
        argv: std::iter::once(program_name()).chain(argv).collect(),
    };
    runtime.block_on(dispatch(ctx, command))
}

/// What every command gets: the agent folder, the listener's effective environment (after `.env` and the
/// removal of `VSTS_AGENT_INPUT_*`), and its full argv.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub root: PathBuf,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
}

impl Context {
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// argv with the values of secret arguments replaced by `***`, as the agent's secret masker does for
    /// its logs.
    pub fn masked_argv(&self) -> Vec<String> {
        let mut masked = Vec::with_capacity(self.argv.len());
        let mut hide_next = false;
        for arg in &self.argv {
            if hide_next {
                masked.push("***".to_string());
                hide_next = false;
                continue;
            }
            hide_next = arg.strip_prefix("--").is_some_and(|name| {
                args::SECRET_ARGS.contains(&name.to_ascii_lowercase().as_str())
            });
            masked.push(arg.clone());
        }
        masked
    }

    pub fn knob_ms(&self, name: &str, default: u64) -> std::time::Duration {
        let ms = self
            .var(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(default);
        std::time::Duration::from_millis(ms)
    }
}

async fn dispatch(ctx: Context, command: CommandLine) -> i32 {
    for unknown in &command.unknown {
        eprintln!(
            "Unrecognized command-line input arguments: '{unknown}'. For usage refer to: .\\config.cmd --help or ./config.sh --help"
        );
    }
    match command.command {
        Command::Version => {
            println!("{AGENT_VERSION}");
            return_code::SUCCESS
        }
        Command::Help => {
            println!(
                "Stand-in Azure Pipelines agent {AGENT_VERSION}: configure | remove | run [--once]"
            );
            return_code::SUCCESS
        }
        Command::Configure => match configure::configure(&ctx, &command).await {
            Ok(()) => return_code::SUCCESS,
            Err(e) => {
                diag::event(
                    &ctx.root,
                    "configure_failed",
                    serde_json::json!({"error": e.to_string(), "label": e.metric_label()}),
                );
                eprintln!("{e}");
                return_code::TERMINATED_ERROR
            }
        },
        Command::Remove => match remove::remove(&ctx, &command).await {
            Ok(()) => return_code::SUCCESS,
            Err(e) => {
                diag::event(
                    &ctx.root,
                    "remove_failed",
                    serde_json::json!({"error": e.to_string(), "label": e.metric_label()}),
                );
                eprintln!("{e}");
                return_code::TERMINATED_ERROR
            }
        },
        Command::Run => run::run(&ctx, &command).await,
    }
}

fn program_name() -> String {
    std::env::args()
        .next()
        .unwrap_or_else(|| "Agent.Listener".into())
}

/// The agent root: the parent of the folder holding `bin/Agent.Listener` as invoked (the symlink, not the
/// binary it points to), as `HostContext.GetDirectory(WellKnownDirectory.Root)`.
fn agent_root() -> Result<PathBuf, StandinError> {
    let name = program_name();
    let mut invoked = PathBuf::from(&name);
    if !name.contains('/') {
        // Found through PATH: the first PATH entry holding it.
        if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&name))
                .find(|candidate| candidate.is_file())
        }) {
            invoked = found;
        }
    }
    let invoked = if invoked.is_absolute() {
        invoked
    } else {
        let cwd = std::env::current_dir().map_err(|e| StandinError::io(".", e))?;
        cwd.join(invoked)
    };
    let bin = invoked.parent().ok_or_else(|| {
        StandinError::Usage("cannot find the agent's bin folder from argv[0]".into())
    })?;
    let root = bin.parent().ok_or_else(|| {
        StandinError::Usage("Agent.Listener must be run from <agent root>/bin".into())
    })?;
    std::path::absolute(root).map_err(|e| StandinError::io(root, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_argument_values_are_masked_for_logs() {
        let ctx = Context {
            root: PathBuf::from("/agent"),
            env: Vec::new(),
            argv: [
                "Agent.Listener",
                "configure",
                "--TOKEN",
                "s3cret",
                "--pool",
                "p",
                "--password",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        assert_eq!(
            ctx.masked_argv(),
            [
                "Agent.Listener",
                "configure",
                "--TOKEN",
                "***",
                "--pool",
                "p",
                "--password"
            ]
        );
    }

    #[test]
    fn transient_errors_are_the_ones_the_agent_retries() {
        let http = |status| StandinError::Http {
            call: "c",
            status,
            type_key: None,
            message: String::new(),
        };
        assert!(http(503).is_transient());
        assert!(http(429).is_transient());
        assert!(!http(401).is_transient());
        assert!(!http(404).is_transient());
        assert_eq!(http(401).metric_label(), "http_401");
        assert_eq!(http(502).metric_label(), "http_5xx");
        assert_eq!(
            StandinError::AgentRunning(1).metric_label(),
            "agent_running"
        );
    }
}
