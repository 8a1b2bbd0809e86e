//! What the entrypoint needs from Azure DevOps, as a seam: tokens, and the REST fallbacks of
//! deregistration. Production wires it to the [`crate::ado`] module; unit tests use fakes.

use std::fmt;
use std::future::Future;

/// A token for Azure DevOps. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself: only for `VSTS_AGENT_INPUT_TOKEN` and the redactor.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What kind of problem an [`OpsError`] is, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsKind {
    /// The identity itself: no token, rejected federated credential, not in the organization (TF401444).
    Identity,
    /// Authenticated but not allowed (403 on the pool).
    Permission,
    /// The pool (or agent) does not exist.
    NotFound,
    /// Anything else (network, 5xx, throttling, malformed answers).
    Other,
}

/// A failure talking to Entra or Azure DevOps, reduced to what the entrypoint decides on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpsError {
    /// What kind of problem.
    pub kind: OpsKind,
    /// Whether trying again later may help.
    pub transient: bool,
    /// Stable metric label of the underlying error.
    pub label: &'static str,
    /// The explained message (names the cause and the fix).
    pub message: String,
}

impl OpsError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        self.label
    }
}

/// The result of deleting an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// It existed and was removed.
    Removed,
    /// It did not exist (404): someone (the controller) removed it already.
    AlreadyGone,
}

/// An agent's place: pool id and agent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRef {
    /// Pool id.
    pub pool_id: i32,
    /// Agent id.
    pub agent_id: i32,
}

/// Azure DevOps as the entrypoint sees it.
pub trait AdoOps: Send + Sync {
    /// A newly acquired token (never a cached one).
    fn fresh_token(&self) -> impl Future<Output = Result<Secret, OpsError>> + Send;

    /// Deletes an agent by id (404 = [`Removal::AlreadyGone`]).
    fn delete_agent(
        &self,
        agent: AgentRef,
    ) -> impl Future<Output = Result<Removal, OpsError>> + Send;

    /// Finds an agent by pool and agent name (`None`: no such pool or agent).
    fn find_agent(
        &self,
        pool: &str,
        agent_name: &str,
    ) -> impl Future<Output = Result<Option<AgentRef>, OpsError>> + Send;

    /// Explains a failed registration by checking the pool with our own token (pool missing, no
    /// permission, identity not in the organization). `None` when the check finds nothing wrong.
    fn diagnose_registration(&self, pool: &str) -> impl Future<Output = Option<OpsError>> + Send;
}
