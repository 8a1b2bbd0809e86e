//! The decision procedure behind [`plan`](super::plan). See the module documentation of
//! [`crate::plan`] for the rules; comments here explain the how.

use std::collections::{BTreeSet, HashMap, HashSet};

use jiff::{SignedDuration, Timestamp};

use super::demand::{Capabilities, Demand, first_unmet};
use super::model::{
    AdoSnapshot, Agent, AgentJob, AgentPoolSpec, AgentStatus, ClusterSnapshot, JobPhase,
    JobRequest, RequestId,
};
use super::names::{request_job_name, standby_job_name};
use super::output::{Action, AgentCounts, Blocked, Plan, PoolSummary};

/// First delay of the startup backoff; it doubles with every further consecutive failure.
pub const BACKOFF_BASE: SignedDuration = SignedDuration::from_secs(30);
/// Longest startup backoff.
pub const BACKOFF_MAX: SignedDuration = SignedDuration::from_secs(600);

/// The extra wait after `failures` consecutive startup failures of an AgentPool: 0, 30 s, 60 s,
/// 120 s, ... up to [`BACKOFF_MAX`].
pub fn startup_backoff(failures: u32) -> SignedDuration {
    if failures == 0 {
        return SignedDuration::ZERO;
    }
    let doublings = failures.saturating_sub(1).min(16);
    let secs = BACKOFF_BASE.as_secs().saturating_mul(1_i64 << doublings);
    SignedDuration::from_secs(secs).min(BACKOFF_MAX)
}

/// One AgentPool while planning.
struct Pool<'a> {
    spec: &'a AgentPoolSpec,
    capabilities: Capabilities,
    failures: u32,
    /// Unfinished Jobs (every state): what `maxAgents` limits.
    unfinished: u32,
    /// Jobs created by this plan.
    created: u32,
    /// Unclaimed agents that can take a request, not reserved for a particular one.
    free: Vec<&'a AgentJob>,
    counts: AgentCounts,
    /// (queue position, request) attributed to this AgentPool.
    pending: Vec<(usize, RequestId)>,
    matched: Vec<RequestId>,
    created_for: Vec<RequestId>,
    capped: Vec<Blocked>,
    unservable: Vec<Blocked>,
    reasons: Vec<String>,
}

impl Pool<'_> {
    fn label(&self) -> String {
        self.spec.agent_pool.to_string()
    }

    fn room(&self) -> u32 {
        self.spec
            .max_agents
            .saturating_sub(self.unfinished + self.created)
    }
}

/// A pending request that survived the filters and wants an agent.
struct Want<'a> {
    request: &'a JobRequest,
    position: usize,
    /// Pools whose capabilities satisfy every demand, in routing order.
    eligible: Vec<usize>,
}

struct AgentIndex<'a> {
    /// Lower-cased names of agents some request reserved (finished requests included: a run-once
    /// agent that served one is done).
    reserved: HashSet<String>,
    by_name: HashMap<String, &'a Agent>,
}

impl<'a> AgentIndex<'a> {
    fn new(ado: &'a AdoSnapshot) -> Self {
        let reserved = ado
            .requests
            .iter()
            .filter_map(|r| r.reserved_agent.as_ref())
            .map(|a| a.name.to_lowercase())
            .collect();
        let by_name = ado
            .agents
            .iter()
            .map(|a| (a.name.to_lowercase(), a))
            .collect();
        Self { reserved, by_name }
    }

    fn agent(&self, name: &str) -> Option<&'a Agent> {
        self.by_name.get(&name.to_lowercase()).copied()
    }

    fn holds_request(&self, name: &str) -> bool {
        self.reserved.contains(&name.to_lowercase())
            || self
                .agent(name)
                .is_some_and(|a| a.assigned_request.is_some())
    }
}

pub(super) fn plan(
    ado: &AdoSnapshot,
    cluster: &ClusterSnapshot,
    specs: &[AgentPoolSpec],
    now: Timestamp,
) -> Plan {
    // ---- AgentPools in routing order (a duplicate reference keeps its first spec) ----
    let mut ordered: Vec<&AgentPoolSpec> = specs.iter().collect();
    ordered.sort_by(|a, b| a.routing_order(b));
    let mut seen = HashSet::new();
    ordered.retain(|s| seen.insert(&s.agent_pool));
    let mut pools: Vec<Pool> = ordered
        .iter()
        .map(|spec| {
            let mut capabilities: Capabilities = spec.capabilities.iter().collect();
            capabilities.insert("Agent.Version", &spec.agent_version);
            Pool {
                spec,
                capabilities,
                failures: cluster.failures_of(&spec.agent_pool),
                unfinished: 0,
                created: 0,
                free: Vec::new(),
                counts: AgentCounts::default(),
                pending: Vec::new(),
                matched: Vec::new(),
                created_for: Vec::new(),
                capped: Vec::new(),
                unservable: Vec::new(),
                reasons: Vec::new(),
            }
        })
        .collect();
    let pool_index: HashMap<_, usize> = pools
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.spec.agent_pool, i))
        .collect();

    let agents = AgentIndex::new(ado);
    let mut removals: Vec<Action> = Vec::new();
    let mut replacements: Vec<Action> = Vec::new();
    // Requests whose own Job is unfinished and holds nothing: they must not get a second one.
    let mut has_live_job: HashSet<RequestId> = HashSet::new();
    let mut stuck_for: HashMap<RequestId, &str> = HashMap::new();

    // ---- Our agents: busy, idle, starting, stuck ----
    let mut jobs: Vec<&AgentJob> = cluster.jobs.iter().collect();
    jobs.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    for job in &jobs {
        if job.phase == JobPhase::Finished {
            continue;
        }
        let busy = agents.holds_request(&job.agent_name);
        if !busy && let Some(request) = job.for_request {
            has_live_job.insert(request);
        }
        // Jobs of an AgentPool we were not given (being deleted, or another ADO pool's) are
        // neither supply nor ours to act on; their request still gets no second Job meanwhile.
        let Some(&pi) = pool_index.get(&job.agent_pool) else {
            continue;
        };
        let pool = &mut pools[pi];
        pool.unfinished += 1;
        if busy {
            pool.counts.busy += 1;
            continue;
        }
        let ado_agent = agents.agent(&job.agent_name);
        let registered = job.phase == JobPhase::Running
            || ado_agent.is_some_and(|a| a.status == AgentStatus::Online);
        if registered {
            pool.counts.idle += 1;
        } else {
            pool.counts.starting += 1;
        }
        let paused = pool.spec.paused;
        // A paused AgentPool's agents still take requests, but nothing of it is removed or replaced.
        if let Some(agent) = ado_agent.filter(|a| !a.enabled) {
            if !paused {
                removals.push(Action::RemoveIdleAgent {
                    agent_pool: job.agent_pool.clone(),
                    job_name: job.name.clone(),
                    agent_name: job.agent_name.clone(),
                    agent_id: Some(agent.id),
                    reason: format!(
                        "agent {} is disabled in ADO and holds no request: finishing its removal",
                        job.agent_name
                    ),
                });
            }
            continue;
        }
        let deadline = pool.spec.startup_timeout + startup_backoff(pool.failures);
        let age = now.duration_since(job.created);
        if !registered && age > deadline {
            if !paused {
                replacements.push(Action::ReplaceStuckAgent {
                    agent_pool: job.agent_pool.clone(),
                    job_name: job.name.clone(),
                    agent_name: job.agent_name.clone(),
                    agent_id: ado_agent.map(|a| a.id),
                    for_request: job.for_request,
                    reason: stuck_reason(job, age, pool.spec.startup_timeout, pool.failures),
                });
                if let Some(request) = job.for_request {
                    stuck_for.insert(request, job.name.as_str());
                }
            }
            continue;
        }
        pool.free.push(job);
    }

    // Highest attempt per request over every Job we know (any AgentPool, finished included).
    let mut last_attempt: HashMap<RequestId, (u32, Timestamp)> = HashMap::new();
    for job in &cluster.jobs {
        if let Some(request) = job.for_request {
            let entry = last_attempt.entry(request).or_insert((0, job.created));
            if (job.attempt, job.created) > *entry {
                *entry = (job.attempt, job.created);
            }
        }
    }
    let taken_names: BTreeSet<(&str, &str)> = cluster
        .jobs
        .iter()
        .map(|j| (j.agent_pool.namespace.as_str(), j.name.as_str()))
        .collect();

    // ---- Demand: pending requests in queue order ----
    let mut pending: Vec<&JobRequest> = ado.requests.iter().filter(|r| r.is_pending()).collect();
    pending.sort_by_key(|r| (r.queue_time, r.id));
    let mut seen_ids = HashSet::new();
    pending.retain(|r| seen_ids.insert(r.id));

    let usage = ado.parallel_jobs.as_ref();
    let mut free_slots = usage.map(|u| u.total.saturating_sub(u.used));
    let slot_holders: HashSet<RequestId> = usage
        .map(|u| u.slot_holders.iter().copied().collect())
        .unwrap_or_default();

    let mut wants: Vec<Want> = Vec::new();
    // Requests waiting for a parallel job: no new agents for them, but the unclaimed agents they
    // could use are kept (they run as soon as a slot frees; recreating costs a start).
    let mut slot_waiting: Vec<Vec<usize>> = Vec::new();
    for (position, request) in pending.iter().enumerate() {
        // Slots go in queue order to every pending request (ADO does not know which ones we serve).
        let counts_against_limit = usage.is_some_and(|u| {
            request
                .parallelism_tag
                .as_deref()
                .is_none_or(|tag| tag.eq_ignore_ascii_case(&u.parallelism_tag))
        }) && !slot_holders.contains(&request.id);
        let has_slot = if counts_against_limit {
            match free_slots.as_mut() {
                Some(0) => false,
                Some(n) => {
                    *n -= 1;
                    true
                }
                None => true,
            }
        } else {
            true
        };

        let demands: Result<Vec<Demand>, _> =
            request.demands.iter().map(|d| Demand::parse(d)).collect();
        let demands = match demands {
            Ok(demands) => demands,
            Err(err) => {
                let why = format!("unservable: {err}");
                for pool in &mut pools {
                    pool.pending.push((position, request.id));
                    pool.reasons.push(format!("request {}: {why}", request.id));
                    pool.unservable.push(Blocked {
                        request: request.id,
                        why: why.clone(),
                    });
                }
                continue;
            }
        };
        let eligible: Vec<usize> = pools
            .iter()
            .enumerate()
            .filter(|(_, p)| first_unmet(&demands, &p.capabilities).is_none())
            .map(|(i, _)| i)
            .collect();
        if eligible.is_empty() {
            let detail: Vec<String> = pools
                .iter()
                .filter_map(|p| {
                    first_unmet(&demands, &p.capabilities)
                        .map(|d| format!("{} does not offer `{d}`", p.label()))
                })
                .collect();
            let why = format!(
                "unservable: no AgentPool's capabilities satisfy all its demands ({})",
                detail.join("; ")
            );
            for pool in &mut pools {
                pool.pending.push((position, request.id));
                pool.reasons.push(format!("request {}: {why}", request.id));
                pool.unservable.push(Blocked {
                    request: request.id,
                    why: why.clone(),
                });
            }
            continue;
        }
        if !has_slot {
            let (total, used, tag) = usage
                .map(|u| (u.total, u.used, u.parallelism_tag.as_str()))
                .unwrap_or((0, 0, ""));
            let why = format!(
                "capped (parallel jobs): all {total} {tag} parallel jobs are taken ({used} in use, earlier requests get the free ones); ADO runs it when one frees up"
            );
            let pool = &mut pools[eligible[0]];
            pool.pending.push((position, request.id));
            pool.reasons.push(format!("request {}: {why}", request.id));
            pool.capped.push(Blocked {
                request: request.id,
                why,
            });
            slot_waiting.push(eligible);
            continue;
        }
        wants.push(Want {
            request,
            position,
            eligible,
        });
    }

    // ---- Supply: first every request keeps the unclaimed agent started for it ----
    let mut own: Vec<bool> = vec![false; wants.len()];
    for (wi, want) in wants.iter().enumerate() {
        for &pi in &want.eligible {
            let pool = &mut pools[pi];
            if let Some(k) = pool
                .free
                .iter()
                .position(|j| j.for_request == Some(want.request.id))
            {
                let job = pool.free.remove(k);
                pool.pending.push((want.position, want.request.id));
                pool.matched.push(want.request.id);
                pool.reasons.push(format!(
                    "request {}: waits for agent {} ({}), started for it",
                    want.request.id,
                    job.name,
                    phase_word(job, &agents)
                ));
                own[wi] = true;
                break;
            }
        }
    }

    // ---- Then one matching over the whole ADO pool ----
    // Nodes: `pi` = the existing unclaimed agents of pool `pi`; `np + pi` = the agents pool `pi`
    // may still create (0 when paused). Claims, in precedence order:
    //   A. requests that may get a new agent, on existing agents only (queue order);
    //   B. the same, where left over, on new agents too: highest priority with room first, or
    //      through a chain that moves an earlier request to a new agent elsewhere;
    //   C. standby slots (`minIdle`) on existing agents, else a new agent of their own pool, else
    //      by moving a request to a new agent elsewhere; requests claim supply first, so a
    //      standby about to take a request is replaced now;
    //   D. requests that must not get a new agent (their own Job is alive, stuck or unfit) on
    //      whatever existing agents are still unclaimed;
    //   E. requests waiting for a parallel job, likewise (so those agents are not surplus).
    let np = pools.len();
    let failures: Vec<u32> = pools.iter().map(|p| p.failures).collect();
    let last_attempt_of = |id: RequestId| last_attempt.get(&id).copied();
    // A request's next attempt in a pool with failed starts waits out the backoff.
    let backoff_blocks = |id: RequestId, pi: usize| {
        let backoff = startup_backoff(failures[pi]);
        last_attempt
            .get(&id)
            .is_some_and(|&(_, created)| now.duration_since(created) < backoff)
    };
    let mut capacity = vec![0_usize; 2 * np];
    for (pi, pool) in pools.iter().enumerate() {
        capacity[pi] = pool.free.len();
        capacity[np + pi] = if pool.spec.paused {
            0
        } else {
            pool.room() as usize
        };
    }
    let mut lists: Vec<Vec<usize>> = Vec::new();
    let mut creatable: Vec<(usize, usize)> = Vec::new(); // (claim, want)
    let mut blocked: Vec<(usize, usize)> = Vec::new();
    for (wi, want) in wants.iter().enumerate() {
        if own[wi] {
            continue;
        }
        let id = want.request.id;
        let mut nodes: Vec<usize> = want.eligible.clone();
        if has_live_job.contains(&id) {
            blocked.push((lists.len(), wi));
        } else {
            nodes.extend(
                want.eligible
                    .iter()
                    .filter(|&&pi| !backoff_blocks(id, pi))
                    .map(|&pi| np + pi),
            );
            creatable.push((lists.len(), wi));
        }
        lists.push(nodes);
    }
    let mut standby: Vec<(usize, usize)> = Vec::new(); // (claim, pool)
    for (pi, pool) in pools.iter().enumerate() {
        if !pool.spec.paused {
            for _ in 0..pool.spec.min_idle {
                standby.push((lists.len(), pi));
                lists.push(vec![pi, np + pi]);
            }
        }
    }
    let waiting: Vec<usize> = slot_waiting
        .into_iter()
        .map(|nodes| {
            lists.push(nodes);
            lists.len() - 1
        })
        .collect();
    let mut matcher = Matcher::new(capacity, lists, np);
    for &(claim, _) in &creatable {
        matcher.assign(claim, true);
    }
    for &(claim, _) in &creatable {
        if matcher.assigned[claim].is_none() {
            matcher.assign(claim, false);
        }
    }
    for &(claim, pi) in &standby {
        // Existing agents first, then a new one of its own pool, and only then by moving a
        // request onto a new agent elsewhere (as the next poll would see it anyway).
        if !matcher.assign(claim, true) && !matcher.take_if_free(claim, np + pi) {
            matcher.assign(claim, false);
        }
    }
    for &(claim, _) in &blocked {
        matcher.assign(claim, true);
    }
    for &claim in &waiting {
        matcher.assign(claim, true);
    }
    let mut kept_for_slots = vec![0_usize; np];
    for node in waiting.iter().filter_map(|&claim| matcher.assigned[claim]) {
        kept_for_slots[node] += 1;
    }
    let used: Vec<usize> = (0..np).map(|pi| matcher.holders[pi].len()).collect();
    let new_full: Vec<bool> = (0..np)
        .map(|pi| matcher.holders[np + pi].len() >= matcher.capacity[np + pi])
        .collect();
    let why_not = |pools: &[Pool], id: RequestId, pi: usize| -> Option<String> {
        let pool = &pools[pi];
        if pool.spec.paused {
            Some(format!("{} is paused", pool.label()))
        } else if backoff_blocks(id, pi) {
            Some(format!(
                "{} backs off {}s after {} failed agent starts",
                pool.label(),
                startup_backoff(pool.failures).as_secs(),
                pool.failures
            ))
        } else if new_full[pi] {
            Some(format!(
                "{} is at maxAgents {}",
                pool.label(),
                pool.spec.max_agents
            ))
        } else {
            None
        }
    };

    // ---- Outcomes of the requests, in queue order ----
    let mut claim_of: Vec<Option<usize>> = vec![None; wants.len()];
    for &(claim, wi) in creatable.iter().chain(&blocked) {
        claim_of[wi] = Some(claim);
    }
    let mut creates: Vec<Action> = Vec::new();
    let mut planned_names: BTreeSet<(String, String)> = BTreeSet::new();
    for (wi, want) in wants.iter().enumerate() {
        let Some(claim) = claim_of[wi] else {
            continue; // kept its own agent
        };
        let id = want.request.id;
        match matcher.assigned[claim] {
            Some(node) if node < np => {
                let pool = &mut pools[node];
                pool.pending.push((want.position, id));
                pool.matched.push(id);
                pool.reasons.push(format!(
                    "request {id}: an unclaimed agent of {} can take it (ADO picks which)",
                    pool.label()
                ));
            }
            Some(node) => {
                let pi = node - np;
                let skipped: Vec<String> = want
                    .eligible
                    .iter()
                    .take_while(|&&p| p != pi)
                    .filter_map(|&p| why_not(&pools, id, p))
                    .collect();
                let last = last_attempt_of(id).map_or(0, |(attempt, _)| attempt);
                let pool = &mut pools[pi];
                let mut attempt = last + 1;
                let mut job_name = request_job_name(&pool.spec.agent_pool.name, id, attempt);
                while taken_names
                    .contains(&(pool.spec.agent_pool.namespace.as_str(), job_name.as_str()))
                {
                    attempt += 1;
                    job_name = request_job_name(&pool.spec.agent_pool.name, id, attempt);
                }
                let mut reason = format!(
                    "request {id}: no unclaimed agent is left for it; {} is the first AgentPool by priority whose capabilities satisfy its demands",
                    pool.label()
                );
                if !skipped.is_empty() {
                    reason.push_str(&format!(" and has room ({})", skipped.join("; ")));
                }
                if attempt > 1 {
                    reason.push_str(&format!(
                        "; attempt {attempt}: earlier agents for it took other requests, failed or are gone"
                    ));
                }
                pool.created += 1;
                pool.pending.push((want.position, id));
                pool.created_for.push(id);
                pool.reasons.push(reason.clone());
                planned_names.insert((pool.spec.agent_pool.namespace.clone(), job_name.clone()));
                creates.push(Action::CreateAgent {
                    agent_pool: pool.spec.agent_pool.clone(),
                    job_name,
                    for_request: Some(id),
                    attempt,
                    reason,
                });
            }
            None => {
                let why = if let Some(stuck) = stuck_for.get(&id) {
                    format!(
                        "capped: its agent Job {stuck} is being replaced; a new agent follows once it is gone"
                    )
                } else if has_live_job.contains(&id) {
                    "capped: it already has an unfinished agent Job that holds no request (no second one)".to_owned()
                } else {
                    let reasons: Vec<String> = want
                        .eligible
                        .iter()
                        .filter_map(|&p| why_not(&pools, id, p))
                        .collect();
                    format!("capped: {}", reasons.join("; "))
                };
                let pool = &mut pools[want.eligible[0]];
                pool.pending.push((want.position, id));
                pool.reasons.push(format!("request {id}: {why}"));
                pool.capped.push(Blocked { request: id, why });
            }
        }
    }

    // ---- Standby (minIdle) and surplus ----
    let mut standby_new = vec![0_u32; np];
    let mut standby_missing = vec![0_u32; np];
    for &(claim, pi) in &standby {
        match matcher.assigned[claim] {
            Some(node) if node >= np => standby_new[pi] += 1,
            Some(_) => {}
            None => standby_missing[pi] += 1,
        }
    }
    let mut standby_creates: Vec<Action> = Vec::new();
    for (pi, pool) in pools.iter_mut().enumerate() {
        if pool.spec.paused {
            if pool.spec.min_idle > 0 || !pool.free.is_empty() {
                pool.reasons
                    .push("paused: creates and removes no agents".to_owned());
            }
            continue;
        }
        if standby_missing[pi] > 0 {
            pool.reasons.push(format!(
                "minIdle {}: {} standby agents short, at maxAgents {}",
                pool.spec.min_idle, standby_missing[pi], pool.spec.max_agents
            ));
        }
        let namespace = pool.spec.agent_pool.namespace.clone();
        let mut n = 0_u32;
        for _ in 0..standby_new[pi] {
            let job_name = loop {
                let candidate = standby_job_name(&pool.spec.agent_pool.name, n);
                n += 1;
                let key = (namespace.as_str(), candidate.as_str());
                if !taken_names.contains(&key)
                    && !planned_names.contains(&(namespace.clone(), candidate.clone()))
                {
                    break candidate;
                }
            };
            let reason = format!(
                "standby: keep minIdle {} unclaimed agents in {} beyond pending requests",
                pool.spec.min_idle,
                pool.label()
            );
            pool.created += 1;
            pool.reasons.push(format!("{reason} (create {job_name})"));
            planned_names.insert((namespace.clone(), job_name.clone()));
            standby_creates.push(Action::CreateAgent {
                agent_pool: pool.spec.agent_pool.clone(),
                job_name,
                for_request: None,
                attempt: 1,
                reason,
            });
        }

        if kept_for_slots[pi] > 0 {
            pool.reasons.push(format!(
                "keeps {} unclaimed agents for requests waiting for a parallel job",
                kept_for_slots[pi]
            ));
        }
        // Unclaimed agents beyond the pending requests and minIdle are surplus.
        let surplus = pool.free.len().saturating_sub(used[pi]);
        if surplus > 0 {
            let mut candidates: Vec<&AgentJob> = pool.free.clone();
            // Registered agents first (the safe disable-and-check removal applies to them), oldest first.
            candidates.sort_by_key(|j| {
                let registered = j.phase == JobPhase::Running
                    || agents
                        .agent(&j.agent_name)
                        .is_some_and(|a| a.status == AgentStatus::Online);
                (!registered, j.created, j.name.clone())
            });
            for job in candidates.into_iter().take(surplus) {
                let reason = format!(
                    "surplus: {} unclaimed agents in {}, {} of them needed for pending requests and minIdle {}",
                    pool.free.len(),
                    pool.label(),
                    used[pi],
                    pool.spec.min_idle
                );
                pool.reasons
                    .push(format!("{reason}: remove idle agent {}", job.agent_name));
                removals.push(Action::RemoveIdleAgent {
                    agent_pool: job.agent_pool.clone(),
                    job_name: job.name.clone(),
                    agent_name: job.agent_name.clone(),
                    agent_id: agents.agent(&job.agent_name).map(|a| a.id),
                    reason,
                });
            }
        }
    }
    for action in replacements.iter().chain(&removals) {
        if let Some(&pi) = pool_index.get(action.agent_pool()) {
            pools[pi].reasons.push(action.reason().to_owned());
        }
    }

    let mut actions = replacements;
    actions.extend(removals);
    actions.extend(creates);
    actions.extend(standby_creates);

    let summaries = pools
        .into_iter()
        .map(|mut pool| {
            pool.pending.sort_unstable();
            PoolSummary {
                agent_pool: pool.spec.agent_pool.clone(),
                pending: pool.pending.iter().map(|&(_, id)| id).collect(),
                matched: pool.matched,
                created_for: pool.created_for,
                capped: pool.capped,
                unservable: pool.unservable,
                agents: pool.counts,
                create: pool.created,
                reasons: pool.reasons,
            }
        })
        .collect();

    Plan {
        ado_pool: ado.ado_pool.clone(),
        actions,
        pools: summaries,
    }
}

fn stuck_reason(
    job: &AgentJob,
    age: SignedDuration,
    timeout: SignedDuration,
    failures: u32,
) -> String {
    let what = if job.pod_started {
        "its pod ran but the agent never registered"
    } else {
        "its pod never started (image pull, scheduling or quota?)"
    };
    let backoff = startup_backoff(failures);
    let backoff_note = if backoff.is_zero() {
        String::new()
    } else {
        format!(
            " plus a backoff of {}s after {failures} failed starts",
            backoff.as_secs()
        )
    };
    format!(
        "agent Job {} is {}s old and not registered: {what} (startup timeout {}s{backoff_note})",
        job.name,
        age.as_secs(),
        timeout.as_secs()
    )
}

fn phase_word(job: &AgentJob, agents: &AgentIndex<'_>) -> &'static str {
    let online = agents
        .agent(&job.agent_name)
        .is_some_and(|a| a.status == AgentStatus::Online);
    if job.phase == JobPhase::Running || online {
        "idle"
    } else {
        "starting"
    }
}

/// Bipartite matching of claims (each a list of acceptable nodes, in preference order) to nodes
/// with capacities, by augmenting paths. A claim matched once stays matched (it may move to
/// another of its nodes), so earlier claims win when not all can be met; deterministic.
struct Matcher {
    capacity: Vec<usize>,
    lists: Vec<Vec<usize>>,
    /// Nodes from this index on are "new agents", which `existing_only` searches skip.
    first_new: usize,
    assigned: Vec<Option<usize>>,
    holders: Vec<Vec<usize>>,
    /// Nodes a failed search visited: no augmenting path leads through them until the matching
    /// changes, so later searches (with the same `existing_only`) skip them. This keeps a burst
    /// of requests that cannot all be served linear instead of quadratic.
    dead: Vec<bool>,
    dead_for_existing_only: Option<bool>,
}

impl Matcher {
    fn new(capacity: Vec<usize>, lists: Vec<Vec<usize>>, first_new: usize) -> Self {
        let holders = vec![Vec::new(); capacity.len()];
        let assigned = vec![None; lists.len()];
        let dead = vec![false; capacity.len()];
        Self {
            capacity,
            lists,
            first_new,
            assigned,
            holders,
            dead,
            dead_for_existing_only: None,
        }
    }

    fn allowed(&self, node: usize, existing_only: bool) -> bool {
        !(existing_only && node >= self.first_new)
    }

    fn has_room(&self, node: usize) -> bool {
        self.holders[node].len() < self.capacity[node]
    }

    /// Matches `claim`: a node of its list with room (in preference order), else an augmenting
    /// path. Returns whether it is matched.
    fn assign(&mut self, claim: usize, existing_only: bool) -> bool {
        let direct = self.lists[claim]
            .iter()
            .copied()
            .find(|&node| self.allowed(node, existing_only) && self.has_room(node));
        if let Some(node) = direct {
            self.holders[node].push(claim);
            self.assigned[claim] = Some(node);
            self.forget_dead();
            return true;
        }
        if self.dead_for_existing_only != Some(existing_only) {
            self.forget_dead();
            self.dead_for_existing_only = Some(existing_only);
        }
        let mut visited = std::mem::take(&mut self.dead);
        let found = self.augment(claim, existing_only, &mut visited);
        self.dead = visited;
        if found {
            self.forget_dead();
        }
        found
    }

    fn forget_dead(&mut self) {
        self.dead.iter_mut().for_each(|d| *d = false);
        self.dead_for_existing_only = None;
    }

    /// Matches `claim` to `node` only if it has room right now.
    fn take_if_free(&mut self, claim: usize, node: usize) -> bool {
        if self.has_room(node) {
            self.holders[node].push(claim);
            self.assigned[claim] = Some(node);
            self.forget_dead();
            true
        } else {
            false
        }
    }

    fn augment(&mut self, claim: usize, existing_only: bool, visited: &mut [bool]) -> bool {
        for i in 0..self.lists[claim].len() {
            let node = self.lists[claim][i];
            if visited[node] || self.capacity[node] == 0 || !self.allowed(node, existing_only) {
                continue;
            }
            visited[node] = true;
            if self.has_room(node) {
                self.holders[node].push(claim);
                self.assigned[claim] = Some(node);
                return true;
            }
            for k in 0..self.holders[node].len() {
                let other = self.holders[node][k];
                if self.augment(other, existing_only, visited) {
                    self.holders[node][k] = claim;
                    self.assigned[claim] = Some(node);
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_bounded() {
        assert_eq!(startup_backoff(0), SignedDuration::ZERO);
        assert_eq!(startup_backoff(1), SignedDuration::from_secs(30));
        assert_eq!(startup_backoff(2), SignedDuration::from_secs(60));
        assert_eq!(startup_backoff(4), SignedDuration::from_secs(240));
        assert_eq!(startup_backoff(5), SignedDuration::from_secs(480));
        assert_eq!(startup_backoff(6), BACKOFF_MAX);
        assert_eq!(startup_backoff(u32::MAX), BACKOFF_MAX);
    }

    fn run(lists: Vec<Vec<usize>>, capacity: Vec<usize>) -> Vec<Option<usize>> {
        let n = lists.len();
        let mut m = Matcher::new(capacity, lists, usize::MAX);
        for claim in 0..n {
            m.assign(claim, false);
        }
        m.assigned
    }

    #[test]
    fn matching_moves_earlier_claims_to_make_room() {
        // Claim 0 could use node 0 or 1; claim 1 only node 0; one place each.
        assert_eq!(
            run(vec![vec![0, 1], vec![0]], vec![1, 1]),
            vec![Some(1), Some(0)]
        );
    }

    #[test]
    fn matching_keeps_earlier_claims_when_short() {
        assert_eq!(
            run(vec![vec![0], vec![0], vec![0]], vec![2]),
            vec![Some(0), Some(0), None]
        );
    }

    #[test]
    fn existing_only_searches_never_use_new_nodes() {
        // Node 1 is "new". Claim 1 could push claim 0 there, but not in an existing-only search.
        let mut m = Matcher::new(vec![1, 1], vec![vec![0, 1], vec![0]], 1);
        assert!(m.assign(0, true));
        assert!(!m.assign(1, true));
        assert!(m.assign(1, false));
        assert_eq!(m.assigned, vec![Some(1), Some(0)]);
    }
}
