//! Pure conversions from what the controller reads (ADO models, Kubernetes objects) into the planner's own
//! input types. No IO: table-tested like the planner.

use std::collections::{BTreeMap, HashSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use crate::ado::models::{self, ResourceUsage, TaskAgent, TaskAgentJobRequest};
use crate::k8s::crd::AgentPool;
use crate::k8s::job::{
    ANNOTATION_AGENT_NAME, ANNOTATION_ATTEMPT, ANNOTATION_REQUEST, LABEL_AGENTPOOL, LABEL_BUSY,
};
use crate::plan;

/// The parallelism bucket of self-hosted private jobs.
pub const PRIVATE_TAG: &str = "Private";

/// ADO's answers for one ADO pool → the planner's [`plan::AdoSnapshot`].
pub fn ado_snapshot(
    ado_pool: &str,
    requests: &[TaskAgentJobRequest],
    agents: &[TaskAgent],
    usage: Option<&ResourceUsage>,
) -> plan::AdoSnapshot {
    let agents: Vec<plan::Agent> = agents.iter().filter_map(agent).collect();
    let mut requests: Vec<plan::JobRequest> = requests.iter().filter_map(job_request).collect();
    // The two lists are read one after the other: an agent may already hold a request that the (older)
    // request list still shows as waiting. It is not waiting: counting it as demand would make a second
    // agent for it.
    for r in &mut requests {
        if r.reserved_agent.is_none()
            && let Some(holder) = agents.iter().find(|a| a.assigned_request == Some(r.id))
        {
            r.reserved_agent = Some(plan::AgentRef {
                id: holder.id,
                name: holder.name.clone(),
            });
        }
    }
    plan::AdoSnapshot {
        ado_pool: ado_pool.to_owned(),
        requests,
        agents,
        parallel_jobs: usage.and_then(parallel_jobs),
    }
}

fn job_request(r: &TaskAgentJobRequest) -> Option<plan::JobRequest> {
    Some(plan::JobRequest {
        id: plan::RequestId::try_from(r.request_id).ok()?,
        queue_time: r.queue_time,
        assign_time: r.assign_time,
        receive_time: r.receive_time,
        finish_time: r.finish_time,
        result: r
            .result
            .as_ref()
            .map(|x| format!("{x:?}").to_ascii_lowercase()),
        demands: r.demands.iter().map(|d| d.as_str().to_owned()).collect(),
        reserved_agent: r.reserved_agent.as_ref().map(|a| plan::AgentRef {
            id: plan::AgentId::from(a.id),
            name: a.name.clone(),
        }),
        parallelism_tag: r.parallelism_tag().map(str::to_owned),
    })
}

fn agent(a: &TaskAgent) -> Option<plan::Agent> {
    let mut capabilities = a.system_capabilities.clone();
    capabilities.extend(a.user_capabilities.clone());
    Some(plan::Agent {
        id: plan::AgentId::from(a.id),
        name: a.name.clone(),
        status: match a.status {
            Some(models::AgentStatus::Online) => plan::AgentStatus::Online,
            Some(models::AgentStatus::Offline) => plan::AgentStatus::Offline,
            _ => plan::AgentStatus::Unknown,
        },
        enabled: a.is_enabled(),
        capabilities,
        assigned_request: a
            .assigned_request
            .as_ref()
            .and_then(|r| plan::RequestId::try_from(r.request_id).ok()),
    })
}

fn parallel_jobs(u: &ResourceUsage) -> Option<plan::ParallelJobUsage> {
    let limit = u.resource_limit.as_ref()?;
    Some(plan::ParallelJobUsage {
        parallelism_tag: limit
            .parallelism_tag
            .clone()
            .unwrap_or_else(|| PRIVATE_TAG.to_owned()),
        total: u32::try_from(limit.total_count?).ok()?,
        used: u32::try_from(u.used_count).unwrap_or(0),
        slot_holders: u
            .running_requests
            .iter()
            .filter_map(|r| plan::RequestId::try_from(r.request_id).ok())
            .collect(),
    })
}

/// The AgentPool → the part of its spec the planner needs.
pub fn plan_spec(pool: &AgentPool) -> Option<plan::AgentPoolSpec> {
    Some(plan::AgentPoolSpec {
        agent_pool: pool_ref(pool)?,
        priority: pool.spec.priority,
        capabilities: pool.spec.capabilities.clone(),
        agent_version: pool.spec.agent_version.clone(),
        min_idle: pool.spec.min_idle,
        max_agents: pool.spec.max_agents,
        paused: pool.spec.paused,
        startup_timeout: SignedDuration::from_secs(i64::from(pool.spec.startup_timeout_seconds)),
    })
}

/// The AgentPool's identity for the planner.
pub fn pool_ref(pool: &AgentPool) -> Option<plan::PoolRef> {
    Some(plan::PoolRef::new(
        pool.metadata.namespace.clone()?,
        pool.metadata.name.clone()?,
    ))
}

/// An agent pod of ours → [`plan::protect::AgentPod`]; `None` for a pod without our labels.
pub fn agent_pod(pod: &Pod) -> Option<plan::protect::AgentPod> {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone()?;
    let pool = meta.labels.as_ref()?.get(LABEL_AGENTPOOL)?.clone();
    let agent_name = meta
        .annotations
        .as_ref()?
        .get(ANNOTATION_AGENT_NAME)?
        .clone();
    let status = pod.status.as_ref();
    let terminal = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let disruption = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        .map(|c| c.reason.clone().unwrap_or_else(|| "Unknown".to_owned()));
    Some(plan::protect::AgentPod {
        agent_pool: plan::PoolRef::new(namespace.clone(), pool),
        namespace,
        name: meta.name.clone()?,
        agent_name,
        marked_busy: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_BUSY))
            .is_some_and(|v| v == "true"),
        ended: terminal || meta.deletion_timestamp.is_some(),
        disruption,
    })
}

/// What ADO's agent list says about our agents, by agent name.
#[derive(Debug, Default, Clone)]
pub struct AgentsSeen<'a> {
    /// Agents registered in the pool.
    pub registered: HashSet<&'a str>,
    /// Agents that already completed a request: a run-once agent never takes another, so its Job is
    /// finished even while its pod is still deregistering (it must not count as an idle agent).
    pub completed: HashSet<&'a str>,
    /// Agents whose listener connected (online) or that hold a request. A controller-registered agent
    /// exists in ADO before its pod starts: only this says that its pod got going.
    pub started: HashSet<&'a str>,
}

impl<'a> AgentsSeen<'a> {
    /// From the agents list (read with `includeLastCompletedRequest`).
    pub fn from_agents(agents: &'a [TaskAgent]) -> Self {
        AgentsSeen {
            registered: agents.iter().map(|a| a.name.as_str()).collect(),
            completed: agents
                .iter()
                .filter(|a| a.last_completed_request.is_some())
                .map(|a| a.name.as_str())
                .collect(),
            started: agents
                .iter()
                .filter(|a| {
                    a.status == Some(models::AgentStatus::Online) || a.assigned_request.is_some()
                })
                .map(|a| a.name.as_str())
                .collect(),
        }
    }

    /// Also counts as completed the agents that were registered in an earlier list and are gone now: a
    /// run-once agent that deregistered after its job (its pod may still be exiting) never comes back, so
    /// its Job is neither a starting agent nor surplus to remove.
    pub fn with_deregistered(mut self, registered_before: &'a HashSet<String>) -> Self {
        let gone: Vec<&'a str> = registered_before
            .iter()
            .map(String::as_str)
            .filter(|n| !self.registered.contains(n))
            .collect();
        self.completed.extend(gone);
        self
    }
}

/// Remembers which of our agents have been seen registered (`agent_names`: the agent names of our
/// unfinished-or-recent Jobs, which bounds the set), for [`AgentsSeen::with_deregistered`].
pub fn remember_registered(
    registered_before: &mut HashSet<String>,
    agents: &[TaskAgent],
    agent_names: &HashSet<String>,
) {
    registered_before.retain(|n| agent_names.contains(n));
    registered_before.extend(
        agents
            .iter()
            .filter(|a| agent_names.contains(&a.name))
            .map(|a| a.name.clone()),
    );
}

/// Our agent Jobs (and their pods) → the planner's [`plan::ClusterSnapshot`]. A Job whose agent is
/// registered is `Running`, else `Starting`; one whose agent completed its job or whose pod terminated is
/// `Finished`.
pub fn cluster_snapshot<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    pods: &[&Pod],
    seen: &AgentsSeen<'_>,
) -> plan::ClusterSnapshot {
    let jobs: Vec<(&Job, plan::AgentJob)> = jobs
        .into_iter()
        .filter_map(|job| Some((job, agent_job(job, pods, seen)?)))
        .collect();
    plan::ClusterSnapshot {
        startup_failures: startup_failures(&jobs),
        jobs: jobs.into_iter().map(|(_, j)| j).collect(),
    }
}

/// Per AgentPool, how many of its latest finished agent Jobs failed in a row (newest first, up to the
/// first one that succeeded): a template whose agents cannot start must back off, not spin.
fn startup_failures(jobs: &[(&Job, plan::AgentJob)]) -> BTreeMap<String, u32> {
    let mut finished: BTreeMap<String, Vec<(Timestamp, bool)>> = BTreeMap::new();
    for (job, agent_job) in jobs {
        let status = job.status.as_ref();
        let failed = status.and_then(|s| s.failed).unwrap_or(0) > 0;
        let succeeded = status.and_then(|s| s.succeeded).unwrap_or(0) > 0;
        if failed || succeeded {
            finished
                .entry(agent_job.agent_pool.to_string())
                .or_default()
                .push((agent_job.created, failed));
        }
    }
    finished
        .into_iter()
        .map(|(pool, mut list)| {
            list.sort_by_key(|(created, _)| std::cmp::Reverse(*created));
            let streak = list.iter().take_while(|(_, failed)| *failed).count();
            (pool, u32::try_from(streak).unwrap_or(u32::MAX))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// One of our agent Jobs → the planner's view of it (None for a Job that is not an agent Job of ours).
pub fn agent_job(job: &Job, pods: &[&Pod], seen: &AgentsSeen<'_>) -> Option<plan::AgentJob> {
    let meta = &job.metadata;
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone()?;
    let pool = meta.labels.as_ref()?.get(LABEL_AGENTPOOL)?.clone();
    let annotations = meta.annotations.as_ref()?;
    let agent_name = annotations.get(ANNOTATION_AGENT_NAME)?.clone();
    let for_request = annotations
        .get(ANNOTATION_REQUEST)
        .and_then(|v| v.parse::<plan::RequestId>().ok());
    let attempt = annotations
        .get(ANNOTATION_ATTEMPT)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    let created = meta
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH);
    let own_pods: Vec<&&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job-name"))
                    .is_some_and(|j| *j == name)
        })
        .collect();
    let pod_started = own_pods.iter().any(|p| pod_started(p));
    // The controller registered its agent before the pod started: being registered says nothing yet.
    let controller_registered = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(crate::k8s::job::ANNOTATION_AGENT_SECRET));
    let agent_up = if controller_registered {
        &seen.started
    } else {
        &seen.registered
    };
    let pod_terminated = !own_pods.is_empty() && own_pods.iter().all(|p| pod_terminated(p));
    let phase =
        if job_finished(job) || pod_terminated || seen.completed.contains(agent_name.as_str()) {
            plan::JobPhase::Finished
        } else if agent_up.contains(agent_name.as_str()) {
            plan::JobPhase::Running
        } else {
            plan::JobPhase::Starting
        };
    Some(plan::AgentJob {
        name,
        agent_pool: plan::PoolRef::new(namespace, pool),
        agent_name,
        for_request,
        attempt,
        created,
        phase,
        pod_started,
    })
}

/// A Job that will run no agent any more: succeeded, failed, or being deleted.
pub fn job_finished(job: &Job) -> bool {
    if job.metadata.deletion_timestamp.is_some() {
        return true;
    }
    let Some(status) = job.status.as_ref() else {
        return false;
    };
    status.succeeded.unwrap_or(0) > 0
        || status.failed.unwrap_or(0) > 0
        || status.conditions.iter().flatten().any(|c| {
            c.status == "True"
                && matches!(
                    c.type_.as_str(),
                    "Complete" | "Failed" | "SuccessCriteriaMet" | "FailureTarget"
                )
        })
}

fn pod_terminated(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod
            .status
            .as_ref()
            .is_some_and(|s| matches!(s.phase.as_deref(), Some("Succeeded" | "Failed")))
}

fn pod_started(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        matches!(s.phase.as_deref(), Some("Running" | "Succeeded" | "Failed"))
            || s.container_statuses.iter().flatten().any(|c| {
                c.started == Some(true)
                    || c.state.as_ref().is_some_and(|st| st.terminated.is_some())
            })
    })
}

/// The agent's name in ADO: the Job name plus a short digest of (cluster, namespace), so two clusters — or
/// two namespaces — sharing one ADO pool never produce the same name (`--replace` would silently take over
/// the other's live agent). Deterministic: every replica derives the same name.
pub fn agent_name(job_name: &str, cluster_id: &str, namespace: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{cluster_id}\n{namespace}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{job_name}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn job(name: &str, request: Option<u64>, attempt: u32) -> Job {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_AGENT_NAME.to_owned(), format!("{name}-abcd1234")),
            (ANNOTATION_ATTEMPT.to_owned(), attempt.to_string()),
        ]);
        if let Some(r) = request {
            annotations.insert(ANNOTATION_REQUEST.to_owned(), r.to_string());
        }
        Job {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ci".into()),
                labels: Some(BTreeMap::from([(
                    LABEL_AGENTPOOL.to_owned(),
                    "linux".to_owned(),
                )])),
                annotations: Some(annotations),
                creation_timestamp: Some(Time("2026-11-26T10:00:00Z".parse().unwrap())),
                ..ObjectMeta::default()
            },
            ..Job::default()
        }
    }

    fn finished(mut j: Job, kind: &str) -> Job {
        j.status = Some(JobStatus {
            conditions: Some(vec![JobCondition {
                type_: kind.into(),
                status: "True".into(),
                ..JobCondition::default()
            }]),
            ..JobStatus::default()
        });
        j
    }

    #[test]
    fn job_phase_table() {
        let seen = AgentsSeen {
            registered: HashSet::from([
                "linux-r2-a1-abcd1234",
                "linux-r5-a1-abcd1234",
                "linux-r8-a1-abcd1234",
                "linux-r9-a1-abcd1234",
            ]),
            completed: HashSet::from(["linux-r5-a1-abcd1234"]),
            started: HashSet::from(["linux-r9-a1-abcd1234"]),
        };
        let controller_registered = |mut j: Job| {
            j.metadata.annotations.as_mut().unwrap().insert(
                crate::k8s::job::ANNOTATION_AGENT_SECRET.to_owned(),
                "x-agent".to_owned(),
            );
            j
        };
        let cases = [
            // Registered by the controller before its pod ran: starting until its listener connects.
            (
                controller_registered(job("linux-r8-a1", Some(8), 1)),
                plan::JobPhase::Starting,
            ),
            (
                controller_registered(job("linux-r9-a1", Some(9), 1)),
                plan::JobPhase::Running,
            ),
            (
                finished(
                    controller_registered(job("linux-r9-a1", Some(9), 1)),
                    "Failed",
                ),
                plan::JobPhase::Finished,
            ),
            (job("linux-r1-a1", Some(1), 1), plan::JobPhase::Starting),
            (job("linux-r2-a1", Some(2), 1), plan::JobPhase::Running),
            (
                finished(job("linux-r2-a1", Some(2), 1), "Complete"),
                plan::JobPhase::Finished,
            ),
            (
                finished(job("linux-r3-a2", Some(3), 2), "Failed"),
                plan::JobPhase::Finished,
            ),
            (
                finished(job("linux-r4-a1", Some(4), 1), "Suspended"),
                plan::JobPhase::Starting,
            ),
            // Ran its one job, still deregistering: finished, never an idle agent.
            (job("linux-r5-a1", Some(5), 1), plan::JobPhase::Finished),
        ];
        for (j, want) in cases {
            let got = agent_job(&j, &[], &seen).unwrap();
            assert_eq!(got.phase, want, "{}", got.name);
        }
    }

    #[test]
    fn job_annotations_become_request_and_attempt() {
        let got = agent_job(&job("linux-r7-a2", Some(7), 2), &[], &AgentsSeen::default()).unwrap();
        assert_eq!(got.for_request, Some(7));
        assert_eq!(got.attempt, 2);
        assert_eq!(got.agent_pool, plan::PoolRef::new("ci", "linux"));
        let standby = agent_job(&job("linux-s1", None, 1), &[], &AgentsSeen::default()).unwrap();
        assert_eq!(standby.for_request, None);
    }

    fn with_outcome(mut j: Job, created: &str, failed: bool) -> Job {
        j.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        j.status = Some(JobStatus {
            failed: failed.then_some(1),
            succeeded: (!failed).then_some(1),
            ..JobStatus::default()
        });
        j
    }

    #[test]
    fn consecutive_failed_jobs_count_as_startup_failures_until_a_success() {
        let jobs = [
            with_outcome(
                job("linux-r1-a1", Some(1), 1),
                "2026-11-26T10:00:00Z",
                false,
            ),
            with_outcome(job("linux-r2-a1", Some(2), 1), "2026-11-26T10:01:00Z", true),
            with_outcome(job("linux-r3-a1", Some(3), 1), "2026-11-26T10:02:00Z", true),
            job("linux-r4-a1", Some(4), 1),
        ];
        let snap = cluster_snapshot(jobs.iter(), &[], &AgentsSeen::default());
        assert_eq!(snap.failures_of(&plan::PoolRef::new("ci", "linux")), 2);
        let healed = [
            with_outcome(job("linux-r2-a1", Some(2), 1), "2026-11-26T10:01:00Z", true),
            with_outcome(
                job("linux-r3-a1", Some(3), 1),
                "2026-11-26T10:02:00Z",
                false,
            ),
        ];
        let snap = cluster_snapshot(healed.iter(), &[], &AgentsSeen::default());
        assert_eq!(snap.failures_of(&plan::PoolRef::new("ci", "linux")), 0);
    }

    #[test]
    fn a_job_without_our_labels_is_not_an_agent_job() {
        let mut j = job("other", None, 1);
        j.metadata.labels = None;
        assert!(agent_job(&j, &[], &AgentsSeen::default()).is_none());
    }

    #[test]
    fn agent_names_differ_across_clusters_and_namespaces_and_are_stable() {
        let a = agent_name("linux-r1-a1", "cluster-a", "ci");
        assert_eq!(a, agent_name("linux-r1-a1", "cluster-a", "ci"));
        assert_ne!(a, agent_name("linux-r1-a1", "cluster-b", "ci"));
        assert_ne!(a, agent_name("linux-r1-a1", "cluster-a", "ci2"));
        assert!(a.starts_with("linux-r1-a1-") && a.len() == "linux-r1-a1-".len() + 8);
    }

    #[test]
    fn a_request_an_agent_already_holds_is_not_pending_even_if_the_request_list_is_older() {
        let requests: Vec<TaskAgentJobRequest> =
            serde_json::from_value(serde_json::json!([{"requestId": 1}, {"requestId": 2}]))
                .unwrap();
        let agents: Vec<TaskAgent> = serde_json::from_value(serde_json::json!([
            {"id": 7, "name": "linux-r1-a1-abcd1234", "assignedRequest": {"requestId": 1}}
        ]))
        .unwrap();
        let snap = ado_snapshot("linux", &requests, &agents, None);
        let pending: Vec<i64> = snap
            .requests
            .iter()
            .filter(|r| r.is_pending())
            .map(|r| r.id)
            .collect();
        assert_eq!(pending, vec![2]);
        assert_eq!(
            snap.requests[0].reserved_agent.as_ref().map(|a| a.id),
            Some(7)
        );
    }

    #[test]
    fn resource_usage_becomes_parallel_slots() {
        let usage: ResourceUsage = serde_json::from_value(serde_json::json!({
            "resourceLimit": {"parallelismTag": "Private", "isHosted": false, "totalCount": 3},
            "usedCount": 2,
            "runningRequests": [{"requestId": 11}, {"requestId": 12}]
        }))
        .unwrap();
        let p = parallel_jobs(&usage).unwrap();
        assert_eq!((p.total, p.used), (3, 2));
        assert_eq!(p.slot_holders, vec![11, 12]);
    }
}

/// What the re-check of an agent being removed found (after disabling it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// Nothing holds it: delete its Job and the agent.
    StillIdle,
    /// It got a request in between (its `assignedRequest`, or a request's `reservedAgent`): re-enable it
    /// and keep it.
    GotWork,
    /// It already completed its one job and is deregistering: leave it, its Job ends by itself.
    Finishing,
}

/// The re-check of the disable → re-check → delete removal, from fresh reads of the agent and the requests.
pub fn removal_recheck(
    agent: Option<&TaskAgent>,
    requests: &[TaskAgentJobRequest],
    agent_id: i32,
    agent_name: &str,
) -> Recheck {
    if agent.is_some_and(|a| a.last_completed_request.is_some()) {
        return Recheck::Finishing;
    }
    let reserved = requests.iter().any(|r| {
        r.finish_time.is_none()
            && r.reserved_agent
                .as_ref()
                .is_some_and(|a| a.id == agent_id || a.name.eq_ignore_ascii_case(agent_name))
    });
    if reserved || agent.is_some_and(|a| a.assigned_request.is_some()) {
        Recheck::GotWork
    } else {
        Recheck::StillIdle
    }
}

/// The phases of one request's time to agent, each measured from its queue time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTimings {
    /// The request.
    pub request: plan::RequestId,
    /// The AgentPool of the agent that received it.
    pub agent_pool: plan::PoolRef,
    /// (phase, time since queued), for each phase whose time is known.
    pub phases: Vec<(crate::metrics::Phase, std::time::Duration)>,
}

/// For every request that one of our agents has received: how long each phase of getting it an agent took
/// (queued → Job created → pod running → agent registered → request received). Pure: computed from the
/// snapshots, so the poll loop only records each request once.
pub fn request_timings(
    requests: &[TaskAgentJobRequest],
    agents: &[TaskAgent],
    jobs: &[&Job],
    pods: &[&Pod],
) -> Vec<RequestTimings> {
    use crate::metrics::Phase;
    let mut out = Vec::new();
    for r in requests {
        let (Some(queued), Some(received), Some(agent)) =
            (r.queue_time, r.receive_time, r.reserved_agent.as_ref())
        else {
            continue;
        };
        let Some(job) = jobs.iter().find(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_AGENT_NAME))
                .is_some_and(|n| n.eq_ignore_ascii_case(&agent.name))
        }) else {
            continue; // not one of ours
        };
        let (Some(ns), Some(pool)) = (
            job.metadata.namespace.clone(),
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_AGENTPOOL))
                .cloned(),
        ) else {
            continue;
        };
        let since = |t: Timestamp| std::time::Duration::try_from(t.duration_since(queued)).ok();
        let job_name = job.metadata.name.as_deref().unwrap_or_default();
        let pod_running = pods
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("job-name"))
                        .map(String::as_str)
                        == Some(job_name)
            })
            .filter_map(|p| p.status.as_ref()?.start_time.as_ref().map(|t| t.0))
            .min();
        let registered = agents
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(&agent.name))
            .and_then(|a| a.created_on);
        let mut phases = Vec::new();
        for (phase, at) in [
            (
                Phase::job_created,
                job.metadata.creation_timestamp.as_ref().map(|t| t.0),
            ),
            (Phase::pod_running, pod_running),
            (Phase::agent_registered, registered),
            (Phase::request_received, Some(received)),
        ] {
            if let Some(d) = at.and_then(since) {
                phases.push((phase, d));
            }
        }
        out.push(RequestTimings {
            request: plan::RequestId::from(r.request_id),
            agent_pool: plan::PoolRef::new(ns, pool),
            phases,
        });
    }
    out
}

#[cfg(test)]
mod recheck_tests {
    use super::*;

    #[test]
    fn removal_recheck_table() {
        let agent = |extra: serde_json::Value| -> TaskAgent {
            let mut v = serde_json::json!({"id": 7, "name": "linux-1-1-abcd1234"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(v).unwrap()
        };
        let reqs = |v: serde_json::Value| -> Vec<TaskAgentJobRequest> {
            serde_json::from_value(v).unwrap()
        };
        let idle = agent(serde_json::json!({}));
        let assigned = agent(serde_json::json!({"assignedRequest": {"requestId": 3}}));
        let done = agent(serde_json::json!({"lastCompletedRequest": {"requestId": 2}}));
        let none = reqs(serde_json::json!([]));
        let reserved_by_id =
            reqs(serde_json::json!([{"requestId": 3, "reservedAgent": {"id": 7, "name": "x"}}]));
        let reserved_by_name = reqs(
            serde_json::json!([{"requestId": 3, "reservedAgent": {"id": 99, "name": "LINUX-1-1-ABCD1234"}}]),
        );
        let finished = reqs(
            serde_json::json!([{"requestId": 3, "finishTime": "2026-11-26T10:00:00Z",
            "reservedAgent": {"id": 7, "name": "linux-1-1-abcd1234"}}]),
        );
        let cases = [
            (Some(&idle), &none, Recheck::StillIdle),
            (None, &none, Recheck::StillIdle),
            (Some(&assigned), &none, Recheck::GotWork),
            (Some(&idle), &reserved_by_id, Recheck::GotWork),
            (Some(&idle), &reserved_by_name, Recheck::GotWork),
            (Some(&idle), &finished, Recheck::StillIdle),
            (Some(&done), &reserved_by_id, Recheck::Finishing),
        ];
        for (i, (a, r, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                removal_recheck(a, r, 7, "linux-1-1-abcd1234"),
                want,
                "case {i}"
            );
        }
    }
}

#[cfg(test)]
mod timing_tests {
    use super::*;
    use crate::metrics::Phase;
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::time::Duration;

    #[test]
    fn phases_are_measured_from_the_queue_time_for_our_agents_only() {
        let requests: Vec<TaskAgentJobRequest> = serde_json::from_value(serde_json::json!([
            {"requestId": 1, "queueTime": "2026-11-26T10:00:00Z", "receiveTime": "2026-11-26T10:00:09Z",
             "reservedAgent": {"id": 3, "name": "linux-1-1-abcd1234"}},
            {"requestId": 2, "queueTime": "2026-11-26T10:00:00Z", "receiveTime": "2026-11-26T10:00:05Z",
             "reservedAgent": {"id": 4, "name": "someone-elses-agent"}},
            {"requestId": 3, "queueTime": "2026-11-26T10:00:00Z"}
        ]))
        .unwrap();
        let agents: Vec<TaskAgent> = serde_json::from_value(serde_json::json!([
            {"id": 3, "name": "linux-1-1-abcd1234", "createdOn": "2026-11-26T10:00:07Z"}
        ]))
        .unwrap();
        let job = Job {
            metadata: ObjectMeta {
                name: Some("linux-1-1".into()),
                namespace: Some("ci".into()),
                labels: Some(BTreeMap::from([(
                    LABEL_AGENTPOOL.to_owned(),
                    "linux".to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_AGENT_NAME.to_owned(),
                    "linux-1-1-abcd1234".to_owned(),
                )])),
                creation_timestamp: Some(Time("2026-11-26T10:00:02Z".parse().unwrap())),
                ..ObjectMeta::default()
            },
            ..Job::default()
        };
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("ci".into()),
                labels: Some(BTreeMap::from([(
                    "job-name".to_owned(),
                    "linux-1-1".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                start_time: Some(Time("2026-11-26T10:00:03Z".parse().unwrap())),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        let t = request_timings(&requests, &agents, &[&job], &[&pod]);
        assert_eq!(
            t.len(),
            1,
            "only the received request served by our agent: {t:?}"
        );
        assert_eq!(t[0].request, 1);
        assert_eq!(
            t[0].phases,
            vec![
                (Phase::job_created, Duration::from_secs(2)),
                (Phase::pod_running, Duration::from_secs(3)),
                (Phase::agent_registered, Duration::from_secs(7)),
                (Phase::request_received, Duration::from_secs(9)),
            ]
        );
    }
}

#[cfg(test)]
mod agent_pod_tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        let mut base = serde_json::json!({
            "metadata": {
                "name": "linux-1-1-abc", "namespace": "ci",
                "labels": {"azp-autoscaler.dev/agentpool": "linux"},
                "annotations": {"azp-autoscaler.dev/agent-name": "linux-1-1-4f3d08ae"},
            },
            "status": {"phase": "Running"},
        });
        json_merge(&mut base, v);
        serde_json::from_value(base).expect("pod")
    }

    fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn pods_become_protection_views() {
        let running = agent_pod(&pod(serde_json::json!({}))).expect("ours");
        assert_eq!(running.agent_pool, plan::PoolRef::new("ci", "linux"));
        assert_eq!(running.agent_name, "linux-1-1-4f3d08ae");
        assert!(!running.marked_busy && !running.ended && running.disruption.is_none());

        let busy = agent_pod(&pod(
            serde_json::json!({"metadata": {"labels": {"azp-autoscaler.dev/busy": "true"}}}),
        ))
        .expect("ours");
        assert!(busy.marked_busy);

        for (what, v) in [
            (
                "succeeded",
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
            ("failed", serde_json::json!({"status": {"phase": "Failed"}})),
            (
                "terminating",
                serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
        ] {
            assert!(agent_pod(&pod(v)).expect("ours").ended, "{what}");
        }

        let evicted = agent_pod(&pod(serde_json::json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"},
        ]}})))
        .expect("ours");
        assert_eq!(evicted.disruption.as_deref(), Some("EvictionByEvictionAPI"));
        let not_disrupted = agent_pod(&pod(serde_json::json!({"status": {"conditions": [
            {"type": "DisruptionTarget", "status": "False", "reason": "Whatever"},
        ]}})))
        .expect("ours");
        assert_eq!(not_disrupted.disruption, None);

        let foreign = pod(serde_json::json!({"metadata": {"labels": null}}));
        assert!(
            agent_pod(&foreign).is_none(),
            "no AgentPool label: not ours"
        );
    }
}

/// Agent Jobs this controller created (or found existing on create) that its watch cache may not show
/// yet: after a watch error the cache lags behind the API server for a while, and planning without them
/// would exceed `maxAgents` and start second agents for requests. They count until the cache shows them
/// or `ttl` passes (the watch has re-synced by then).
#[derive(Debug, Default)]
pub struct ExpectedJobs {
    jobs: BTreeMap<(String, String), (Job, Timestamp)>,
}

impl ExpectedJobs {
    pub fn insert(&mut self, job: Job, now: Timestamp) {
        if let (Some(ns), Some(name)) = (job.metadata.namespace.clone(), job.metadata.name.clone())
        {
            self.jobs.insert((ns, name), (job, now));
        }
    }

    /// Forgets the Jobs the cache shows and those expected for longer than `ttl`; returns the others,
    /// which the snapshot must add to the cache's Jobs.
    pub fn settle<'a>(
        &mut self,
        cached: impl IntoIterator<Item = &'a Job>,
        now: Timestamp,
        ttl: SignedDuration,
    ) -> Vec<&Job> {
        let seen: HashSet<(String, String)> = cached
            .into_iter()
            .filter_map(|j| Some((j.metadata.namespace.clone()?, j.metadata.name.clone()?)))
            .collect();
        self.jobs
            .retain(|key, (_, since)| !seen.contains(key) && now.duration_since(*since) < ttl);
        self.jobs.values().map(|(j, _)| j).collect()
    }

    /// The agent names of the expected Jobs.
    pub fn agent_names(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter_map(|(j, _)| {
                j.metadata
                    .annotations
                    .as_ref()?
                    .get(ANNOTATION_AGENT_NAME)
                    .cloned()
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

#[cfg(test)]
mod expected_jobs_tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn job(ns: &str, name: &str) -> Job {
        Job {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Job::default()
        }
    }

    #[test]
    fn created_jobs_count_until_the_cache_shows_them_or_the_ttl_passes() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let ttl = SignedDuration::from_secs(120);
        let mut expected = ExpectedJobs::default();
        expected.insert(job("ci", "linux-1-1"), t0);
        expected.insert(job("ci", "linux-2-1"), t0);
        expected.insert(job("other", "linux-1-1"), t0);

        // The cache lags: every created Job is added.
        let names = |v: Vec<&Job>| -> Vec<String> {
            v.iter()
                .map(|j| {
                    format!(
                        "{}/{}",
                        j.metadata.namespace.clone().unwrap_or_default(),
                        j.metadata.name.clone().unwrap_or_default()
                    )
                })
                .collect()
        };
        assert_eq!(
            names(expected.settle([], t0, ttl)),
            ["ci/linux-1-1", "ci/linux-2-1", "other/linux-1-1"]
        );
        // The cache shows one (namespace and name both match): only the others are added.
        let cached = [job("ci", "linux-1-1")];
        assert_eq!(
            names(expected.settle(&cached, t0 + SignedDuration::from_secs(5), ttl)),
            ["ci/linux-2-1", "other/linux-1-1"]
        );
        // Once seen, a Job is forgotten: a later deletion is the cache's to report.
        assert_eq!(
            names(expected.settle([], t0 + SignedDuration::from_secs(6), ttl)),
            ["ci/linux-2-1", "other/linux-1-1"]
        );
        // Past the TTL nothing is added any more.
        assert!(expected.settle([], t0 + ttl, ttl).is_empty());
        assert!(expected.is_empty());
    }
}

#[cfg(test)]
mod deregistered_tests {
    use super::*;

    fn agent(name: &str, completed: bool) -> TaskAgent {
        let mut v = serde_json::json!({"id": 1, "name": name, "status": "online", "enabled": true});
        if completed {
            v["lastCompletedRequest"] = serde_json::json!({"requestId": 9});
        }
        serde_json::from_value(v).expect("agent")
    }

    #[test]
    fn an_agent_seen_registered_and_gone_now_has_completed() {
        let ours: HashSet<String> = ["a-1", "a-2", "a-3"].map(str::to_owned).into();
        let mut before = HashSet::new();
        // First list: a-1 and a-2 registered (a-3 still starting); a foreign agent is not remembered.
        let first = [
            agent("a-1", false),
            agent("a-2", false),
            agent("vm-7", false),
        ];
        remember_registered(&mut before, &first, &ours);
        assert_eq!(before, ["a-1", "a-2"].map(str::to_owned).into());

        // Second list: a-1 deregistered after its job, a-2 completed but still registered.
        let second = [agent("a-2", true)];
        let seen = AgentsSeen::from_agents(&second).with_deregistered(&before);
        assert!(
            seen.completed.contains("a-1"),
            "gone after being registered"
        );
        assert!(seen.completed.contains("a-2"), "lastCompletedRequest");
        assert!(
            !seen.completed.contains("a-3"),
            "never registered yet: still starting, not completed"
        );

        // Jobs gone (TTL): their names are forgotten.
        remember_registered(&mut before, &second, &HashSet::from(["a-2".to_owned()]));
        assert_eq!(before, HashSet::from(["a-2".to_owned()]));
    }
}
