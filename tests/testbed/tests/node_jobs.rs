//! Node harness on the real API server: Jobs run to Complete / Failed as the Job controller sees them,
//! node capacity holds pods back, node-level faults (OOM-like kill) fail the pod.
//! Needs the local control plane (`tests/cluster/up.sh`).

use std::time::Duration;

use azp_testbed::node::testing::{
    TestNamespace, first_pod, init_tracing, pod_phase, shell_job, shell_pod, terminated,
    wait_job_finished, wait_pod_phase,
};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(120);

async fn job_pod(pods: &Api<Pod>, job: &str) -> Pod {
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .expect("list the Job's pods");
    assert_eq!(
        list.items.len(),
        1,
        "one pod for Job {job} (backoffLimit 0)"
    );
    list.items.into_iter().next().expect("one pod")
}

#[tokio::test]
async fn jobs_complete_or_fail_with_the_exit_code_of_their_process() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-jobs").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();

    jobs.create(
        &PostParams::default(),
        &shell_job("ok", "echo hello from $HOSTNAME; exit 0"),
    )
    .await
    .expect("create Job ok");
    jobs.create(
        &PostParams::default(),
        &shell_job("fails", "echo failing >&2; exit 3"),
    )
    .await
    .expect("create Job fails");

    assert_eq!(wait_job_finished(&jobs, "ok", TIMEOUT).await, "Complete");
    assert_eq!(wait_job_finished(&jobs, "fails", TIMEOUT).await, "Failed");

    let ok = job_pod(&pods, "ok").await;
    assert_eq!(pod_phase(&ok), Some("Succeeded"));
    assert_eq!(terminated(&ok), Some((0, "Completed".to_owned())));
    assert_eq!(
        ok.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(harness.node_name()),
        "bound to the harness's node"
    );
    let status = ok.status.as_ref().expect("status");
    assert!(status.start_time.is_some(), "startTime set");
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));

    let failed = job_pod(&pods, "fails").await;
    assert_eq!(pod_phase(&failed), Some("Failed"));
    assert_eq!(terminated(&failed), Some((3, "Error".to_owned())));

    // The process's output is captured in the pod folder.
    let name = ok.metadata.name.clone().expect("pod name");
    let layout = harness
        .pod_layout(ns.name(), &name)
        .expect("the node knows the pod");
    let out = std::fs::read_to_string(&layout.stdout).expect("stdout.log");
    assert_eq!(out.trim(), format!("hello from {name}"));
    let fname = failed.metadata.name.clone().expect("pod name");
    let err = std::fs::read_to_string(harness.pod_layout(ns.name(), &fname).expect("known").stderr)
        .expect("stderr.log");
    assert_eq!(err.trim(), "failing");

    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn capacity_holds_pods_unbound_until_a_slot_frees() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-capacity").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    config.capacity.pods = 1;
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    let pp = PostParams::default();
    pods.create(&pp, &shell_pod("a", "exec sleep 300"))
        .await
        .expect("create a");
    pods.create(&pp, &shell_pod("b", "exec sleep 300"))
        .await
        .expect("create b");

    // Whichever got the slot runs; the other cannot be bound while it does.
    let running = tokio::select! {
        p = wait_pod_phase(&pods, "a", "Running", TIMEOUT) => p,
        p = wait_pod_phase(&pods, "b", "Running", TIMEOUT) => p,
    };
    let running_name = running.metadata.name.clone().expect("name");
    let other_name = if running_name == "a" { "b" } else { "a" };
    let other = pods.get(other_name).await.expect("get the other pod");
    assert_eq!(
        other.spec.as_ref().and_then(|s| s.node_name.clone()),
        None,
        "with one pod slot taken, {other_name} stays unbound"
    );
    assert_eq!(pod_phase(&other), Some("Pending"));

    // Finishing the running pod frees the slot: the other one is bound and runs.
    pods.delete(&running_name, &DeleteParams::default())
        .await
        .expect("delete the running pod");
    let other = wait_pod_phase(&pods, other_name, "Running", TIMEOUT).await;
    assert_eq!(
        other.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(harness.node_name())
    );

    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_oom_like_kill_fails_the_job_with_exit_code_137() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-oom").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();
    jobs.create(&PostParams::default(), &shell_job("hog", "exec sleep 300"))
        .await
        .expect("create Job");
    let pod_name = first_pod(&pods, "job-name=hog", TIMEOUT)
        .await
        .metadata
        .name
        .expect("pod name");
    wait_pod_phase(&pods, &pod_name, "Running", TIMEOUT).await;
    harness
        .kill_pod(ns.name(), &pod_name)
        .expect("kill the pod's process");
    assert_eq!(wait_job_finished(&jobs, "hog", TIMEOUT).await, "Failed");
    let pod = pods.get(&pod_name).await.expect("get pod");
    assert_eq!(pod_phase(&pod), Some("Failed"));
    assert_eq!(terminated(&pod), Some((137, "OOMKilled".to_owned())));

    let err = harness
        .kill_pod(ns.name(), "no-such-pod")
        .expect_err("unknown pod");
    assert_eq!(err.metric_label(), "no_such_pod");
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn on_failure_restarts_the_container_in_the_same_pod() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-restart").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let mut pod = shell_pod(
        "flaky",
        r#"if [ -f "$TESTBED_POD_DIR/failed-once" ]; then exit 0; fi; touch "$TESTBED_POD_DIR/failed-once"; exit 1"#,
    );
    if let Some(spec) = pod.spec.as_mut() {
        spec.restart_policy = Some("OnFailure".into());
    }
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let done = wait_pod_phase(&pods, "flaky", "Succeeded", TIMEOUT).await;
    let status = done
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .cloned()
        .expect("container status");
    assert_eq!(status.restart_count, 1);
    let last = status
        .last_state
        .and_then(|s| s.terminated)
        .expect("lastState.terminated");
    assert_eq!(last.exit_code, 1);
    assert_eq!(terminated(&done), Some((0, "Completed".to_owned())));
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_pod_past_its_active_deadline_fails_with_deadline_exceeded() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-deadline").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let mut pod = shell_pod("late", "exec sleep 300");
    if let Some(spec) = pod.spec.as_mut() {
        spec.active_deadline_seconds = Some(1);
    }
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let failed = wait_pod_phase(&pods, "late", "Failed", TIMEOUT).await;
    assert_eq!(
        failed.status.as_ref().and_then(|s| s.reason.as_deref()),
        Some("DeadlineExceeded")
    );
    assert_eq!(
        terminated(&failed).map(|t| t.0),
        Some(143),
        "stopped with SIGTERM"
    );
    harness.shutdown().await.expect("shutdown");
}
