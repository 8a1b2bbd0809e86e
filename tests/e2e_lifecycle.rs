//! Lifecycle end to end on the real local API server (controller process + ADO simulator + node harness +
//! agent entrypoint + stand-in agent): ADO-side cleanup of agents left behind, never of foreign agents.
//! Needs `tests/cluster/up.sh` and `cargo build --workspace --bins` (tests/run.sh does both).

use std::time::Duration;

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::invariants::job_agent;
use azp_testbed::sim::{IdentitySpec, RequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;

const DEADLINE: Duration = Duration::from_secs(120);
const FOREIGN_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000f0e19";
const FOREIGN_OBJECT_ID: &str = "0f0e1900-0000-0000-0000-000000000001";

/// Fails the test with the controller's logs.
fn fail(bed: &Bed, what: impl std::fmt::Display) -> ! {
    panic!("{what}\ncontroller logs:\n{}", bed.controller_logs())
}

fn agent_names(bed: &Bed) -> Vec<String> {
    bed.sim
        .agents(ORG, "linux")
        .expect("agents")
        .into_iter()
        .map(|a| a.name)
        .collect()
}

/// Registers an offline agent as another identity (another cluster's controller, or a hand-made agent).
async fn register_agent(bed: &Bed, name: &str, capabilities: serde_json::Value) {
    let foreign = IdentitySpec::new(FOREIGN_CLIENT_ID).object_id(FOREIGN_OBJECT_ID);
    bed.register_agent_as(&foreign, "linux", name, capabilities)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn metric(bed: &Bed, needle: &str) -> Option<f64> {
    azp_testbed::bed::scrape_metric(&bed.admin_addr, needle).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_job_is_cleaned_from_ado_and_foreign_agents_are_untouched() {
    let mut opts = BedOptions::new("e2e-orphans");
    opts.controller_args = vec!["--orphan-grace-seconds".into(), "3".into()];
    // A killed agent stops renewing its job lock: ADO abandons the request when the lock runs out.
    opts.sim.lock_secs = 8;
    let bed = Bed::start(opts).await.expect("bed");
    bed.sim
        .add_identity(IdentitySpec::new(FOREIGN_CLIENT_ID).object_id(FOREIGN_OBJECT_ID));
    bed.sim.add_member(ORG, FOREIGN_OBJECT_ID).expect("member");

    // Agents that are not this controller's: another cluster's agent of the same namespace/AgentPool,
    // another cluster's placeholder, and a hand-made agent without any owner. All offline, no Job here.
    let ours = format!("bed-{ns}/{ns}/linux", ns = bed.namespace);
    let other_cluster = format!("other-cluster/{}/linux", bed.namespace);
    register_agent(
        &bed,
        "linux-77-1-0ther000",
        serde_json::json!({"azp-autoscaler.owner": other_cluster}),
    )
    .await;
    register_agent(
        &bed,
        "azp-placeholder-other-linux",
        serde_json::json!({"azp-autoscaler.owner": other_cluster, "azp-autoscaler.placeholder": "true"}),
    )
    .await;
    register_agent(&bed, "build-vm-3", serde_json::json!({"Agent.OS": "Linux"})).await;
    // Ours but half-registered (its pod died during config.sh, its Job is gone): cleaned.
    register_agent(
        &bed,
        "linux-55-1-deadbeef",
        serde_json::json!({"azp-autoscaler.owner": ours}),
    )
    .await;

    let mut manifest = bed.agentpool("linux", "linux", 5);
    // Renew the job lock often, so only a killed agent loses its request.
    manifest["spec"]["template"]["spec"]["containers"][0]["env"] =
        serde_json::json!([{"name": "STANDIN_RENEW_INTERVAL_MS", "value": "1000"}]);
    bed.apply_agentpool(manifest).await.expect("apply");

    eventually("the half-registered agent cleaned", DEADLINE, || async {
        (!agent_names(&bed).contains(&"linux-55-1-deadbeef".to_owned())).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // A long job; its pod is OOM-killed while it runs.
    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(600)),
        )
        .expect("queue");
    let running = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.receive_time.is_some())
        .await
        .expect("request");
    let agent = running
        .agent_name
        .clone()
        .unwrap_or_else(|| fail(&bed, format!("request {id} never ran: {running:?}")));
    let pod = pod_of_agent(&bed, &agent)
        .await
        .and_then(|p| p.metadata.name)
        .unwrap_or_else(|| fail(&bed, format!("no agent Job's pod runs {agent}")));
    bed.node
        .as_ref()
        .expect("node")
        .kill_pod(&bed.namespace, &pod)
        .expect("kill pod");

    // ADO abandons the request; the agent it leaves behind is ours and holds nothing: deleted.
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .expect("request");
    assert_eq!(done.result.as_deref(), Some("abandoned"), "{done:?}");
    eventually("the killed agent cleaned from ADO", DEADLINE, || async {
        (!agent_names(&bed).contains(&agent)).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // Counted, and an Event says why.
    let cleaned = eventually("cleanups counted", DEADLINE, || async {
        metric(&bed, "azp_autoscaler_cleanups_total{")
            .await
            .filter(|n| *n >= 2.0)
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert!(cleaned >= 2.0);
    // The Event recorder folds repeats of one reason on one AgentPool into a series: count them all.
    eventually("OrphanAgentRemoved Events", DEADLINE, || async {
        let list = Api::<Event>::namespaced(bed.client.clone(), &bed.namespace)
            .list(&ListParams::default())
            .await
            .ok()?;
        let count: i32 = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("OrphanAgentRemoved"))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        (count >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // Several more polls later, the foreign agents and our placeholder are still there, and the request
    // got no second agent.
    let before = bed.sim.call_count("jobrequests.list");
    eventually("five more polls", DEADLINE, || async {
        (bed.sim.call_count("jobrequests.list") >= before + 5).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let names = agent_names(&bed);
    for foreign in [
        "linux-77-1-0ther000",
        "azp-placeholder-other-linux",
        "build-vm-3",
    ] {
        assert!(
            names.contains(&foreign.to_owned()),
            "{foreign} untouched: {names:?}"
        );
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with(&format!("azp-placeholder-{}-linux-", bed.namespace))),
        "our placeholder stays: {names:?}"
    );
    assert_eq!(
        bed.jobs().await.expect("jobs").len(),
        1,
        "no second agent for an abandoned request"
    );
    bed.teardown().await;
}

fn agentpools(bed: &Bed) -> Api<kube::core::DynamicObject> {
    Api::namespaced_with(
        bed.client.clone(),
        &bed.namespace,
        &azp_testbed::bed::agentpool_resource(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_agentpool_drains_it_a_busy_agent_finishes_its_job_first() {
    let bed = Bed::start(BedOptions::new("e2e-drain")).await.expect("bed");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 5))
        .await
        .expect("apply");
    let placeholder_prefix = format!("azp-placeholder-{}-linux-", bed.namespace);
    eventually("finalizer and placeholder", DEADLINE, || async {
        let pool = agentpools(&bed).get("linux").await.ok()?;
        let finalizers = pool.metadata.finalizers.unwrap_or_default();
        (finalizers.contains(&"azp-autoscaler.dev/drain".to_owned())
            && agent_names(&bed)
                .iter()
                .any(|n| n.starts_with(&placeholder_prefix)))
        .then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // One agent busy with a job.
    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(10)),
        )
        .expect("queue");
    let running = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.receive_time.is_some())
        .await
        .expect("request");
    assert!(running.result.is_none(), "{running:?}");

    // Delete the AgentPool with foreground propagation, the harshest cascade (kubectl and helm use
    // background): it stays, draining, and no cascade reaches the busy agent's Job or pod.
    agentpools(&bed)
        .delete("linux", &kube::api::DeleteParams::foreground())
        .await
        .expect("delete");
    let pool = agentpools(&bed).get("linux").await.expect("still there");
    assert!(pool.metadata.deletion_timestamp.is_some());
    // kubectl shows why it stays: Ready=False, Draining, naming the busy agent.
    let busy = running.agent_name.clone().unwrap_or_default();
    eventually("Draining status", DEADLINE, || async {
        let pool = agentpools(&bed).get("linux").await.ok()?;
        let conditions = pool.data["status"]["conditions"].as_array()?.clone();
        conditions
            .iter()
            .any(|c| {
                c["type"] == "Ready"
                    && c["reason"] == "Draining"
                    && c["message"].as_str().is_some_and(|m| m.contains(&busy))
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // The busy agent's job completes normally...
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .expect("request");
    assert_eq!(done.result.as_deref(), Some("succeeded"), "{done:?}");

    // ...then the AgentPool goes, and with it the placeholder.
    eventually("the AgentPool gone", DEADLINE, || async {
        match agentpools(&bed).get("linux").await {
            Err(kube::Error::Api(s)) if s.code == 404 => Some(()),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let names = agent_names(&bed);
    assert!(
        !names.iter().any(|n| n.starts_with(&placeholder_prefix)),
        "placeholder removed: {names:?}"
    );
    assert!(
        names.is_empty(),
        "no agent of the AgentPool left in ADO: {names:?}"
    );
    // The busy agent's Job was never killed: it succeeded.
    let jobs = bed.jobs().await.expect("jobs");
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().and_then(|s| s.failed).unwrap_or(0) == 0),
        "no agent Job failed: {jobs:?}"
    );
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_placeholder_follows_the_agentpools_capabilities_and_agent_version() {
    let bed = Bed::start(BedOptions::new("e2e-placeholder"))
        .await
        .expect("bed");
    let mut manifest = bed.agentpool("linux", "linux", 5);
    manifest["spec"]["capabilities"] = serde_json::json!({"docker": "true"});
    bed.apply_agentpool(manifest.clone()).await.expect("apply");
    let prefix = format!("azp-placeholder-{}-linux-", bed.namespace);
    let placeholder = |want: &'static [(&'static str, &'static str)], version: String| {
        let bed = &bed;
        let prefix = prefix.clone();
        async move {
            let agents = bed.sim.agents(ORG, "linux").ok()?;
            let p: Vec<_> = agents
                .into_iter()
                .filter(|a| a.name.starts_with(&prefix))
                .collect();
            let [p] = &p[..] else { return None };
            let caps = &p.system_capabilities;
            (p.version == version
                && !p.online
                && caps.get("azp-autoscaler.placeholder").map(String::as_str) == Some("true")
                && want
                    .iter()
                    .all(|(k, v)| caps.get(*k).map(String::as_str) == Some(*v)))
            .then(|| (p.id, caps.clone()))
        }
    };
    let version = azp_testbed::standin::AGENT_VERSION.to_owned();
    let (first_id, _) = eventually("the placeholder", DEADLINE, || {
        placeholder(&[("docker", "true")], version.clone())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // New capabilities and a newer agent image: the same placeholder now advertises them.
    manifest["spec"]["capabilities"] = serde_json::json!({"docker": "true", "gpu": "a100"});
    manifest["spec"]["agentVersion"] = serde_json::json!("9.1.0");
    bed.apply_agentpool(manifest).await.expect("apply");
    let (id, caps) = eventually("the placeholder updated", DEADLINE, || {
        placeholder(
            &[
                ("docker", "true"),
                ("gpu", "a100"),
                ("Agent.Version", "9.1.0"),
            ],
            "9.1.0".to_owned(),
        )
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert_eq!(id, first_id, "updated in place, not a second placeholder");
    assert_eq!(
        caps.get("azp-autoscaler.owner").map(String::as_str),
        Some(format!("bed-{ns}/{ns}/linux", ns = bed.namespace).as_str())
    );
    assert_eq!(agent_names(&bed).len(), 1, "one placeholder, nothing else");
    bed.teardown().await;
}

async fn leader_metric(addr: &str) -> Option<f64> {
    azp_testbed::bed::scrape_metric(addr, "azp_autoscaler_leader ").await
}

fn served_requests(bed: &Bed, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new().duration(Duration::from_millis(300)),
                )
                .expect("queue")
        })
        .collect()
}

async fn all_succeeded(bed: &Bed, ids: &[u64]) {
    for id in ids {
        let r = bed
            .sim
            .wait_request(ORG, *id, DEADLINE, |r| r.result.is_some())
            .await
            .expect("request");
        if r.result.as_deref() != Some("succeeded") {
            fail(bed, format!("request {id}: {r:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_leader_writes_and_the_other_takes_over_when_it_dies() {
    let election = [
        "--leader-elect".to_owned(),
        "--lease-duration-seconds".to_owned(),
        "6".to_owned(),
    ];
    let mut opts = BedOptions::new("e2e-leader");
    opts.start_controller = false;
    opts.controller_args = election.to_vec();
    let mut bed = Bed::start(opts).await.expect("bed");
    bed.grant_lease().await.expect("lease RBAC");
    bed.start_controller().expect("controller 1");
    // The second replica: same binary, identity and settings, its own admin port.
    let mut second = bed.spawn_replica("replica-2").expect("controller 2");
    let second_addr = second.admin_addr.clone();
    let first_addr = bed.admin_addr.clone();

    // Exactly one leader.
    let first_leads = eventually("one leader, one follower", DEADLINE, || async {
        match (
            leader_metric(&first_addr).await?,
            leader_metric(&second_addr).await?,
        ) {
            (a, b) if a == 1.0 && b == 0.0 => Some(true),
            (a, b) if a == 0.0 && b == 1.0 => Some(false),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    bed.apply_agentpool(bed.agentpool("linux", "linux", 5))
        .await
        .expect("apply");
    let prefix = format!("azp-placeholder-{}-linux-", bed.namespace);
    eventually("the placeholder", DEADLINE, || async {
        agent_names(&bed)
            .iter()
            .any(|n| n.starts_with(&prefix))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let ids = served_requests(&bed, 3);
    all_succeeded(&bed, &ids).await;
    assert_eq!(
        bed.jobs().await.expect("jobs").len(),
        3,
        "one agent Job per request with two replicas"
    );

    // The leader dies without a word (SIGKILL): the follower takes over once the Lease runs out.
    let survivor = if first_leads {
        bed.kill_controller().await;
        second_addr.clone()
    } else {
        second.kill().await;
        first_addr.clone()
    };
    eventually("the follower leads", DEADLINE, || async {
        (leader_metric(&survivor).await? == 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let more = served_requests(&bed, 2);
    all_succeeded(&bed, &more).await;
    assert_eq!(
        bed.jobs().await.expect("jobs").len(),
        5,
        "the new leader served the new requests, once each"
    );
    second.kill().await;
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_cleanup_while_ado_reads_fail_then_cleanup_resumes() {
    use azp_testbed::sim::{EndpointClass, Fault, FaultKind};
    let mut opts = BedOptions::new("e2e-nocleanup");
    opts.controller_args = vec!["--orphan-grace-seconds".into(), "1".into()];
    let bed = Bed::start(opts).await.expect("bed");
    bed.sim
        .add_identity(IdentitySpec::new(FOREIGN_CLIENT_ID).object_id(FOREIGN_OBJECT_ID));
    bed.sim.add_member(ORG, FOREIGN_OBJECT_ID).expect("member");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 5))
        .await
        .expect("apply");
    let prefix = format!("azp-placeholder-{}-linux-", bed.namespace);
    eventually("the placeholder", DEADLINE, || async {
        agent_names(&bed)
            .iter()
            .any(|n| n.starts_with(&prefix))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    // Every job request read now fails: each poll fails, so nothing is destroyed, whatever it sees.
    bed.sim.inject_fault(Fault::always(
        EndpointClass::JobRequests,
        FaultKind::MalformedJson,
    ));
    let ours = format!("bed-{ns}/{ns}/linux", ns = bed.namespace);
    register_agent(
        &bed,
        "linux-66-1-deadbeef",
        serde_json::json!({"azp-autoscaler.owner": ours}),
    )
    .await;
    let before = bed.sim.call_count("jobrequests.list");
    eventually("ten failed polls", DEADLINE, || async {
        (bed.sim.call_count("jobrequests.list") >= before + 10).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert!(
        agent_names(&bed).contains(&"linux-66-1-deadbeef".to_owned()),
        "no cleanup after failed ADO reads"
    );

    // ADO answers again: the left-behind agent goes.
    bed.sim.clear_faults();
    eventually("the left-behind agent cleaned", DEADLINE, || async {
        (!agent_names(&bed).contains(&"linux-66-1-deadbeef".to_owned())).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert!(
        agent_names(&bed).iter().any(|n| n.starts_with(&prefix)),
        "the placeholder stays"
    );
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_agentpool_removes_its_idle_standby_agent_safely() {
    let bed = Bed::start(BedOptions::new("e2e-drain-idle"))
        .await
        .expect("bed");
    let mut manifest = bed.agentpool("linux", "linux", 5);
    manifest["spec"]["minIdle"] = serde_json::json!(1);
    bed.apply_agentpool(manifest).await.expect("apply");
    // The standby agent registers and waits, idle.
    let standby = eventually("an idle standby agent online", DEADLINE, || async {
        bed.sim
            .agents(ORG, "linux")
            .ok()?
            .into_iter()
            .find(|a| a.name.starts_with("linux-standby-") && a.online)
            .map(|a| a.name)
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));

    agentpools(&bed)
        .delete("linux", &kube::api::DeleteParams::background())
        .await
        .expect("delete");
    eventually("the AgentPool gone", DEADLINE, || async {
        match agentpools(&bed).get("linux").await {
            Err(kube::Error::Api(s)) if s.code == 404 => Some(()),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let names = agent_names(&bed);
    assert!(
        names.is_empty(),
        "standby {standby} and the placeholder removed from ADO: {names:?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", bed.admin_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("kind=\"idle_agent_removed\"") && !l.ends_with(" 0")),
        "the standby went the safe way (disable, re-check, delete): {metrics}"
    );
    bed.teardown().await;
}

/// A client of the bed's cluster that makes each call once (kube's default retries 429s).
async fn client_without_retries() -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(azp_testbed::node::kubeconfig_path())
        .expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("client config");
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// The pod of the agent Job running `agent`.
async fn pod_of_agent(bed: &Bed, agent: &str) -> Option<Pod> {
    let job_name = job_of_agent(bed, agent).await?.metadata.name?;
    Api::<Pod>::namespaced(bed.client.clone(), &bed.namespace)
        .list(&ListParams::default().labels(&format!("job-name={job_name}")))
        .await
        .ok()?
        .items
        .into_iter()
        .next()
}

/// The agent Job running `agent`.
async fn job_of_agent(bed: &Bed, agent: &str) -> Option<Job> {
    bed.jobs()
        .await
        .ok()?
        .into_iter()
        .find(|j| job_agent(j) == Some(agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_agent_pod_cannot_be_evicted_an_idle_one_can_and_a_lost_job_is_counted() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let mut bed = Bed::start(BedOptions::new("e2e-evict")).await.expect("bed");
    let mut manifest = bed.agentpool("linux", "linux", 3);
    manifest["spec"]["minIdle"] = serde_json::json!(1);
    bed.apply_agentpool(manifest).await.expect("apply");
    bed.wait_ready("linux").await;

    // A long job runs on one agent; the standby agent waits idle.
    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(600)),
        )
        .expect("queue");
    let running = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.receive_time.is_some())
        .await
        .expect("request");
    let agent = running
        .agent_name
        .clone()
        .unwrap_or_else(|| fail(&bed, format!("request {id} never ran: {running:?}")));

    step("a job runs");
    // The busy pod is marked, and its AgentPool's budget selects it and allows no disruption.
    let busy = eventually("the busy pod marked", DEADLINE, || async {
        let pod = pod_of_agent(&bed, &agent).await?;
        (pod.metadata
            .labels
            .as_ref()?
            .get("azp-autoscaler.dev/busy")?
            == "true")
            .then_some(pod)
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let busy_name = busy.metadata.name.clone().unwrap_or_default();
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let budget = eventually("the budget observed", DEADLINE, || async {
        let b = budgets.get("linux-busy-agents").await.ok()?;
        let status = b.status.as_ref()?;
        (status.observed_generation == b.metadata.generation && status.expected_pods == 1)
            .then_some(b)
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let spec = budget.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(3)),
        "minAvailable = maxAgents: {spec:?}"
    );
    assert_eq!(
        budget.status.as_ref().map(|s| s.disruptions_allowed),
        Some(0)
    );

    // A new template (KEDA's default rollout would delete running Jobs): the busy Job keeps running.
    let busy_job_uid = job_of_agent(&bed, &agent)
        .await
        .and_then(|j| j.metadata.uid)
        .expect("the busy agent's Job");
    let mut changed = bed.agentpool("linux", "linux", 3);
    changed["spec"]["minIdle"] = serde_json::json!(1);
    changed["spec"]["template"]["spec"]["containers"][0]["env"] =
        serde_json::json!([{"name": "TEMPLATE_REVISION", "value": "2"}]);
    bed.apply_agentpool(changed)
        .await
        .expect("apply the new template");
    eventually("the new generation observed", DEADLINE, || async {
        let status = bed.agentpool_status("linux").await?;
        (status["observedGeneration"].as_i64()? >= 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let after = pod_of_agent(&bed, &agent).await;
    assert!(
        after
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "the busy pod survives a template change: {after:?}"
    );
    let jobs = bed.jobs().await.expect("jobs");
    assert!(
        jobs.iter()
            .any(|j| j.metadata.uid.as_deref() == Some(busy_job_uid.as_str())
                && j.metadata.deletion_timestamp.is_none()),
        "the busy Job is neither replaced nor deleted"
    );
    step("budget observed");
    // One eviction call, as `kubectl drain` makes it (the default client would retry the 429 for
    // minutes).
    let once: Api<Pod> = Api::namespaced(client_without_retries().await, &bed.namespace);
    let refused = once
        .evict(&busy_name, &kube::api::EvictParams::default())
        .await
        .expect_err("evicting the busy agent pod must be refused");
    assert!(
        format!("{refused:?}").contains("disruption budget"),
        "refused by the budget: {refused:?}"
    );
    let node = bed.node.as_ref().expect("node");

    step("busy pod eviction refused");
    // The standby agent (registered, idle) is not selected: evictable, and replaced by the controller.
    let standby = eventually("the standby agent registered", DEADLINE, || async {
        let jobs = bed.jobs().await.ok()?;
        // Not the busy one: the first standby may well have taken the request.
        let registered = agent_names(&bed);
        let standby_agent = jobs.iter().find_map(|j| {
            let name = j.metadata.name.as_deref()?;
            let a = j
                .metadata
                .annotations
                .as_ref()?
                .get("azp-autoscaler.dev/agent-name")?;
            (name.starts_with("linux-standby-") && *a != agent && registered.contains(a))
                .then(|| a.clone())
        })?;
        pod_of_agent(&bed, &standby_agent).await
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    let standby_name = standby.metadata.name.clone().unwrap_or_default();
    assert!(
        standby
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("azp-autoscaler.dev/busy"))
            .is_none(),
        "an idle pod is not marked busy"
    );
    node.evict_pod(&bed.namespace, &standby_name)
        .await
        .unwrap_or_else(|e| fail(&bed, format!("evicting the idle standby pod: {e}")));
    assert_eq!(
        metric(&bed, "azp_autoscaler_jobs_lost_to_eviction_total{").await,
        None,
        "an idle pod evicted loses no job"
    );

    step("idle pod evicted");
    // The node is lost (a spot VM reclaimed): pod GC deletes its pods with a DisruptionTarget condition.
    // The busy pod's job is lost and counted once; the idle ones are not counted.
    bed.node
        .as_mut()
        .expect("node")
        .lose_node(true)
        .await
        .expect("lose the node");
    let lost = eventually("the lost job counted", Duration::from_secs(180), || async {
        metric(&bed, "azp_autoscaler_jobs_lost_to_eviction_total{").await
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert_eq!(lost, 1.0);
    step("lost job counted");
    eventually("the busy pod gone", DEADLINE, || async {
        Api::<Pod>::namespaced(bed.client.clone(), &bed.namespace)
            .get_opt(&busy_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    assert_eq!(
        metric(&bed, "azp_autoscaler_jobs_lost_to_eviction_total{").await,
        Some(1.0),
        "counted once per pod"
    );
    step("done");
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_uninstall_hook_drains_the_releases_agentpools_under_the_charts_rbac() {
    let bed = Bed::start(BedOptions::new("e2e-uninstall"))
        .await
        .expect("bed");
    let release_label = "app.kubernetes.io/instance=azp-e2e";
    let mut ours = bed.agentpool("linux", "linux", 3);
    ours["metadata"]["labels"] = serde_json::json!({"app.kubernetes.io/instance": "azp-e2e"});
    bed.apply_agentpool(ours).await.expect("apply");
    // An AgentPool that is not the release's: the hook leaves it alone.
    bed.apply_agentpool(bed.agentpool("other", "linux", 1))
        .await
        .expect("apply");
    bed.wait_ready("linux").await;
    bed.wait_ready("other").await;
    let placeholders = |bed: &Bed| -> Vec<String> {
        agent_names(bed)
            .into_iter()
            .filter(|n| n.starts_with("azp-placeholder-"))
            .collect()
    };
    assert_eq!(placeholders(&bed).len(), 2, "{:?}", agent_names(&bed));

    // A job runs when `helm uninstall` starts.
    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(8)),
        )
        .expect("queue");
    bed.sim
        .wait_request(ORG, id, DEADLINE, |r| r.receive_time.is_some())
        .await
        .unwrap_or_else(|e| fail(&bed, format!("request {id} never ran: {e}")));

    // The hook's command, as the chart's Job runs it, under exactly the chart's hook RBAC.
    let rules = azp_testbed::chart::drain_rules().expect("the chart's drain rules");
    let kubeconfig = bed
        .service_account_kubeconfig("azp-drain", rules)
        .await
        .expect("hook ServiceAccount");
    let out = tokio::process::Command::new(azp_testbed::bed::bin("azp-autoscaler"))
        .args([
            "drain",
            "--namespace",
            &bed.namespace,
            "--selector",
            release_label,
            "--timeout-seconds",
            "120",
            "--progress-seconds",
            "1",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .expect("run azp-autoscaler drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        fail(
            &bed,
            format!("drain failed ({}):\n{stdout}\n{stderr}", out.status),
        );
    }
    assert!(
        stdout.contains("busy agent(s) to finish their job"),
        "progress names the busy agent it waits for:\n{stdout}"
    );

    // The busy agent finished its job; the release's AgentPool and placeholder are gone, the other stays.
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .expect("request");
    assert_eq!(done.result.as_deref(), Some("succeeded"), "{done:?}");
    let api = agentpools(&bed);
    assert!(api.get_opt("linux").await.expect("get").is_none());
    assert!(api.get_opt("other").await.expect("get").is_some());
    let left = placeholders(&bed);
    assert!(
        left.len() == 1 && left[0].contains("-other-"),
        "only the other AgentPool's placeholder is left: {left:?}"
    );
    bed.teardown().await;
}
