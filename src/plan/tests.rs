//! Table tests of the planner: each test builds a small world (ADO requests and agents, our agent
//! Jobs, AgentPool specs), plans it, and checks the decisions.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};

use super::*;

const NS: &str = "ci";

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_750_000_000 + secs).expect("valid test time")
}

/// "Now" in every test: 1000 s after the epoch of the test world.
fn now() -> Timestamp {
    t(1000)
}

fn pref(name: &str) -> PoolRef {
    PoolRef::new(NS, name)
}

#[derive(Clone)]
struct World {
    ado: AdoSnapshot,
    cluster: ClusterSnapshot,
    specs: Vec<AgentPoolSpec>,
}

impl World {
    fn new() -> Self {
        World {
            ado: AdoSnapshot {
                ado_pool: "builds".into(),
                ..AdoSnapshot::default()
            },
            cluster: ClusterSnapshot::default(),
            specs: Vec::new(),
        }
    }

    /// An AgentPool with maxAgents 10, minIdle 0, startup timeout 300 s, agent version 4.255.0.
    fn pool(mut self, name: &str, priority: i32, caps: &[(&str, &str)]) -> Self {
        self.specs.push(AgentPoolSpec {
            agent_pool: pref(name),
            priority,
            capabilities: caps
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "4.255.0".into(),
            min_idle: 0,
            max_agents: 10,
            paused: false,
            startup_timeout: SignedDuration::from_secs(300),
        });
        self
    }

    fn tune(mut self, name: &str, f: impl FnOnce(&mut AgentPoolSpec)) -> Self {
        let spec = self
            .specs
            .iter_mut()
            .find(|s| s.agent_pool.name == name)
            .expect("tune an existing pool");
        f(spec);
        self
    }

    /// A pending request queued at `queued` seconds.
    fn pending(mut self, id: RequestId, queued: i64, demands: &[&str]) -> Self {
        self.ado.requests.push(JobRequest {
            id,
            queue_time: Some(t(queued)),
            assign_time: None,
            receive_time: None,
            finish_time: None,
            result: None,
            demands: demands.iter().map(|d| d.to_string()).collect(),
            reserved_agent: None,
            parallelism_tag: Some("Private".into()),
        });
        self
    }

    /// A request ADO gave to `agent` (reserved and assigned, maybe received).
    fn running(mut self, id: RequestId, agent: &str) -> Self {
        self.ado.requests.push(JobRequest {
            id,
            queue_time: Some(t(0)),
            assign_time: Some(t(10)),
            receive_time: Some(t(11)),
            finish_time: None,
            result: None,
            demands: Vec::new(),
            reserved_agent: Some(AgentRef {
                id: 9000 + id,
                name: agent.into(),
            }),
            parallelism_tag: Some("Private".into()),
        });
        self
    }

    fn request_mut(&mut self, id: RequestId) -> &mut JobRequest {
        self.ado
            .requests
            .iter_mut()
            .find(|r| r.id == id)
            .expect("existing request")
    }

    /// One of our agent Jobs; its agent name is its Job name.
    fn job(
        mut self,
        name: &str,
        pool: &str,
        for_request: Option<RequestId>,
        attempt: u32,
        created: i64,
        phase: JobPhase,
    ) -> Self {
        self.cluster.jobs.push(AgentJob {
            name: name.into(),
            agent_pool: pref(pool),
            agent_name: name.into(),
            for_request,
            attempt,
            created: t(created),
            phase,
            pod_started: phase != JobPhase::Starting,
        });
        self
    }

    fn ado_agent(mut self, id: AgentId, name: &str, f: impl FnOnce(&mut Agent)) -> Self {
        let mut agent = Agent {
            id,
            name: name.into(),
            status: AgentStatus::Online,
            enabled: true,
            capabilities: BTreeMap::new(),
            assigned_request: None,
        };
        f(&mut agent);
        self.ado.agents.push(agent);
        self
    }

    fn parallel(mut self, total: u32, used: u32) -> Self {
        self.ado.parallel_jobs = Some(ParallelJobUsage {
            parallelism_tag: "Private".into(),
            total,
            used,
            slot_holders: Vec::new(),
        });
        self
    }

    fn plan(&self) -> Plan {
        plan(&self.ado, &self.cluster, &self.specs, now())
    }

    /// What the controller would do with a plan: new Jobs appear as starting, removed or
    /// replaced ones as finished.
    fn apply(&mut self, plan: &Plan) {
        for action in &plan.actions {
            match action {
                Action::CreateAgent {
                    agent_pool,
                    job_name,
                    for_request,
                    attempt,
                    ..
                } => self.cluster.jobs.push(AgentJob {
                    name: job_name.clone(),
                    agent_pool: agent_pool.clone(),
                    agent_name: job_name.clone(),
                    for_request: *for_request,
                    attempt: *attempt,
                    created: now(),
                    phase: JobPhase::Starting,
                    pod_started: false,
                }),
                Action::RemoveIdleAgent { job_name, .. }
                | Action::ReplaceStuckAgent { job_name, .. } => {
                    for job in &mut self.cluster.jobs {
                        if &job.name == job_name {
                            job.phase = JobPhase::Finished;
                        }
                    }
                }
            }
        }
    }
}

/// (AgentPool name, Job name, request, attempt) of every creation, in order.
fn creates(plan: &Plan) -> Vec<(String, String, Option<RequestId>, u32)> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateAgent {
                agent_pool,
                job_name,
                for_request,
                attempt,
                ..
            } => Some((
                agent_pool.name.clone(),
                job_name.clone(),
                *for_request,
                *attempt,
            )),
            _ => None,
        })
        .collect()
}

fn created_for(plan: &Plan) -> Vec<(String, RequestId)> {
    creates(plan)
        .into_iter()
        .filter_map(|(pool, _, request, _)| request.map(|r| (pool, r)))
        .collect()
}

fn removed(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::RemoveIdleAgent { job_name, .. } => Some(job_name.clone()),
            _ => None,
        })
        .collect()
}

fn replaced(plan: &Plan) -> Vec<String> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::ReplaceStuckAgent { job_name, .. } => Some(job_name.clone()),
            _ => None,
        })
        .collect()
}

fn summary<'a>(plan: &'a Plan, pool: &str) -> &'a PoolSummary {
    plan.pool(&pref(pool)).expect("pool in plan")
}

fn ids(blocked: &[Blocked]) -> Vec<RequestId> {
    blocked.iter().map(|b| b.request).collect()
}

fn s(text: &str) -> String {
    text.to_owned()
}

/// Plans, applies, plans again: the second plan must do nothing.
fn assert_idempotent(mut world: World) {
    let first = world.plan();
    world.apply(&first);
    let second = world.plan();
    assert!(
        second.actions.is_empty(),
        "planning again after applying {:#?}\nstill wants {:#?}",
        first.actions,
        second.actions
    );
}

// ---------------------------------------------------------------- demand and scale-from-zero

#[test]
fn nothing_waiting_means_no_agents() {
    let worlds = [
        World::new().pool("linux", 0, &[]),
        // Running and finished requests are not demand.
        World::new()
            .pool("linux", 0, &[])
            .running(1, "foreign-agent")
            .pending(2, 5, &[]),
    ];
    let mut finished = worlds[1].clone();
    let request = finished.request_mut(2);
    request.result = Some("canceled".into());
    request.finish_time = Some(t(20));
    for world in [worlds[0].clone(), finished] {
        let plan = world.plan();
        assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
        assert_eq!(summary(&plan, "linux").pending, Vec::<RequestId>::new());
        assert_eq!(summary(&plan, "linux").create, 0);
    }
}

#[test]
fn each_pending_request_gets_one_agent_in_queue_order() {
    // Ids and queue times disagree on purpose: queue time decides, id breaks ties.
    let world = World::new()
        .pool("linux", 0, &[])
        .pending(30, 1, &[])
        .pending(10, 3, &[])
        .pending(20, 3, &[]);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![
            (s("linux"), s("linux-30-1"), Some(30), 1),
            (s("linux"), s("linux-10-1"), Some(10), 1),
            (s("linux"), s("linux-20-1"), Some(20), 1),
        ]
    );
    let linux = summary(&plan, "linux");
    assert_eq!(linux.pending, vec![30, 10, 20]);
    assert_eq!(linux.created_for, vec![30, 10, 20]);
    assert_eq!(linux.create, 3);
    assert!(plan.creates().all(|a| !a.reason().is_empty()));
    assert_idempotent(world);
}

#[test]
fn pending_filter_follows_every_field() {
    type Edit = fn(&mut JobRequest);
    let table: [(&str, Edit, bool); 6] = [
        ("untouched", |_| {}, true),
        ("result", |r| r.result = Some("succeeded".into()), false),
        ("assignTime", |r| r.assign_time = Some(t(2)), false),
        ("receiveTime", |r| r.receive_time = Some(t(2)), false),
        ("finishTime", |r| r.finish_time = Some(t(2)), false),
        (
            "reservedAgent",
            |r| {
                r.reserved_agent = Some(AgentRef {
                    id: 1,
                    name: "someone".into(),
                })
            },
            false,
        ),
    ];
    for (what, edit, creates_agent) in table {
        let mut world = World::new().pool("linux", 0, &[]).pending(1, 0, &[]);
        edit(world.request_mut(1));
        let plan = world.plan();
        assert_eq!(plan.creates().count(), usize::from(creates_agent), "{what}");
    }
}

#[test]
fn max_agents_caps_and_counts_every_unfinished_job() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.max_agents = 3)
        .running(100, "linux-busy")
        .job("linux-busy", "linux", None, 1, 0, JobPhase::Running)
        .pending(1, 1, &[])
        .pending(2, 2, &[])
        .pending(3, 3, &[]);
    let plan = world.plan();
    assert_eq!(created_for(&plan), vec![(s("linux"), 1), (s("linux"), 2)]);
    let linux = summary(&plan, "linux");
    assert_eq!(ids(&linux.capped), vec![3]);
    assert!(
        linux.capped[0].why.contains("maxAgents 3"),
        "{:?}",
        linux.capped
    );
    assert_eq!(linux.pending, vec![1, 2, 3]);
    assert_idempotent(world);
}

#[test]
fn parallel_job_slots_cap_demand_in_queue_order() {
    let world = World::new()
        .pool("linux", 0, &[])
        .parallel(3, 1)
        .pending(1, 1, &[])
        .pending(2, 2, &[])
        .pending(3, 3, &[])
        .pending(4, 4, &[]);
    let plan = world.plan();
    assert_eq!(created_for(&plan), vec![(s("linux"), 1), (s("linux"), 2)]);
    let linux = summary(&plan, "linux");
    assert_eq!(ids(&linux.capped), vec![3, 4]);
    assert!(
        linux.capped[0].why.contains("parallel jobs"),
        "{:?}",
        linux.capped
    );
    assert_idempotent(world);
}

#[test]
fn agents_for_requests_waiting_for_a_parallel_job_are_kept() {
    // All slots taken: request 1 keeps the agent started for it, request 2 gets none.
    let world = World::new()
        .pool("linux", 0, &[])
        .parallel(2, 2)
        .job("linux-1-1", "linux", Some(1), 1, 900, JobPhase::Running)
        .job("linux-spare", "linux", None, 1, 900, JobPhase::Running)
        .pending(1, 1, &[])
        .pending(2, 2, &[])
        .pending(3, 3, &[]);
    let plan = world.plan();
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    let linux = summary(&plan, "linux");
    assert_eq!(ids(&linux.capped), vec![1, 2, 3]);
    assert!(
        linux
            .reasons
            .iter()
            .any(|r| r.contains("keeps 2 unclaimed agents"))
    );
    // Once nothing waits, they are surplus.
    let mut done = world.clone();
    done.ado.requests.clear();
    assert_eq!(removed(&done.plan()).len(), 2);
}

#[test]
fn parallel_slot_holders_and_other_buckets_are_not_capped() {
    let mut world = World::new()
        .pool("linux", 0, &[])
        .parallel(1, 1)
        .pending(1, 1, &[])
        .pending(2, 2, &[])
        .pending(3, 3, &[]);
    // Request 1 already holds a slot (it is in runningRequests); request 3 is a public project's.
    if let Some(usage) = world.ado.parallel_jobs.as_mut() {
        usage.slot_holders = vec![1];
    }
    world.request_mut(3).parallelism_tag = Some("Public".into());
    let plan = world.plan();
    assert_eq!(created_for(&plan), vec![(s("linux"), 1), (s("linux"), 3)]);
    assert_eq!(ids(&summary(&plan, "linux").capped), vec![2]);
}

#[test]
fn unknown_parallel_usage_caps_nothing() {
    let world = World::new()
        .pool("linux", 0, &[])
        .pending(1, 1, &[])
        .pending(2, 2, &[]);
    assert_eq!(world.plan().creates().count(), 2);
}

#[test]
fn more_than_200_pending_are_all_counted() {
    let mut world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.max_agents = 1000);
    for id in 1..=500 {
        world = world.pending(id, id, &[]);
    }
    let plan = world.plan();
    assert_eq!(plan.creates().count(), 500);
    let names: BTreeSet<&str> = plan.creates().map(Action::job_name).collect();
    assert_eq!(names.len(), 500, "Job names are unique");
    let report = report(&plan);
    assert_eq!(report.pools[0].pending.len(), 500);
    assert_eq!(report.pools[0].create, 500);
    assert_idempotent(world);
}

// ---------------------------------------------------------------- routing

fn two_os_pools() -> World {
    World::new()
        .pool("linux", 10, &[("Agent.OS", "Linux"), ("docker", "")])
        .pool("windows", 10, &[("Agent.OS", "Windows_NT")])
        .pool("gpu", 1, &[("Agent.OS", "Linux"), ("gpu", "a100")])
}

#[test]
fn routing_follows_demands() {
    let table: [(&[&str], &str); 7] = [
        (&["Agent.OS -equals Linux"], "linux"),
        (&["agent.os -equals windows_nt"], "windows"),
        (&["docker"], "linux"),
        (&["gpu"], "gpu"),
        (&["gpu -equals A100", "Agent.OS -equals linux"], "gpu"),
        (&["Agent.Version -gtVersion 4.0.0"], "gpu"), // no OS demand: every pool fits; see below
        (
            &["Agent.OS -equals Linux", "Agent.Version -gtVersion 2.190"],
            "linux",
        ),
    ];
    for (demands, want) in table {
        // The version-only demand fits all three; "gpu" wins only when it has the top priority.
        let world = if demands.len() == 1 && demands[0].starts_with("Agent.Version") {
            two_os_pools().tune("gpu", |s| s.priority = 50)
        } else {
            two_os_pools()
        };
        let plan = world.pending(1, 0, demands).plan();
        assert_eq!(
            created_for(&plan),
            vec![(s(want), 1)],
            "demands {demands:?}"
        );
    }
}

#[test]
fn higher_priority_wins_and_ties_go_by_name() {
    let world = World::new()
        .pool("b", 5, &[])
        .pool("a", 5, &[])
        .pool("c", 7, &[])
        .pending(1, 0, &[]);
    assert_eq!(created_for(&world.plan()), vec![(s("c"), 1)]);
    let tie = World::new()
        .pool("b", 5, &[])
        .pool("a", 5, &[])
        .pending(1, 0, &[]);
    let plan = tie.plan();
    assert_eq!(created_for(&plan), vec![(s("a"), 1)]);
    let order: Vec<String> = plan
        .pools
        .iter()
        .map(|p| p.agent_pool.to_string())
        .collect();
    assert_eq!(order, vec!["ci/a", "ci/b"]);
}

#[test]
fn spills_over_when_full_or_paused() {
    let world = two_os_pools()
        .tune("linux", |s| s.max_agents = 1)
        .pending(1, 1, &["Agent.OS -equals Linux"])
        .pending(2, 2, &["Agent.OS -equals Linux"])
        .pending(3, 3, &["Agent.OS -equals Linux"]);
    let plan = world.plan();
    assert_eq!(
        created_for(&plan),
        vec![(s("linux"), 1), (s("gpu"), 2), (s("gpu"), 3)]
    );
    let gpu_reason = plan.creates().nth(1).map(Action::reason).unwrap_or("");
    assert!(
        gpu_reason.contains("ci/linux is at maxAgents 1"),
        "{gpu_reason}"
    );
    assert_idempotent(world);

    let paused = two_os_pools().tune("linux", |s| s.paused = true).pending(
        1,
        1,
        &["Agent.OS -equals Linux"],
    );
    let plan = paused.plan();
    assert_eq!(created_for(&plan), vec![(s("gpu"), 1)]);
    assert!(
        plan.creates()
            .all(|a| a.reason().contains("ci/linux is paused"))
    );
}

#[test]
fn capped_when_every_fitting_pool_is_full_or_paused() {
    let world = two_os_pools()
        .tune("linux", |s| s.paused = true)
        .tune("gpu", |s| s.max_agents = 0)
        .pending(1, 1, &["Agent.OS -equals Linux"]);
    let plan = world.plan();
    assert!(plan.actions.is_empty());
    // Attributed to the first pool that fits, with every pool's reason.
    let linux = summary(&plan, "linux");
    assert_eq!(ids(&linux.capped), vec![1]);
    assert!(linux.capped[0].why.contains("ci/linux is paused"));
    assert!(linux.capped[0].why.contains("ci/gpu is at maxAgents 0"));
    assert!(summary(&plan, "gpu").pending.is_empty());
}

#[test]
fn unservable_requests_are_reported_by_every_pool() {
    let world = two_os_pools()
        .pending(1, 1, &["Agent.OS -equals Darwin"])
        .pending(2, 2, &["docker -Equals yes"])
        .pending(3, 3, &["Agent.Version -gtVersion 9.0"])
        .pending(4, 4, &["docker"]);
    let plan = world.plan();
    assert_eq!(created_for(&plan), vec![(s("linux"), 4)]);
    for pool in ["linux", "windows", "gpu"] {
        let summary = summary(&plan, pool);
        assert_eq!(ids(&summary.unservable), vec![1, 2, 3], "{pool}");
    }
    let linux = summary(&plan, "linux");
    assert!(
        linux.unservable[0]
            .why
            .contains("`Agent.OS -equals Darwin`")
    );
    assert!(
        linux.unservable[1].why.contains("\"docker -Equals yes\""),
        "the unparseable text is quoted: {}",
        linux.unservable[1].why
    );
    assert!(
        linux.unservable[2]
            .why
            .contains("Agent.Version -gtVersion 9.0")
    );
    assert_eq!(linux.pending, vec![1, 2, 3, 4]);
}

#[test]
fn agent_version_demands_use_the_pools_agent_version() {
    // The capability map says 1.0, but the agent image is what counts.
    let world = World::new()
        .pool("old", 9, &[("Agent.Version", "9.9.9")])
        .tune("old", |s| s.agent_version = "3.220.0".into())
        .pool("new", 1, &[])
        .tune("new", |s| s.agent_version = "4.255.0".into())
        .pending(1, 0, &["Agent.Version -gtVersion 4.0"])
        .pending(2, 1, &["Agent.Version -gtVersion 3.0"]);
    assert_eq!(
        created_for(&world.plan()),
        vec![(s("new"), 1), (s("old"), 2)]
    );
}

#[test]
fn no_pools_means_no_actions() {
    let world = World::new().pending(1, 0, &[]);
    let plan = world.plan();
    assert!(plan.actions.is_empty());
    assert!(plan.pools.is_empty());
}

// ---------------------------------------------------------------- KEDA's regressions

#[test]
fn keda_7747_a_taken_request_gets_no_duplicate_agent() {
    // Request 1 was received by our agent; 2 is reserved but not yet received; 3 has its Job.
    let world = World::new()
        .pool("linux", 0, &[])
        .running(1, "linux-1-1")
        .job("linux-1-1", "linux", Some(1), 1, 0, JobPhase::Running)
        .running(2, "linux-2-1")
        .job("linux-2-1", "linux", Some(2), 1, 0, JobPhase::Running)
        .pending(3, 5, &[])
        .job("linux-3-1", "linux", Some(3), 1, 900, JobPhase::Starting);
    let mut world = world;
    world.request_mut(2).receive_time = None;
    let plan = world.plan();
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    let linux = summary(&plan, "linux");
    assert_eq!(linux.matched, vec![3]);
    assert_eq!(
        linux.agents,
        AgentCounts {
            starting: 1,
            idle: 0,
            busy: 2
        }
    );
}

#[test]
fn keda_7747_the_same_request_never_gets_a_second_job_across_polls() {
    let mut world = World::new().pool("linux", 0, &[]).pending(1, 0, &[]);
    let first = world.plan();
    assert_eq!(creates(&first).len(), 1);
    world.apply(&first);
    for phase in [JobPhase::Starting, JobPhase::Running] {
        world.cluster.jobs[0].phase = phase;
        assert!(world.plan().actions.is_empty(), "{phase:?}");
    }
}

#[test]
fn keda_7878_busy_agents_do_not_reduce_new_agents() {
    let world = World::new()
        .pool("linux", 0, &[])
        .running(1, "linux-1-1")
        .job("linux-1-1", "linux", Some(1), 1, 0, JobPhase::Running)
        .running(2, "linux-2-1")
        .job("linux-2-1", "linux", Some(2), 1, 0, JobPhase::Running)
        // Busy by ADO's agent list only (assignedRequest), not yet in the requests read.
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running)
        .ado_agent(77, "linux-standby-0", |a| a.assigned_request = Some(99))
        .pending(3, 5, &[])
        .pending(4, 6, &[]);
    let plan = world.plan();
    assert_eq!(created_for(&plan), vec![(s("linux"), 3), (s("linux"), 4)]);
    assert!(removed(&plan).is_empty());
    assert_eq!(summary(&plan, "linux").agents.busy, 3);
    assert_idempotent(world);
}

// ---------------------------------------------------------------- matching over the ADO pool

#[test]
fn an_agent_started_for_one_request_may_serve_another() {
    // Request 1 was cancelled; its agent is free and request 2 can use it.
    let world = World::new()
        .pool("linux", 0, &[])
        .job("linux-1-1", "linux", Some(1), 1, 900, JobPhase::Starting)
        .pending(2, 5, &[]);
    let plan = world.plan();
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    assert_eq!(summary(&plan, "linux").matched, vec![2]);
}

#[test]
fn each_request_keeps_its_own_agent_first() {
    // 1 and 2 pending, 2 has its own agent: only 1 gets a new one (no second Job for 2).
    let world = World::new()
        .pool("linux", 0, &[])
        .pending(1, 1, &[])
        .pending(2, 2, &[])
        .job("linux-2-1", "linux", Some(2), 1, 900, JobPhase::Starting);
    assert_eq!(created_for(&world.plan()), vec![(s("linux"), 1)]);
    assert_idempotent(world);
}

#[test]
fn attempt_two_when_the_first_agent_took_another_request() {
    // ADO gave request 2 to the agent started for request 1; request 1 still waits.
    let world = World::new()
        .pool("linux", 0, &[])
        .pending(1, 1, &[])
        .running(2, "linux-1-1")
        .job("linux-1-1", "linux", Some(1), 1, 900, JobPhase::Running);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![(s("linux"), s("linux-1-2"), Some(1), 2)]
    );
    assert!(plan.creates().all(|a| a.reason().contains("attempt 2")));
    assert_idempotent(world);
}

#[test]
fn attempt_numbers_never_go_back_even_when_old_jobs_are_gone() {
    // Only attempt 3 is still known (1 and 2 expired); it finished without serving request 1.
    let world = World::new().pool("linux", 0, &[]).pending(1, 1, &[]).job(
        "linux-1-3",
        "linux",
        Some(1),
        3,
        100,
        JobPhase::Finished,
    );
    assert_eq!(
        creates(&world.plan()),
        vec![(s("linux"), s("linux-1-4"), Some(1), 4)]
    );
}

#[test]
fn matching_is_maximal_across_pools() {
    // One free Linux agent and one free GPU agent. The first request fits both, the second only
    // the GPU pool: a greedy match would waste the GPU agent on the first and create one more.
    let world = two_os_pools()
        .job("gpu-standby-0", "gpu", None, 1, 0, JobPhase::Running)
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running)
        .tune("gpu", |s| s.priority = 20)
        .pending(1, 1, &["Agent.OS -equals Linux"])
        .pending(2, 2, &["gpu"]);
    let plan = world.plan();
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    assert_eq!(summary(&plan, "linux").matched, vec![1]);
    assert_eq!(summary(&plan, "gpu").matched, vec![2]);
}

#[test]
fn a_full_pool_is_relieved_by_moving_a_flexible_request_elsewhere() {
    // The GPU pool is at maxAgents with one free agent. Request 1 runs anywhere on Linux, request
    // 2 needs the GPU. The GPU agent is left for 2 and the new agent is made for 1 in the Linux
    // pool, instead of capping 2.
    let world = World::new()
        .pool("linux", 1, &[("Agent.OS", "Linux")])
        .pool("gpu", 5, &[("Agent.OS", "Linux"), ("gpu", "a100")])
        .tune("gpu", |s| s.max_agents = 1)
        .job("gpu-standby-0", "gpu", None, 1, 900, JobPhase::Running)
        .pending(1, 1, &["Agent.OS -equals Linux"])
        .pending(2, 2, &["gpu"]);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![(s("linux"), s("linux-1-1"), Some(1), 1)]
    );
    assert_eq!(summary(&plan, "gpu").matched, vec![2]);
    assert!(summary(&plan, "gpu").capped.is_empty());
    assert_idempotent(world);
}

#[test]
fn agents_of_paused_pools_still_serve_requests() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.paused = true)
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running)
        .pending(1, 1, &[]);
    let plan = world.plan();
    assert!(plan.actions.is_empty());
    assert_eq!(summary(&plan, "linux").matched, vec![1]);
}

// ---------------------------------------------------------------- standby (minIdle)

#[test]
fn min_idle_keeps_standby_agents() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.min_idle = 2);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![
            (s("linux"), s("linux-standby-0"), None, 1),
            (s("linux"), s("linux-standby-1"), None, 1),
        ]
    );
    assert_idempotent(world);
}

#[test]
fn a_standby_that_took_a_request_is_replaced() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.min_idle = 1)
        .running(5, "linux-standby-0")
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![(s("linux"), s("linux-standby-1"), None, 1)]
    );
    assert_idempotent(world);
}

#[test]
fn a_standby_about_to_take_a_request_is_replaced_at_once() {
    // The pending request will go to the idle standby: make the next standby now, and no agent
    // for the request itself.
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.min_idle = 1)
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running)
        .pending(1, 1, &[]);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![(s("linux"), s("linux-standby-1"), None, 1)]
    );
    assert_eq!(summary(&plan, "linux").matched, vec![1]);
    assert_idempotent(world);
}

#[test]
fn standby_respects_max_agents_and_requests_come_first() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| {
            s.min_idle = 3;
            s.max_agents = 2
        })
        .pending(1, 1, &[]);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![
            (s("linux"), s("linux-1-1"), Some(1), 1),
            (s("linux"), s("linux-standby-0"), None, 1),
        ]
    );
    assert!(
        summary(&plan, "linux")
            .reasons
            .iter()
            .any(|r| r.contains("2 standby agents short"))
    );
    assert_idempotent(world);
}

#[test]
fn standby_and_priorities_reach_a_fixed_point() {
    // A request fitting both pools takes the high-priority pool's only agent; both pools want a
    // standby. Planning again after applying must neither create nor remove anything.
    let world = World::new()
        .pool("fast", 10, &[])
        .tune("fast", |s| s.min_idle = 1)
        .pool("slow", 1, &[])
        .tune("slow", |s| s.min_idle = 1)
        .job("slow-standby-0", "slow", None, 1, 0, JobPhase::Running)
        .job("fast-standby-0", "fast", None, 1, 0, JobPhase::Running)
        .pending(1, 1, &[])
        .pending(2, 2, &[]);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![
            (s("fast"), s("fast-standby-1"), None, 1),
            (s("slow"), s("slow-standby-1"), None, 1),
        ]
    );
    assert_idempotent(world);
}

// ---------------------------------------------------------------- removal

#[test]
fn surplus_unclaimed_agents_are_removed_registered_and_oldest_first() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.min_idle = 1)
        .job("linux-a", "linux", None, 1, 300, JobPhase::Running)
        .job("linux-b", "linux", None, 1, 100, JobPhase::Running)
        .job("linux-c", "linux", None, 1, 900, JobPhase::Starting)
        .job("linux-d", "linux", None, 1, 200, JobPhase::Running)
        .pending(1, 1, &[]);
    let plan = world.plan();
    // 4 unclaimed, 1 pending + minIdle 1 → 2 surplus: the two oldest registered ones (the
    // starting one is younger than its timeout and stays).
    assert_eq!(removed(&plan), vec![s("linux-b"), s("linux-d")]);
    assert!(creates(&plan).is_empty());
    assert_idempotent(world);
}

#[test]
fn a_busy_agent_is_never_removed() {
    // Every flavour of "holds a request", with nothing pending and minIdle 0.
    let world = World::new()
        .pool("linux", 0, &[])
        .running(1, "linux-reserved")
        .job("linux-reserved", "linux", Some(1), 1, 0, JobPhase::Running)
        .job("linux-assigned", "linux", None, 1, 0, JobPhase::Running)
        .ado_agent(2, "linux-assigned", |a| a.assigned_request = Some(2))
        // Its request finished but the run-once agent is still exiting.
        .running(3, "LINUX-DONE")
        .job("linux-done", "linux", Some(3), 1, 0, JobPhase::Running)
        // Disabled while it holds a request (an interrupted removal that found work).
        .job(
            "linux-disabled-busy",
            "linux",
            None,
            1,
            0,
            JobPhase::Running,
        )
        .ado_agent(4, "linux-disabled-busy", |a| {
            a.enabled = false;
            a.assigned_request = Some(4)
        });
    let mut world = world;
    let done = world.request_mut(3);
    done.result = Some("succeeded".into());
    done.finish_time = Some(t(500));
    let plan = world.plan();
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
    assert_eq!(summary(&plan, "linux").agents.busy, 4);
}

#[test]
fn a_stuck_busy_agent_is_not_replaced() {
    // Starting long ago but ADO already reserved it: it is busy, not stuck.
    let world = World::new()
        .pool("linux", 0, &[])
        .running(1, "linux-1-1")
        .job("linux-1-1", "linux", Some(1), 1, 0, JobPhase::Starting);
    assert!(world.plan().actions.is_empty());
}

#[test]
fn paused_pools_remove_nothing() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.paused = true)
        .job("linux-a", "linux", None, 1, 0, JobPhase::Running)
        .job("linux-b", "linux", None, 1, 0, JobPhase::Starting);
    assert!(world.plan().actions.is_empty());
}

#[test]
fn a_paused_pools_stuck_agent_is_neither_supply_nor_replaced() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.paused = true)
        .pool("other", 0, &[])
        .job("linux-1-1", "linux", Some(1), 1, 0, JobPhase::Starting)
        .pending(1, 1, &[])
        .pending(2, 2, &[]);
    let plan = world.plan();
    // Request 1 keeps its (stuck) Job: no second one. Request 2 cannot count on the stuck agent.
    assert!(replaced(&plan).is_empty());
    assert_eq!(created_for(&plan), vec![(s("other"), 2)]);
    let linux = summary(&plan, "linux");
    assert_eq!(ids(&linux.capped), vec![1]);
    assert!(
        linux.capped[0]
            .why
            .contains("already has an unfinished agent Job")
    );
}

#[test]
fn a_request_listed_twice_counts_once() {
    let world = World::new()
        .pool("linux", 0, &[])
        .pending(1, 5, &[])
        .pending(2, 6, &[])
        .pending(1, 7, &[]);
    assert_eq!(
        created_for(&world.plan()),
        vec![(s("linux"), 1), (s("linux"), 2)]
    );
}

#[test]
fn a_disabled_idle_agent_finishes_its_removal() {
    let world = World::new()
        .pool("linux", 0, &[])
        .tune("linux", |s| s.min_idle = 1)
        .job("linux-standby-0", "linux", None, 1, 0, JobPhase::Running)
        .ado_agent(7, "linux-standby-0", |a| a.enabled = false);
    let plan = world.plan();
    assert_eq!(removed(&plan), vec![s("linux-standby-0")]);
    assert!(matches!(
        plan.actions.first(),
        Some(Action::RemoveIdleAgent {
            agent_id: Some(7),
            ..
        })
    ));
    // It is not counted as standby, so a new one is made.
    assert_eq!(
        creates(&plan),
        vec![(s("linux"), s("linux-standby-1"), None, 1)]
    );
}

#[test]
fn jobs_of_unknown_pools_are_left_alone() {
    let world = World::new()
        .pool("linux", 0, &[])
        .job("gone-1-1", "gone", Some(1), 1, 0, JobPhase::Running)
        .job("gone-standby-0", "gone", None, 1, 0, JobPhase::Starting);
    assert!(world.plan().actions.is_empty());
}

// ---------------------------------------------------------------- stuck agents and backoff

#[test]
fn a_stuck_starting_agent_is_replaced_then_retried() {
    let mut world = World::new()
        .pool("linux", 0, &[])
        .pending(1, 1, &[])
        // Created at 600: 400 s old at now=1000, timeout 300 s.
        .job("linux-1-1", "linux", Some(1), 1, 600, JobPhase::Starting)
        .ado_agent(31, "linux-1-1", |a| a.status = AgentStatus::Offline);
    let plan = world.plan();
    assert_eq!(replaced(&plan), vec![s("linux-1-1")]);
    assert!(matches!(
        plan.actions.first(),
        Some(Action::ReplaceStuckAgent {
            agent_id: Some(31),
            for_request: Some(1),
            ..
        })
    ));
    assert!(plan.actions[0].reason().contains("never started"));
    // No second unfinished Job for request 1 while the stuck one still exists.
    assert!(creates(&plan).is_empty());
    assert_eq!(ids(&summary(&plan, "linux").capped), vec![1]);

    world.apply(&plan);
    let next = world.plan();
    assert_eq!(
        creates(&next),
        vec![(s("linux"), s("linux-1-2"), Some(1), 2)]
    );
}

#[test]
fn a_young_or_registered_agent_is_not_stuck() {
    let table = [
        // (created, phase, online in ADO)
        (800, JobPhase::Starting, false), // 200 s < 300 s
        (0, JobPhase::Running, false),
        (0, JobPhase::Starting, true), // registered: ADO says online
    ];
    for (created, phase, online) in table {
        let mut world = World::new().pool("linux", 0, &[]).pending(1, 1, &[]).job(
            "linux-1-1",
            "linux",
            Some(1),
            1,
            created,
            phase,
        );
        if online {
            world = world.ado_agent(1, "linux-1-1", |_| {});
        }
        let plan = world.plan();
        assert!(
            plan.actions.is_empty(),
            "{created} {phase:?}: {:#?}",
            plan.actions
        );
    }
}

#[test]
fn failures_extend_the_startup_deadline() {
    // 400 s old, timeout 300 s: stuck with no failures, not yet with 3 (backoff 120 s → 420 s).
    let world = |failures: u32| {
        let mut world = World::new()
            .pool("linux", 0, &[])
            .tune("linux", |s| s.min_idle = 1)
            .job("linux-standby-0", "linux", None, 1, 600, JobPhase::Starting);
        world
            .cluster
            .startup_failures
            .insert(pref("linux").to_string(), failures);
        world
    };
    assert_eq!(replaced(&world(0).plan()), vec![s("linux-standby-0")]);
    assert!(world(3).plan().actions.is_empty());
}

#[test]
fn retries_back_off_after_failed_starts_and_spill_over() {
    let mut world = World::new()
        .pool("linux", 5, &[])
        .pool("spare", 1, &[])
        .pending(1, 1, &[])
        // The first attempt failed 20 s ago.
        .job("linux-1-1", "linux", Some(1), 1, 980, JobPhase::Finished);
    world
        .cluster
        .startup_failures
        .insert(pref("linux").to_string(), 1);
    let plan = world.plan();
    assert_eq!(
        creates(&plan),
        vec![(s("spare"), s("spare-1-2"), Some(1), 2)]
    );
    assert!(plan.actions[0].reason().contains("backs off 30s"));

    let mut only_linux = world.clone();
    only_linux.specs.retain(|s| s.agent_pool.name == "linux");
    let plan = only_linux.plan();
    assert!(plan.actions.is_empty());
    assert!(summary(&plan, "linux").capped[0].why.contains("backs off"));
}

// ---------------------------------------------------------------- determinism, idempotence, report

#[test]
fn input_order_does_not_matter() {
    let world = two_os_pools()
        .tune("linux", |s| {
            s.min_idle = 1;
            s.max_agents = 3
        })
        .running(50, "linux-50-1")
        .job("linux-50-1", "linux", Some(50), 1, 0, JobPhase::Running)
        .job("gpu-standby-0", "gpu", None, 1, 0, JobPhase::Running)
        .job("linux-old", "linux", None, 1, 10, JobPhase::Running)
        .pending(1, 1, &["Agent.OS -equals Linux"])
        .pending(2, 2, &["gpu"])
        .pending(3, 3, &["docker"])
        .pending(4, 4, &["Agent.OS -equals Windows_NT"])
        .pending(5, 5, &["bogus -op x"])
        .pending(6, 6, &["Agent.OS -equals Linux"]);
    let expected = world.plan();
    let mut reversed = world.clone();
    reversed.ado.requests.reverse();
    reversed.cluster.jobs.reverse();
    reversed.specs.reverse();
    assert_eq!(reversed.plan(), expected);
    let mut rotated = world.clone();
    rotated.ado.requests.rotate_left(3);
    rotated.cluster.jobs.rotate_left(1);
    rotated.specs.rotate_left(1);
    assert_eq!(rotated.plan(), expected);
    assert_idempotent(world);
}

#[test]
fn actions_come_in_apply_order() {
    let world = World::new()
        .pool("linux", 0, &[])
        .pool("gpu", 0, &[("gpu", "a100")])
        .job("linux-stuck", "linux", None, 1, 0, JobPhase::Starting)
        .job("linux-x", "linux", None, 1, 900, JobPhase::Running)
        .job("linux-y", "linux", None, 1, 901, JobPhase::Running)
        .pending(1, 1, &["nothing-offers-this"])
        .pending(2, 2, &["gpu"]);
    let plan = world.plan();
    let kinds: Vec<&str> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::ReplaceStuckAgent { .. } => "replace",
            Action::RemoveIdleAgent { .. } => "remove",
            Action::CreateAgent { .. } => "create",
        })
        .collect();
    assert_eq!(kinds, vec!["replace", "remove", "remove", "create"]);
    assert_eq!(replaced(&plan), vec![s("linux-stuck")]);
    assert_eq!(removed(&plan), vec![s("linux-x"), s("linux-y")]);
    assert_eq!(created_for(&plan), vec![(s("gpu"), 2)]);
}

#[test]
fn report_has_the_cli_shape() {
    let world = two_os_pools()
        .tune("windows", |s| s.max_agents = 0)
        .running(9, "linux-9-1")
        .job("linux-9-1", "linux", Some(9), 1, 0, JobPhase::Running)
        .pending(1, 1, &["docker"])
        .pending(2, 2, &["Agent.OS -equals Windows_NT"])
        .pending(3, 3, &["cobol"]);
    let json = serde_json::to_value(report(&world.plan())).expect("serializes");
    let pools = json["pools"].as_array().expect("pools array");
    assert_eq!(pools.len(), 3);
    let linux = &pools[0];
    let keys: BTreeSet<&str> = linux
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "agentPool",
            "adoPool",
            "pending",
            "capped",
            "unservable",
            "agents",
            "create",
            "reasons"
        ])
    );
    assert_eq!(linux["agentPool"], "ci/linux");
    assert_eq!(linux["adoPool"], "builds");
    assert_eq!(linux["pending"], serde_json::json!([1, 3]));
    assert_eq!(linux["capped"], serde_json::json!([]));
    assert_eq!(linux["unservable"], serde_json::json!([3]));
    assert_eq!(
        linux["agents"],
        serde_json::json!({"starting": 0, "idle": 0, "busy": 1})
    );
    assert_eq!(linux["create"], 1);
    assert!(linux["reasons"].as_array().is_some_and(|r| !r.is_empty()));
    let windows = &pools[1];
    assert_eq!(windows["agentPool"], "ci/windows");
    assert_eq!(windows["capped"], serde_json::json!([2]));
    assert_eq!(windows["create"], 0);
}

#[test]
fn job_names_are_dns_labels_within_52() {
    let long = "a-very-long-agentpool-name-that-goes-on-and-on-and-on";
    let world = World::new()
        .pool(long, 0, &[])
        .tune(long, |s| s.min_idle = 1)
        .pending(i64::MAX, 0, &[]);
    let plan = world.plan();
    assert_eq!(plan.creates().count(), 2);
    for action in plan.creates() {
        let name = action.job_name();
        assert!(name.len() <= names::MAX_JOB_NAME_LEN, "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
    }
    assert_idempotent(world);
}

// ---------------------------------------------------------------- invariants over generated worlds

/// A small deterministic generator (xorshift64*), so failures reproduce from the seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn generated_world(seed: u64) -> World {
    let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let pool_names = ["linux", "gpu", "win"];
    let caps: [&[(&str, &str)]; 3] = [
        &[("Agent.OS", "Linux"), ("docker", "")],
        &[("Agent.OS", "Linux"), ("gpu", "a100")],
        &[("Agent.OS", "Windows_NT")],
    ];
    let mut world = World::new();
    for (i, name) in pool_names.iter().enumerate() {
        if g.below(4) == 0 {
            continue;
        }
        world = world.pool(name, g.below(3) as i32, caps[i]);
        let (min_idle, max_agents, paused) =
            (g.below(3) as u32, g.below(8) as u32, g.below(6) == 0);
        world = world.tune(name, |s| {
            s.min_idle = min_idle;
            s.max_agents = max_agents;
            s.paused = paused;
        });
    }
    let demands: [&[&str]; 6] = [
        &[],
        &["docker"],
        &["gpu", "Agent.OS -equals linux"],
        &["Agent.OS -equals Windows_NT"],
        &["Agent.Version -gtVersion 4.0"],
        &["cobol"],
    ];
    let phases = [JobPhase::Starting, JobPhase::Running, JobPhase::Finished];
    let mut next_id = 1;
    for _ in 0..g.below(12) {
        let chosen: &[&str] = demands[g.below(demands.len() as u64) as usize];
        world = world.pending(next_id, g.below(50) as i64, chosen);
        next_id += 1;
    }
    for k in 0..g.below(10) {
        let pool = *g.pick(&pool_names);
        let for_request = match g.below(3) {
            0 => None,
            _ => Some(1 + g.below(next_id as u64 + 2) as i64),
        };
        let name = format!("{pool}-gen-{k}");
        let phase = *g.pick(&phases);
        world = world.job(
            &name,
            pool,
            for_request,
            1 + g.below(2) as u32,
            g.below(1000) as i64,
            phase,
        );
        match g.below(4) {
            0 => world = world.running(100 + k as i64, &name),
            1 => {
                world = world.ado_agent(500 + k as i64, &name, |a| {
                    a.enabled = k % 3 != 0;
                    a.assigned_request = (k % 2 == 0).then_some(700 + k as i64);
                })
            }
            _ => {}
        }
    }
    if g.below(3) == 0 {
        world = world.parallel(g.below(6) as u32, g.below(4) as u32);
    }
    for name in pool_names {
        if g.below(4) == 0 {
            let failures = 1 + g.below(5) as u32;
            world
                .cluster
                .startup_failures
                .insert(pref(name).to_string(), failures);
        }
    }
    world
}

fn busy_jobs(world: &World) -> BTreeSet<String> {
    let reserved: BTreeSet<String> = world
        .ado
        .requests
        .iter()
        .filter_map(|r| r.reserved_agent.as_ref().map(|a| a.name.to_lowercase()))
        .collect();
    world
        .cluster
        .jobs
        .iter()
        .filter(|j| {
            reserved.contains(&j.agent_name.to_lowercase())
                || world.ado.agents.iter().any(|a| {
                    a.name.eq_ignore_ascii_case(&j.agent_name) && a.assigned_request.is_some()
                })
        })
        .map(|j| j.name.clone())
        .collect()
}

fn check_invariants(seed: u64, world: &World, plan: &Plan) {
    let busy = busy_jobs(world);
    let spec = |pool: &PoolRef| world.specs.iter().find(|s| &s.agent_pool == pool);
    let mut names: BTreeSet<(String, String)> = world
        .cluster
        .jobs
        .iter()
        .map(|j| (j.agent_pool.namespace.clone(), j.name.clone()))
        .collect();
    let mut new_per_pool: BTreeMap<PoolRef, u32> = BTreeMap::new();
    for action in &plan.actions {
        let pool = spec(action.agent_pool()).expect("actions only for given AgentPools");
        assert!(
            !pool.paused,
            "seed {seed}: action in a paused pool: {action:?}"
        );
        match action {
            Action::RemoveIdleAgent { job_name, .. }
            | Action::ReplaceStuckAgent { job_name, .. } => {
                assert!(
                    !busy.contains(job_name),
                    "seed {seed}: busy agent removed: {action:?}"
                );
            }
            Action::CreateAgent {
                agent_pool,
                job_name,
                for_request,
                ..
            } => {
                assert!(
                    names.insert((agent_pool.namespace.clone(), job_name.clone())),
                    "seed {seed}: Job name reused: {job_name}"
                );
                assert!(job_name.len() <= names::MAX_JOB_NAME_LEN);
                *new_per_pool.entry(agent_pool.clone()).or_default() += 1;
                if let Some(id) = for_request {
                    let request = world
                        .ado
                        .requests
                        .iter()
                        .find(|r| r.id == *id)
                        .expect("known request");
                    assert!(
                        request.is_pending(),
                        "seed {seed}: agent for a request that is not pending"
                    );
                    let caps: Capabilities = pool
                        .capabilities
                        .iter()
                        .chain([(&"Agent.Version".to_owned(), &pool.agent_version)])
                        .collect();
                    for demand in &request.demands {
                        let demand = Demand::parse(demand).expect("servable demands parse");
                        assert!(
                            demand.is_satisfied_by(&caps),
                            "seed {seed}: {demand} unmet in {agent_pool}"
                        );
                    }
                    let second = world.cluster.jobs.iter().any(|j| {
                        j.for_request == Some(*id)
                            && j.phase != JobPhase::Finished
                            && !busy.contains(&j.name)
                    });
                    assert!(
                        !second,
                        "seed {seed}: second unfinished Job for request {id}"
                    );
                }
            }
        }
    }
    // No churn: an agent removed as surplus could not have served anything created for.
    let can_serve = |pool: &AgentPoolSpec, request: &JobRequest| {
        let caps: Capabilities = pool
            .capabilities
            .iter()
            .chain([(&"Agent.Version".to_owned(), &pool.agent_version)])
            .collect();
        request
            .demands
            .iter()
            .all(|d| Demand::parse(d).is_ok_and(|d| d.is_satisfied_by(&caps)))
    };
    for removal in &plan.actions {
        let Action::RemoveIdleAgent {
            agent_pool, reason, ..
        } = removal
        else {
            continue;
        };
        if !reason.starts_with("surplus") {
            continue;
        }
        let from = spec(agent_pool).expect("known pool");
        for create in plan.creates() {
            let Action::CreateAgent {
                agent_pool: to,
                for_request,
                ..
            } = create
            else {
                continue;
            };
            assert!(
                to != agent_pool,
                "seed {seed}: {to} creates and removes surplus at once"
            );
            if let Some(id) = for_request {
                let request = world
                    .ado
                    .requests
                    .iter()
                    .find(|r| r.id == *id)
                    .expect("known");
                assert!(
                    !can_serve(from, request),
                    "seed {seed}: removes {removal:?} yet creates for request {id}"
                );
            }
        }
    }
    for (pool, new) in new_per_pool {
        let max = spec(&pool).map_or(0, |s| s.max_agents);
        let unfinished = world
            .cluster
            .jobs
            .iter()
            .filter(|j| j.agent_pool == pool && j.phase != JobPhase::Finished)
            .count() as u32;
        assert!(
            unfinished + new <= max,
            "seed {seed}: {pool} over maxAgents {max}"
        );
    }
}

#[test]
fn generated_worlds_keep_the_invariants_and_settle() {
    for seed in 0..2000 {
        let mut world = generated_world(seed);
        let first = world.plan();
        check_invariants(seed, &world, &first);

        let mut shuffled = world.clone();
        shuffled.ado.requests.reverse();
        shuffled.cluster.jobs.reverse();
        shuffled.ado.agents.reverse();
        assert_eq!(
            shuffled.plan(),
            first,
            "seed {seed}: input order changed the plan"
        );

        // Creating is idempotent: when nothing was removed or replaced, the next plan is empty.
        // (With a startup backoff running, a request held back by it may take a new standby
        // agent, which is then replaced one poll later: that is the settling below.)
        let only_creates = first
            .actions
            .iter()
            .all(|a| matches!(a, Action::CreateAgent { .. }));
        if only_creates && world.cluster.startup_failures.is_empty() {
            let mut after = world.clone();
            after.apply(&first);
            let second = after.plan();
            assert!(
                second.actions.is_empty(),
                "seed {seed}: after {:#?}\nstill {:#?}",
                first.actions,
                second.actions
            );
        }

        // Otherwise it settles one poll later (a stuck or removed agent's request gets its new
        // Job once the old one is gone).
        let mut plan = first;
        let mut rounds = 0;
        while !plan.actions.is_empty() {
            rounds += 1;
            assert!(
                rounds <= 3,
                "seed {seed}: no fixed point, still {:#?}",
                plan.actions
            );
            world.apply(&plan);
            plan = world.plan();
            check_invariants(seed, &world, &plan);
        }
    }
}
