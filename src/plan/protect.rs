//! Busy agent pods and disruption: which pods to protect from voluntary eviction, how large the
//! protecting budget must be, and which ended pods were jobs lost to a disruption.
//!
//! - A pod whose agent **holds a request** (ADO's `assignedRequest`, or a request naming it as
//!   `reservedAgent`) is **protected**: the controller marks it busy, and a PodDisruptionBudget per
//!   AgentPool selects exactly the busy pods of that AgentPool. An idle or starting agent pod stays
//!   evictable: its request (if any) is still pending, and the planner starts another agent for it.
//! - The budget's `minAvailable` is never below the number of busy pods it can select, so it allows
//!   no disruption at all: `max(maxAgents, busy pods)` (unfinished Jobs never exceed `maxAgents`, so the
//!   number is stable and the budget rarely changes).
//! - When the agent holds no request any more (its one job is done, it only deregisters) the mark is
//!   removed: the pod is evictable again, and a disruption then loses nothing.
//! - A pod that was marked busy and carries the `DisruptionTarget` condition (eviction, preemption,
//!   node deletion, node shutdown, taint eviction) ended its job early: a **job lost to eviction**,
//!   counted once per pod.

use std::collections::HashSet;

use super::model::{AdoSnapshot, PoolRef};

/// One agent pod as the protection rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub namespace: String,
    pub name: String,
    pub agent_pool: PoolRef,
    /// The agent name of its Job.
    pub agent_name: String,
    /// Already marked busy (and so selected by the AgentPool's budget).
    pub marked_busy: bool,
    /// Terminating or terminal: nothing to protect any more.
    pub ended: bool,
    /// The reason of a `DisruptionTarget=True` condition, if the pod has one.
    pub disruption: Option<String>,
}

/// Lower-cased names of the agents that hold a request.
pub fn agents_holding_requests(ado: &AdoSnapshot) -> HashSet<String> {
    let reserved = ado
        .requests
        .iter()
        .filter(|r| r.result.is_none() && r.finish_time.is_none())
        .filter_map(|r| r.reserved_agent.as_ref())
        .map(|a| a.name.to_lowercase());
    let assigned = ado
        .agents
        .iter()
        .filter(|a| a.assigned_request.is_some())
        .map(|a| a.name.to_lowercase());
    reserved.chain(assigned).collect()
}

/// The pods to mark busy now: their agent holds a request, they are not marked yet, and they still run.
pub fn pods_to_protect<'a>(ado: &AdoSnapshot, pods: &'a [AgentPod]) -> Vec<&'a AgentPod> {
    let holding = agents_holding_requests(ado);
    pods.iter()
        .filter(|p| !p.marked_busy && !p.ended && p.disruption.is_none())
        .filter(|p| holding.contains(&p.agent_name.to_lowercase()))
        .collect()
}

/// The pods to unmark now: marked busy, still running, and their agent holds no request any more (its
/// one job is done; it only deregisters). The request list names every unfinished request with its
/// agent, so a running job always shows as held.
pub fn pods_to_release<'a>(ado: &AdoSnapshot, pods: &'a [AgentPod]) -> Vec<&'a AgentPod> {
    let holding = agents_holding_requests(ado);
    pods.iter()
        .filter(|p| p.marked_busy && !p.ended && p.disruption.is_none())
        .filter(|p| !holding.contains(&p.agent_name.to_lowercase()))
        .collect()
}

/// `minAvailable` of an AgentPool's budget over its busy pods: at least every pod it can select, so
/// no eviction is ever allowed.
pub fn budget_min_available(max_agents: u32, busy_pods: usize) -> i32 {
    let floor = u32::try_from(busy_pods).unwrap_or(u32::MAX).max(max_agents);
    // A budget of 0 would allow evicting every selected pod: never below one.
    i32::try_from(floor).unwrap_or(i32::MAX).max(1)
}

/// Why this pod's job was lost to a disruption, if it was: marked busy and a `DisruptionTarget`.
pub fn lost_to_disruption(pod: &AgentPod) -> Option<&str> {
    if pod.marked_busy {
        pod.disruption.as_deref()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::{Agent, AgentRef, AgentStatus, JobRequest};

    fn pod(name: &str, agent: &str) -> AgentPod {
        AgentPod {
            namespace: "ci".into(),
            name: name.into(),
            agent_pool: PoolRef::new("ci", "linux"),
            agent_name: agent.into(),
            marked_busy: false,
            ended: false,
            disruption: None,
        }
    }

    fn request(id: i64, agent: Option<&str>, result: Option<&str>) -> JobRequest {
        JobRequest {
            id,
            queue_time: None,
            assign_time: agent.map(|_| "2026-01-01T00:00:00Z".parse().unwrap()),
            receive_time: None,
            finish_time: None,
            result: result.map(str::to_owned),
            demands: vec![],
            reserved_agent: agent.map(|a| AgentRef {
                id: 1,
                name: a.into(),
            }),
            parallelism_tag: None,
        }
    }

    fn agent(name: &str, assigned: Option<i64>) -> Agent {
        Agent {
            id: 7,
            name: name.into(),
            status: AgentStatus::Online,
            enabled: true,
            capabilities: Default::default(),
            assigned_request: assigned,
        }
    }

    #[test]
    fn which_pods_are_protected() {
        struct Case {
            what: &'static str,
            requests: Vec<JobRequest>,
            agents: Vec<Agent>,
            pod: AgentPod,
            protect: bool,
        }
        let marked = AgentPod {
            marked_busy: true,
            ..pod("p", "a-1")
        };
        let ended = AgentPod {
            ended: true,
            ..pod("p", "a-1")
        };
        let disrupted = AgentPod {
            disruption: Some("EvictionByEvictionAPI".into()),
            ..pod("p", "a-1")
        };
        let cases = [
            Case {
                what: "reserved by a running request",
                requests: vec![request(1, Some("a-1"), None)],
                agents: vec![],
                pod: pod("p", "a-1"),
                protect: true,
            },
            Case {
                what: "ADO's assignedRequest (agents list newer than requests)",
                requests: vec![],
                agents: vec![agent("a-1", Some(3))],
                pod: pod("p", "a-1"),
                protect: true,
            },
            Case {
                what: "agent names compare case-insensitively, as ADO does",
                requests: vec![request(1, Some("A-1"), None)],
                agents: vec![],
                pod: pod("p", "a-1"),
                protect: true,
            },
            Case {
                what: "idle agent: evictable (its pending request gets another agent)",
                requests: vec![request(1, None, None)],
                agents: vec![agent("a-1", None)],
                pod: pod("p", "a-1"),
                protect: false,
            },
            Case {
                what: "its request finished: nothing left to protect",
                requests: vec![request(1, Some("a-1"), Some("succeeded"))],
                agents: vec![agent("a-1", None)],
                pod: pod("p", "a-1"),
                protect: false,
            },
            Case {
                what: "another agent's request",
                requests: vec![request(1, Some("a-2"), None)],
                agents: vec![],
                pod: pod("p", "a-1"),
                protect: false,
            },
            Case {
                what: "already marked: no second write",
                requests: vec![request(1, Some("a-1"), None)],
                agents: vec![],
                pod: marked,
                protect: false,
            },
            Case {
                what: "terminating or terminal: nothing to protect",
                requests: vec![request(1, Some("a-1"), None)],
                agents: vec![],
                pod: ended,
                protect: false,
            },
            Case {
                what: "already disrupted: marking would not save it",
                requests: vec![request(1, Some("a-1"), None)],
                agents: vec![],
                pod: disrupted,
                protect: false,
            },
        ];
        for c in cases {
            let ado = AdoSnapshot {
                ado_pool: "linux".into(),
                requests: c.requests,
                agents: c.agents,
                parallel_jobs: None,
            };
            let pods = [c.pod];
            assert_eq!(
                !pods_to_protect(&ado, &pods).is_empty(),
                c.protect,
                "{}",
                c.what
            );
        }
    }

    #[test]
    fn which_pods_are_released() {
        let marked = AgentPod {
            marked_busy: true,
            ..pod("p", "a-1")
        };
        let ado = |requests: Vec<JobRequest>, agents: Vec<Agent>| AdoSnapshot {
            ado_pool: "linux".into(),
            requests,
            agents,
            parallel_jobs: None,
        };
        for (what, snapshot, pod, release) in [
            (
                "its job is done (the request left the list of unfinished ones)",
                ado(vec![], vec![agent("a-1", None)]),
                marked.clone(),
                true,
            ),
            (
                "its job finished (listed with a result)",
                ado(vec![request(1, Some("a-1"), Some("succeeded"))], vec![]),
                marked.clone(),
                true,
            ),
            (
                "still running its job",
                ado(vec![request(1, Some("a-1"), None)], vec![]),
                marked.clone(),
                false,
            ),
            (
                "assigned per the agents list",
                ado(vec![], vec![agent("a-1", Some(1))]),
                marked.clone(),
                false,
            ),
            (
                "not marked: nothing to release",
                ado(vec![], vec![]),
                pod("p", "a-1"),
                false,
            ),
            (
                "ended: nothing to write",
                ado(vec![], vec![]),
                AgentPod {
                    ended: true,
                    ..marked.clone()
                },
                false,
            ),
            (
                "disrupted: the mark stays, so the loss is counted",
                ado(vec![], vec![]),
                AgentPod {
                    disruption: Some("DeletionByPodGC".into()),
                    ..marked.clone()
                },
                false,
            ),
        ] {
            let pods = [pod];
            assert_eq!(
                !pods_to_release(&snapshot, &pods).is_empty(),
                release,
                "{what}"
            );
        }
    }

    #[test]
    fn the_budget_never_allows_an_eviction_of_a_selected_pod() {
        for (max_agents, busy, want) in [
            (10, 0, 10),
            (10, 3, 10),
            // maxAgents lowered below what still runs: the budget follows the busy pods.
            (2, 5, 5),
            // A zero budget would allow evicting everything.
            (0, 0, 1),
        ] {
            let got = budget_min_available(max_agents, busy);
            assert_eq!(got, want, "maxAgents {max_agents}, busy {busy}");
            // disruptionsAllowed = healthy - minAvailable <= busy - minAvailable <= 0
            assert!(got as usize >= busy);
        }
    }

    #[test]
    fn a_job_is_lost_only_when_a_busy_pod_was_disrupted() {
        let base = pod("p", "a-1");
        for (marked_busy, disruption, want) in [
            (true, Some("DeletionByPodGC"), Some("DeletionByPodGC")),
            (true, None, None),
            // An idle or starting pod evicted: no job was running on it.
            (false, Some("EvictionByEvictionAPI"), None),
        ] {
            let p = AgentPod {
                marked_busy,
                disruption: disruption.map(str::to_owned),
                ..base.clone()
            };
            assert_eq!(lost_to_disruption(&p), want, "{p:?}");
        }
    }
}
