//! ADO-side cleanup: which of *our* agents are left behind by an agent Job that is gone or finished
//! (OOM kill, eviction, node loss, failed deregistration, a pod killed during `config.sh`), and when
//! they may be deleted. Pure: the controller passes what it read, the time, and what it remembers
//! from earlier polls (when each orphan was first seen), and gets back what to delete and what to
//! remember.
//!
//! # Rules
//!
//! An agent of the ADO pool is an **orphan** when all of these hold:
//!
//! - its owner capability names *this* cluster and one of the given AgentPools (`scope.owners`):
//!   a foreign agent (another cluster, another controller, no owner capability) is never touched;
//! - it is not a placeholder (placeholder capability `true`, or a placeholder name);
//! - it holds no request: no `assignedRequest`, and no unfinished request names it as
//!   `reservedAgent` (a finished request that named it is the one job a run-once agent ran);
//! - no unfinished agent Job runs it (none with its agent name; a Job being deleted is finished).
//!
//! ADO's online flag is not a condition: ADO notices a dead listener only minutes after its pod
//! died, and an agent with no unfinished Job has no process of ours behind it.
//!
//! An orphan is deleted once it has been an orphan in every poll for `grace` (so a pod that is
//! still deregistering, or a Job the cache has not shown yet, is left alone). Orphans of a paused
//! AgentPool are kept (a paused AgentPool removes nothing) and their clock is not started. The
//! controller calls this only after a successful ADO read (a failed poll takes no destructive
//! action) and re-checks each agent right before deleting it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::model::{AdoSnapshot, Agent, AgentId, ClusterSnapshot, JobPhase, PoolRef};

/// Which agents are ours, and how to recognise a placeholder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerScope {
    /// The owner capability's name (compared case-insensitively, as ADO does).
    pub owner_capability: String,
    /// Owner capability value → the AgentPool it names, for every AgentPool cleanup may act for
    /// (values compared exactly: they carry the cluster id).
    pub owners: BTreeMap<String, PoolRef>,
    /// AgentPools that are paused: their orphans are kept.
    pub paused: BTreeSet<PoolRef>,
    /// The capability that marks a placeholder (value `true`).
    pub placeholder_capability: String,
    /// Names of our placeholders (compared case-insensitively).
    pub placeholder_names: BTreeSet<String>,
    /// AgentPools with `registration: controller`: their pods cannot deregister (they hold no
    /// identity), so the controller does it as soon as the agent's Job is finished, without grace.
    pub controller_registered: BTreeSet<PoolRef>,
}

/// One agent to delete from ADO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanAgent {
    pub agent_pool: PoolRef,
    pub agent_id: AgentId,
    pub agent_name: String,
    /// When it was first seen as an orphan.
    pub since: Timestamp,
    pub reason: String,
}

/// What [`cleanup`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Orphans past their grace period: delete them (after a fresh re-check).
    pub remove: Vec<OrphanAgent>,
    /// Every current orphan with the time it was first seen: pass it back in the next poll.
    pub orphan_since: BTreeMap<AgentId, Timestamp>,
}

/// The AgentPool whose owner capability this agent carries, if it is one of `scope`'s.
fn owner<'a>(agent: &Agent, scope: &'a OwnerScope) -> Option<&'a PoolRef> {
    let value = agent
        .capabilities
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&scope.owner_capability))
        .map(|(_, v)| v)?;
    scope.owners.get(value)
}

fn is_placeholder(agent: &Agent, scope: &OwnerScope) -> bool {
    let marked = agent.capabilities.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case(&scope.placeholder_capability) && v.eq_ignore_ascii_case("true")
    });
    marked
        || scope
            .placeholder_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&agent.name))
}

/// Decides which of our agents are orphans and which of them to delete now. `seen_since` is the
/// previous call's [`Cleanup::orphan_since`] (empty after a restart: the grace starts again).
pub fn cleanup(
    ado: &AdoSnapshot,
    cluster: &ClusterSnapshot,
    scope: &OwnerScope,
    seen_since: &BTreeMap<AgentId, Timestamp>,
    now: Timestamp,
    grace: SignedDuration,
) -> Cleanup {
    let reserved: HashSet<String> = ado
        .requests
        .iter()
        .filter(|r| r.finish_time.is_none() && r.result.is_none())
        .filter_map(|r| r.reserved_agent.as_ref())
        .flat_map(|a| [format!("id:{}", a.id), a.name.to_lowercase()])
        .collect();
    let running: HashSet<String> = cluster
        .jobs
        .iter()
        .filter(|j| j.phase != JobPhase::Finished)
        .map(|j| j.agent_name.to_lowercase())
        .collect();
    let finished_job: BTreeMap<String, &str> = cluster
        .jobs
        .iter()
        .filter(|j| j.phase == JobPhase::Finished)
        .map(|j| (j.agent_name.to_lowercase(), j.name.as_str()))
        .collect();

    let mut out = Cleanup::default();
    let mut agents: Vec<&Agent> = ado.agents.iter().collect();
    agents.sort_by_key(|a| a.id);
    for agent in agents {
        let Some(pool) = owner(agent, scope) else {
            continue;
        };
        let name = agent.name.to_lowercase();
        if is_placeholder(agent, scope)
            || scope.paused.contains(pool)
            || agent.assigned_request.is_some()
            || reserved.contains(&name)
            || reserved.contains(&format!("id:{}", agent.id))
            || running.contains(&name)
        {
            continue;
        }
        let since = seen_since.get(&agent.id).copied().unwrap_or(now).min(now);
        out.orphan_since.insert(agent.id, since);
        let age = now.duration_since(since);
        // A finished Job runs no process any more, and a controller-registered agent has nobody else
        // to deregister it: no reason to wait.
        let deregister_now =
            scope.controller_registered.contains(pool) && finished_job.contains_key(&name);
        if age < grace && !deregister_now {
            continue;
        }
        let why = match finished_job.get(&name) {
            Some(job) if deregister_now => format!(
                "its agent Job {job} finished and the controller registered it (registration: controller)"
            ),
            Some(job) => format!("its agent Job {job} finished"),
            None => "no agent Job of ours runs it (gone, or it never had one)".to_owned(),
        };
        out.remove.push(OrphanAgent {
            agent_pool: pool.clone(),
            agent_id: agent.id,
            agent_name: agent.name.clone(),
            since,
            reason: format!(
                "agent {} of {pool} holds no request and {why}; left behind for {}s (grace {}s): deleting it from ADO",
                agent.name,
                age.as_secs(),
                grace.as_secs()
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::{AgentJob, AgentRef, AgentStatus, JobRequest};

    const OWNER: &str = "azp-autoscaler.owner";
    const PLACEHOLDER: &str = "azp-autoscaler.placeholder";

    fn t(s: &str) -> Timestamp {
        format!("2026-11-26T12:{s}Z").parse().unwrap()
    }

    fn linux() -> PoolRef {
        PoolRef::new("ci", "linux")
    }

    fn scope() -> OwnerScope {
        OwnerScope {
            owner_capability: OWNER.into(),
            owners: BTreeMap::from([
                ("c1/ci/linux".to_owned(), linux()),
                ("c1/ci/paused".to_owned(), PoolRef::new("ci", "paused")),
            ]),
            paused: BTreeSet::from([PoolRef::new("ci", "paused")]),
            placeholder_capability: PLACEHOLDER.into(),
            placeholder_names: BTreeSet::from(["azp-placeholder-ci-linux-0123456789".to_owned()]),
            controller_registered: BTreeSet::new(),
        }
    }

    fn agent(id: AgentId, name: &str, owner: Option<&str>) -> Agent {
        Agent {
            id,
            name: name.into(),
            status: AgentStatus::Offline,
            enabled: true,
            capabilities: owner
                .map(|o| BTreeMap::from([(OWNER.to_owned(), o.to_owned())]))
                .unwrap_or_default(),
            assigned_request: None,
        }
    }

    fn job(agent_name: &str, phase: JobPhase) -> AgentJob {
        AgentJob {
            name: agent_name.trim_end_matches("-abcd").to_owned(),
            agent_pool: linux(),
            agent_name: agent_name.into(),
            for_request: Some(1),
            attempt: 1,
            created: t("00:00"),
            phase,
            pod_started: true,
        }
    }

    fn request(id: i64, reserved: Option<(AgentId, &str)>, finished: bool) -> JobRequest {
        JobRequest {
            id,
            queue_time: Some(t("00:00")),
            assign_time: reserved.map(|_| t("00:01")),
            receive_time: None,
            finish_time: finished.then(|| t("00:05")),
            result: finished.then(|| "succeeded".to_owned()),
            demands: vec![],
            reserved_agent: reserved.map(|(id, name)| AgentRef {
                id,
                name: name.into(),
            }),
            parallelism_tag: None,
        }
    }

    /// One agent in one situation → whether it is an orphan at all, and whether it is deleted
    /// when first seen at 12:00 and planned at 12:01:30 with a grace of 60 s.
    #[test]
    fn who_is_an_orphan_and_when_it_goes() {
        struct Case {
            what: &'static str,
            agent: Agent,
            jobs: Vec<AgentJob>,
            requests: Vec<JobRequest>,
            orphan: bool,
        }
        let ours = |id| agent(id, "linux-7-1-abcd", Some("c1/ci/linux"));
        let cases = vec![
            Case {
                what: "ours, no Job at all (half-registered, or its Job is gone)",
                agent: ours(1),
                jobs: vec![],
                requests: vec![],
                orphan: true,
            },
            Case {
                what: "ours, its Job finished (OOM, eviction, failed deregistration)",
                agent: ours(1),
                jobs: vec![job("linux-7-1-abcd", JobPhase::Finished)],
                requests: vec![request(7, Some((1, "linux-7-1-abcd")), true)],
                orphan: true,
            },
            Case {
                what: "ours, online in ADO but its Job finished (ADO has not noticed yet)",
                agent: Agent {
                    status: AgentStatus::Online,
                    ..ours(1)
                },
                jobs: vec![job("linux-7-1-abcd", JobPhase::Finished)],
                requests: vec![],
                orphan: true,
            },
            Case {
                what: "ours, its Job still starting",
                agent: ours(1),
                jobs: vec![job("LINUX-7-1-ABCD", JobPhase::Starting)],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "ours, its Job running",
                agent: ours(1),
                jobs: vec![job("linux-7-1-abcd", JobPhase::Running)],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "ours, Job gone, but it holds a request (assignedRequest)",
                agent: Agent {
                    assigned_request: Some(7),
                    ..ours(1)
                },
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "ours, Job gone, an unfinished request reserves it by name",
                agent: ours(1),
                jobs: vec![],
                requests: vec![request(7, Some((99, "LINUX-7-1-abcd")), false)],
                orphan: false,
            },
            Case {
                what: "ours, Job gone, an unfinished request reserves it by id",
                agent: ours(1),
                jobs: vec![],
                requests: vec![request(7, Some((1, "renamed")), false)],
                orphan: false,
            },
            Case {
                what: "a placeholder (marked)",
                agent: Agent {
                    capabilities: BTreeMap::from([
                        (OWNER.to_owned(), "c1/ci/linux".to_owned()),
                        (PLACEHOLDER.to_owned(), "True".to_owned()),
                    ]),
                    ..ours(1)
                },
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "a placeholder (by name, mark lost)",
                agent: agent(
                    1,
                    "AZP-placeholder-ci-linux-0123456789",
                    Some("c1/ci/linux"),
                ),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "another cluster's agent of the same namespace/AgentPool",
                agent: agent(1, "linux-7-1-ffff", Some("c2/ci/linux")),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "an AgentPool we do not act for",
                agent: agent(1, "windows-7-1-abcd", Some("c1/ci/windows")),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "no owner capability at all (someone's hand-made agent)",
                agent: agent(1, "build-vm-3", None),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "owner capability name in another case (ADO keys are case-insensitive)",
                agent: Agent {
                    capabilities: BTreeMap::from([(
                        "AZP-AUTOSCALER.OWNER".to_owned(),
                        "c1/ci/linux".to_owned(),
                    )]),
                    ..ours(1)
                },
                jobs: vec![],
                requests: vec![],
                orphan: true,
            },
            Case {
                what: "owner value in another case is not ours (values are exact)",
                agent: agent(1, "linux-7-1-abcd", Some("C1/CI/LINUX")),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
            Case {
                what: "a paused AgentPool's orphan is kept",
                agent: agent(1, "paused-7-1-abcd", Some("c1/ci/paused")),
                jobs: vec![],
                requests: vec![],
                orphan: false,
            },
        ];
        let grace = SignedDuration::from_secs(60);
        for case in cases {
            let ado = AdoSnapshot {
                agents: vec![case.agent.clone()],
                requests: case.requests,
                ..AdoSnapshot::default()
            };
            let cluster = ClusterSnapshot {
                jobs: case.jobs,
                ..ClusterSnapshot::default()
            };
            let first = cleanup(
                &ado,
                &cluster,
                &scope(),
                &BTreeMap::new(),
                t("00:00"),
                grace,
            );
            assert!(
                first.remove.is_empty(),
                "{}: never on first sight",
                case.what
            );
            assert_eq!(
                first.orphan_since.contains_key(&1),
                case.orphan,
                "{}",
                case.what
            );
            let later = cleanup(
                &ado,
                &cluster,
                &scope(),
                &first.orphan_since,
                t("01:30"),
                grace,
            );
            assert_eq!(
                later.remove.iter().map(|o| o.agent_id).collect::<Vec<_>>(),
                if case.orphan { vec![1] } else { vec![] },
                "{}",
                case.what
            );
            if case.orphan {
                let o = &later.remove[0];
                assert_eq!(o.agent_pool, linux(), "{}", case.what);
                assert_eq!(o.since, t("00:00"), "{}", case.what);
                assert!(
                    o.reason.contains("grace 60s"),
                    "{}: {}",
                    case.what,
                    o.reason
                );
            }
        }
    }

    /// `registration: controller`: an agent whose Job finished goes at first sight; every other case
    /// keeps the grace (a Job gone without a trace may still be in the cache's future) or its agent.
    #[test]
    fn controller_registered_agents_go_when_their_job_finished() {
        let mut scope = scope();
        scope.controller_registered.insert(linux());
        let grace = SignedDuration::from_secs(60);
        let ours = agent(1, "linux-7-1-abcd", Some("c1/ci/linux"));
        let cases = [
            (
                "Job finished",
                vec![job("linux-7-1-abcd", JobPhase::Finished)],
                None,
                true,
            ),
            ("Job gone: grace first", vec![], None, false),
            (
                "Job running",
                vec![job("linux-7-1-abcd", JobPhase::Running)],
                None,
                false,
            ),
            (
                "Job starting",
                vec![job("linux-7-1-abcd", JobPhase::Starting)],
                None,
                false,
            ),
            (
                "Job finished but the agent still holds its request (killed mid-job)",
                vec![job("linux-7-1-abcd", JobPhase::Finished)],
                Some(7),
                false,
            ),
            (
                "an old finished Job and a new running one of the same agent name",
                vec![
                    job("linux-7-1-abcd", JobPhase::Finished),
                    job("linux-7-1-abcd", JobPhase::Running),
                ],
                None,
                false,
            ),
        ];
        for (what, jobs, assigned, now) in cases {
            let ado = AdoSnapshot {
                agents: vec![Agent {
                    assigned_request: assigned,
                    ..ours.clone()
                }],
                ..AdoSnapshot::default()
            };
            let cluster = ClusterSnapshot {
                jobs,
                ..ClusterSnapshot::default()
            };
            let c = cleanup(&ado, &cluster, &scope, &BTreeMap::new(), t("00:00"), grace);
            assert_eq!(
                c.remove.iter().map(|o| o.agent_id).collect::<Vec<_>>(),
                if now { vec![1] } else { vec![] },
                "{what}"
            );
            if now {
                assert!(
                    c.remove[0].reason.contains("registration: controller"),
                    "{what}"
                );
            }
        }
        // The default mode keeps the grace for a finished Job (its pod deregisters by itself).
        let c = cleanup(
            &AdoSnapshot {
                agents: vec![ours],
                ..AdoSnapshot::default()
            },
            &ClusterSnapshot {
                jobs: vec![job("linux-7-1-abcd", JobPhase::Finished)],
                ..ClusterSnapshot::default()
            },
            &self::scope(),
            &BTreeMap::new(),
            t("00:00"),
            grace,
        );
        assert!(c.remove.is_empty());
    }

    #[test]
    fn grace_counts_from_first_sight_and_forgets_agents_that_are_no_longer_orphans() {
        let grace = SignedDuration::from_secs(120);
        let a = agent(1, "linux-7-1-abcd", Some("c1/ci/linux"));
        let b = agent(2, "linux-8-1-abcd", Some("c1/ci/linux"));
        let ado = AdoSnapshot {
            agents: vec![a.clone(), b.clone()],
            ..AdoSnapshot::default()
        };
        let none = ClusterSnapshot::default();
        let seen = BTreeMap::from([(1, t("00:00")), (7, t("00:00"))]);
        // Agent 1 was seen at 12:00, agent 2 is new; agent 7 is no longer listed.
        let c = cleanup(&ado, &none, &scope(), &seen, t("01:59"), grace);
        assert!(c.remove.is_empty(), "119 s < 120 s");
        assert_eq!(
            c.orphan_since,
            BTreeMap::from([(1, t("00:00")), (2, t("01:59"))])
        );
        let c = cleanup(&ado, &none, &scope(), &c.orphan_since, t("02:00"), grace);
        assert_eq!(
            c.remove.iter().map(|o| o.agent_id).collect::<Vec<_>>(),
            vec![1]
        );
        // Agent 1 gets a Job again (same name, e.g. a standby slot reused): its clock stops.
        let cluster = ClusterSnapshot {
            jobs: vec![job("linux-7-1-abcd", JobPhase::Starting)],
            ..ClusterSnapshot::default()
        };
        let c = cleanup(&ado, &cluster, &scope(), &c.orphan_since, t("05:00"), grace);
        assert_eq!(c.orphan_since.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(
            c.remove.iter().map(|o| o.agent_id).collect::<Vec<_>>(),
            vec![2]
        );
        // A first-seen time in the future (clock step back) never delays forever nor deletes early.
        let c = cleanup(
            &AdoSnapshot {
                agents: vec![b],
                ..AdoSnapshot::default()
            },
            &none,
            &scope(),
            &BTreeMap::from([(2, t("09:00"))]),
            t("03:00"),
            grace,
        );
        assert_eq!(c.orphan_since, BTreeMap::from([(2, t("03:00"))]));
        assert!(c.remove.is_empty());
    }
}
