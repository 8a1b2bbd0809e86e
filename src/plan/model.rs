//! The planner's own input types: plain data the controller fills from the ADO models and the
//! Kubernetes caches (and tests write by hand).

use std::collections::BTreeMap;
use std::fmt;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// ADO's job request id (`requestId`, an int64 on the wire).
pub type RequestId = i64;
/// ADO's agent id (an int32 on the wire; widened so every id fits).
pub type AgentId = i64;

/// Names one `AgentPool` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolRef {
    pub namespace: String,
    pub name: String,
}

impl PoolRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PoolRef {
    /// `<namespace>/<name>`, the form used in reports and reasons.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What ADO says about one ADO pool, read in one poll.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoSnapshot {
    /// The ADO pool's name (for reports).
    pub ado_pool: String,
    /// Every request `jobrequests?completedRequestCount=0` returned (all pages: more than 200 is
    /// normal during a burst), in any order.
    pub requests: Vec<JobRequest>,
    /// The pool's agents, as last read (may be older than `requests`). Used to see which of our
    /// agents hold a request, are registered, or are disabled; foreign agents are ignored.
    pub agents: Vec<Agent>,
    /// Self-hosted parallel-job limit and usage, when known. `None` = do not cap.
    pub parallel_jobs: Option<ParallelJobUsage>,
}

/// One ADO job request (`TaskAgentJobRequest`), reduced to what decisions need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    pub id: RequestId,
    /// `queueTime`; a request without one sorts first (it cannot be newer than anything).
    pub queue_time: Option<Timestamp>,
    pub assign_time: Option<Timestamp>,
    pub receive_time: Option<Timestamp>,
    pub finish_time: Option<Timestamp>,
    /// `result` (`succeeded`, `canceled`, ...) once the request is done.
    pub result: Option<String>,
    /// The demand strings exactly as ADO sent them.
    pub demands: Vec<String>,
    /// `reservedAgent`: the agent ADO gave this request to.
    pub reserved_agent: Option<AgentRef>,
    /// `data.ParallelismTag` (`Private` / `Public`), when present.
    pub parallelism_tag: Option<String>,
}

impl JobRequest {
    /// A request that waits for an agent: no result, not assigned, not reserved, not received.
    pub fn is_pending(&self) -> bool {
        self.result.is_none()
            && self.assign_time.is_none()
            && self.reserved_agent.is_none()
            && self.receive_time.is_none()
            && self.finish_time.is_none()
    }
}

/// A reference to an agent (`TaskAgentReference`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRef {
    pub id: AgentId,
    pub name: String,
}

/// ADO's view of one agent of the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub status: AgentStatus,
    pub enabled: bool,
    /// System and user capabilities (not used for routing: routing uses the AgentPool's).
    #[serde(default)]
    pub capabilities: BTreeMap<String, String>,
    /// `assignedRequest.requestId`, when the agent holds one.
    pub assigned_request: Option<RequestId>,
}

/// An agent's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentStatus {
    Online,
    Offline,
    Unknown,
}

/// Parallel-job limit and usage of one bucket (`resourceusage?parallelismTag=...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParallelJobUsage {
    /// The bucket (`Private` for self-hosted private jobs). Requests tagged with another bucket
    /// are not capped; requests without a tag count against this one.
    pub parallelism_tag: String,
    /// `resourceLimit.totalCount`.
    pub total: u32,
    /// `usedCount`.
    pub used: u32,
    /// Ids in `runningRequests`: requests that already hold a slot. A pending request listed here
    /// waits for an agent, not for a slot, so it is never capped (ADO lists at most 50).
    #[serde(default)]
    pub slot_holders: Vec<RequestId>,
}

/// Our side: the agent Jobs of every AgentPool that shares the ADO pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSnapshot {
    /// Every agent Job the cache knows, finished ones included (they keep attempt numbers and
    /// standby numbers moving forward). A Job being deleted should be given as `Finished`.
    pub jobs: Vec<AgentJob>,
    /// Per AgentPool, how many agents in a row failed to start (stuck beyond the startup timeout,
    /// or failed before registering). Drives the backoff of replacements; absent = 0.
    #[serde(default)]
    pub startup_failures: BTreeMap<String, u32>,
}

impl ClusterSnapshot {
    /// Consecutive startup failures recorded for an AgentPool.
    pub fn failures_of(&self, pool: &PoolRef) -> u32 {
        self.startup_failures
            .get(&pool.to_string())
            .copied()
            .unwrap_or(0)
    }
}

/// One agent Job we created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentJob {
    /// The Job's name (unique within its namespace).
    pub name: String,
    pub agent_pool: PoolRef,
    /// The ADO agent name passed to the pod (what `reservedAgent.name` will say).
    pub agent_name: String,
    /// The request it was created for; `None` for a standby.
    pub for_request: Option<RequestId>,
    /// Its attempt number for `for_request` (1 for the first Job of a request).
    pub attempt: u32,
    pub created: Timestamp,
    pub phase: JobPhase,
    /// Whether its pod ever ran (tells "image pull / unschedulable" from "crashed before registering").
    pub pod_started: bool,
}

/// Where an agent Job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobPhase {
    /// Pod not running yet, or running but the agent has not registered yet.
    Starting,
    /// The agent is registered and listening (or running a job).
    Running,
    /// The Job succeeded, failed, or is being deleted.
    Finished,
}

/// The part of one `AgentPool`'s spec that decisions need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolSpec {
    pub agent_pool: PoolRef,
    /// Among AgentPools of the same ADO pool, the **higher** number is tried first; equal
    /// priorities go by `namespace/name`, ascending.
    pub priority: i32,
    /// The capabilities this AgentPool's agents advertise (injected into the agent).
    pub capabilities: BTreeMap<String, String>,
    /// The agent version baked into the image; `Agent.Version` demands are checked against it.
    pub agent_version: String,
    /// Unclaimed agents to keep ready beyond the pending requests.
    pub min_idle: u32,
    /// Most unfinished agent Jobs at any time (busy, idle, starting, stuck).
    pub max_agents: u32,
    /// A paused AgentPool creates and removes nothing; its agents still serve requests.
    pub paused: bool,
    /// How long an agent may take from Job creation to registration before it is replaced.
    pub startup_timeout: SignedDuration,
}

impl AgentPoolSpec {
    /// Whether `self` is tried before `other` when routing.
    pub(crate) fn routing_order(&self, other: &Self) -> std::cmp::Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then_with(|| self.agent_pool.cmp(&other.agent_pool))
    }
}
