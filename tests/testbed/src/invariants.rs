//! Invariants over observed state (agent Jobs from the API server, requests from the simulator), shared by
//! the end-to-end tests and the fault suite.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;

use crate::sim::RequestInfo;

/// Annotation naming the request an agent Job was made for.
pub const ANNOTATION_REQUEST: &str = "azp-autoscaler.dev/request-id";
/// Annotation naming the agent an agent Job runs.
pub const ANNOTATION_AGENT: &str = "azp-autoscaler.dev/agent-name";
/// Label naming the AgentPool of an agent Job.
pub const LABEL_AGENTPOOL: &str = "azp-autoscaler.dev/agentpool";

/// Whether a Job has finished (a pod succeeded or failed; agent Jobs run one pod, no retry).
pub fn job_finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .is_some_and(|s| s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) > 0)
}

/// The agent an agent Job runs.
pub fn job_agent(job: &Job) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_AGENT)
        .map(String::as_str)
}

/// Unfinished agent Jobs per AgentPool (Jobs being deleted included: their pod may still run).
pub fn unfinished_per_agentpool(jobs: &[Job]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for j in jobs.iter().filter(|j| !job_finished(j)) {
        let pool = j
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_AGENTPOOL))
            .cloned()
            .unwrap_or_default();
        out.entry(pool)
            .or_default()
            .push(j.metadata.name.clone().unwrap_or_default());
    }
    out
}

/// Requests with two unfinished agent Jobs waiting for them: request id → the Jobs. A Job whose agent took
/// another request (ADO decides which agent gets which request) no longer waits for the one it was made
/// for: the planner may then make attempt 2, which is not a duplicate. Jobs being deleted do not wait.
pub fn requests_with_two_unfinished_jobs(
    jobs: &[Job],
    requests: &[RequestInfo],
) -> BTreeMap<String, Vec<String>> {
    let serving: BTreeMap<&str, u64> = requests
        .iter()
        .filter_map(|r| Some((r.agent_name.as_deref()?, r.request_id)))
        .collect();
    let mut waiting_for: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for j in jobs {
        if job_finished(j) || j.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let annotations = j.metadata.annotations.clone().unwrap_or_default();
        let (Some(r), Some(agent)) = (
            annotations.get(ANNOTATION_REQUEST),
            annotations.get(ANNOTATION_AGENT),
        ) else {
            continue;
        };
        if serving
            .get(agent.as_str())
            .is_some_and(|other| other.to_string() != *r)
        {
            continue;
        }
        waiting_for
            .entry(r.clone())
            .or_default()
            .push(j.metadata.name.clone().unwrap_or_default());
    }
    waiting_for.retain(|_, v| v.len() > 1);
    waiting_for
}

/// Agent Jobs per AgentPool that hold an agent able to take work — what `maxAgents` caps: unfinished, their
/// pod not terminated, and their run-once agent not done with a request already (a pod still deregistering
/// after its one job takes no more work).
pub fn agents_per_agentpool(
    jobs: &[Job],
    pods: &[k8s_openapi::api::core::v1::Pod],
    requests: &[RequestInfo],
) -> BTreeMap<String, Vec<String>> {
    let done_agents: std::collections::BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.is_finished())
        .filter_map(|r| r.agent_name.as_deref())
        .collect();
    let terminated = |job: &str| {
        let own: Vec<_> = pods
            .iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("job-name"))
                    .is_some_and(|j| j == job)
            })
            .collect();
        !own.is_empty()
            && own.iter().all(|p| {
                p.metadata.deletion_timestamp.is_some()
                    || p.status
                        .as_ref()
                        .is_some_and(|s| matches!(s.phase.as_deref(), Some("Succeeded" | "Failed")))
            })
    };
    let mut out = unfinished_per_agentpool(jobs);
    let by_name: BTreeMap<&str, &Job> = jobs
        .iter()
        .filter_map(|j| Some((j.metadata.name.as_deref()?, j)))
        .collect();
    for names in out.values_mut() {
        names.retain(|n| {
            let agent = by_name.get(n.as_str()).and_then(|j| job_agent(j));
            !terminated(n) && !agent.is_some_and(|a| done_agents.contains(a))
        });
    }
    out
}
