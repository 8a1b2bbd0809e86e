//! The fault suite (issue 5): every scenario on the real local API server (controller process + ADO
//! simulator + node harness + agent entrypoint + stand-in agent), each in its own namespace with its own
//! simulator, a few at once, all against the one shared API server. After each scenario the invariants
//! are derived from what was observed — agent Jobs sampled from the API server during the scenario, the
//! simulator's requests, agents and agent audit log — and a table of scenarios × invariants is printed to
//! stderr (`cargo test --test fault_suite -- --nocapture`); the test fails if any cell is ✗ or a scenario
//! could not be driven. Needs `tests/cluster/up.sh` and `cargo build --workspace --bins` (tests/run.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azp_testbed::bed::{
    AGENT_CLIENT_ID, Bed, BedOptions, CONTROLLER_CLIENT_ID, ORG, Replica, condition, eventually,
    scrape_metric,
};
use azp_testbed::invariants::{
    agents_per_agentpool, job_agent, job_finished, requests_with_two_unfinished_jobs,
    unfinished_per_agentpool,
};
use azp_testbed::proxy::TcpProxy;
use azp_testbed::sim::testing::TestIssuer;
use azp_testbed::sim::{
    AgentAction, AgentInfo, EndpointClass, FEDERATED_AUDIENCE, Fault, FaultKind,
    FederatedCredential, IdentitySpec, PoolRole, RequestInfo, RequestSpec,
};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::watcher;
use tokio::task::JoinHandle;

/// `--orphan-grace-seconds` of every controller in the suite.
const GRACE_SECS: u64 = 3;
/// How long the requests of a scenario may take to finish once its faults are over.
const SETTLE: Duration = Duration::from_secs(180);
/// How long a scenario may wait for a step (a deadline against hangs, not a speed assertion).
const STEP: Duration = Duration::from_secs(90);
/// Scenarios at once (each runs a controller, a node harness and its agent processes).
const CONCURRENCY: usize = 3;
const POOL: &str = "linux";
const AGENTPOOL: &str = "linux";
const JOBS_SELECTOR: &str = "app.kubernetes.io/managed-by=azp-autoscaler";
const OWNER_CAP: &str = "azp-autoscaler.owner";
const PLACEHOLDER_CAP: &str = "azp-autoscaler.placeholder";
const FOREIGN_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000f0e19";
const PEER_CONTROLLER_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000bc0de";
const PEER_AGENT_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000ba9e1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    KillBurst,
    RateLimited,
    ServerErrors,
    Malformed,
    TokenOutage,
    TokenRotation,
    ApiServerRestart,
    LeaderChange,
    PodsKilled,
    NodeDrain,
    CancelWhileStarting,
    DeregistrationFails,
    SecondCluster,
}

impl Scenario {
    /// The longest first, so the suite's wall time is not its tail.
    const ALL: [Scenario; 13] = [
        Scenario::KillBurst,
        Scenario::LeaderChange,
        Scenario::SecondCluster,
        Scenario::NodeDrain,
        Scenario::PodsKilled,
        Scenario::TokenOutage,
        Scenario::TokenRotation,
        Scenario::ApiServerRestart,
        Scenario::RateLimited,
        Scenario::ServerErrors,
        Scenario::Malformed,
        Scenario::CancelWhileStarting,
        Scenario::DeregistrationFails,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::KillBurst => "controller SIGKILL mid 200-burst",
            Scenario::RateLimited => "ADO 429 + Retry-After",
            Scenario::ServerErrors => "ADO 5xx bursts",
            Scenario::Malformed => "malformed ADO responses",
            Scenario::TokenOutage => "token endpoint outage",
            Scenario::TokenRotation => "federated token rotation",
            Scenario::ApiServerRestart => "API server restart",
            Scenario::LeaderChange => "leader change mid-burst",
            Scenario::PodsKilled => "agent pods killed mid-job",
            Scenario::NodeDrain => "node drain",
            Scenario::CancelWhileStarting => "build cancelled, agent starting",
            Scenario::DeregistrationFails => "deregistration fails in pod",
            Scenario::SecondCluster => "second cluster, same ADO pool",
        }
    }

    /// Namespace prefix.
    fn slug(self) -> &'static str {
        match self {
            Scenario::KillBurst => "fs-killburst",
            Scenario::RateLimited => "fs-429",
            Scenario::ServerErrors => "fs-5xx",
            Scenario::Malformed => "fs-malformed",
            Scenario::TokenOutage => "fs-tokenout",
            Scenario::TokenRotation => "fs-rotation",
            Scenario::ApiServerRestart => "fs-apirestart",
            Scenario::LeaderChange => "fs-leader",
            Scenario::PodsKilled => "fs-podkill",
            Scenario::NodeDrain => "fs-drain",
            Scenario::CancelWhileStarting => "fs-cancel",
            Scenario::DeregistrationFails => "fs-dereg",
            Scenario::SecondCluster => "fs-twoclusters",
        }
    }

    fn max_agents(self) -> u32 {
        match self {
            Scenario::KillBurst => 20,
            Scenario::SecondCluster => 4,
            _ => 5,
        }
    }
}

const INVARIANTS: [&str; 6] = [
    "served",
    "≤maxAgents",
    "no busy removed",
    "1 Job/request",
    "no orphans",
    "foreign untouched",
];

#[derive(Clone, Debug)]
enum Cell {
    Pass(String),
    Fail(String),
    Na(String),
}

impl Cell {
    fn symbol(&self) -> &'static str {
        match self {
            Cell::Pass(_) => "✓",
            Cell::Fail(_) => "✗",
            Cell::Na(_) => "n/a",
        }
    }
    fn reason(&self) -> &str {
        match self {
            Cell::Pass(r) | Cell::Fail(r) | Cell::Na(r) => r,
        }
    }
    fn from_problems(problems: Vec<String>, pass: String) -> Cell {
        if problems.is_empty() {
            Cell::Pass(pass)
        } else {
            Cell::Fail(summarize(&problems))
        }
    }
}

fn summarize(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > 3 {
        let _ = write!(s, "; … {} in all", problems.len());
    }
    s
}

/// What the samplers saw while the scenario ran.
#[derive(Default, Clone)]
struct Observed {
    samples: u64,
    sample_errors: u64,
    /// (namespace, AgentPool) → the most agents able to take work seen at once.
    peak: BTreeMap<(String, String), usize>,
    /// (namespace, AgentPool) → the most unfinished agent Jobs seen at once (pods still deregistering
    /// after their one job included).
    raw_peak: BTreeMap<(String, String), usize>,
    over_max: Vec<String>,
    duplicates: BTreeMap<String, String>,
    /// Requests with two unfinished Jobs in the previous sample (a duplicate counts when two samples in a
    /// row see it: one sample reads Jobs and requests at two moments).
    suspects: BTreeSet<String>,
    busy_job_deletions: BTreeMap<String, String>,
}

/// One cluster of a scenario: a bed and its controller's identity.
struct Cluster {
    bed: Bed,
    controller_client_id: &'static str,
    agent_client_id: &'static str,
}

/// A scenario in progress.
struct Run {
    scenario: Scenario,
    clusters: Vec<Cluster>,
    queued: Vec<u64>,
    /// Requests the scenario itself killed or cancelled, with why.
    excused: BTreeMap<u64, String>,
    /// The foreign agents as registered.
    foreign: Vec<AgentInfo>,
    observed: Arc<Mutex<Observed>>,
    tasks: Vec<JoinHandle<()>>,
    replicas: Vec<Replica>,
    proxy: Option<TcpProxy>,
    notes: Vec<String>,
}

impl Run {
    fn bed(&self) -> &Bed {
        &self.clusters[0].bed
    }

    fn queue(&mut self, n: usize, duration: Duration) -> Result<Vec<u64>, String> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(
                self.bed()
                    .sim
                    .queue(ORG, POOL, RequestSpec::new().duration(duration))
                    .map_err(|e| e.to_string())?,
            );
        }
        self.queued.extend(&ids);
        Ok(ids)
    }

    fn requests(&self) -> Vec<RequestInfo> {
        self.bed().sim.requests(ORG, POOL).unwrap_or_default()
    }

    /// Requests of `ids` an agent is running now.
    fn running(&self, ids: &[u64]) -> Vec<RequestInfo> {
        self.requests()
            .into_iter()
            .filter(|r| ids.contains(&r.request_id) && r.receive_time.is_some() && !r.is_finished())
            .collect()
    }

    async fn wait_for<F, Fut>(&self, what: &str, mut check: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        eventually(what, STEP, || {
            let f = check();
            async move { f.await.then_some(()) }
        })
        .await
    }

    async fn unfinished_jobs(&self) -> usize {
        self.bed()
            .jobs()
            .await
            .map(|jobs| jobs.iter().filter(|j| !job_finished(j)).count())
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for c in &self.clusters {
            let _ = writeln!(
                out,
                "=== controller of {} ({}) ===\n{}",
                c.bed.namespace,
                c.bed.dir.display(),
                c.bed.controller_logs()
            );
        }
        for r in &self.replicas {
            let _ = writeln!(out, "=== replica {} ===\n{}", r.log.display(), r.logs());
        }
        out
    }
}

/// The outcome of one scenario.
struct Report {
    scenario: Scenario,
    cells: Vec<Cell>,
    error: Option<String>,
    notes: Vec<String>,
    logs: String,
    wall: Duration,
}

impl Report {
    fn failed(&self) -> bool {
        self.error.is_some() || self.cells.iter().any(|c| matches!(c, Cell::Fail(_)))
    }
}

fn options(scenario: Scenario) -> BedOptions {
    let mut opts = BedOptions::new(scenario.slug());
    opts.parallel_jobs = 25;
    opts.node_pods = 30;
    // A dead agent stops renewing its job lock: ADO abandons its request soon after.
    opts.sim.lock_secs = 10;
    opts.controller_args = vec!["--orphan-grace-seconds".to_owned(), GRACE_SECS.to_string()];
    match scenario {
        Scenario::KillBurst => opts.node_pods = 40,
        // Access tokens outlive neither the outage nor the rotation period: the controller must get new
        // ones while the fault lasts.
        Scenario::TokenOutage => opts.sim.token_lifetime_secs = 6,
        Scenario::TokenRotation => opts.sim.token_lifetime_secs = 5,
        Scenario::LeaderChange => {
            opts.start_controller = false;
            opts.controller_args.extend(
                ["--leader-elect", "--lease-duration-seconds", "4"]
                    .iter()
                    .map(|s| (*s).to_owned()),
            );
        }
        Scenario::ApiServerRestart => opts.start_controller = false,
        _ => {}
    }
    opts
}

fn manifest(bed: &Bed, scenario: Scenario) -> serde_json::Value {
    let mut m = bed.agentpool(AGENTPOOL, POOL, scenario.max_agents());
    let mut env = vec![serde_json::json!({"name": "STANDIN_RENEW_INTERVAL_MS", "value": "1000"})];
    if scenario == Scenario::DeregistrationFails {
        env.push(serde_json::json!({"name": "AZP_DEREGISTER_TIMEOUT_SECONDS", "value": "3"}));
    }
    m["spec"]["template"]["spec"]["containers"][0]["env"] = serde_json::Value::Array(env);
    m
}

async fn wait_ready(bed: &Bed, agentpool: &str) -> Result<(), String> {
    eventually(
        &format!("AgentPool {}/{agentpool} Ready", bed.namespace),
        STEP,
        || async {
            let status = bed.agentpool_status(agentpool).await?;
            let (s, _, _) = condition(&status, "Ready")?;
            (s == "True").then_some(())
        },
    )
    .await
}

/// Starts the bed(s) of a scenario, its foreign agents, its AgentPool(s) and the samplers.
async fn setup(scenario: Scenario) -> Result<Run, (String, String)> {
    let bed = Bed::start(options(scenario))
        .await
        .map_err(|e| (format!("bed: {e}"), String::new()))?;
    let mut run = Run {
        scenario,
        clusters: vec![Cluster {
            bed,
            controller_client_id: CONTROLLER_CLIENT_ID,
            agent_client_id: AGENT_CLIENT_ID,
        }],
        queued: Vec::new(),
        excused: BTreeMap::new(),
        foreign: Vec::new(),
        observed: Arc::new(Mutex::new(Observed::default())),
        tasks: Vec::new(),
        replicas: Vec::new(),
        proxy: None,
        notes: Vec::new(),
    };
    match prepare(&mut run).await {
        Ok(()) => Ok(run),
        Err(e) => {
            let logs = run.logs();
            teardown(run).await;
            Err((e, logs))
        }
    }
}

async fn prepare(run: &mut Run) -> Result<(), String> {
    let scenario = run.scenario;
    match scenario {
        Scenario::LeaderChange => {
            let bed = &mut run.clusters[0].bed;
            bed.grant_lease().await.map_err(|e| e.to_string())?;
            bed.start_controller().map_err(|e| e.to_string())?;
            let replica = bed.spawn_replica("replica-2").map_err(|e| e.to_string())?;
            run.replicas.push(replica);
        }
        Scenario::ApiServerRestart => {
            // The API server is shared by every test running now: restarting it would break them. A TCP
            // proxy between the controller and the API server is cut instead (connections reset, new ones
            // refused) and restored, which is what the controller sees of a restart.
            let upstream = azp_testbed::bed::api_server_addr().map_err(|e| e.to_string())?;
            let proxy = TcpProxy::start(upstream).await.map_err(|e| e.to_string())?;
            let bed = &mut run.clusters[0].bed;
            bed.route_controller_api_through(proxy.addr())
                .map_err(|e| e.to_string())?;
            bed.start_controller().map_err(|e| e.to_string())?;
            run.proxy = Some(proxy);
        }
        _ => {}
    }

    // Foreign agents in the ADO pool: a hand-made one, and another cluster's agent and placeholder for the
    // same namespace/AgentPool. Offline, no Job here: ours to leave alone.
    let foreign_identity = IdentitySpec::new(FOREIGN_CLIENT_ID);
    let bed = run.bed();
    let other_owner = format!("other-cluster/{}/{AGENTPOOL}", bed.namespace);
    let mut ids = Vec::new();
    for (name, caps) in [
        ("build-vm-3", serde_json::json!({"Agent.OS": "Linux"})),
        (
            "linux-77-1-0ther000",
            serde_json::json!({OWNER_CAP: other_owner}),
        ),
        (
            "azp-placeholder-other-linux",
            serde_json::json!({OWNER_CAP: other_owner, PLACEHOLDER_CAP: "true"}),
        ),
    ] {
        ids.push(
            bed.register_agent_as(&foreign_identity, POOL, name, caps)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let foreign: Vec<AgentInfo> = bed
        .sim
        .agents(ORG, POOL)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|a| ids.contains(&a.id))
        .collect();
    run.foreign = foreign;

    let bed = run.bed();
    bed.apply_agentpool(manifest(bed, scenario))
        .await
        .map_err(|e| e.to_string())?;
    wait_ready(bed, AGENTPOOL).await?;

    if scenario == Scenario::SecondCluster {
        let mut opts = BedOptions::new("fs-peer");
        opts.share_sim = Some(bed.sim.clone());
        opts.controller_client_id = PEER_CONTROLLER_CLIENT_ID.to_owned();
        opts.agent_client_id = PEER_AGENT_CLIENT_ID.to_owned();
        opts.node_pods = 30;
        opts.controller_args = vec!["--orphan-grace-seconds".to_owned(), GRACE_SECS.to_string()];
        let peer = Bed::start(opts)
            .await
            .map_err(|e| format!("second cluster: {e}"))?;
        peer.apply_agentpool(manifest(&peer, scenario))
            .await
            .map_err(|e| e.to_string())?;
        let ready = wait_ready(&peer, AGENTPOOL).await;
        run.clusters.push(Cluster {
            bed: peer,
            controller_client_id: PEER_CONTROLLER_CLIENT_ID,
            agent_client_id: PEER_AGENT_CLIENT_ID,
        });
        ready?;
    }

    for c in &run.clusters {
        run.tasks.push(sample_jobs(&c.bed, run.observed.clone()));
        run.tasks
            .push(watch_job_deletions(&c.bed, run.observed.clone()));
    }
    Ok(())
}

/// Samples the agent Jobs of a bed every 250 ms: unfinished per AgentPool (against maxAgents) and requests
/// with two unfinished Jobs.
fn sample_jobs(bed: &Bed, observed: Arc<Mutex<Observed>>) -> JoinHandle<()> {
    let api: Api<Job> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let pods_api: Api<Pod> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let sim = bed.sim.clone();
    let namespace = bed.namespace.clone();
    let max = Scenario::ALL
        .iter()
        .find(|s| namespace.starts_with(&format!("{}-", s.slug())))
        .map_or(Scenario::SecondCluster.max_agents(), |s| s.max_agents()) as usize;
    tokio::spawn(async move {
        loop {
            let jobs = api.list(&ListParams::default().labels(JOBS_SELECTOR)).await;
            let pods = pods_api.list(&ListParams::default()).await;
            let requests = sim.requests(ORG, POOL);
            if let (Ok(jobs), Ok(pods), Ok(requests)) = (jobs, pods, requests) {
                let raw = unfinished_per_agentpool(&jobs.items);
                let agents = agents_per_agentpool(&jobs.items, &pods.items, &requests);
                let twice = requests_with_two_unfinished_jobs(&jobs.items, &requests);
                let mut o = observed.lock().unwrap_or_else(|e| e.into_inner());
                o.samples += 1;
                for (pool, unfinished) in raw {
                    let peak = o.raw_peak.entry((namespace.clone(), pool)).or_default();
                    *peak = (*peak).max(unfinished.len());
                }
                for (pool, able) in agents {
                    let peak = o.peak.entry((namespace.clone(), pool.clone())).or_default();
                    *peak = (*peak).max(able.len());
                    if able.len() > max && o.over_max.len() < 10 {
                        o.over_max.push(format!(
                            "{namespace}/{pool}: {} agents able to take work > maxAgents {max} ({})",
                            able.len(),
                            able.join(", ")
                        ));
                    }
                }
                let serving = |job: &str| {
                    let agent = jobs
                        .items
                        .iter()
                        .find(|j| j.metadata.name.as_deref() == Some(job))
                        .and_then(job_agent)?;
                    requests
                        .iter()
                        .find(|r| r.agent_name.as_deref() == Some(agent))
                        .map(|r| r.request_id)
                };
                let mut seen = BTreeSet::new();
                for (request, dup) in twice {
                    if o.suspects.contains(&request) {
                        let what = dup
                            .iter()
                            .map(|j| format!("{j} (its agent runs {:?})", serving(j)))
                            .collect::<Vec<_>>()
                            .join(", ");
                        o.duplicates
                            .entry(request.clone())
                            .or_insert_with(|| format!("request {request}: {what}"));
                    }
                    seen.insert(request);
                }
                o.suspects = seen;
            } else {
                observed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sample_errors += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Watches agent Job deletions: a Job deleted while its agent runs a request is a busy agent removed
/// (nothing but the controller deletes agent Jobs during a scenario).
fn watch_job_deletions(bed: &Bed, observed: Arc<Mutex<Observed>>) -> JoinHandle<()> {
    let api: Api<Job> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let sim = bed.sim.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(
            api,
            watcher::Config::default().labels(JOBS_SELECTOR)
        ));
        while let Some(event) = stream.next().await {
            let job = match event {
                Ok(watcher::Event::Delete(job)) => job,
                Ok(watcher::Event::Apply(job)) if job.metadata.deletion_timestamp.is_some() => job,
                _ => continue,
            };
            let Some(agent) = job_agent(&job) else {
                continue;
            };
            let busy = sim.requests(ORG, POOL).ok().and_then(|rs| {
                rs.into_iter().find(|r| {
                    r.agent_name.as_deref() == Some(agent)
                        && r.receive_time.is_some()
                        && !r.is_finished()
                })
            });
            if let Some(r) = busy {
                let name = job.metadata.name.clone().unwrap_or_default();
                observed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .busy_job_deletions
                    .entry(name.clone())
                    .or_insert_with(|| {
                        format!(
                            "Job {name} deleted while its agent {agent} ran request {}",
                            r.request_id
                        )
                    });
            }
        }
    })
}

async fn leader_of(addrs: &[String]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        if scrape_metric(a, "azp_autoscaler_leader ").await? == 1.0 {
            leaders.push(i);
        }
    }
    match leaders[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// Runs the scenario's faults and workload.
async fn drive(run: &mut Run) -> Result<(), String> {
    let sim = run.bed().sim.clone();
    let second = Duration::from_secs(1);
    // ADO faults hit the controller's calls: ADO throttles per identity, and a failed call of an agent's
    // own job flow (its lock renewal) loses its job by the agent's design, which says nothing of the
    // controller.
    let controller_oid = sim
        .identity(run.clusters[0].controller_client_id)
        .map(|i| i.object_id)
        .unwrap_or_default();
    let inject = |fault: Fault| sim.inject_fault(fault.by(controller_oid.clone()));
    match run.scenario {
        Scenario::RateLimited => {
            let ids = run.queue(12, second)?;
            for class in [EndpointClass::JobRequests, EndpointClass::Agents] {
                inject(Fault::times(
                    class,
                    FaultKind::RateLimited {
                        retry_after_secs: 3,
                    },
                    2,
                ));
            }
            run.wait_for("4 requests running", || async {
                run.running(&ids).len() + finished(run, &ids) >= 4
            })
            .await?;
            inject(Fault::times(
                EndpointClass::JobRequests,
                FaultKind::RateLimited {
                    retry_after_secs: 2,
                },
                2,
            ));
            run.queue(4, second)?;
        }
        Scenario::ServerErrors | Scenario::Malformed => {
            let malformed = run.scenario == Scenario::Malformed;
            let burst = |round: u16| {
                for (class, n) in [
                    (EndpointClass::JobRequests, 4),
                    (EndpointClass::Agents, 3),
                    (EndpointClass::Pools, 2),
                    (EndpointClass::ResourceUsage, 2),
                ] {
                    let kind = if malformed {
                        FaultKind::MalformedJson
                    } else {
                        FaultKind::ServerError {
                            status: [500, 502, 503][usize::from(round) % 3],
                        }
                    };
                    inject(Fault::times(class, kind, n));
                }
            };
            let ids = run.queue(12, second)?;
            burst(0);
            run.wait_for("4 requests running", || async {
                run.running(&ids).len() + finished(run, &ids) >= 4
            })
            .await?;
            burst(1);
            run.queue(4, second)?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            burst(2);
        }
        Scenario::TokenOutage => {
            let ids = run.queue(4, second)?;
            run.wait_for("4 requests running", || async {
                run.running(&ids).len() + finished(run, &ids) >= 4
            })
            .await?;
            sim.inject_fault(Fault::always(EndpointClass::Token, FaultKind::TokenOutage));
            run.queue(8, second)?;
            // Longer than the access tokens live.
            tokio::time::sleep(Duration::from_secs(10)).await;
            sim.clear_faults();
            run.notes.push(format!(
                "token calls refused during the outage: {}",
                sim.calls()
                    .iter()
                    .filter(|c| c.endpoint == "entra.token" && c.status == 503)
                    .map(|c| c.count)
                    .sum::<u64>()
            ));
        }
        Scenario::TokenRotation => {
            rotate_federated_tokens(run).await?;
            let ids = run.queue(8, second)?;
            run.wait_for("8 requests finished", || async { finished(run, &ids) >= 8 })
                .await?;
            // More work after several rotations and access-token lifetimes.
            tokio::time::sleep(Duration::from_secs(8)).await;
            run.queue(8, second)?;
        }
        Scenario::KillBurst => {
            let ids = run.queue(200, Duration::from_millis(500))?;
            run.wait_for("40 agent Jobs created", || async {
                run.bed().jobs().await.map(|j| j.len()).unwrap_or(0) >= 40
            })
            .await?;
            run.clusters[0].bed.kill_controller().await;
            run.notes.push(format!(
                "SIGKILLed after {} of 200 requests finished",
                finished(run, &ids)
            ));
            tokio::time::sleep(Duration::from_secs(2)).await;
            run.clusters[0]
                .bed
                .start_controller()
                .map_err(|e| e.to_string())?;
        }
        Scenario::ApiServerRestart => {
            let ids = run.queue(12, second)?;
            run.wait_for("3 agent Jobs", || async {
                run.bed().jobs().await.map(|j| j.len()).unwrap_or(0) >= 3
            })
            .await?;
            let proxy = run.proxy.as_mut().ok_or("no proxy")?;
            if proxy.connections() == 0 {
                return Err("the controller does not go through the proxy".into());
            }
            proxy.cut();
            let cut_at = proxy.connections();
            run.queue(6, second)?;
            tokio::time::sleep(Duration::from_secs(8)).await;
            let proxy = run.proxy.as_mut().ok_or("no proxy")?;
            proxy.restore().await.map_err(|e| e.to_string())?;
            run.wait_for("the controller reconnected", || async {
                run.proxy.as_ref().is_some_and(|p| p.connections() > cut_at)
            })
            .await?;
            run.notes.push(format!(
                "{} of the first 12 requests finished when the API server came back",
                finished(run, &ids)
            ));
        }
        Scenario::LeaderChange => {
            let addrs = vec![
                run.bed().admin_addr.clone(),
                run.replicas[0].admin_addr.clone(),
            ];
            let leader = eventually("exactly one leader", STEP, || leader_of(&addrs)).await?;
            let ids = run.queue(30, second)?;
            run.wait_for("6 agent Jobs", || async {
                run.bed().jobs().await.map(|j| j.len()).unwrap_or(0) >= 6
            })
            .await?;
            if leader == 0 {
                run.clusters[0].bed.kill_controller().await;
            } else {
                run.replicas[0].kill().await;
            }
            let survivor = addrs[1 - leader].clone();
            run.notes.push(format!(
                "leader {} SIGKILLed after {} of 30 requests finished",
                addrs[leader],
                finished(run, &ids)
            ));
            eventually("the follower leads", STEP, || async {
                (scrape_metric(&survivor, "azp_autoscaler_leader ").await? == 1.0).then_some(())
            })
            .await?;
        }
        Scenario::PodsKilled => {
            let ids = run.queue(10, Duration::from_secs(8))?;
            run.wait_for("4 requests running", || async {
                run.running(&ids).len() >= 4
            })
            .await?;
            let victims: Vec<RequestInfo> = run.running(&ids).into_iter().take(3).collect();
            for r in victims {
                let agent = r.agent_name.clone().unwrap_or_default();
                let pod = pod_of_agent(run.bed(), &agent).await?;
                let bed = run.bed();
                bed.node
                    .as_ref()
                    .ok_or("no node")?
                    .kill_pod(&bed.namespace, &pod)
                    .map_err(|e| e.to_string())?;
                run.excused.insert(
                    r.request_id,
                    format!("its pod {pod} was OOM-killed by the scenario"),
                );
            }
        }
        Scenario::NodeDrain => {
            let ids = run.queue(8, Duration::from_secs(6))?;
            run.wait_for("4 requests running", || async {
                run.running(&ids).len() >= 4
            })
            .await?;
            let busy: Vec<String> = run
                .running(&ids)
                .iter()
                .filter_map(|r| r.agent_name.clone())
                .collect();
            // Protection starts at the controller's next poll after ADO gives an agent its request (the
            // documented window): drain once the busy pods are marked, as a drain at a random moment
            // would almost always find them.
            run.wait_for("the busy agents' pods marked busy", || async {
                let Ok(pods) =
                    Api::<Pod>::namespaced(run.bed().client.clone(), &run.bed().namespace)
                        .list(&ListParams::default().labels(JOBS_SELECTOR))
                        .await
                else {
                    return false;
                };
                // Every busy agent's pod that still runs is marked (a finished one may be gone).
                busy.iter().all(|agent| {
                    pods.items.iter().all(|p| {
                        let of_agent = p
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get("azp-autoscaler.dev/agent-name"))
                            == Some(agent);
                        let running =
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        !of_agent
                            || !running
                            || p.metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get("azp-autoscaler.dev/busy"))
                                .is_some_and(|v| v == "true")
                    })
                })
            })
            .await?;
            let node = run.bed().node.as_ref().ok_or("no node")?;
            let report = node
                .drain_until_empty(Duration::from_secs(1), Duration::from_secs(120))
                .await
                .map_err(|e| e.to_string())?;
            node.uncordon().await.map_err(|e| e.to_string())?;
            run.notes.push(format!(
                "drain: {} busy agents at the start ({}), {} pods evicted, {} evictions refused (after the client's own 429 retries), {} pods left",
                busy.len(),
                busy.join(", "),
                report.evicted.len(),
                report.refused,
                report.left.len()
            ));
            if !report.left.is_empty() {
                return Err(format!("the node did not drain: {:?}", report.left));
            }
        }
        Scenario::CancelWhileStarting => {
            let ids = run.queue(6, Duration::from_secs(2))?;
            // Cancel as soon as agent Jobs exist for them, before their agents take the requests.
            eventually("agent Jobs for the requests", STEP, || async {
                let jobs = run.bed().jobs().await.ok()?;
                (jobs.len() >= 3).then_some(())
            })
            .await?;
            let waiting: Vec<u64> = run
                .requests()
                .into_iter()
                .filter(|r| ids.contains(&r.request_id) && !r.is_assigned())
                .map(|r| r.request_id)
                .take(3)
                .collect();
            if waiting.is_empty() {
                return Err("every request was assigned before it could be cancelled".into());
            }
            for id in &waiting {
                sim.cancel(ORG, *id).map_err(|e| e.to_string())?;
                run.excused.insert(
                    *id,
                    "cancelled by the scenario while its agent started".into(),
                );
            }
            run.notes.push(format!(
                "cancelled {waiting:?} with their agent Jobs starting"
            ));
        }
        Scenario::DeregistrationFails => {
            let ids = run.queue(5, Duration::from_secs(5))?;
            run.wait_for("5 requests running", || async {
                run.running(&ids).len() == 5
            })
            .await?;
            let agent_oid = sim
                .identity(run.clusters[0].agent_client_id)
                .ok_or("no agent identity")?
                .object_id;
            // The agents' identity loses the right to delete agents: their deregistration fails (403).
            sim.set_pool_role(ORG, POOL, &agent_oid, PoolRole::Reader)
                .map_err(|e| e.to_string())?;
            run.wait_for("the 5 jobs finished and their pods exited", || async {
                finished(run, &ids) == 5 && run.unfinished_jobs().await == 0
            })
            .await?;
            let left: Vec<String> = ours(run.bed())
                .into_iter()
                .filter(|a| !a.online)
                .map(|a| a.name)
                .collect();
            sim.set_pool_role(ORG, POOL, &agent_oid, PoolRole::Administrator)
                .map_err(|e| e.to_string())?;
            run.notes.push(format!(
                "{} agents left behind by a failed deregistration",
                left.len()
            ));
            if left.is_empty() {
                return Err("no deregistration failed: the fault did not apply".into());
            }
        }
        Scenario::SecondCluster => {
            run.queue(16, second)?;
        }
    }
    Ok(())
}

fn finished(run: &Run, ids: &[u64]) -> usize {
    run.requests()
        .iter()
        .filter(|r| ids.contains(&r.request_id) && r.is_finished())
        .count()
}

/// Our agents in the ADO pool (the bed's owner capability), placeholders excluded.
fn ours(bed: &Bed) -> Vec<AgentInfo> {
    let owner = bed.owner(AGENTPOOL);
    bed.sim
        .agents(ORG, POOL)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            a.system_capabilities.get(OWNER_CAP) == Some(&owner)
                && a.system_capabilities
                    .get(PLACEHOLDER_CAP)
                    .map(String::as_str)
                    != Some("true")
        })
        .collect()
}

async fn pod_of_agent(bed: &Bed, agent: &str) -> Result<String, String> {
    let jobs = bed.jobs().await.map_err(|e| e.to_string())?;
    let job = jobs
        .iter()
        .find(|j| job_agent(j) == Some(agent))
        .and_then(|j| j.metadata.name.clone())
        .ok_or_else(|| format!("no agent Job runs {agent}"))?;
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &bed.namespace)
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .map_err(|e| e.to_string())?;
    pods.items
        .iter()
        .find_map(|p| p.metadata.name.clone())
        .ok_or_else(|| format!("no pod of Job {job}"))
}

/// Federated token rotation as the kubelet does it: the token file is replaced (atomically) every 2 s
/// with a token that lives 6 s, from an issuer the controller's identity now trusts alone. A controller
/// that read the file once could not get an access token after 6 s (they live 5 s in this scenario).
async fn rotate_federated_tokens(run: &mut Run) -> Result<(), String> {
    let bed = run.bed();
    let issuer = TestIssuer::new(format!("https://rotating.{}.example", bed.namespace))
        .map_err(|e| e.to_string())?;
    let token_file = bed
        .controller_env()
        .into_iter()
        .find(|(k, _)| k == "AZURE_FEDERATED_TOKEN_FILE")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .ok_or("no AZURE_FEDERATED_TOKEN_FILE")?;
    let namespace = bed.namespace.clone();
    let write = move |issuer: &TestIssuer| -> std::io::Result<()> {
        let token = issuer.sa_token(
            &namespace,
            azp_testbed::bed::CONTROLLER_SA,
            Duration::from_secs(6),
        );
        let tmp = token_file.with_extension("next");
        std::fs::write(&tmp, token)?;
        std::fs::rename(&tmp, &token_file)
    };
    write(&issuer).map_err(|e| e.to_string())?;
    bed.sim.add_federated_issuer(issuer.federated_issuer());
    let mut identity = bed
        .sim
        .identity(run.clusters[0].controller_client_id)
        .ok_or("no controller identity")?;
    identity.federated = vec![FederatedCredential {
        issuer: issuer.issuer.clone(),
        subject: format!(
            "system:serviceaccount:{}:{}",
            bed.namespace,
            azp_testbed::bed::CONTROLLER_SA
        ),
        audience: FEDERATED_AUDIENCE.to_owned(),
    }];
    bed.sim.add_identity(identity);
    let rotations = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let counter = rotations.clone();
    run.tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if write(&issuer).is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }));
    Ok(())
}

/// Derives every invariant from what was observed.
async fn verdict(run: &Run) -> Vec<Cell> {
    let sim = run.bed().sim.clone();
    // (1) every queued request served: it finished, and (unless the scenario cancelled it) an agent ran it.
    let settled = eventually("every queued request finished", SETTLE, || async {
        let requests = sim.requests(ORG, POOL).ok()?;
        let mine: Vec<RequestInfo> = requests
            .into_iter()
            .filter(|r| run.queued.contains(&r.request_id))
            .collect();
        mine.iter().all(RequestInfo::is_finished).then_some(mine)
    })
    .await;
    let requests: Vec<RequestInfo> = sim
        .requests(ORG, POOL)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| run.queued.contains(&r.request_id))
        .collect();
    let served = {
        let mut problems: Vec<String> = requests
            .iter()
            .filter(|r| !r.is_finished())
            .map(|r| {
                format!(
                    "request {} not finished after {SETTLE:?} (assigned: {}, agent {:?})",
                    r.request_id,
                    r.is_assigned(),
                    r.agent_name
                )
            })
            .collect();
        problems.extend(
            requests
                .iter()
                .filter(|r| r.is_finished() && r.receive_time.is_none())
                .filter(|r| !run.excused.contains_key(&r.request_id))
                .map(|r| {
                    format!(
                        "request {} finished {:?} without an agent",
                        r.request_id, r.result
                    )
                }),
        );
        let ran = requests.iter().filter(|r| r.receive_time.is_some()).count();
        Cell::from_problems(
            problems,
            format!(
                "{ran}/{} ran ({} excused)",
                requests.len(),
                run.excused.len()
            ),
        )
    };

    let observed = run
        .observed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // (2) never more than maxAgents unfinished agent Jobs, sampled all along.
    let max_agents = if observed.samples == 0 {
        Cell::Na(format!("no sample ({} errors)", observed.sample_errors))
    } else {
        let peaks = |m: &BTreeMap<(String, String), usize>| {
            m.values()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("+")
        };
        Cell::from_problems(
            observed.over_max.clone(),
            format!(
                "peak {}/{} agents in {} samples (unfinished Jobs incl. deregistering pods: {})",
                peaks(&observed.peak),
                run.scenario.max_agents(),
                observed.samples,
                peaks(&observed.raw_peak)
            ),
        )
    };

    // (3) no busy agent removed: no agent deleted while it held a request (simulator audit log), no agent
    // Job deleted while its agent ran a request, no request lost by its agent unless the scenario killed it.
    let changes = sim.agent_changes();
    let busy = {
        let mut problems: Vec<String> = changes
            .iter()
            .filter(|c| c.action == AgentAction::Deleted)
            .filter_map(|c| {
                let r = c.held_request?;
                Some(format!(
                    "agent {} deleted by {} while holding request {r}{}",
                    c.agent_name,
                    who(run, &c.by),
                    if c.held_request_received {
                        " (running)"
                    } else {
                        ""
                    }
                ))
            })
            .collect();
        problems.extend(observed.busy_job_deletions.values().cloned());
        problems.extend(
            requests
                .iter()
                .filter(|r| r.receive_time.is_some() && r.is_finished())
                .filter(|r| r.result.as_deref() != Some("succeeded"))
                .filter(|r| !run.excused.contains_key(&r.request_id))
                .map(|r| {
                    format!(
                        "request {} lost by its busy agent {}: {}",
                        r.request_id,
                        r.agent_name.clone().unwrap_or_default(),
                        r.result.clone().unwrap_or_default()
                    )
                }),
        );
        let removals = changes
            .iter()
            .filter(|c| c.action == AgentAction::Deleted && !c.by.starts_with("agent:"))
            .count();
        Cell::from_problems(
            problems,
            format!("{removals} agent deletions by controllers, none busy"),
        )
    };

    // (4) no request with two unfinished agent Jobs, sampled all along.
    let duplicates = if observed.samples == 0 {
        Cell::Na("no sample".into())
    } else {
        Cell::from_problems(
            observed.duplicates.values().cloned().collect(),
            format!("{} samples", observed.samples),
        )
    };

    // (5) no orphan agent or pod after the grace period, once the requests are done.
    let orphans = if settled.is_err() {
        Cell::Na("requests not settled".into())
    } else {
        let check = || async {
            let mut left = Vec::new();
            for c in &run.clusters {
                left.extend(ours(&c.bed).into_iter().map(|a| {
                    format!(
                        "agent {} ({})",
                        a.name,
                        if a.online { "online" } else { "offline" }
                    )
                }));
                let pods = Api::<Pod>::namespaced(c.bed.client.clone(), &c.bed.namespace)
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default();
                left.extend(pods.iter().filter_map(|p| {
                    let phase = p.status.as_ref()?.phase.clone().unwrap_or_default();
                    (phase != "Succeeded" && phase != "Failed").then(|| {
                        format!(
                            "pod {} ({phase})",
                            p.metadata.name.clone().unwrap_or_default()
                        )
                    })
                }));
            }
            left
        };
        let wait = Duration::from_secs(GRACE_SECS + 60);
        let deadline = Instant::now() + wait;
        let last = loop {
            let left = check().await;
            if left.is_empty() || Instant::now() >= deadline {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        match last.is_empty() {
            true => Cell::Pass(format!("none after grace {GRACE_SECS}s")),
            false => Cell::Fail(format!(
                "{} after {wait:?}: {}",
                last.len(),
                summarize(&last)
            )),
        }
    };

    // (6) foreign agents untouched: still there as registered, and no controller changed an agent that
    // is not its cluster's.
    let foreign = {
        let now = sim.agents(ORG, POOL).unwrap_or_default();
        let mut problems = Vec::new();
        for f in &run.foreign {
            match now.iter().find(|a| a.id == f.id) {
                None => problems.push(format!("{} deleted", f.name)),
                Some(a)
                    if a.enabled != f.enabled
                        || a.system_capabilities != f.system_capabilities
                        || a.name != f.name =>
                {
                    problems.push(format!("{} changed", f.name));
                }
                Some(_) => {}
            }
        }
        for c in &changes {
            let Some(cluster) = run.clusters.iter().find(|cl| {
                sim.identity(cl.controller_client_id)
                    .is_some_and(|i| i.object_id == c.by)
            }) else {
                continue;
            };
            let owner = c
                .system_capabilities
                .get(OWNER_CAP)
                .cloned()
                .unwrap_or_default();
            if !owner.starts_with(&format!("{}/", cluster.bed.cluster_id())) {
                problems.push(format!(
                    "{} ({:?}) by the controller of {}, owner {owner:?}",
                    c.agent_name, c.action, cluster.bed.namespace
                ));
            }
        }
        let n = run.foreign.len()
            + if run.clusters.len() > 1 {
                1 // the other cluster's agents
            } else {
                0
            };
        Cell::from_problems(problems, format!("{n} kinds kept"))
    };
    vec![served, max_agents, busy, duplicates, orphans, foreign]
}

/// Names a caller of the audit log.
fn who(run: &Run, by: &str) -> String {
    let sim = &run.bed().sim;
    for c in &run.clusters {
        if sim
            .identity(c.controller_client_id)
            .is_some_and(|i| i.object_id == by)
        {
            return format!("the controller of {}", c.bed.namespace);
        }
        if sim
            .identity(c.agent_client_id)
            .is_some_and(|i| i.object_id == by)
        {
            return format!("an agent of {}", c.bed.namespace);
        }
    }
    by.to_owned()
}

async fn teardown(mut run: Run) {
    for t in &run.tasks {
        t.abort();
    }
    for r in &mut run.replicas {
        r.kill().await;
    }
    // The second cluster first: it shares the first one's simulator.
    while let Some(c) = run.clusters.pop() {
        c.bed.teardown().await;
    }
}

async fn run_scenario(scenario: Scenario) -> Report {
    let started = Instant::now();
    eprintln!("[fault suite] {} …", scenario.name());
    let mut run = match setup(scenario).await {
        Ok(run) => run,
        Err((e, logs)) => {
            return Report {
                scenario,
                cells: vec![Cell::Na(format!("setup failed: {e}")); INVARIANTS.len()],
                error: Some(format!("setup: {e}")),
                notes: Vec::new(),
                logs,
                wall: started.elapsed(),
            };
        }
    };
    let driven = drive(&mut run).await;
    let cells = verdict(&run).await;
    let report = Report {
        scenario,
        cells,
        error: driven.err(),
        notes: std::mem::take(&mut run.notes),
        logs: run.logs(),
        wall: started.elapsed(),
    };
    teardown(run).await;
    eprintln!(
        "[fault suite] {} done in {:.0?}{}",
        scenario.name(),
        report.wall,
        if report.failed() { " — FAILED" } else { "" }
    );
    report
}

fn table(reports: &[Report]) -> String {
    let name_w = reports
        .iter()
        .map(|r| r.scenario.name().chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    let widths: Vec<usize> = INVARIANTS
        .iter()
        .map(|i| i.chars().count().max(3))
        .collect();
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = String::new();
    let _ = write!(out, "| {} |", pad("scenario", name_w));
    for (i, w) in INVARIANTS.iter().zip(&widths) {
        let _ = write!(out, " {} |", pad(i, *w));
    }
    let _ = writeln!(out, " time |");
    let _ = write!(out, "|{}|", "-".repeat(name_w + 2));
    for w in &widths {
        let _ = write!(out, "{}|", "-".repeat(w + 2));
    }
    let _ = writeln!(out, "------|");
    for r in reports {
        let _ = write!(out, "| {} |", pad(r.scenario.name(), name_w));
        for (c, w) in r.cells.iter().zip(&widths) {
            let _ = write!(out, " {} |", pad(c.symbol(), *w));
        }
        let _ = writeln!(out, " {:>3}s |", r.wall.as_secs());
    }
    let _ = writeln!(out, "\nwhy:");
    for r in reports {
        let _ = writeln!(out, "- {}", r.scenario.name());
        if let Some(e) = &r.error {
            let _ = writeln!(out, "    SCENARIO ERROR: {e}");
        }
        for n in &r.notes {
            let _ = writeln!(out, "    note: {n}");
        }
        for (i, c) in INVARIANTS.iter().zip(&r.cells) {
            let _ = writeln!(out, "    {} {i}: {}", c.symbol(), c.reason());
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_suite() {
    let started = Instant::now();
    let only: Option<BTreeSet<String>> = std::env::var("FAULT_SUITE_ONLY")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect());
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| only.as_ref().is_none_or(|o| o.contains(s.slug())))
        .collect();
    let mut reports: Vec<Report> = futures::stream::iter(scenarios.into_iter().map(run_scenario))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    reports.sort_by_key(|r| Scenario::ALL.iter().position(|s| *s == r.scenario));
    let failed: Vec<&Report> = reports.iter().filter(|r| r.failed()).collect();
    for r in &failed {
        eprintln!(
            "\n===== controller logs of the failed scenario {} (last 120 lines each) =====",
            r.scenario.name()
        );
        for part in r.logs.split("=== ").filter(|p| !p.is_empty()) {
            let (head, body) = part.split_once('\n').unwrap_or((part, ""));
            eprintln!("=== {head}\n{}", tail(body, 120));
        }
    }
    let summary = format!(
        "===== fault suite: {} scenarios in {:.0?} =====\n{}",
        reports.len(),
        started.elapsed(),
        table(&reports)
    );
    eprintln!("\n{summary}");
    // cargo test hides a passing test's output: tests/run.sh prints this file after the tests.
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-suite-table.txt"),
        &summary,
    );
    assert!(
        failed.is_empty(),
        "fault suite: {} scenario(s) broke an invariant or could not be driven: {} (table and logs above)",
        failed.len(),
        failed
            .iter()
            .map(|r| r.scenario.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
}
