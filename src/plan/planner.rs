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
        // Jobs of an AgentPool we were not given (being deleted, or another ADO pool's) are
        // neither supply nor ours to act on.
        let Some(&pi) = pool_index.get(&job.agent_pool) else {
            continue;
        };
        let pool = &mut pools[pi];
        pool.unfinished += 1;
        if agents.holds_request(&job.agent_name) {
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
        if let Some(request) = job.for_request {
            has_live_job.insert(request);
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
            continue;
        }
        wants.push(Want {
            request,
            position,
            eligible,
        });
    }

    // ---- Supply: first every request's own agent, then a maximum matching over the rest ----
    let mut outcome: Vec<Option<usize>> = vec![None; wants.len()];
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
                outcome[wi] = Some(pi);
                break;
            }
        }
    }
    // Standby slots are matched after every request, so requests claim supply first and a
    // standby that will take a request is replaced right away.
    let real: Vec<usize> = (0..wants.len()).filter(|&w| outcome[w].is_none()).collect();
    let mut claims: Vec<Vec<usize>> = real.iter().map(|&w| wants[w].eligible.clone()).collect();
    let mut standby_owner: Vec<usize> = Vec::new();
    for (pi, pool) in pools.iter().enumerate() {
        if !pool.spec.paused {
            for _ in 0..pool.spec.min_idle {
                claims.push(vec![pi]);
                standby_owner.push(pi);
            }
        }
    }
    let capacity: Vec<usize> = pools.iter().map(|p| p.free.len()).collect();
    let assignment = max_matching(&claims, &capacity);
    let mut used = vec![0_usize; pools.len()];
    for pi in assignment.iter().flatten() {
        used[*pi] += 1;
    }
    for (k, &w) in real.iter().enumerate() {
        if let Some(pi) = assignment[k] {
            let want = &wants[w];
            let pool = &mut pools[pi];
            pool.pending.push((want.position, want.request.id));
            pool.matched.push(want.request.id);
            pool.reasons.push(format!(
                "request {}: an unclaimed agent of {} can take it (ADO picks which)",
                want.request.id,
                pool.label()
            ));
            outcome[w] = Some(pi);
        }
    }

    // ---- New agents for what is left, by priority with spill-over ----
    let mut creates: Vec<Action> = Vec::new();
    let mut planned_names: BTreeSet<(String, String)> = BTreeSet::new();
    for (wi, want) in wants.iter().enumerate() {
        if outcome[wi].is_some() {
            continue;
        }
        let id = want.request.id;
        let home = want.eligible[0];
        let blocked_by_own_job = if let Some(stuck) = stuck_for.get(&id) {
            Some(format!(
                "capped: its agent Job {stuck} is being replaced; a new agent follows once it is gone"
            ))
        } else if has_live_job.contains(&id) {
            Some("capped: it already has an unfinished agent Job that holds no request (no second one)".to_owned())
        } else {
            None
        };
        if let Some(why) = blocked_by_own_job {
            let pool = &mut pools[home];
            pool.pending.push((want.position, id));
            pool.reasons.push(format!("request {id}: {why}"));
            pool.capped.push(Blocked { request: id, why });
            continue;
        }
        let (last, last_created) = last_attempt.get(&id).copied().unwrap_or((0, now));
        let mut skipped: Vec<String> = Vec::new();
        let mut chosen = None;
        for &pi in &want.eligible {
            let pool = &pools[pi];
            if pool.spec.paused {
                skipped.push(format!("{} is paused", pool.label()));
                continue;
            }
            if pool.room() == 0 {
                skipped.push(format!(
                    "{} is at maxAgents {}",
                    pool.label(),
                    pool.spec.max_agents
                ));
                continue;
            }
            let backoff = startup_backoff(pool.failures);
            if last > 0 && now.duration_since(last_created) < backoff {
                skipped.push(format!(
                    "{} backs off {}s after {} failed agent starts",
                    pool.label(),
                    backoff.as_secs(),
                    pool.failures
                ));
                continue;
            }
            chosen = Some(pi);
            break;
        }
        let Some(pi) = chosen else {
            let why = format!("capped: {}", skipped.join("; "));
            let pool = &mut pools[home];
            pool.pending.push((want.position, id));
            pool.reasons.push(format!("request {id}: {why}"));
            pool.capped.push(Blocked { request: id, why });
            continue;
        };
        let pool = &mut pools[pi];
        let mut attempt = last + 1;
        let mut job_name = request_job_name(&pool.spec.agent_pool.name, id, attempt);
        while taken_names.contains(&(pool.spec.agent_pool.namespace.as_str(), job_name.as_str())) {
            attempt += 1;
            job_name = request_job_name(&pool.spec.agent_pool.name, id, attempt);
        }
        let mut reason = format!(
            "request {id}: no unclaimed agent can take it; {} is the first AgentPool by priority whose capabilities satisfy its demands",
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

    // ---- Standby (minIdle) and surplus ----
    let mut standby_missing = vec![0_u32; pools.len()];
    for (k, &pi) in standby_owner.iter().enumerate() {
        if assignment[real.len() + k].is_none() {
            standby_missing[pi] += 1;
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
        let missing = standby_missing[pi];
        let make = missing.min(pool.room());
        if make < missing {
            pool.reasons.push(format!(
                "minIdle {}: {} standby agents short, at maxAgents {}",
                pool.spec.min_idle,
                missing - make,
                pool.spec.max_agents
            ));
        }
        let namespace = pool.spec.agent_pool.namespace.clone();
        let mut n = 0_u32;
        for _ in 0..make {
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
                    "surplus: {} unclaimed agents in {} for {} pending requests it can serve plus minIdle {}",
                    pool.free.len(),
                    pool.label(),
                    used[pi].saturating_sub(pool.spec.min_idle as usize),
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

/// A maximum matching of claims (each a list of acceptable pools, in preference order) to pools
/// with capacities, found with augmenting paths in claim order. A claim matched once stays
/// matched (it may move to another of its pools), so earlier claims win when not all can be met;
/// the result is deterministic.
fn max_matching(claims: &[Vec<usize>], capacity: &[usize]) -> Vec<Option<usize>> {
    let mut assigned: Vec<Option<usize>> = vec![None; claims.len()];
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); capacity.len()];
    for claim in 0..claims.len() {
        let mut visited = vec![false; capacity.len()];
        augment(
            claim,
            claims,
            capacity,
            &mut assigned,
            &mut holders,
            &mut visited,
        );
    }
    assigned
}

fn augment(
    claim: usize,
    claims: &[Vec<usize>],
    capacity: &[usize],
    assigned: &mut [Option<usize>],
    holders: &mut [Vec<usize>],
    visited: &mut [bool],
) -> bool {
    for &pool in &claims[claim] {
        if visited[pool] || capacity[pool] == 0 {
            continue;
        }
        visited[pool] = true;
        if holders[pool].len() < capacity[pool] {
            holders[pool].push(claim);
            assigned[claim] = Some(pool);
            return true;
        }
        for k in 0..holders[pool].len() {
            let other = holders[pool][k];
            if augment(other, claims, capacity, assigned, holders, visited) {
                holders[pool][k] = claim;
                assigned[claim] = Some(pool);
                return true;
            }
        }
    }
    false
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

    #[test]
    fn matching_moves_earlier_claims_to_make_room() {
        // Claim 0 could use pool 0 or 1; claim 1 only pool 0; one agent each.
        let got = max_matching(&[vec![0, 1], vec![0]], &[1, 1]);
        assert_eq!(got, vec![Some(1), Some(0)]);
    }

    #[test]
    fn matching_keeps_earlier_claims_when_short() {
        let got = max_matching(&[vec![0], vec![0], vec![0]], &[2]);
        assert_eq!(got, vec![Some(0), Some(0), None]);
    }
}
