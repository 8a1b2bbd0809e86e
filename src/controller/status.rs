//! AgentPool status: counts, conditions and metrics after each poll (server-side apply on `/status`).

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::Context;
use crate::k8s::crd::{AgentCounts, AgentPool, AgentPoolStatus};
use crate::metrics::PoolStateLabels;
use crate::plan;

const FIELD_MANAGER: &str = "azp-autoscaler";

/// A condition, keeping `lastTransitionTime` when its status did not change.
fn condition(
    pool: &AgentPool,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let previous = pool
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    let mut message = message.to_owned();
    message.truncate(32 * 1024);
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: pool.metadata.generation,
        last_transition_time,
    }
}

async fn write(ctx: &Context, pool: &AgentPool, status: AgentPoolStatus) {
    let (Some(ns), Some(name)) = (&pool.metadata.namespace, &pool.metadata.name) else {
        return;
    };
    if pool.status.as_ref() == Some(&status) {
        return;
    }
    let api: Api<AgentPool> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": "azp-autoscaler.dev/v1alpha1",
        "kind": "AgentPool",
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if let Err(e) = api.patch_status(name, &params, &Patch::Apply(&patch)).await {
        tracing::warn!(agentpool = %format!("{ns}/{name}"), error = %e, "writing AgentPool status failed");
    }
}

/// After a successful poll: counts, Ready=True, Degraded=False, metrics.
pub(crate) async fn polled(
    ctx: &Context,
    pool: &AgentPool,
    ado_pool: &str,
    pool_id: i32,
    summary: &plan::PoolSummary,
) {
    let agents = AgentCounts {
        starting: summary.agents.starting,
        idle: summary.agents.idle,
        busy: summary.agents.busy,
    };
    let counts = [
        ("pending", summary.pending.len()),
        ("matched", summary.matched.len()),
        ("capped", summary.capped.len()),
        ("unservable", summary.unservable.len()),
    ];
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let message = format!(
        "polling ADO pool {ado_pool}: {} pending, {} capped, {} unservable; agents {} starting, {} idle, {} busy",
        summary.pending.len(),
        summary.capped.len(),
        summary.unservable.len(),
        agents.starting,
        agents.idle,
        agents.busy
    );
    let status = AgentPoolStatus {
        observed_generation: pool.metadata.generation,
        conditions: vec![
            condition(pool, "Ready", true, "Polling", &message),
            condition(
                pool,
                "Degraded",
                false,
                "Polling",
                "no error in the last poll",
            ),
        ],
        pending: n(summary.pending.len()),
        matched: n(summary.matched.len()),
        capped: n(summary.capped.len()),
        unservable: n(summary.unservable.len()),
        agents: agents.clone(),
        ado_pool_id: Some(i64::from(pool_id)),
        last_poll_time: Some(
            Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap_or(Timestamp::now())
                .to_string(),
        ),
    };
    let ns = pool.metadata.namespace.clone().unwrap_or_default();
    let name = pool.metadata.name.clone().unwrap_or_default();
    for (state, value) in counts {
        ctx.metrics
            .requests
            .get_or_create(&PoolStateLabels {
                namespace: ns.clone(),
                agentpool: name.clone(),
                ado_pool: ado_pool.to_owned(),
                state,
            })
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }
    for (state, value) in [
        ("starting", agents.starting),
        ("idle", agents.idle),
        ("busy", agents.busy),
    ] {
        ctx.metrics
            .agents
            .get_or_create(&PoolStateLabels {
                namespace: ns.clone(),
                agentpool: name.clone(),
                ado_pool: ado_pool.to_owned(),
                state,
            })
            .set(i64::from(value));
    }
    // Compare without the poll time so a quiet pool does not rewrite its status every poll.
    let unchanged = pool.status.as_ref().is_some_and(|old| {
        let mut old = old.clone();
        old.last_poll_time = status.last_poll_time.clone();
        old == status
    });
    let stale = pool
        .status
        .as_ref()
        .and_then(|s| s.last_poll_time.as_deref())
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_none_or(|t| Timestamp::now().duration_since(t).as_secs() >= 60);
    if !unchanged || stale {
        write(ctx, pool, status).await;
    }
}

/// After a failed poll or an invalid spec: Ready=False, Degraded=True with the reason; counts kept. A
/// Warning Event when the AgentPool becomes degraded or the reason changes (not on every failed poll).
pub(crate) async fn degraded(ctx: &Context, pool: &AgentPool, reason: &str, message: &str) {
    let already = pool.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == reason)
    });
    if !already {
        super::apply::publish(
            ctx,
            pool,
            kube::runtime::events::EventType::Warning,
            reason,
            "Poll",
            message.to_owned(),
        )
        .await;
    }
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    status.conditions = vec![
        condition(pool, "Ready", false, reason, message),
        condition(pool, "Degraded", true, reason, message),
    ];
    write(ctx, pool, status).await;
}

/// While an AgentPool being deleted drains: Ready=False with reason `Draining` and what it waits for; a
/// Normal Event when draining starts.
pub(crate) async fn draining(ctx: &Context, pool: &AgentPool, waiting_for: &[String]) {
    let message = if waiting_for.is_empty() {
        "being deleted: removing idle agents, then the placeholder".to_owned()
    } else {
        format!(
            "being deleted: waiting for {} busy agent(s) to finish their job ({})",
            waiting_for.len(),
            waiting_for.join(", ")
        )
    };
    let already = pool.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "Draining")
    });
    if !already {
        super::apply::publish(
            ctx,
            pool,
            kube::runtime::events::EventType::Normal,
            "Draining",
            "Drain",
            message.clone(),
        )
        .await;
    }
    let mut status = pool.status.clone().unwrap_or_default();
    status.conditions = vec![
        condition(pool, "Ready", false, "Draining", &message),
        condition(pool, "Degraded", false, "Draining", &message),
    ];
    write(ctx, pool, status).await;
}
