//! The `plan` command's JSON: `{"pools":[{"agentPool":"<ns>/<name>","adoPool":"<name>",
//! "pending":[ids],"capped":[ids],"unservable":[ids],"agents":{"starting":n,"idle":n,"busy":n},
//! "create":n,"reasons":["..."]}]}`.

use serde::{Deserialize, Serialize};

use super::model::RequestId;
use super::output::{AgentCounts, Plan};

/// The report of one or more plans (one per ADO pool): serializes to `{"pools":[...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    pub pools: Vec<PoolReport>,
}

impl PlanReport {
    /// Appends the pools of another ADO pool's report (the CLI plans each ADO pool separately).
    pub fn extend(&mut self, other: PlanReport) {
        self.pools.extend(other.pools);
    }
}

/// One AgentPool's line in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolReport {
    /// `<namespace>/<name>`.
    pub agent_pool: String,
    pub ado_pool: String,
    pub pending: Vec<RequestId>,
    pub capped: Vec<RequestId>,
    pub unservable: Vec<RequestId>,
    pub agents: AgentCounts,
    pub create: u32,
    pub reasons: Vec<String>,
}

/// The report of one plan, AgentPools in routing order.
pub fn report(plan: &Plan) -> PlanReport {
    let pools = plan
        .pools
        .iter()
        .map(|pool| PoolReport {
            agent_pool: pool.agent_pool.to_string(),
            ado_pool: plan.ado_pool.clone(),
            pending: pool.pending.clone(),
            capped: pool.capped.iter().map(|b| b.request).collect(),
            unservable: pool.unservable.iter().map(|b| b.request).collect(),
            agents: pool.agents,
            create: pool.create,
            reasons: pool.reasons.clone(),
        })
        .collect();
    PlanReport { pools }
}
