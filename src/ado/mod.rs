//! Azure DevOps REST client: models, authentication, rate limiting, error mapping. Knows nothing of
//! Kubernetes.
//!
//! - [`AdoClient`]: one per (organization URL, identity), cheap to clone, shared by every ADO pool of
//!   the organization: pools, job requests, agents, parallel-job usage.
//! - [`TokenSource`]: workload identity (default), PAT file (Azure DevOps Server), Azure CLI login.
//! - [`AdoError`] / [`AuthError`]: explained errors with stable metric labels and a transient/permanent
//!   split.
//! - [`AdoObserver`]: the hook metrics hang on.

pub mod auth;
pub mod client;
pub mod error;
pub mod models;
pub mod observer;
pub mod ratelimit;

pub use auth::{
    ADO_SCOPE, AccessToken, AuthError, AuthScheme, TokenSource, WorkloadIdentityConfig,
};
pub use client::{AdoClient, AdoClientConfig, AdoClients, AgentQuery, AgentUpdate, DeleteOutcome};
pub use error::AdoError;
pub use models::{
    AgentStatus, Demand, ListResponse, ResourceLimit, ResourceUsage, TaskAgent,
    TaskAgentAuthorization, TaskAgentJobRequest, TaskAgentPool, TaskAgentPublicKey,
    TaskAgentReference, TaskOrchestrationOwner, TaskResult,
};
pub use observer::{
    AdoObserver, CallRecord, DelayReason, NoopObserver, RateLimitState, TokenEvent,
};
