//! The agent container entrypoint: token → register → run one job → deregister.

use std::process::ExitCode;

/// Settings of `azp-autoscaler agent` (from flags or the environment the controller sets).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {}

/// Runs the entrypoint to completion and returns the process exit code.
pub async fn entrypoint(_args: AgentArgs) -> ExitCode {
    ExitCode::from(1)
}
