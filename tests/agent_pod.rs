//! The entrypoint in a pod, on the real local API server: the node harness plays kubelet (SIGTERM to the
//! container's main process on deletion, SIGKILL after the grace period) and the workload-identity webhook
//! (a real service-account token from the TokenRequest API, exchanged with the simulator's Entra, which
//! checks it against the API server's JWKS). No controller: the test creates the agent pod itself.
//!
//! Needs the local control plane (`tests/cluster/up.sh`; `tests/run.sh` starts it) and the workspace
//! binaries (`cargo build --workspace --bins`).

use std::time::Duration;

use azp_testbed::bed::{AGENT_IMAGE, AGENT_SA, Bed, BedOptions, ORG, eventually};
use azp_testbed::node::testing::{PodFollower, pod_phase, terminated};
use azp_testbed::sim::RequestSpec;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

const POOL: &str = "linux";
const AGENT_NAME: &str = "pod-agent-1";
const DEADLINE: Duration = Duration::from_secs(90);

fn agent_pod(org_url: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent-1",
            "labels": { "azure.workload.identity/use": "true" }
        },
        "spec": {
            "serviceAccountName": AGENT_SA,
            "restartPolicy": "Never",
            // Listener grace (45 s default) + deregistration (30 s default) + margin.
            "terminationGracePeriodSeconds": 90,
            "containers": [{
                "name": "agent",
                "image": AGENT_IMAGE,
                "env": [
                    { "name": "AZP_URL", "value": org_url },
                    { "name": "AZP_POOL", "value": POOL },
                    { "name": "AZP_AGENT_NAME", "value": AGENT_NAME },
                    { "name": "STANDIN_EMPTY_POLL_DELAY_MS", "value": "100" }
                ]
            }]
        }
    }))
    .expect("pod manifest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_busy_agent_pod_cancels_the_job_deregisters_and_exits_14() {
    let mut opts = BedOptions::new("agent-pod");
    opts.start_controller = false;
    let bed = Bed::start(opts)
        .await
        .expect("test bed (is the local control plane up? tests/cluster/up.sh)");
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &bed.namespace);
    pods.create(&PostParams::default(), &agent_pod(&bed.org_url()))
        .await
        .expect("create the agent pod");

    eventually("the agent online in the pool", DEADLINE, || async {
        bed.sim
            .agents(ORG, POOL)
            .ok()?
            .into_iter()
            .find(|a| a.name == AGENT_NAME && a.online)
    })
    .await
    .expect("the agent registered through workload identity and came online");

    let request = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(600)),
        )
        .expect("queue");
    let r = bed
        .sim
        .wait_request(ORG, request, DEADLINE, |r| r.receive_time.is_some())
        .await
        .expect("request");
    assert!(r.receive_time.is_some(), "the job started: {r:?}");

    let follow = PodFollower::start(&pods, "agent-1").await;
    pods.delete("agent-1", &DeleteParams::default())
        .await
        .expect("delete the pod");
    let last = follow.until_deleted(Duration::from_secs(120)).await;

    assert_eq!(pod_phase(&last), Some("Failed"), "{:?}", last.status);
    assert_eq!(
        terminated(&last).map(|(code, _)| code),
        Some(14),
        "exit code 14: the job was interrupted by SIGTERM"
    );
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("canceled"), "{r:?}");
    assert!(
        bed.sim
            .agents(ORG, POOL)
            .expect("pool")
            .iter()
            .all(|a| a.name != AGENT_NAME),
        "the agent was deregistered within the grace period"
    );
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pod_runs_its_job_deregisters_and_succeeds() {
    let mut opts = BedOptions::new("agent-pod-ok");
    opts.start_controller = false;
    let bed = Bed::start(opts)
        .await
        .expect("test bed (is the local control plane up? tests/cluster/up.sh)");
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &bed.namespace);
    pods.create(&PostParams::default(), &agent_pod(&bed.org_url()))
        .await
        .expect("create the agent pod");
    eventually("the agent online in the pool", DEADLINE, || async {
        bed.sim
            .agents(ORG, POOL)
            .ok()?
            .into_iter()
            .find(|a| a.name == AGENT_NAME && a.online)
    })
    .await
    .expect("the agent came online");
    let request = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_millis(500)),
        )
        .expect("queue");
    let phase = eventually("the pod finished", DEADLINE, || async {
        let p = pods.get("agent-1").await.ok()?;
        pod_phase(&p)
            .filter(|ph| matches!(*ph, "Succeeded" | "Failed"))
            .map(|ph| (ph.to_owned(), terminated(&p)))
    })
    .await
    .expect("the pod ends on its own after one job");
    assert_eq!(phase.0, "Succeeded", "{phase:?}");
    assert_eq!(phase.1.map(|(code, _)| code), Some(0));
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("succeeded"), "{r:?}");
    assert!(bed.sim.agents(ORG, POOL).expect("pool").is_empty());
    bed.teardown().await;
}
