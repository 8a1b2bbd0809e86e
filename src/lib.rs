//! azp-autoscaler: scale-to-zero, run-once Azure DevOps agents on Kubernetes.
//!
//! The tree shows the architecture:
//! - [`plan`]: every decision, as pure functions over an ADO snapshot and a cluster snapshot (no IO).
//! - [`ado`]: the Azure DevOps REST client, its models, authentication and rate limiting (no Kubernetes).
//! - [`k8s`]: the `AgentPool` resource, agent Job building, watches, applying a plan, status (no ADO wire formats).
//! - [`agent`]: the agent container entrypoint (token → register → run once → deregister).
//! - [`hooks`]: the ADO service-hook endpoint (a wake-up hint for the polls, never a decision).
//! - [`admin`], [`metrics`], [`telemetry`], [`tls`]: the thin shells around them.

pub mod admin;
pub mod ado;
pub mod agent;
pub mod agent_files;
pub mod cli;
pub mod controller;
pub mod hooks;
pub mod k8s;
pub mod metrics;
pub mod plan;
pub mod telemetry;
pub mod tls;
