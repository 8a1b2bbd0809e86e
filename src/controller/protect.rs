//! Busy agent pods against voluntary disruption (the decisions are in [`crate::plan::protect`]): marks
//! busy pods, keeps each AgentPool's PodDisruptionBudget over them, and counts jobs lost to a
//! disruption from the pod watch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;

use super::Context;
use super::snapshot;
use crate::k8s::crd::AgentPool;
use crate::k8s::job::{LABEL_AGENTPOOL, LABEL_BUSY, MANAGED_BY};
use crate::metrics::{Metrics, PoolLabels};
use crate::plan;

const FIELD_MANAGER: &str = "azp-autoscaler";
/// A budget deleted or edited by hand is put back within this time.
const BUDGET_REFRESH: Duration = Duration::from_secs(300);

/// The PodDisruptionBudget of an AgentPool's busy agent pods.
pub fn budget_name(agentpool: &str) -> String {
    format!("{agentpool}-busy-agents")
}

/// What was last applied per AgentPool: (generation, minAvailable, when).
#[derive(Default)]
pub struct Budgets(HashMap<plan::PoolRef, (Option<i64>, i32, Instant)>);

/// Marks the pods whose agent holds a request busy (their AgentPool's budget then selects them), or
/// unmarks those whose agent's job is done. The cluster-autoscaler annotation is on every agent pod
/// from its template already.
pub async fn mark_busy(ctx: &Context, pods: &[&plan::protect::AgentPod], busy: bool) {
    for pod in pods {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace);
        let value = busy.then_some("true");
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_BUSY: value}}});
        match api
            .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) if busy => {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), agent = %pod.agent_name, "agent busy: pod protected from eviction")
            }
            Ok(_) => {
                tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), agent = %pod.agent_name, "agent's job done: pod evictable again")
            }
            // Gone or going: nothing left to protect.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, busy, "marking the pod failed; retried next poll")
            }
        }
    }
}

/// Applies each AgentPool's budget when its spec changed, its floor changed, or a while has passed.
pub async fn ensure_budgets(
    ctx: &Context,
    pools: &[std::sync::Arc<AgentPool>],
    pods: &[plan::protect::AgentPod],
    applied: &mut Budgets,
) {
    for pool in pools {
        let Some(pool_ref) = snapshot::pool_ref(pool) else {
            continue;
        };
        let busy = pods
            .iter()
            .filter(|p| p.agent_pool == pool_ref && p.marked_busy && !p.ended)
            .count();
        let min_available = plan::protect::budget_min_available(pool.spec.max_agents, busy);
        let generation = pool.metadata.generation;
        if applied.0.get(&pool_ref).is_some_and(|(g, m, at)| {
            *g == generation && *m >= min_available && at.elapsed() < BUDGET_REFRESH
        }) {
            continue;
        }
        match apply_budget(ctx, pool, &pool_ref, min_available).await {
            Ok(()) => {
                applied
                    .0
                    .insert(pool_ref, (generation, min_available, Instant::now()));
            }
            Err(e) => {
                tracing::warn!(agentpool = %pool_ref, error = %e, "applying the busy agents' PodDisruptionBudget failed; retried next poll")
            }
        }
    }
}

async fn apply_budget(
    ctx: &Context,
    pool: &AgentPool,
    pool_ref: &plan::PoolRef,
    min_available: i32,
) -> Result<(), kube::Error> {
    let owner = pool.controller_owner_ref(&());
    let selector = BTreeMap::from([
        (MANAGED_BY.0, MANAGED_BY.1),
        (LABEL_AGENTPOOL, pool_ref.name.as_str()),
        (LABEL_BUSY, "true"),
    ]);
    let budget = serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": budget_name(&pool_ref.name),
            "namespace": pool_ref.namespace,
            "labels": {MANAGED_BY.0: MANAGED_BY.1, LABEL_AGENTPOOL: pool_ref.name},
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "minAvailable": min_available,
            // An unready busy pod is protected as well (it still holds a job).
            "unhealthyPodEvictionPolicy": "IfHealthyBudget",
        },
    });
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &pool_ref.namespace);
    api.patch(
        &budget_name(&pool_ref.name),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&budget),
    )
    .await?;
    Ok(())
}

/// Counts, from the pod watch, the busy pods that a disruption ended: once per pod, by the leader only.
pub struct LostJobs {
    counted: Mutex<HashSet<String>>,
    metrics: Metrics,
    pools: Store<AgentPool>,
    leadership: std::sync::Arc<super::leader::Leadership>,
}

impl LostJobs {
    pub fn new(
        metrics: Metrics,
        pools: Store<AgentPool>,
        leadership: std::sync::Arc<super::leader::Leadership>,
    ) -> Self {
        Self {
            counted: Mutex::new(HashSet::new()),
            metrics,
            pools,
            leadership,
        }
    }

    /// One pod seen by the watch (`deleted`: its last state). Remembers counted pods only while they
    /// exist, so the set stays as small as the pod list.
    pub fn observe(&self, pod: &Pod, deleted: bool) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let Some(view) = snapshot::agent_pod(pod) else {
            return;
        };
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = plan::protect::lost_to_disruption(&view)
            && !counted.contains(&uid)
            && self.leadership.is_leader()
        {
            counted.insert(uid.clone());
            let ado_pool = self
                .pools
                .state()
                .iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(view.agent_pool.namespace.as_str())
                        && p.metadata.name.as_deref() == Some(view.agent_pool.name.as_str())
                })
                .map(|p| p.spec.pool.clone())
                .unwrap_or_default();
            tracing::warn!(pod = %format!("{}/{}", view.namespace, view.name), agent = %view.agent_name, reason, "a busy agent pod was disrupted: its job is lost");
            self.metrics
                .jobs_lost_to_eviction
                .get_or_create(&PoolLabels {
                    namespace: view.agent_pool.namespace.clone(),
                    agentpool: view.agent_pool.name.clone(),
                    ado_pool,
                })
                .inc();
        }
        if deleted {
            counted.remove(&uid);
        }
    }
}
