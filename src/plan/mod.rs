//! The planner: every scaling decision as a pure function. No IO, no clocks (time is an input), no
//! Kubernetes client types, no ADO wire types: the controller converts what it read into the plain
//! types of [`model`], calls [`plan`], and applies the [`Plan`]'s actions; the `plan` command prints
//! [`report`]. One call plans one ADO pool, over every AgentPool that shares it.
//!
//! # Rules
//!
//! **Demand.** A request is *pending* when it has no `result`, no `assignTime`, no
//! `reservedAgent`, no `receiveTime` (and no `finishTime`). Pending requests are taken in queue
//! order (`queueTime`, then id). However many there are, all are counted.
//!
//! - *Parallel jobs*: when usage is known, the free slots (`total − used`) go to pending requests
//!   in queue order (requests listed as slot holders keep theirs); the rest are **capped
//!   (parallel jobs)**: ADO would not run them even with an agent, so they get no new agents,
//!   but the unclaimed agents they could use are kept rather than removed as surplus.
//! - *Demands* are parsed and matched with ADO's semantics ([`demand`]). A request with a demand
//!   that does not parse, or whose demands no AgentPool's capabilities (plus `Agent.Version` = the
//!   AgentPool's agent version) satisfy, is **unservable**, with the reason quoted.
//!
//! **Supply.** Our agents that hold no request: an unfinished agent Job whose agent name is in no
//! request's `reservedAgent` and no agent's `assignedRequest`. Starting agents count. Agents that
//! are disabled in ADO or stuck (not registered within the startup timeout plus a backoff) are not
//! supply. A busy agent (holding a request) is never supply and never removed, so running jobs
//! never reduce the agents created for other requests (KEDA #7878), and a request that ADO has
//! already given to an agent is not pending, so it gets no further agent (KEDA #7747).
//!
//! **Matching.** Each pending request first keeps the unclaimed agent started for it. Then one
//! maximum matching over the whole ADO pool (ADO decides which agent takes which request; an
//! agent started for R may well take S) pairs the other requests with the remaining unclaimed
//! agents of any AgentPool that can serve them, and only the requests left over get new agents.
//! The matching also sees the agents each AgentPool may still create, so when a full AgentPool's
//! agent is the only one that fits a later request, an earlier request that fits elsewhere gets
//! the new agent elsewhere. Precedence, highest first: requests (queue order) on existing agents,
//! the same on new agents, standby slots, then requests that must not get a new agent now
//! (their own Job is alive, stuck or in an unknown AgentPool) on what is still unclaimed.
//!
//! **Routing.** A left-over request goes to the first AgentPool, by priority, whose capabilities
//! satisfy *all* its demands and that has room; an AgentPool that is paused, at `maxAgents`
//! (unfinished Jobs, whatever their state) or backing off after failed starts is skipped (spill
//! over). Priority: the **higher number wins**; equal priorities go by `namespace/name`
//! ascending. When no AgentPool has room the request is **capped**, with each AgentPool's reason.
//!
//! **Naming** ([`names`]). A request's Job is `<agentpool>-<requestId>-<attempt>`, attempt = 1 +
//! the highest attempt of any Job known for that request (so a request whose first agent took
//! another request gets attempt 2). A request never gets a second unfinished Job while its first
//! one holds no request; when the first one holds *another* request, it is that request's agent
//! now, and the request gets attempt 2 while it still runs (so "unfinished Jobs annotated with
//! request R" can be two, but at most one of them is free). Standby Jobs are
//! `<agentpool>-standby-<n>`, the smallest free `n`.
//!
//! **Standby and surplus.** Each AgentPool keeps `minIdle` unclaimed agents beyond what the
//! pending requests are matched to: standby slots are matched after every request, so a standby
//! that is about to take a request is replaced at once. Unclaimed agents beyond pending + `minIdle`
//! are removed (**RemoveIdleAgent**), registered ones first, oldest first; that global count is
//! the only source of removals (never "the request that triggered me finished"). An agent that is
//! disabled in ADO and holds no request is removed too (an interrupted removal). A paused
//! AgentPool creates, removes and replaces nothing.
//!
//! **Stuck agents.** An agent Job not registered `startupTimeout + backoff(failures)` after its
//! creation is replaced (**ReplaceStuckAgent**); its request gets a new Job in the next poll, once
//! the stuck one is gone. After `failures` consecutive failed starts of an AgentPool, a request's
//! next attempt there waits [`startup_backoff`]`(failures)` after its previous attempt.
//!
//! Actions are ordered: replacements, removals, creations for requests (queue order), standbys.
//!
//! **ADO-side cleanup** ([`cleanup()`]). Our agents (owner capability = this cluster and one of the
//! AgentPools) that hold no request and that no unfinished agent Job runs are deleted from ADO once
//! they have been so for a grace period; placeholders and foreign agents never.
//!
//! **Drain** ([`drain()`]). An AgentPool being deleted (held by its finalizer) waits for its busy
//! agents, removes idle ones safely, deletes unregistered Jobs and left-behind agents, and only then
//! its placeholder and its finalizer.
//!
//! **Disruption** ([`protect`]). A pod whose agent holds a request is marked busy and selected by its
//! AgentPool's PodDisruptionBudget, which allows no eviction; a busy pod disrupted anyway (node loss,
//! preemption) is a job lost to eviction.
//!
//! **Leader election** ([`lease_step`], [`still_leader`]). With several replicas only the holder of
//! an unexpired Lease writes; it stops a margin before its Lease could be taken over.
//!
//! # Example
//!
//! ```
//! use azp_autoscaler::plan::{self, *};
//! use jiff::{SignedDuration, Timestamp};
//!
//! let now: Timestamp = "2025-06-01T12:00:00Z".parse().unwrap();
//! let linux = AgentPoolSpec {
//!     agent_pool: PoolRef::new("ci", "linux"),
//!     priority: 0,
//!     capabilities: [("Agent.OS".to_owned(), "Linux".to_owned())].into(),
//!     agent_version: "4.255.0".into(),
//!     min_idle: 0,
//!     max_agents: 5,
//!     paused: false,
//!     startup_timeout: SignedDuration::from_mins(5),
//! };
//! let ado = AdoSnapshot {
//!     ado_pool: "builds".into(),
//!     requests: vec![JobRequest {
//!         id: 42,
//!         queue_time: Some(now),
//!         assign_time: None,
//!         receive_time: None,
//!         finish_time: None,
//!         result: None,
//!         demands: vec!["Agent.OS -equals linux".into()],
//!         reserved_agent: None,
//!         parallelism_tag: Some("Private".into()),
//!     }],
//!     ..AdoSnapshot::default()
//! };
//! let planned = plan::plan(&ado, &ClusterSnapshot::default(), &[linux], now);
//! assert!(matches!(
//!     &planned.actions[..],
//!     [Action::CreateAgent { job_name, for_request: Some(42), attempt: 1, .. }] if job_name == "linux-42-1"
//! ));
//! let json = serde_json::to_string(&plan::report(&planned)).unwrap();
//! assert!(json.starts_with(r#"{"pools":[{"agentPool":"ci/linux","adoPool":"builds","pending":[42]"#));
//! ```

pub mod cleanup;
pub mod demand;
pub mod drain;
pub mod lease;
pub mod model;
pub mod names;
pub mod output;
mod planner;
pub mod protect;
pub mod report;

#[cfg(test)]
mod tests;

pub use cleanup::{Cleanup, OrphanAgent, OwnerScope, cleanup};
pub use demand::{Capabilities, Demand, DemandParseError};
pub use drain::{Drain, DrainAction, DrainScope, drain};
pub use lease::{LeaseRecord, LeaseStep, lease_step, still_leader};
pub use model::{
    AdoSnapshot, Agent, AgentId, AgentJob, AgentPoolSpec, AgentRef, AgentStatus, ClusterSnapshot,
    JobPhase, JobRequest, ParallelJobUsage, PoolRef, RequestId,
};
pub use output::{Action, AgentCounts, Blocked, Plan, PoolSummary};
pub use planner::{BACKOFF_BASE, BACKOFF_MAX, startup_backoff};
pub use report::{PlanReport, PoolReport, report};

use jiff::Timestamp;

/// Plans one ADO pool: what to create, remove and replace, and why. `specs` are the AgentPools
/// that use this ADO pool (valid ones only); `now` is the time of the snapshots.
pub fn plan(
    ado: &AdoSnapshot,
    cluster: &ClusterSnapshot,
    specs: &[AgentPoolSpec],
    now: Timestamp,
) -> Plan {
    planner::plan(ado, cluster, specs, now)
}
