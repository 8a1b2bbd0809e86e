//! `registration: controller` end to end on the real local API server (controller process + ADO
//! simulator + node harness + agent entrypoint + stand-in agent): the controller registers each agent,
//! the agent pod holds no identity at all (no workload-identity token, no service-account token, no
//! `AZURE_*` env), the listener starts from the files in the Job's Secret, and the controller removes the
//! agent when the Job ends — also when the pod is killed mid-job. The Secret goes with the Job.
//!
//! The orphan grace is set far beyond the test's deadlines: an agent that disappears in time was removed
//! because its Job ended, not by the left-behind cleanup.
//! Needs `tests/cluster/up.sh` and `cargo build --workspace --bins` (tests/run.sh does both).

use std::collections::BTreeMap;
use std::time::Duration;

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::sim::RequestSpec;
use azp_testbed::standin;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, PropagationPolicy};

const DEADLINE: Duration = Duration::from_secs(120);
/// Far longer than any wait here: the left-behind cleanup never acts within a test.
const ORPHAN_GRACE: &str = "3600";

fn fail(bed: &Bed, what: impl std::fmt::Display) -> ! {
    // A CRD replaced by another checkout's test run (the cluster is shared) explains many failures here.
    let crd = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let crds: Api<CustomResourceDefinition> = Api::all(bed.client.clone());
            match crds.get("agentpools.azp-autoscaler.dev").await {
                Ok(c) => {
                    let text = serde_json::to_string(&c.spec).unwrap_or_default();
                    if text.contains("\"registration\"") {
                        "the installed CRD has spec.registration".to_owned()
                    } else {
                        "THE INSTALLED CRD HAS NO spec.registration: another checkout's test run replaced it \
                         (the cluster is shared) and the API server pruned the field; rerun when it is done"
                            .to_owned()
                    }
                }
                Err(e) => format!("cannot read the CRD: {e}"),
            }
        })
    });
    panic!("{what}\n{crd}\ncontroller logs:\n{}", bed.controller_logs())
}

fn bed_options(name: &str) -> BedOptions {
    let mut opts = BedOptions::new(name);
    opts.ado_pools = vec!["linux".to_owned(), "control".to_owned()];
    opts.controller_args = vec!["--orphan-grace-seconds".into(), ORPHAN_GRACE.into()];
    opts
}

fn controller_registered(bed: &Bed, name: &str, ado_pool: &str) -> serde_json::Value {
    let mut manifest = bed.agentpool(name, ado_pool, 3);
    manifest["spec"]["registration"] = "controller".into();
    manifest
}

/// The local control plane is shared: a bed started from a checkout without `spec.registration`
/// re-installs its own CRD, and the API server then prunes the field from every AgentPool. Say so plainly
/// instead of failing later on a pod that registered itself.
async fn assert_registration_kept(bed: &Bed, name: &str) {
    let pools: Api<kube::core::DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        &bed.namespace,
        &azp_testbed::bed::agentpool_resource(),
    );
    let stored = pools.get(name).await.expect("AgentPool");
    assert_eq!(
        stored.data["spec"]["registration"], "controller",
        "AgentPool {name} lost spec.registration: the shared cluster's CRD was replaced by one without the \
         field (a test run from an older checkout re-installed it); rerun when no such run is active"
    );
}

fn agent_names(bed: &Bed, pool: &str) -> Vec<String> {
    bed.sim
        .agents(ORG, pool)
        .expect("agents")
        .into_iter()
        .map(|a| a.name)
        .collect()
}

async fn job_of_agent(bed: &Bed, agent: &str) -> Job {
    let jobs = bed.jobs().await.expect("jobs");
    jobs.into_iter()
        .find(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("azp-autoscaler.dev/agent-name"))
                .is_some_and(|n| n == agent)
        })
        .unwrap_or_else(|| fail(bed, format!("no agent Job runs {agent}")))
}

async fn pod_of_job(bed: &Bed, job: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &bed.namespace)
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .expect("pods");
    pods.items
        .into_iter()
        .next()
        .unwrap_or_else(|| fail(bed, format!("no pod of Job {job}")))
}

/// Runs one probe request on `pool` and returns (the agent that served it, the probe report).
async fn probe_on(bed: &Bed, pool: &str) -> (String, standin::ProbeReport) {
    let id = bed
        .sim
        .queue(
            ORG,
            pool,
            RequestSpec::new()
                .duration(Duration::from_millis(500))
                .probe(),
        )
        .expect("queue");
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .unwrap_or_else(|e| fail(bed, format!("request {id} on {pool}: {e}")));
    assert_eq!(done.result.as_deref(), Some("succeeded"), "{done:?}");
    let agent = done.agent_name.clone().expect("served by an agent");
    let reports = bed.sim.reports(id);
    assert_eq!(reports.len(), 1, "one probe report: {reports:?}");
    let report = serde_json::from_value(reports[0].body.clone()).expect("report shape");
    (agent, report)
}

fn readable_tokens(report: &standin::ProbeReport) -> Vec<&String> {
    report
        .readable
        .iter()
        .filter(|(_, readable)| **readable)
        .map(|(path, _)| path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_without_any_identity_serves_a_request_and_its_agent_and_secret_go_with_the_job() {
    let bed = Bed::start(bed_options("e2e-registration"))
        .await
        .expect("bed (is the local control plane up? tests/cluster/up.sh)");
    bed.apply_agentpool(controller_registered(&bed, "nocred", "linux"))
        .await
        .expect("apply");
    // The default mode on another ADO pool: the control that shows the probe finds a mounted token.
    bed.apply_agentpool(bed.agentpool("default", "control", 3))
        .await
        .expect("apply");
    bed.wait_ready("nocred").await;
    bed.wait_ready("default").await;
    assert_registration_kept(&bed, "nocred").await;

    // Control: a pod of the default mode carries token files a job step can read.
    let (_, control) = probe_on(&bed, "control").await;
    assert!(
        !readable_tokens(&control).is_empty(),
        "the probe must find the default mode's token files, or it proves nothing: {:?}",
        control.readable
    );

    // The request is served by a pod without identity.
    let (agent, report) = probe_on(&bed, "linux").await;
    assert!(
        readable_tokens(&report).is_empty(),
        "a job step read a token file: {:?}",
        report.readable
    );
    for (k, v) in &report.env {
        let upper = k.to_ascii_uppercase();
        assert!(
            !upper.starts_with("AZURE_") && !upper.starts_with("AZP_") && !upper.contains("TOKEN"),
            "the job step got {k}={v}"
        );
    }
    assert!(
        report.argv.iter().any(|a| a == "--once"),
        "{:?}",
        report.argv
    );

    // What the API server admitted: no identity anywhere in the pod.
    let job = job_of_agent(&bed, &agent).await;
    let job_name = job.metadata.name.clone().expect("job name");
    let pod = pod_of_job(&bed, &job_name).await;
    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert!(
        !labels.contains_key("azure.workload.identity/use"),
        "{labels:?}"
    );
    for v in spec.volumes.iter().flatten() {
        let projects_a_token = v.projected.as_ref().is_some_and(|p| {
            p.sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some())
        });
        assert!(!projects_a_token, "volume {} projects a token", v.name);
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            assert!(!e.name.starts_with("AZURE_"), "{}: {}", c.name, e.name);
        }
    }

    // The Secret held the agent's three files, owned by the Job.
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let secret_name = format!("{job_name}-agent");
    let secret = secrets
        .get(&secret_name)
        .await
        .unwrap_or_else(|e| fail(&bed, format!("Secret {secret_name}: {e}")));
    let keys: Vec<String> = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    assert_eq!(keys, [".agent", ".credentials", ".credentials_rsaparams"]);
    let owner = &secret.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("Job", job.metadata.uid.as_ref())
    );

    assert_registration_kept(&bed, "nocred").await;
    // The Job ended: the controller removed the agent (the orphan grace is an hour).
    eventually(
        "the agent removed after its Job ended",
        DEADLINE,
        || async { (!agent_names(&bed, "linux").contains(&agent)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    // The placeholder stays: scale to zero keeps the pool queueable.
    assert!(
        agent_names(&bed, "linux")
            .iter()
            .any(|n| n.starts_with("azp-placeholder-")),
        "{:?}",
        agent_names(&bed, "linux")
    );

    // The Secret goes with the Job.
    Api::<Job>::namespaced(bed.client.clone(), &bed.namespace)
        .delete(
            &job_name,
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("delete the Job");
    eventually("the Secret deleted with its Job", DEADLINE, || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()
            .and_then(|s| s.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_pod_is_killed_mid_job_is_removed_from_the_pool() {
    let mut opts = bed_options("e2e-registration-kill");
    // A killed agent stops renewing its job lock: ADO abandons the request when the lock runs out.
    opts.sim.lock_secs = 8;
    let bed = Bed::start(opts).await.expect("bed");
    let mut manifest = controller_registered(&bed, "nocred", "linux");
    manifest["spec"]["template"]["spec"]["containers"][0]["env"] =
        serde_json::json!([{"name": "STANDIN_RENEW_INTERVAL_MS", "value": "1000"}]);
    bed.apply_agentpool(manifest).await.expect("apply");
    bed.wait_ready("nocred").await;
    assert_registration_kept(&bed, "nocred").await;

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
    let job = job_of_agent(&bed, &agent).await;
    let job_name = job.metadata.name.clone().expect("job name");
    let pod = pod_of_job(&bed, &job_name).await;
    bed.node
        .as_ref()
        .expect("node")
        .kill_pod(
            &bed.namespace,
            &pod.metadata.name.clone().unwrap_or_default(),
        )
        .expect("kill pod");

    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .expect("request");
    assert_eq!(done.result.as_deref(), Some("abandoned"), "{done:?}");
    eventually(
        "the killed pod's agent removed from the pool",
        DEADLINE,
        || async { (!agent_names(&bed, "linux").contains(&agent)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    // Only the placeholder is left: nothing of ours without a running Job.
    let left: BTreeMap<String, bool> = bed
        .sim
        .agents(ORG, "linux")
        .expect("agents")
        .into_iter()
        .map(|a| (a.name, a.online))
        .collect();
    assert!(
        left.keys().all(|n| n.starts_with("azp-placeholder-")),
        "{left:?}"
    );
    bed.teardown().await;
}

/// The controller stopped after creating an agent Job and before registering its agent (no Secret):
/// the pod waits for its Secret, and the restarted controller registers the agent and writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_left_without_its_secret_by_a_stopped_controller_is_repaired_after_restart() {
    let mut bed = Bed::start(bed_options("e2e-registration-repair"))
        .await
        .expect("bed");
    bed.apply_agentpool(controller_registered(&bed, "nocred", "linux"))
        .await
        .expect("apply");
    bed.wait_ready("nocred").await;
    assert_registration_kept(&bed, "nocred").await;
    bed.kill_controller().await;

    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_millis(500)),
        )
        .expect("queue");
    // Exactly the Job the controller makes for this request, created while it is down.
    let pools: Api<kube::core::DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        &bed.namespace,
        &azp_testbed::bed::agentpool_resource(),
    );
    let stored = pools.get("nocred").await.expect("AgentPool");
    let pool: azp_autoscaler::k8s::crd::AgentPool =
        serde_json::from_value(serde_json::to_value(&stored).expect("json")).expect("AgentPool");
    let job_name =
        azp_autoscaler::plan::names::request_job_name("nocred", i64::try_from(id).unwrap(), 1);
    let cluster_id = format!("bed-{}", bed.namespace);
    let agent =
        azp_autoscaler::controller::snapshot::agent_name(&job_name, &cluster_id, &bed.namespace);
    let job = azp_autoscaler::k8s::job::build(
        &pool,
        &azp_autoscaler::k8s::job::AgentJob {
            job_name: &job_name,
            agent_name: &agent,
            request_id: Some(i64::try_from(id).unwrap()),
            attempt: 1,
            cluster_id: &cluster_id,
        },
    )
    .expect("build the Job");
    let jobs: Api<Job> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let job = jobs
        .create(&PostParams::default(), &job)
        .await
        .expect("create the Job");
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let secret_name = format!("{job_name}-agent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        secrets.get_opt(&secret_name).await.expect("get").is_none(),
        "no Secret while the controller is down"
    );
    assert!(!agent_names(&bed, "linux").contains(&agent));

    bed.start_controller().expect("restart the controller");
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .unwrap_or_else(|e| fail(&bed, e));
    assert_eq!(done.result.as_deref(), Some("succeeded"), "{done:?}");
    assert_eq!(
        done.agent_name.as_deref(),
        Some(agent.as_str()),
        "served by the repaired Job"
    );
    let secret = secrets
        .get(&secret_name)
        .await
        .unwrap_or_else(|e| fail(&bed, format!("Secret {secret_name}: {e}")));
    let owner = &secret.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(Some(&owner.uid), job.metadata.uid.as_ref());
    let jobs_now = bed.jobs().await.expect("jobs");
    assert_eq!(jobs_now.len(), 1, "no second Job for the request");
    eventually(
        "the agent removed after its Job ended",
        DEADLINE,
        || async { (!agent_names(&bed, "linux").contains(&agent)).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| fail(&bed, e));
    bed.teardown().await;
}
