//! Draining an AgentPool that is being deleted (its finalizer holds it): what to remove now, what to
//! wait for, and when the placeholder and the finalizer may go. Pure: one call per poll.
//!
//! # Rules
//!
//! - An agent that holds a request (ADO's `assignedRequest`, or any request naming it as
//!   `reservedAgent`, finished ones included: a run-once agent that ran its job is ending by
//!   itself) is **waited for**, never removed. Its Job (and pod) are left alone: agent Jobs carry no
//!   ownerReference to the AgentPool, so no cascade (not even a foreground delete) reaches them; finished
//!   Jobs go by their TTL.
//! - An unfinished agent Job whose agent is registered and holds nothing is **removed** the safe
//!   way (disable → re-check → delete Job and agent; re-enabled and waited for if it got work).
//! - An unfinished agent Job whose agent has not registered yet is **deleted** (it cannot hold a
//!   request; if it registered meanwhile, the agent it leaves behind is deleted in a later step).
//! - An agent of ours in ADO (owner capability = this AgentPool) that no unfinished Job runs and
//!   that holds nothing is **deleted** at once (no grace: nothing will start it again).
//! - Once nothing is left to remove or wait for, the **placeholder** is deleted and the
//!   **finalizer** removed, in that order.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::model::{AdoSnapshot, Agent, AgentId, ClusterSnapshot, JobPhase, PoolRef};

/// What identifies the draining AgentPool's agents in ADO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainScope {
    pub agent_pool: PoolRef,
    /// The owner capability's name (case-insensitive) and this AgentPool's value (exact).
    pub owner_capability: String,
    pub owner_value: String,
    /// The placeholder's name (case-insensitive).
    pub placeholder_name: String,
}

/// One step of a drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum DrainAction {
    /// Disable → re-check → delete the Job and the agent (as for an idle agent).
    #[serde(rename_all = "camelCase")]
    RemoveIdleAgent {
        job_name: String,
        agent_name: String,
        agent_id: AgentId,
    },
    /// Delete an agent Job whose agent has not registered.
    #[serde(rename_all = "camelCase")]
    DeleteJob { job_name: String },
    /// Delete an agent of ours that nothing runs and that holds nothing.
    #[serde(rename_all = "camelCase")]
    DeleteAgent {
        agent_name: String,
        agent_id: AgentId,
    },
    /// Everything is gone: delete the placeholder (when registered), then remove the finalizer.
    #[serde(rename_all = "camelCase")]
    Finish { placeholder_id: Option<AgentId> },
}

/// The decisions of one drain step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drain {
    pub actions: Vec<DrainAction>,
    /// Agents that hold a request: the drain waits for them.
    pub waiting_for: Vec<String>,
}

impl Drain {
    /// Whether this step finishes the drain.
    pub fn finishes(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, DrainAction::Finish { .. }))
    }
}

fn owned_by(agent: &Agent, scope: &DrainScope) -> bool {
    agent
        .capabilities
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case(&scope.owner_capability) && *v == scope.owner_value)
}

/// One drain step of `scope.agent_pool`. `cluster` must hold that AgentPool's agent Jobs; `ado` is
/// the ADO pool as read in this poll (agents read fresh).
pub fn drain(ado: &AdoSnapshot, cluster: &ClusterSnapshot, scope: &DrainScope) -> Drain {
    let reserved: HashSet<String> = ado
        .requests
        .iter()
        .filter_map(|r| r.reserved_agent.as_ref())
        .flat_map(|a| [format!("id:{}", a.id), a.name.to_lowercase()])
        .collect();
    let agent = |name: &str| {
        ado.agents
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
    };
    let holds = |name: &str, found: Option<&Agent>| {
        reserved.contains(&name.to_lowercase())
            || found.is_some_and(|a| {
                a.assigned_request.is_some() || reserved.contains(&format!("id:{}", a.id))
            })
    };

    let mut out = Drain::default();
    let mut jobs: Vec<_> = cluster
        .jobs
        .iter()
        .filter(|j| j.agent_pool == scope.agent_pool)
        .collect();
    jobs.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut run_by_job: HashSet<String> = HashSet::new();
    for job in jobs {
        if job.phase == JobPhase::Finished {
            continue;
        }
        run_by_job.insert(job.agent_name.to_lowercase());
        let found = agent(&job.agent_name);
        if holds(&job.agent_name, found) {
            out.waiting_for.push(job.agent_name.clone());
            continue;
        }
        out.actions.push(match found {
            Some(a) => DrainAction::RemoveIdleAgent {
                job_name: job.name.clone(),
                agent_name: job.agent_name.clone(),
                agent_id: a.id,
            },
            None => DrainAction::DeleteJob {
                job_name: job.name.clone(),
            },
        });
    }

    let mut placeholder_id = None;
    let mut agents: Vec<&Agent> = ado.agents.iter().collect();
    agents.sort_by_key(|a| a.id);
    for a in agents {
        if a.name.eq_ignore_ascii_case(&scope.placeholder_name) {
            placeholder_id = Some(a.id);
            continue;
        }
        if !owned_by(a, scope) || run_by_job.contains(&a.name.to_lowercase()) {
            continue;
        }
        if holds(&a.name, Some(a)) {
            out.waiting_for.push(a.name.clone());
        } else {
            out.actions.push(DrainAction::DeleteAgent {
                agent_name: a.name.clone(),
                agent_id: a.id,
            });
        }
    }

    if out.actions.is_empty() && out.waiting_for.is_empty() {
        out.actions.push(DrainAction::Finish { placeholder_id });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::{AgentJob, AgentRef, AgentStatus, JobRequest};
    use std::collections::BTreeMap;

    const OWNER: &str = "azp-autoscaler.owner";

    fn scope() -> DrainScope {
        DrainScope {
            agent_pool: PoolRef::new("ci", "linux"),
            owner_capability: OWNER.into(),
            owner_value: "c1/ci/linux".into(),
            placeholder_name: "azp-placeholder-ci-linux-01234".into(),
        }
    }

    fn agent(id: AgentId, name: &str, owner: &str) -> Agent {
        Agent {
            id,
            name: name.into(),
            status: AgentStatus::Online,
            enabled: true,
            capabilities: BTreeMap::from([(OWNER.to_owned(), owner.to_owned())]),
            assigned_request: None,
        }
    }

    fn job(name: &str, pool: &str, phase: JobPhase) -> AgentJob {
        AgentJob {
            name: name.into(),
            agent_pool: PoolRef::new("ci", pool),
            agent_name: format!("{name}-abcd"),
            for_request: None,
            attempt: 1,
            created: "2026-11-26T12:00:00Z".parse().unwrap(),
            phase,
            pod_started: true,
        }
    }

    fn reserved(id: i64, agent_id: AgentId, name: &str, finished: bool) -> JobRequest {
        JobRequest {
            id,
            queue_time: None,
            assign_time: None,
            receive_time: None,
            finish_time: finished.then(|| "2026-11-26T12:05:00Z".parse().unwrap()),
            result: finished.then(|| "succeeded".to_owned()),
            demands: vec![],
            reserved_agent: Some(AgentRef {
                id: agent_id,
                name: name.into(),
            }),
            parallelism_tag: None,
        }
    }

    fn placeholder() -> Agent {
        Agent {
            status: AgentStatus::Offline,
            ..agent(1, "azp-placeholder-ci-linux-01234", "c1/ci/linux")
        }
    }

    #[test]
    fn drain_steps() {
        struct Case {
            what: &'static str,
            agents: Vec<Agent>,
            requests: Vec<JobRequest>,
            jobs: Vec<AgentJob>,
            actions: Vec<DrainAction>,
            waiting: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                what: "nothing left but the placeholder: finish",
                agents: vec![placeholder()],
                requests: vec![],
                jobs: vec![job("linux-1-1", "linux", JobPhase::Finished)],
                actions: vec![DrainAction::Finish {
                    placeholder_id: Some(1),
                }],
                waiting: vec![],
            },
            Case {
                what: "placeholder already gone: finish without it",
                agents: vec![],
                requests: vec![],
                jobs: vec![],
                actions: vec![DrainAction::Finish {
                    placeholder_id: None,
                }],
                waiting: vec![],
            },
            Case {
                what: "a busy agent (assigned) is waited for; nothing else happens",
                agents: vec![
                    placeholder(),
                    Agent {
                        assigned_request: Some(9),
                        ..agent(2, "linux-9-1-abcd", "c1/ci/linux")
                    },
                ],
                requests: vec![],
                jobs: vec![job("linux-9-1", "linux", JobPhase::Running)],
                actions: vec![],
                waiting: vec!["linux-9-1-abcd"],
            },
            Case {
                what: "reserved (request list newer than agents list) is busy too",
                agents: vec![placeholder(), agent(2, "linux-9-1-abcd", "c1/ci/linux")],
                requests: vec![reserved(9, 2, "linux-9-1-abcd", false)],
                jobs: vec![job("linux-9-1", "linux", JobPhase::Running)],
                actions: vec![],
                waiting: vec!["linux-9-1-abcd"],
            },
            Case {
                what: "done with its one job, still deregistering: waited for",
                agents: vec![placeholder(), agent(2, "linux-9-1-abcd", "c1/ci/linux")],
                requests: vec![reserved(9, 2, "linux-9-1-abcd", true)],
                jobs: vec![job("linux-9-1", "linux", JobPhase::Running)],
                actions: vec![],
                waiting: vec!["linux-9-1-abcd"],
            },
            Case {
                what: "idle registered agent: removed safely; starting one: Job deleted",
                agents: vec![
                    placeholder(),
                    agent(3, "linux-standby-0-abcd", "c1/ci/linux"),
                ],
                requests: vec![],
                jobs: vec![
                    job("linux-standby-0", "linux", JobPhase::Running),
                    job("linux-standby-1", "linux", JobPhase::Starting),
                    job("windows-standby-0", "windows", JobPhase::Running),
                ],
                actions: vec![
                    DrainAction::RemoveIdleAgent {
                        job_name: "linux-standby-0".into(),
                        agent_name: "linux-standby-0-abcd".into(),
                        agent_id: 3,
                    },
                    DrainAction::DeleteJob {
                        job_name: "linux-standby-1".into(),
                    },
                ],
                waiting: vec![],
            },
            Case {
                what: "left-behind agent of ours deleted at once; foreign and other AgentPools' kept",
                agents: vec![
                    placeholder(),
                    Agent {
                        status: AgentStatus::Offline,
                        ..agent(4, "linux-5-1-abcd", "c1/ci/linux")
                    },
                    agent(5, "linux-5-1-ffff", "c2/ci/linux"),
                    agent(6, "windows-5-1-abcd", "c1/ci/windows"),
                ],
                requests: vec![],
                jobs: vec![job("linux-5-1", "linux", JobPhase::Finished)],
                actions: vec![DrainAction::DeleteAgent {
                    agent_name: "linux-5-1-abcd".into(),
                    agent_id: 4,
                }],
                waiting: vec![],
            },
            Case {
                what: "an agent of ours with no Job but a request is waited for",
                agents: vec![
                    placeholder(),
                    Agent {
                        assigned_request: Some(5),
                        ..agent(4, "linux-5-1-abcd", "c1/ci/linux")
                    },
                ],
                requests: vec![],
                jobs: vec![],
                actions: vec![],
                waiting: vec!["linux-5-1-abcd"],
            },
        ];
        for case in cases {
            let ado = AdoSnapshot {
                agents: case.agents,
                requests: case.requests,
                ..AdoSnapshot::default()
            };
            let cluster = ClusterSnapshot {
                jobs: case.jobs,
                ..ClusterSnapshot::default()
            };
            let d = drain(&ado, &cluster, &scope());
            assert_eq!(d.actions, case.actions, "{}", case.what);
            assert_eq!(d.waiting_for, case.waiting, "{}", case.what);
            assert_eq!(
                d.finishes(),
                matches!(d.actions[..], [DrainAction::Finish { .. }]),
                "{}",
                case.what
            );
        }
    }
}
