//! One poll task per ADO pool group: read ADO, read the caches, plan, apply, report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use super::{
    Context, GroupKey, apply, finalizer, group_key, placeholder, protect, registration, snapshot,
    status,
};
use crate::ado::models::{ResourceUsage, TaskAgent};
use crate::ado::{
    AdoClient, AdoError, AdoObserver, AgentQuery, TokenSource, WorkloadIdentityConfig,
};
use crate::k8s::crd::{AgentPool, Registration};
use crate::k8s::job::{self, LABEL_AGENTPOOL};
use crate::metrics::{ErrorLabels, OrgLabels};
use crate::plan;

/// Why a poll of a group failed. No destructive action follows a failed poll.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Ado(#[from] AdoError),
    #[error(
        "ADO pool {pool:?} does not exist in {organization} (or the identity cannot see it): check spec.pool against Organization settings → Agent pools"
    )]
    PoolNotFound { organization: String, pool: String },
    #[error(
        "cannot read the PAT from Secret {namespace}/{secret} key {key:?} (spec.auth.pat): {reason}"
    )]
    PatSecret {
        namespace: String,
        secret: String,
        key: String,
        reason: String,
    },
}

impl PollError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PollError::Ado(e) => e.metric_label(),
            PollError::PoolNotFound { .. } => "ado_pool_not_found",
            PollError::PatSecret { .. } => "pat_secret",
        }
    }

    /// The `reason` of the Degraded condition.
    pub fn reason(&self) -> &'static str {
        match self {
            PollError::Ado(AdoError::Throttled { .. }) => "AdoThrottled",
            PollError::Ado(AdoError::Auth(_)) => "TokenFailed",
            PollError::Ado(AdoError::NotInOrganization { .. }) => "IdentityNotInOrganization",
            PollError::Ado(AdoError::Forbidden { .. }) => "Forbidden",
            PollError::Ado(_) => "AdoError",
            PollError::PoolNotFound { .. } => "AdoPoolNotFound",
            PollError::PatSecret { .. } => "PatSecretUnreadable",
        }
    }
}

/// What a group task remembers between polls.
#[derive(Default)]
struct GroupState {
    pool_id: Option<i32>,
    agents: Vec<TaskAgent>,
    agents_read: Option<Instant>,
    usage: Option<ResourceUsage>,
    usage_read: Option<Instant>,
    /// Placeholder agent id per AgentPool, with the spec generation it was made for.
    placeholders: HashMap<plan::PoolRef, (Option<i64>, i32)>,
    /// Requests already logged as capped / unservable (logged once per request).
    reported: HashSet<(plan::RequestId, &'static str)>,
    /// Requests whose time to agent is already recorded (each once).
    timed: HashSet<plan::RequestId>,
    /// Our left-behind agents, with when each was first seen so (see [`plan::cleanup`]).
    orphan_since: BTreeMap<plan::AgentId, Timestamp>,
    /// The busy agents' PodDisruptionBudgets last applied.
    budgets: protect::Budgets,
    /// Agent Jobs created that the watch cache may not show yet.
    expected: snapshot::ExpectedJobs,
    /// Our agents seen registered in an earlier agents list (see [`snapshot::AgentsSeen::with_deregistered`]).
    registered_before: HashSet<String>,
    /// `registration: controller` agent Jobs (`namespace/name`) whose agent is registered and whose
    /// Secret exists (written or seen by this process); the others are checked once and repaired.
    files_stored: HashSet<String>,
}

/// How long a created Job counts without the watch cache showing it.
const EXPECTED_JOB_TTL: SignedDuration = SignedDuration::from_secs(120);

/// Polls one group until no AgentPool belongs to it any more.
pub(crate) async fn run_group(ctx: Arc<Context>, key: GroupKey) {
    let mut state = GroupState::default();
    let mut last_hook: Option<Instant> = None;
    loop {
        let members = members(&ctx, &key);
        let draining = draining(&ctx, &key);
        if members.is_empty() && draining.is_empty() {
            return;
        }
        let interval = members
            .iter()
            .chain(&draining)
            .map(|p| p.spec.poll_interval_seconds)
            .min()
            .unwrap_or(5);
        let started = Instant::now();
        // Registered before the poll: a wake-up (service hook) that arrives while this poll runs is kept
        // and starts the next poll at once, instead of being lost until the next interval.
        let woken = ctx.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut slow_down = 1.0;
        match poll_once(&ctx, &key, &members, &draining, &mut state).await {
            Ok(factor) => slow_down = factor,
            Err(e) => {
                tracing::warn!(organization = %key.organization, ado_pool = %key.ado_pool, error = %e, "poll failed; keeping the last view, no destructive action");
                for pool in &members {
                    ctx.metrics
                        .reconcile_errors
                        .get_or_create(&ErrorLabels {
                            namespace: pool.metadata.namespace.clone().unwrap_or_default(),
                            agentpool: pool.metadata.name.clone().unwrap_or_default(),
                            error: e.metric_label(),
                        })
                        .inc();
                    status::degraded(&ctx, pool, e.reason(), &e.to_string()).await;
                }
            }
        }
        ctx.metrics
            .poll_duration
            .get_or_create(&OrgLabels {
                organization: key.organization.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let wait = plan::cadence::next_poll_wait(
            Duration::from_secs(u64::from(interval)),
            slow_down,
            ctx.config.hook_cadence,
            last_hook.map(|t| t.elapsed()),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Only the service-hook endpoint wakes the polls.
            _ = woken => last_hook = Some(Instant::now()),
        }
    }
}

/// The AgentPools of the group (not being deleted).
fn members(ctx: &Context, key: &GroupKey) -> Vec<Arc<AgentPool>> {
    let mut members: Vec<Arc<AgentPool>> = ctx
        .pools
        .state()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && group_key(p) == *key)
        .collect();
    members.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    members
}

/// The group's AgentPools that are being deleted and still hold our finalizer: they are drained.
fn draining(ctx: &Context, key: &GroupKey) -> Vec<Arc<AgentPool>> {
    let mut draining: Vec<Arc<AgentPool>> = ctx
        .pools
        .state()
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_some() && finalizer::has(p) && group_key(p) == *key
        })
        .collect();
    draining.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    draining
}

/// One poll. Returns the slow-down factor the ADO rate limit asks for.
async fn poll_once(
    ctx: &Context,
    key: &GroupKey,
    members: &[Arc<AgentPool>],
    draining: &[Arc<AgentPool>],
    state: &mut GroupState,
) -> Result<f64, PollError> {
    // The controller's identity is lent only where the allow-list says so (checked before any token use).
    let allowed: Vec<Arc<AgentPool>>;
    let members = match (&ctx.config.allow_list, &key.auth) {
        (Some(list), super::AuthKey::WorkloadIdentity(_)) => {
            let mut ok = Vec::new();
            for pool in members {
                let ns = pool.metadata.namespace.as_deref().unwrap_or_default();
                match list.check(ns, &pool.spec.organization, &pool.spec.pool) {
                    Ok(()) => ok.push(pool.clone()),
                    Err(why) => status::degraded(ctx, pool, "NotAllowed", &why).await,
                }
            }
            allowed = ok;
            if allowed.is_empty() && draining.is_empty() {
                return Ok(1.0);
            }
            &allowed[..]
        }
        _ => members,
    };
    let ado = client_for(ctx, key).await?;
    let ado_pool_name = members
        .first()
        .or(draining.first())
        .map(|p| p.spec.pool.clone())
        .unwrap_or_else(|| key.ado_pool.clone());

    // What the schema cannot check: invalid AgentPools get a condition and create nothing.
    let mut valid = Vec::new();
    for pool in members {
        match job::validate_template(pool) {
            Ok(()) => valid.push(pool.clone()),
            Err(e) => status::degraded(ctx, pool, "InvalidTemplate", &e.to_string()).await,
        }
    }

    let pool_id = match state.pool_id {
        Some(id) => id,
        None => {
            let pool =
                ado.pool_by_name(&ado_pool_name)
                    .await?
                    .ok_or_else(|| PollError::PoolNotFound {
                        organization: key.organization.clone(),
                        pool: ado_pool_name.clone(),
                    })?;
            state.pool_id = Some(pool.id);
            pool.id
        }
    };

    // The finalizer before anything is registered in ADO: whatever we register, a deletion drains.
    for pool in members {
        if let Err(e) = finalizer::ensure(ctx, pool).await {
            tracing::warn!(agentpool = ?snapshot::pool_ref(pool), error = %e, "adding the finalizer failed; retried next poll");
        }
    }
    for pool in &valid {
        ensure_placeholder(ctx, &ado, pool_id, pool, state).await?;
    }
    if !draining.is_empty() {
        // Draining decides "nothing left" from the agents list: read it fresh every poll.
        state.agents_read = None;
    }

    let requests = ado.job_requests(pool_id).await?;
    let now = Instant::now();
    if state
        .agents_read
        .is_none_or(|t| now.duration_since(t) >= ctx.config.agents_every)
    {
        state.agents = ado
            .agents(
                pool_id,
                &AgentQuery::all()
                    .with_capabilities()
                    .with_assigned_request()
                    .with_last_completed_request(),
            )
            .await?;
        state.agents_read = Some(now);
        let ours: HashSet<String> = ctx
            .jobs
            .state()
            .iter()
            .filter_map(|j| {
                j.metadata
                    .annotations
                    .as_ref()?
                    .get(job::ANNOTATION_AGENT_NAME)
                    .cloned()
            })
            .chain(state.expected.agent_names())
            .collect();
        snapshot::remember_registered(&mut state.registered_before, &state.agents, &ours);
    }
    if state
        .usage_read
        .is_none_or(|t| now.duration_since(t) >= ctx.config.usage_every)
    {
        // Parallel-job usage is a refinement: without it nothing is capped by slots.
        match ado.resource_usage().await {
            Ok(u) => state.usage = Some(u),
            Err(e) => {
                tracing::debug!(error = %e, "parallel-job usage unavailable; not capping by slots")
            }
        }
        state.usage_read = Some(now);
    }

    let ado_snapshot = snapshot::ado_snapshot(
        &ado_pool_name,
        &requests,
        &state.agents,
        state.usage.as_ref(),
    );
    let specs: Vec<plan::AgentPoolSpec> = valid
        .iter()
        .filter_map(|p| snapshot::plan_spec(p))
        .collect();
    let planned_at = Timestamp::now();
    let cluster = cluster_snapshot(
        ctx,
        &valid,
        &state.agents,
        &state.registered_before,
        &mut state.expected,
        planned_at,
    );
    let plan = plan::plan(&ado_snapshot, &cluster, &specs, planned_at);
    let cleanup = plan::cleanup(
        &ado_snapshot,
        &cluster,
        &owner_scope(ctx, &valid),
        &state.orphan_since,
        planned_at,
        SignedDuration::try_from(ctx.config.orphan_grace).unwrap_or(SignedDuration::MAX),
    );
    state.orphan_since = cleanup.orphan_since;

    report_blocked(ctx, key, &plan, state);
    record_timings(ctx, &valid, &requests, &ado_pool_name, state);
    let by_ref: BTreeMap<plan::PoolRef, Arc<AgentPool>> = valid
        .iter()
        .filter_map(|p| Some((snapshot::pool_ref(p)?, p.clone())))
        .collect();
    if !ctx.leadership.is_leader() {
        // Leadership ended while reading: write nothing (the new leader plans afresh).
        return Ok(1.0);
    }
    // Busy pods first protected (budget, then mark), so an eviction during the creations finds them so.
    let agent_pods = agent_pods(ctx, valid.iter().chain(draining));
    protect::ensure_budgets(ctx, &valid, &agent_pods, &mut state.budgets).await;
    protect::mark_busy(
        ctx,
        &plan::protect::pods_to_protect(&ado_snapshot, &agent_pods),
        true,
    )
    .await;
    protect::mark_busy(
        ctx,
        &plan::protect::pods_to_release(&ado_snapshot, &agent_pods),
        false,
    )
    .await;
    let (existing, stored) = apply::apply(ctx, &ado, pool_id, &plan, &by_ref).await;
    for job in existing {
        state.expected.insert(job, planned_at);
    }
    ensure_agent_files(ctx, &ado, pool_id, &valid, stored, state).await;
    let gone = apply::remove_orphans(ctx, &ado, pool_id, &plan, &cleanup.remove, &by_ref).await;
    state.agents.retain(|a| !gone.contains(&a.id));
    for pool in draining {
        let Some(pool_ref) = snapshot::pool_ref(pool) else {
            continue;
        };
        let scope = plan::DrainScope {
            owner_capability: job::OWNER_CAPABILITY.to_owned(),
            owner_value: job::owner_tag(&ctx.cluster_id, &pool_ref.namespace, &pool_ref.name),
            placeholder_name: placeholder::name(
                &ctx.cluster_id,
                &pool_ref.namespace,
                &pool_ref.name,
            ),
            agent_pool: pool_ref.clone(),
        };
        let cluster = cluster_snapshot(
            ctx,
            std::slice::from_ref(pool),
            &state.agents,
            &state.registered_before,
            &mut state.expected,
            planned_at,
        );
        let step = plan::drain(&ado_snapshot, &cluster, &scope);
        if step.finishes() {
            state.placeholders.remove(&pool_ref);
        } else {
            status::draining(ctx, pool, &step.waiting_for).await;
        }
        apply::drain(ctx, &ado, pool_id, pool, &pool_ref, &step).await;
    }
    for (pool_ref, pool) in &by_ref {
        if let Some(summary) = plan.pool(pool_ref) {
            status::polled(ctx, pool, &ado_pool_name, pool_id, summary).await;
        }
    }
    Ok(ado.slow_down_factor())
}

/// The ADO client of the group's (organization, identity): built once and shared, with the metrics
/// observer on its calls and its token exchanges.
async fn client_for(ctx: &Context, key: &GroupKey) -> Result<AdoClient, PollError> {
    let observer: Arc<dyn AdoObserver> = Arc::new(ctx.metrics.clone());
    match &key.auth {
        super::AuthKey::WorkloadIdentity(client_id) => {
            let config =
                WorkloadIdentityConfig::from_env(client_id.as_deref()).map_err(AdoError::from)?;
            ctx.ado
                .get_or_insert_with(&key.organization, &config.identity_key(), || {
                    TokenSource::workload_identity(config.clone())
                        .map(|t| t.with_observer(observer))
                        .map_err(|e| PollError::from(AdoError::from(e)))
                })
        }
        // A PAT is read from its Secret every poll (it may be rotated); the client is shared per PAT.
        super::AuthKey::Pat { .. } => {
            let tokens = super::token_source(Some(&ctx.client), &key.auth, false).await?;
            Ok(ctx
                .ado
                .get(&key.organization, tokens.with_observer(observer))?)
        }
    }
}

async fn ensure_placeholder(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    pool: &AgentPool,
    state: &mut GroupState,
) -> Result<(), PollError> {
    let Some(pool_ref) = snapshot::pool_ref(pool) else {
        return Ok(());
    };
    let generation = pool.metadata.generation;
    if state
        .placeholders
        .get(&pool_ref)
        .is_some_and(|(g, _)| *g == generation)
    {
        return Ok(());
    }
    let name = placeholder::name(&ctx.cluster_id, &pool_ref.namespace, &pool_ref.name);
    let want = placeholder::desired_capabilities(
        &pool.spec.capabilities,
        &pool.spec.agent_version,
        &ctx.cluster_id,
        &pool_ref.namespace,
        &pool_ref.name,
    );
    let id = placeholder::ensure(ado, pool_id, &name, &want, &pool.spec.agent_version).await?;
    state.placeholders.insert(pool_ref, (generation, id));
    Ok(())
}

/// Every unfinished `registration: controller` agent Job must have its agent registered and its Secret:
/// a Job whose registration failed, or whose controller stopped between creating it and writing the
/// Secret, is repaired here (its pod waits for the Secret meanwhile). A Job this process has not seen
/// with its Secret costs one `get`; the Jobs it knows (`fresh`: written by this poll) cost nothing.
async fn ensure_agent_files(
    ctx: &Context,
    ado: &AdoClient,
    pool_id: i32,
    members: &[Arc<AgentPool>],
    fresh: Vec<String>,
    state: &mut GroupState,
) {
    let controller_pools: HashMap<(String, String), &Arc<AgentPool>> = members
        .iter()
        .filter(|p| p.spec.registration == Registration::Controller)
        .filter_map(|p| Some(((p.metadata.namespace.clone()?, p.metadata.name.clone()?), p)))
        .collect();
    let pool_keys: HashSet<(String, String)> = controller_pools.keys().cloned().collect();
    state.files_stored.extend(fresh.iter().cloned());
    let mut alive: HashSet<String> = fresh.into_iter().collect();
    for job in ctx.jobs.state() {
        let Some((key, pool_key)) = registration::wants_agent_files(&job, &pool_keys) else {
            continue;
        };
        let Some(pool) = controller_pools.get(&pool_key) else {
            continue;
        };
        alive.insert(key.clone());
        if state.files_stored.contains(&key) {
            continue;
        }
        let (ns, name) = (
            &pool_key.0,
            job.metadata.name.as_deref().unwrap_or_default(),
        );
        match registration::secret_exists(&ctx.client, ns, name).await {
            Ok(true) => {
                state.files_stored.insert(key);
            }
            Ok(false) => {
                tracing::info!(job = %key, "agent Job without its agent files: registering its agent");
                if apply::register_for_job(ctx, ado, pool_id, pool, &job).await {
                    state.files_stored.insert(key);
                }
            }
            Err(e) => {
                tracing::warn!(job = %key, error = %e, "cannot check the agent Job's Secret; retried next poll")
            }
        }
    }
    // Forget Jobs that finished or are gone: the set stays as small as the running agents.
    state.files_stored.retain(|k| alive.contains(k));
}

/// Which agents cleanup may act on: those whose owner capability names this cluster and one of the
/// group's (valid) AgentPools; their placeholders are protected by name as well as by mark.
fn owner_scope(ctx: &Context, members: &[Arc<AgentPool>]) -> plan::OwnerScope {
    let mut scope = plan::OwnerScope {
        owner_capability: job::OWNER_CAPABILITY.to_owned(),
        placeholder_capability: placeholder::PLACEHOLDER_CAPABILITY.to_owned(),
        ..plan::OwnerScope::default()
    };
    for pool in members {
        let Some(pool_ref) = snapshot::pool_ref(pool) else {
            continue;
        };
        scope.owners.insert(
            job::owner_tag(&ctx.cluster_id, &pool_ref.namespace, &pool_ref.name),
            pool_ref.clone(),
        );
        scope.placeholder_names.insert(placeholder::name(
            &ctx.cluster_id,
            &pool_ref.namespace,
            &pool_ref.name,
        ));
        if pool.spec.registration == Registration::Controller {
            scope.controller_registered.insert(pool_ref.clone());
        }
        if pool.spec.paused {
            scope.paused.insert(pool_ref);
        }
    }
    scope
}

/// The agent pods of these AgentPools, from the cache.
fn agent_pods<'a>(
    ctx: &Context,
    pools: impl Iterator<Item = &'a Arc<AgentPool>>,
) -> Vec<plan::protect::AgentPod> {
    let wanted: HashSet<plan::PoolRef> = pools.filter_map(|p| snapshot::pool_ref(p)).collect();
    ctx.pods
        .state()
        .iter()
        .filter_map(|p| snapshot::agent_pod(p))
        .filter(|p| wanted.contains(&p.agent_pool))
        .collect()
}

/// Our Jobs and Pods of the group's AgentPools, from the caches.
fn cluster_snapshot(
    ctx: &Context,
    members: &[Arc<AgentPool>],
    agents: &[TaskAgent],
    registered_before: &HashSet<String>,
    expected: &mut snapshot::ExpectedJobs,
    now: Timestamp,
) -> plan::ClusterSnapshot {
    let wanted: HashSet<(String, String)> = members
        .iter()
        .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
        .collect();
    let belongs = |meta: &kube::api::ObjectMeta| {
        let ns = meta.namespace.clone().unwrap_or_default();
        meta.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_AGENTPOOL))
            .is_some_and(|name| wanted.contains(&(ns.clone(), name.clone())))
    };
    let cached = ctx.jobs.state();
    let not_cached_yet: Vec<&Job> = expected
        .settle(cached.iter().map(|j| j.as_ref()), now, EXPECTED_JOB_TTL)
        .into_iter()
        .filter(|j| belongs(&j.metadata))
        .collect();
    if !not_cached_yet.is_empty() {
        tracing::debug!(
            jobs = not_cached_yet.len(),
            "counting created agent Jobs the watch cache does not show yet"
        );
    }
    let jobs: Vec<&Job> = cached
        .iter()
        .map(|j| j.as_ref())
        .filter(|j| belongs(&j.metadata))
        .chain(not_cached_yet)
        .collect();
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| belongs(&p.metadata))
        .collect();
    let pod_refs: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
    snapshot::cluster_snapshot(
        jobs,
        &pod_refs,
        &snapshot::AgentsSeen::from_agents(agents).with_deregistered(registered_before),
    )
}

/// Time to agent by phase and queue wait, once per request an agent of ours received.
fn record_timings(
    ctx: &Context,
    members: &[Arc<AgentPool>],
    requests: &[crate::ado::TaskAgentJobRequest],
    ado_pool: &str,
    state: &mut GroupState,
) {
    let names: HashSet<(String, String)> = members
        .iter()
        .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
        .collect();
    let jobs = ctx.jobs.state();
    let pods = ctx.pods.state();
    let job_refs: Vec<&Job> = jobs
        .iter()
        .map(|j| j.as_ref())
        .filter(|j| {
            let ns = j.metadata.namespace.clone().unwrap_or_default();
            j.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_AGENTPOOL))
                .is_some_and(|n| names.contains(&(ns, n.clone())))
        })
        .collect();
    let pod_refs: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
    let fresh: Vec<&crate::ado::TaskAgentJobRequest> = requests
        .iter()
        .filter(|r| r.receive_time.is_some() && !state.timed.contains(&r.request_id))
        .collect();
    if fresh.is_empty() {
        return;
    }
    let fresh_owned: Vec<crate::ado::TaskAgentJobRequest> = fresh.into_iter().cloned().collect();
    for t in snapshot::request_timings(&fresh_owned, &state.agents, &job_refs, &pod_refs) {
        state.timed.insert(t.request);
        let labels = crate::metrics::PoolLabels {
            namespace: t.agent_pool.namespace.clone(),
            agentpool: t.agent_pool.name.clone(),
            ado_pool: ado_pool.to_owned(),
        };
        for (phase, d) in &t.phases {
            ctx.metrics.observe_phase(&labels, *phase, *d);
            if *phase == crate::metrics::Phase::request_received {
                ctx.metrics
                    .queue_wait
                    .get_or_create(&labels)
                    .observe(d.as_secs_f64());
            }
        }
    }
    // Forget requests ADO no longer lists (finished): the set stays as small as the queue.
    let listed: HashSet<plan::RequestId> = requests.iter().map(|r| r.request_id).collect();
    state.timed.retain(|r| listed.contains(r));
}

/// Capped and unservable requests: visible in a log line once per request, never silently dropped.
fn report_blocked(ctx: &Context, key: &GroupKey, plan: &plan::Plan, state: &mut GroupState) {
    let _ = ctx;
    let mut still = HashSet::new();
    for summary in &plan.pools {
        for (kind, list) in [
            ("capped", &summary.capped),
            ("unservable", &summary.unservable),
        ] {
            for blocked in list {
                still.insert((blocked.request, kind));
                if state.reported.insert((blocked.request, kind)) {
                    tracing::warn!(
                        organization = %key.organization,
                        ado_pool = %key.ado_pool,
                        agentpool = %summary.agent_pool,
                        request = blocked.request,
                        kind,
                        why = %blocked.why,
                        "request waits without a new agent"
                    );
                }
            }
        }
    }
    state.reported.retain(|r| still.contains(r));
}
