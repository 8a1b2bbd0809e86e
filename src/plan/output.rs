//! What the planner decides: actions with reasons, and per-AgentPool counts.

use serde::{Deserialize, Serialize};

use super::model::{AgentId, PoolRef, RequestId};

/// The decisions for one ADO pool in one poll.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub ado_pool: String,
    /// In the order to apply them: replacements and removals first (they free `maxAgents` room),
    /// then creations, oldest request first, standby agents last.
    pub actions: Vec<Action>,
    /// One entry per AgentPool given to the planner, in routing order (highest priority first).
    pub pools: Vec<PoolSummary>,
}

impl Plan {
    /// The creations, in order.
    pub fn creates(&self) -> impl Iterator<Item = &Action> {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::CreateAgent { .. }))
    }

    /// The summary of one AgentPool.
    pub fn pool(&self, agent_pool: &PoolRef) -> Option<&PoolSummary> {
        self.pools.iter().find(|p| &p.agent_pool == agent_pool)
    }
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// Create an agent Job. Creating an existing name is success (409): the name is deterministic.
    #[serde(rename_all = "camelCase")]
    CreateAgent {
        agent_pool: PoolRef,
        job_name: String,
        /// The request that caused it; `None` for a standby (`minIdle`) agent. ADO may give the
        /// agent another request: that is fine, the planner sees it next poll.
        for_request: Option<RequestId>,
        /// 1 for the first Job of a request (and for standbys).
        attempt: u32,
        reason: String,
    },
    /// Remove an agent that holds no request and is surplus (more unclaimed agents than pending
    /// requests plus `minIdle`). The applier must still disable it in ADO, re-check that no
    /// request holds it, and re-enable it if one does.
    #[serde(rename_all = "camelCase")]
    RemoveIdleAgent {
        agent_pool: PoolRef,
        job_name: String,
        agent_name: String,
        /// The ADO agent id when the agent is registered.
        agent_id: Option<AgentId>,
        reason: String,
    },
    /// Delete an agent Job that did not register within its startup timeout (and its
    /// half-registered agent, if any). Whatever it was for is re-planned like any other demand.
    #[serde(rename_all = "camelCase")]
    ReplaceStuckAgent {
        agent_pool: PoolRef,
        job_name: String,
        agent_name: String,
        agent_id: Option<AgentId>,
        for_request: Option<RequestId>,
        reason: String,
    },
}

impl Action {
    /// The AgentPool the action is about.
    pub fn agent_pool(&self) -> &PoolRef {
        match self {
            Action::CreateAgent { agent_pool, .. }
            | Action::RemoveIdleAgent { agent_pool, .. }
            | Action::ReplaceStuckAgent { agent_pool, .. } => agent_pool,
        }
    }

    /// The Job the action creates or deletes.
    pub fn job_name(&self) -> &str {
        match self {
            Action::CreateAgent { job_name, .. }
            | Action::RemoveIdleAgent { job_name, .. }
            | Action::ReplaceStuckAgent { job_name, .. } => job_name,
        }
    }

    /// Why, in words for logs, Events and the `plan` command.
    pub fn reason(&self) -> &str {
        match self {
            Action::CreateAgent { reason, .. }
            | Action::RemoveIdleAgent { reason, .. }
            | Action::ReplaceStuckAgent { reason, .. } => reason,
        }
    }
}

/// A request that will not get an agent this poll, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    pub request: RequestId,
    pub why: String,
}

/// Agents of one AgentPool by state (unfinished Jobs only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCounts {
    /// Not registered yet (stuck ones included).
    pub starting: u32,
    /// Registered, holding no request.
    pub idle: u32,
    /// Holding a request (reserved or assigned in ADO).
    pub busy: u32,
}

/// What one AgentPool sees and does this poll.
///
/// Every pending request of the ADO pool lands in the summary of exactly one AgentPool (the one
/// serving it, or, when blocked, the first one whose capabilities fit), except unservable
/// requests, which appear in every AgentPool's summary (no template can serve them, and each
/// status should say so).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSummary {
    pub agent_pool: PoolRef,
    /// All pending requests attributed to this AgentPool, in queue order.
    pub pending: Vec<RequestId>,
    /// Pending requests an existing unclaimed agent of this AgentPool is expected to take.
    pub matched: Vec<RequestId>,
    /// Pending requests a new agent is created for.
    pub created_for: Vec<RequestId>,
    /// Pending requests that wait for room: parallel jobs, `maxAgents`, `paused`, or a startup
    /// backoff.
    pub capped: Vec<Blocked>,
    /// Pending requests no AgentPool can serve (demands unmet or unparseable).
    pub unservable: Vec<Blocked>,
    pub agents: AgentCounts,
    /// Agent Jobs created this poll (requests and standbys).
    pub create: u32,
    /// One line per decision and blocked request.
    pub reasons: Vec<String>,
}
