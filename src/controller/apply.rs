//! Carrying out a plan: creating agent Jobs (concurrently, idempotently) and removing agents that hold no
//! request (disable → re-check → delete, re-enable if work arrived in between).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource};

use super::{Context, snapshot};
use crate::ado::{AdoClient, AgentQuery, AgentUpdate};
use crate::k8s::crd::{AgentPool, Registration};
use crate::k8s::job::{self, AgentJob};
use crate::metrics::{CleanupLabels, ErrorLabels, PoolLabels};
use crate::plan::{self, Action};

/// Applies every action of the plan. Errors are counted and logged per action; one failed action never
/// stops the others. Returns the agent Jobs that exist now because of the creations (created, or found
/// already there): the caller counts them until its watch cache shows them; and the agent Jobs
/// (`namespace/name`) of `registration: controller` whose agent this call registered and whose Secret it
/// wrote.
pub(crate) async fn apply(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    plan: &plan::Plan,
    pools: &BTreeMap<plan::PoolRef, Arc<AgentPool>>,
) -> (Vec<Job>, Vec<String>) {
    let creates: Vec<Action> = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::CreateAgent { .. }))
        .cloned()
        .collect();
    let results: Vec<(plan::PoolRef, Result<Created, String>)> = futures::stream::iter(creates)
        .map(|action: Action| async move {
            let pool_ref = action.agent_pool().clone();
            let result = match pools.get(&pool_ref) {
                Some(pool) => create(ctx, ado, pool_id, pool, &action, &plan.ado_pool).await,
                None => Err(format!("AgentPool {pool_ref} vanished")),
            };
            (pool_ref, result)
        })
        .buffer_unordered(ctx.config.create_concurrency.max(1))
        .collect()
        .await;

    let mut created: BTreeMap<plan::PoolRef, u32> = BTreeMap::new();
    let mut existing = Vec::new();
    let mut files_stored = Vec::new();
    for (pool_ref, result) in results {
        match result {
            Ok(Created::New(job, stored)) => {
                *created.entry(pool_ref).or_default() += 1;
                existing.push(*job);
                files_stored.extend(stored);
            }
            Ok(Created::Existed(job)) => existing.extend(job.map(|j| *j)),
            Ok(Created::Nothing) => {}
            Err(message) => {
                tracing::warn!(agentpool = %pool_ref, error = %message, "creating an agent Job failed");
                ctx.metrics
                    .reconcile_errors
                    .get_or_create(&ErrorLabels {
                        namespace: pool_ref.namespace.clone(),
                        agentpool: pool_ref.name.clone(),
                        error: "job_create",
                    })
                    .inc();
            }
        }
    }
    for (pool_ref, n) in created {
        if let Some(pool) = pools.get(&pool_ref) {
            let reasons: Vec<&str> = plan
                .actions
                .iter()
                .filter(|a| a.agent_pool() == &pool_ref && matches!(a, Action::CreateAgent { .. }))
                .map(Action::reason)
                .take(5)
                .collect();
            publish(
                ctx,
                pool,
                EventType::Normal,
                "ScaledUp",
                "CreateAgentJobs",
                format!("created {n} agent Job(s): {}", reasons.join("; ")),
            )
            .await;
        }
    }

    for action in &plan.actions {
        match action {
            Action::CreateAgent { .. } => {}
            Action::RemoveIdleAgent {
                agent_pool,
                job_name,
                agent_name,
                agent_id,
                reason,
            } => {
                let Some(agent_id) = agent_id.and_then(|id| i32::try_from(id).ok()) else {
                    // Not registered yet: it cannot hold a request, but it could get one any moment.
                    // Removed safely once it shows up in ADO.
                    continue;
                };
                remove_idle(
                    ctx, ado, pool_id, agent_pool, job_name, agent_name, agent_id, reason, pools,
                )
                .await;
            }
            Action::ReplaceStuckAgent {
                agent_pool,
                job_name,
                agent_name,
                agent_id,
                reason,
                ..
            } => {
                if let Some(id) = agent_id.and_then(|id| i32::try_from(id).ok()) {
                    remove_idle(
                        ctx, ado, pool_id, agent_pool, job_name, agent_name, id, reason, pools,
                    )
                    .await;
                } else {
                    delete_job(ctx, agent_pool, job_name).await;
                    count_cleanup(ctx, agent_pool, "stuck_agent_replaced");
                    if let Some(pool) = pools.get(agent_pool) {
                        publish(
                            ctx,
                            pool,
                            EventType::Warning,
                            "AgentStuck",
                            "ReplaceAgent",
                            format!("{job_name}: {reason}"),
                        )
                        .await;
                    }
                }
            }
        }
    }
    (existing, files_stored)
}

/// What a creation found.
enum Created {
    /// Created now; for `registration: controller`, `Some(namespace/name)` when its agent was registered
    /// and its Secret written too (a failure there is retried by the next poll).
    New(Box<Job>, Option<String>),
    /// The Job existed already (409): read back so it counts even if the cache lacks it; `None` when
    /// that read failed too.
    Existed(Option<Box<Job>>),
    Nothing,
}

/// Creates one agent Job (and, for `registration: controller`, registers its agent and writes its
/// Secret).
async fn create(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    pool: &AgentPool,
    action: &Action,
    ado_pool: &str,
) -> Result<Created, String> {
    let Action::CreateAgent {
        agent_pool,
        job_name,
        for_request,
        attempt,
        reason,
    } = action
    else {
        return Ok(Created::Nothing);
    };
    let agent_name = snapshot::agent_name(job_name, &ctx.cluster_id, &agent_pool.namespace);
    let request_id = *for_request;
    let job = job::build(
        pool,
        &AgentJob {
            job_name,
            agent_name: &agent_name,
            request_id,
            attempt: *attempt,
            cluster_id: &ctx.cluster_id,
        },
    )
    .map_err(|e| e.to_string())?;
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &agent_pool.namespace);
    match api.create(&PostParams::default(), &job).await {
        Ok(created) => {
            tracing::info!(agentpool = %agent_pool, job = %job_name, agent = %agent_name, request = ?for_request, %reason, "agent Job created");
            let labels = PoolLabels {
                namespace: agent_pool.namespace.clone(),
                agentpool: agent_pool.name.clone(),
                ado_pool: ado_pool.to_owned(),
            };
            ctx.metrics.jobs_created.get_or_create(&labels).inc();
            let stored = pool.spec.registration == Registration::Controller
                && register_for_job(ctx, ado, pool_id, pool, &created).await;
            Ok(Created::New(
                Box::new(created),
                stored.then(|| format!("{}/{job_name}", agent_pool.namespace)),
            ))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Created::Existed(
            api.get_opt(job_name).await.ok().flatten().map(Box::new),
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Registers the agent of a `registration: controller` Job and writes its Secret; a failure is logged
/// and counted (the next poll retries: see [`super::registration`]).
pub(crate) async fn register_for_job(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    pool: &AgentPool,
    job: &Job,
) -> bool {
    match super::registration::register(&ctx.client, &ctx.cluster_id, ado, pool_id, pool, job).await
    {
        Ok(()) => true,
        Err(e) => {
            let job_name = job.metadata.name.as_deref().unwrap_or_default();
            tracing::warn!(job = %job_name, error = %e, "registering the agent of a Job failed; retried next poll");
            ctx.metrics
                .reconcile_errors
                .get_or_create(&ErrorLabels {
                    namespace: pool.metadata.namespace.clone().unwrap_or_default(),
                    agentpool: pool.metadata.name.clone().unwrap_or_default(),
                    error: e.metric_label(),
                })
                .inc();
            false
        }
    }
}

/// Removes an agent that holds no request, without ever killing a busy one: disable it so ADO assigns it
/// nothing new, re-check that no request holds it, then delete its Job and the agent; if work arrived in
/// between, re-enable it and keep it.
#[allow(clippy::too_many_arguments)]
async fn remove_idle(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    agent_pool: &plan::PoolRef,
    job_name: &str,
    agent_name: &str,
    agent_id: i32,
    reason: &str,
    pools: &BTreeMap<plan::PoolRef, Arc<AgentPool>>,
) {
    let result: Result<bool, crate::ado::AdoError> = async {
        ado.update_agent(pool_id, agent_id, &AgentUpdate::enabled(false))
            .await?;
        let requests = ado.job_requests(pool_id).await?;
        let agent = ado
            .agents(
                pool_id,
                &AgentQuery {
                    include_last_completed_request: true,
                    ..AgentQuery::named(agent_name).with_assigned_request()
                },
            )
            .await?
            .into_iter()
            .find(|a| a.id == agent_id);
        match snapshot::removal_recheck(agent.as_ref(), &requests, agent_id, agent_name) {
            snapshot::Recheck::StillIdle => {}
            // It already ran its one job and is deregistering: its Job ends by itself.
            snapshot::Recheck::Finishing => return Ok(false),
            snapshot::Recheck::GotWork => {
                ado.update_agent(pool_id, agent_id, &AgentUpdate::enabled(true))
                    .await?;
                return Ok(false);
            }
        }
        Ok(true)
    }
    .await;
    match result {
        Ok(true) => {
            delete_job(ctx, agent_pool, job_name).await;
            if let Err(e) = ado.delete_agent(pool_id, agent_id).await {
                tracing::warn!(agent = agent_name, error = %e, "deleting the idle agent failed; cleanup retries");
            }
            count_cleanup(ctx, agent_pool, "idle_agent_removed");
            tracing::info!(agentpool = %agent_pool, job = job_name, agent = agent_name, %reason, "idle agent removed");
            if let Some(pool) = pools.get(agent_pool) {
                publish(
                    ctx,
                    pool,
                    EventType::Normal,
                    "ScaledDown",
                    "RemoveIdleAgent",
                    format!("{agent_name}: {reason}"),
                )
                .await;
            }
        }
        Ok(false) => {
            tracing::info!(
                agent = agent_name,
                "agent got work while being removed: re-enabled and kept"
            );
        }
        Err(e) => {
            tracing::warn!(agent = agent_name, error = %e, "removing an idle agent failed; it stays (re-enable on next poll if disabled)");
        }
    }
}

async fn delete_job(ctx: &Context, agent_pool: &plan::PoolRef, job_name: &str) {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &agent_pool.namespace);
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(job_name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => tracing::warn!(job = job_name, error = %e, "deleting an agent Job failed"),
    }
}

fn count_cleanup(ctx: &Context, agent_pool: &plan::PoolRef, kind: &'static str) {
    ctx.metrics
        .cleanups
        .get_or_create(&CleanupLabels {
            namespace: agent_pool.namespace.clone(),
            agentpool: agent_pool.name.clone(),
            kind,
        })
        .inc();
}

/// Publishes an Event on the AgentPool (best effort: an Event failing never fails a poll).
pub(crate) async fn publish(
    ctx: &Context,
    pool: &AgentPool,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let mut note = note;
    note.truncate(1000);
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an Event failed");
    }
}

/// Deletes our left-behind agents from ADO (see [`plan::cleanup`]). Each is re-checked right before:
/// read again from ADO (still there, still holding no request), no unfinished agent Job of ours runs an
/// agent of that name (the cache, and the Jobs this poll just created). Anything doubtful waits for the
/// next poll. Returns the ids of the agents that are gone from ADO now (deleted, or already gone), so the
/// caller's (possibly older) agents list forgets them.
pub(crate) async fn remove_orphans(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    plan: &plan::Plan,
    orphans: &[plan::OrphanAgent],
    pools: &BTreeMap<plan::PoolRef, Arc<AgentPool>>,
) -> Vec<i32> {
    let mut gone = Vec::new();
    for orphan in orphans {
        let name = &orphan.agent_name;
        let being_created = plan.creates().any(|a| {
            snapshot::agent_name(a.job_name(), &ctx.cluster_id, &a.agent_pool().namespace)
                .eq_ignore_ascii_case(name)
        });
        let job_alive = ctx.jobs.state().iter().any(|j| {
            !snapshot::job_finished(j)
                && j.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(job::ANNOTATION_AGENT_NAME))
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        });
        if being_created || job_alive {
            tracing::debug!(agent = %name, "left-behind agent has an agent Job again: kept");
            continue;
        }
        let Ok(agent_id) = i32::try_from(orphan.agent_id) else {
            continue;
        };
        let fresh = match ado
            .agents(pool_id, &AgentQuery::named(name).with_assigned_request())
            .await
        {
            Ok(agents) => agents.into_iter().find(|a| a.id == agent_id),
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "re-reading a left-behind agent failed; cleanup retries");
                return gone;
            }
        };
        match fresh {
            None => {
                gone.push(agent_id);
                continue;
            }
            Some(a) if a.assigned_request.is_some() => {
                tracing::info!(agent = %name, "left-behind agent holds a request now: kept");
                continue;
            }
            Some(_) => {}
        }
        match ado.delete_agent(pool_id, agent_id).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "deleting a left-behind agent failed; cleanup retries");
                ctx.metrics
                    .reconcile_errors
                    .get_or_create(&ErrorLabels {
                        namespace: orphan.agent_pool.namespace.clone(),
                        agentpool: orphan.agent_pool.name.clone(),
                        error: "orphan_delete",
                    })
                    .inc();
                continue;
            }
        }
        gone.push(agent_id);
        count_cleanup(ctx, &orphan.agent_pool, "orphan_agent_removed");
        tracing::info!(agentpool = %orphan.agent_pool, agent = %name, agent_id, reason = %orphan.reason, "left-behind agent deleted from ADO");
        if let Some(pool) = pools.get(&orphan.agent_pool) {
            publish(
                ctx,
                pool,
                EventType::Normal,
                "OrphanAgentRemoved",
                "DeleteAgent",
                orphan.reason.clone(),
            )
            .await;
        }
    }
    gone
}

/// Carries out one drain step of an AgentPool being deleted (see [`plan::drain`]): idle agents removed
/// safely, unregistered Jobs and left-behind agents deleted, busy agents waited for; once nothing is left,
/// the placeholder is deleted and then the finalizer removed.
pub(crate) async fn drain(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    pool: &Arc<AgentPool>,
    pool_ref: &plan::PoolRef,
    step: &plan::Drain,
) {
    let pools = BTreeMap::from([(pool_ref.clone(), pool.clone())]);
    if !step.waiting_for.is_empty() {
        tracing::info!(agentpool = %pool_ref, busy = ?step.waiting_for, "draining: waiting for busy agents to finish their job");
    }
    for action in &step.actions {
        match action {
            plan::DrainAction::RemoveIdleAgent {
                job_name,
                agent_name,
                agent_id,
            } => {
                let Ok(id) = i32::try_from(*agent_id) else {
                    continue;
                };
                remove_idle(
                    ctx,
                    ado,
                    pool_id,
                    pool_ref,
                    job_name,
                    agent_name,
                    id,
                    "the AgentPool is being deleted",
                    &pools,
                )
                .await;
            }
            plan::DrainAction::DeleteJob { job_name } => {
                delete_job(ctx, pool_ref, job_name).await;
                count_cleanup(ctx, pool_ref, "drain_job_deleted");
                tracing::info!(agentpool = %pool_ref, job = %job_name, "draining: deleted an agent Job whose agent had not registered");
            }
            plan::DrainAction::DeleteAgent {
                agent_name,
                agent_id,
            } => {
                let Ok(id) = i32::try_from(*agent_id) else {
                    continue;
                };
                match ado.delete_agent(pool_id, id).await {
                    Ok(_) => {}
                    Err(e) if e.status() == Some(404) => {}
                    Err(e) => {
                        tracing::warn!(agent = %agent_name, error = %e, "draining: deleting a left-behind agent failed; retried next poll");
                        continue;
                    }
                }
                count_cleanup(ctx, pool_ref, "orphan_agent_removed");
                tracing::info!(agentpool = %pool_ref, agent = %agent_name, "draining: deleted a left-behind agent");
            }
            plan::DrainAction::Finish { placeholder_id } => {
                if let Some(id) = placeholder_id.and_then(|id| i32::try_from(id).ok()) {
                    match ado.delete_agent(pool_id, id).await {
                        Ok(_) => {}
                        Err(e) if e.status() == Some(404) => {}
                        Err(e) => {
                            tracing::warn!(agentpool = %pool_ref, error = %e, "draining: deleting the placeholder failed; retried next poll");
                            return;
                        }
                    }
                    count_cleanup(ctx, pool_ref, "placeholder_removed");
                }
                publish(
                    ctx,
                    pool,
                    EventType::Normal,
                    "Drained",
                    "RemoveFinalizer",
                    "every agent finished or was removed and the placeholder is gone: the AgentPool may go".to_owned(),
                )
                .await;
                match super::finalizer::remove(ctx, pool).await {
                    Ok(()) => tracing::info!(agentpool = %pool_ref, "drained; finalizer removed"),
                    Err(e) => {
                        tracing::warn!(agentpool = %pool_ref, error = %e, "removing the finalizer failed; retried next poll")
                    }
                }
            }
        }
    }
}
