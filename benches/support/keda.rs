//! A replay of KEDA's documented decision loop for a `ScaledJob` with one `azure-pipelines` trigger,
//! written from KEDA's docs (ScaledJob spec, scaling strategies, the Azure Pipelines scaler page) and the
//! behaviour of its sources as of 2.20; it acts on the same simulator and the same API server as our
//! controller, creating plain agent Jobs from the same pod template, named `keda-agent-<random>`.
//!
//! Every `pollingInterval` (30 s by default, first poll at once):
//! 1. **One ADO call per trigger**: `GET {org}/_apis/distributedtask/pools/{id}/jobrequests?$top=250`
//!    (`jobsToFetch` 250; ADO, and the simulator, return at most 200: KEDA #6819).
//! 2. **Queue length** = requests with `result == null` and no `receiveTime` (KEDA ≥ 2.20, #7757), no
//!    demands, `targetPipelinesQueueLength` 1. A request already *assigned* to an agent but not yet
//!    *received* still counts (KEDA #7747 in its remaining form: the request is counted as demand while
//!    the agent that holds it is also counted as a running Job).
//! 3. **`default` scaling strategy**: `maxScale = min(queueLength, maxReplicaCount)`, running = every
//!    unfinished Job of the ScaledJob (pending, starting or busy), new Jobs = `maxScale − running`
//!    (when > 0). Busy agents are therefore subtracted from the agents made for *waiting* requests
//!    (KEDA #7878): with `b` busy Jobs, `b` waiting requests get no agent until some busy one ends.
//!
//! Not replayed (irrelevant here): demands/parent matching, activation threshold, history-limit cleanup
//! of finished Jobs, `minReplicaCount` (0).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use azp_testbed::bed::{Bed, ORG};
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::Deserialize;

/// Label of the replay's Jobs (KEDA's own `scaledjob.keda.sh/name`).
pub const LABEL: &str = "scaledjob.keda.sh/name";
pub const SCALED_JOB: &str = "azp-bench";
pub const SELECTOR: &str = "scaledjob.keda.sh/name=azp-bench";
const PAT: &str = "keda-bench-pat";
const PAT_OID: &str = "00000000-0000-0000-0000-00000000feda";

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub polling_interval: Duration,
    pub max_replica_count: u32,
    pub jobs_to_fetch: u32,
}

/// What one poll saw and did.
#[derive(Clone, Debug, Default)]
pub struct Poll {
    pub at_secs: f64,
    /// Requests in the response (at most 200).
    pub listed: usize,
    pub queue_length: usize,
    /// Counted in the queue though ADO already assigned them to an agent (#7747).
    pub assigned_not_received: usize,
    /// Unfinished Jobs (KEDA's "running").
    pub running_jobs: usize,
    /// Of those, Jobs whose agent runs a request: requests received and unfinished (#7878).
    pub busy: usize,
    pub created: usize,
    /// Waiting requests (no receiveTime) left without an agent by this decision.
    pub short: usize,
}

#[derive(Default, Debug)]
pub struct Record {
    pub polls: Vec<Poll>,
    pub errors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequests {
    #[serde(default)]
    value: Vec<JobRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest {
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    receive_time: Option<String>,
    #[serde(default)]
    assign_time: Option<String>,
}

/// A running replay; [`Replay::stop`] ends it and returns what it did.
pub struct Replay {
    record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replay {
    /// Gives the replay a PAT in the organization (KEDA's documented authentication), registers the
    /// offline placeholder agent KEDA's docs ask for (without one ADO fails requests at once: no agent in
    /// the pool), and starts polling.
    pub async fn start(bed: &Bed, settings: Settings) -> Replay {
        bed.sim.add_member(ORG, PAT_OID).expect("member");
        bed.sim.add_pat(ORG, PAT, PAT_OID).expect("pat");
        let pool_id = bed.sim.pool_id(ORG, "linux").expect("pool id");
        let http = bed.sim.http_client();
        register_placeholder(&http, &bed.org_url(), pool_id).await;
        // KEDA sends no api-version (ADO then serves its default); the simulator insists on one.
        let url = format!(
            "{}/_apis/distributedtask/pools/{pool_id}/jobrequests?$top={}&api-version=7.1",
            bed.org_url(),
            settings.jobs_to_fetch
        );
        let template = job_template(bed);
        let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.namespace);
        let record = Arc::new(Mutex::new(Record::default()));
        let shared = record.clone();
        let started = std::time::Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(settings.polling_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let at_secs = started.elapsed().as_secs_f64();
                let outcome = poll(&http, &url, &jobs, &template, settings).await;
                let mut record = shared.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(mut p) => {
                        p.at_secs = at_secs;
                        record.polls.push(p);
                    }
                    Err(e) => record.errors.push(e),
                }
            }
        });
        Replay { record, task }
    }

    /// Stops polling (between polls or in one) and returns what it did.
    pub async fn stop(self) -> Record {
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.record.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn register_placeholder(http: &reqwest::Client, org_url: &str, pool_id: u32) {
    use base64::Engine;
    // A key nobody holds: the placeholder never connects.
    let modulus: Vec<u8> = (0..256u32).map(|i| (i * 7 + 1) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({
        "name": "keda-placeholder",
        "version": azp_testbed::standin::AGENT_VERSION,
        "authorization": {"publicKey": {"modulus": b64.encode(modulus), "exponent": b64.encode([1u8, 0, 1])}}
    });
    let response = http
        .post(format!(
            "{org_url}/_apis/distributedtask/pools/{pool_id}/agents?api-version=7.1"
        ))
        .basic_auth("", Some(PAT))
        .json(&body)
        .send()
        .await
        .expect("register the placeholder");
    assert!(
        response.status().is_success(),
        "placeholder: HTTP {}",
        response.status()
    );
}

async fn poll(
    http: &reqwest::Client,
    url: &str,
    jobs: &Api<Job>,
    template: &Job,
    settings: Settings,
) -> Result<Poll, String> {
    let response = http
        .get(url)
        .basic_auth("", Some(PAT))
        .send()
        .await
        .map_err(|e| format!("jobrequests: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("jobrequests: HTTP {}", response.status()));
    }
    let body: JobRequests = response
        .json()
        .await
        .map_err(|e| format!("jobrequests body: {e}"))?;
    let unfinished = body.value.iter().filter(|r| r.result.is_none());
    let queued: Vec<&JobRequest> = unfinished
        .clone()
        .filter(|r| r.receive_time.is_none())
        .collect();
    let busy = unfinished.filter(|r| r.receive_time.is_some()).count();
    let queue_length = queued.len();
    let assigned_not_received = queued.iter().filter(|r| r.assign_time.is_some()).count();

    let list = jobs
        .list(&ListParams::default().labels(SELECTOR))
        .await
        .map_err(|e| format!("list Jobs: {e}"))?;
    let running_jobs = list
        .items
        .iter()
        .filter(|j| {
            !j.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    })
                })
        })
        .count();
    let max_scale = queue_length.min(settings.max_replica_count as usize);
    let created = max_scale.saturating_sub(running_jobs);
    for _ in 0..created {
        jobs.create(&PostParams::default(), template)
            .await
            .map_err(|e| format!("create Job: {e}"))?;
    }
    // Agents free for the waiting requests after this decision: unfinished Jobs not running a request.
    let free = (running_jobs + created).saturating_sub(busy);
    Ok(Poll {
        listed: body.value.len(),
        queue_length,
        assigned_not_received,
        running_jobs,
        busy,
        created,
        short: queue_length.saturating_sub(free),
        ..Poll::default()
    })
}

/// The ScaledJob's `jobTargetRef`: the same pod template as the bed's AgentPools, with what a KEDA user
/// sets by hand (organization, pool, agent name = pod name, workload identity label), run once.
fn job_template(bed: &Bed) -> Job {
    let pool = bed.agentpool("keda", "linux", 1);
    let mut template = pool["spec"]["template"].clone();
    template["metadata"] = serde_json::json!({
        "labels": {LABEL: SCALED_JOB, "azure.workload.identity/use": "true"}
    });
    template["spec"]["restartPolicy"] = "Never".into();
    template["spec"]["containers"][0]["env"] = serde_json::json!([
        {"name": "AZP_URL", "value": bed.org_url()},
        {"name": "AZP_POOL", "value": "linux"},
        {"name": "AZP_AGENT_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]);
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "generateName": "keda-agent-",
            "labels": {LABEL: SCALED_JOB, "app.kubernetes.io/managed-by": "keda-operator"}
        },
        "spec": {"backoffLimit": 0, "template": template}
    }))
    .expect("a Job")
}
