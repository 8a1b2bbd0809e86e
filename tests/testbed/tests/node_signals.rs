//! Node harness on the real API server: deleting a pod sends SIGTERM to its process group (the process
//! sees it), SIGKILL after the grace period, terminal status, then the pod is removed; eviction and drain
//! go the same way. Needs the local control plane (`tests/cluster/up.sh`).

use std::path::Path;
use std::time::Duration;

use azp_testbed::node::testing::{
    PodFollower, TestNamespace, init_tracing, pod_phase, shell_pod, terminated, wait_pod_phase,
};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Traps SIGTERM, reports it on stdout and exits 0; says `ready` once the trap is set.
const TRAPS_TERM: &str =
    "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done";
/// Ignores SIGTERM (so only SIGKILL ends it).
const IGNORES_TERM: &str = "trap '' TERM; echo ready; while true; do sleep 0.1; done";

/// Waits until the process wrote `needle` to `path` (the trap must be set before the test signals it).
async fn wait_output(path: &Path, needle: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never contained {needle:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_ready(
    harness: &NodeHarness,
    pods: &Api<Pod>,
    ns: &str,
    name: &str,
    script: &str,
    grace: i64,
) {
    let mut pod = shell_pod(name, script);
    if let Some(spec) = pod.spec.as_mut() {
        spec.termination_grace_period_seconds = Some(grace);
    }
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_pod_phase(pods, name, "Running", TIMEOUT).await;
    let layout = harness
        .pod_layout(ns, name)
        .expect("the node knows the pod");
    wait_output(&layout.stdout, "ready").await;
}

#[tokio::test]
async fn deletion_sends_sigterm_that_the_process_sees() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-term").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    start_ready(&harness, &pods, ns.name(), "graceful", TRAPS_TERM, 30).await;

    let follow = PodFollower::start(&pods, "graceful").await;
    pods.delete("graceful", &DeleteParams::default())
        .await
        .expect("delete pod");
    let last = follow.until_deleted(TIMEOUT).await;
    assert_eq!(
        pod_phase(&last),
        Some("Succeeded"),
        "exit 0 after SIGTERM is a success"
    );
    assert_eq!(terminated(&last), Some((0, "Completed".to_owned())));
    let out = std::fs::read_to_string(
        harness
            .pod_layout(ns.name(), "graceful")
            .expect("known")
            .stdout,
    )
    .expect("stdout");
    assert!(out.contains("got TERM"), "the process saw SIGTERM: {out:?}");
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_process_ignoring_sigterm_is_killed_after_the_grace_period() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-kill").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    start_ready(&harness, &pods, ns.name(), "stubborn", IGNORES_TERM, 1).await;
    let follow = PodFollower::start(&pods, "stubborn").await;
    pods.delete("stubborn", &DeleteParams::default())
        .await
        .expect("delete pod");
    let last = follow.until_deleted(TIMEOUT).await;
    assert_eq!(pod_phase(&last), Some("Failed"));
    assert_eq!(
        terminated(&last),
        Some((137, "Error".to_owned())),
        "SIGKILL after the grace period"
    );
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn eviction_and_drain_stop_pods_through_sigterm() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-drain").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    for name in ["evicted", "drained-1", "drained-2"] {
        start_ready(&harness, &pods, ns.name(), name, TRAPS_TERM, 30).await;
    }

    let follow = PodFollower::start(&pods, "evicted").await;
    harness
        .evict_pod(ns.name(), "evicted")
        .await
        .expect("evict");
    let last = follow.until_deleted(TIMEOUT).await;
    assert_eq!(terminated(&last), Some((0, "Completed".to_owned())));

    let mut followers = Vec::new();
    for name in ["drained-1", "drained-2"] {
        followers.push(PodFollower::start(&pods, name).await);
    }
    let mut evicted = harness.drain().await.expect("drain");
    evicted.sort();
    assert_eq!(
        evicted,
        vec![
            format!("{}/drained-1", ns.name()),
            format!("{}/drained-2", ns.name())
        ]
    );
    for f in followers {
        let last = f.until_deleted(TIMEOUT).await;
        assert_eq!(terminated(&last), Some((0, "Completed".to_owned())));
    }
    for name in ["evicted", "drained-1", "drained-2"] {
        let out =
            std::fs::read_to_string(harness.pod_layout(ns.name(), name).expect("known").stdout)
                .expect("stdout");
        assert!(out.contains("got TERM"), "{name} saw SIGTERM: {out:?}");
    }
    let node: Api<Node> = Api::all(client.clone());
    let n = node.get(harness.node_name()).await.expect("get node");
    assert_eq!(
        n.spec.and_then(|s| s.unschedulable),
        Some(true),
        "drain cordons the node"
    );
    harness.shutdown().await.expect("shutdown");
}

/// Whether process `pid` is gone (absent, or a zombie waiting for its new parent to reap it).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| {
                stat[i + 1..]
                    .split_whitespace()
                    .next()
                    .map(|s| s == "Z" || s == "X")
            })
            .unwrap_or(true),
    }
}

#[tokio::test]
async fn sigterm_reaches_only_the_main_process_and_teardown_kills_every_process() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-wrapper").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    // Like the agent's run.sh: a wrapper that neither execs nor forwards SIGTERM. Child 1 shares its
    // process group; child 2 gets one of its own (perl's setpgrp: `sh` has no job control without a tty),
    // as the entrypoint gives the listener. Both trap SIGTERM to prove whether they ever got one.
    // (`$$$$` is the shell's `$$`: Kubernetes expands `$$` in a command to `$`.)
    let child = |n: u8, prefix: &str| {
        format!(
            r#"{prefix}sh -c 'trap "echo got TERM > \"$TESTBED_POD_DIR/child-{n}.txt\"; exit 0" TERM; echo $$$$ > "$TESTBED_POD_DIR/child-{n}.pid"; while true; do sleep 0.1; done' &"#
        )
    };
    let script = format!(
        "{}\n{}\nwait",
        child(1, ""),
        child(2, "perl -e 'setpgrp(0,0); exec @ARGV or die' -- ")
    );
    pods.create(&PostParams::default(), &shell_pod("wrapper", &script))
        .await
        .expect("create pod");
    wait_pod_phase(&pods, "wrapper", "Running", TIMEOUT).await;
    let layout = harness.pod_layout(ns.name(), "wrapper").expect("known pod");
    let mut children = Vec::new();
    for n in [1, 2] {
        let pid_file = layout.dir.join(format!("child-{n}.pid"));
        wait_output(&pid_file, "\n").await;
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("child pid file")
            .trim()
            .parse()
            .expect("a pid");
        children.push((n, pid));
    }

    let pgrp = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("child is running");
        let rest = stat
            .rfind(')')
            .map(|i| stat[i + 1..].to_owned())
            .unwrap_or_default();
        rest.split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .expect("pgrp field")
    };
    assert_ne!(
        pgrp(children[0].1),
        pgrp(children[1].1),
        "child 2 runs in a process group of its own"
    );
    let follow = PodFollower::start(&pods, "wrapper").await;
    pods.delete("wrapper", &DeleteParams::default())
        .await
        .expect("delete pod");
    let last = follow.until_deleted(TIMEOUT).await;
    assert_eq!(
        terminated(&last),
        Some((143, "Error".to_owned())),
        "the wrapper died of SIGTERM"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (n, pid) in children {
        while !process_gone(pid) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "child {n} ({pid}) survived the container's teardown"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !layout.dir.join(format!("child-{n}.txt")).exists(),
            "child {n} got SIGTERM: it must go to the main process only, as a container runtime sends it"
        );
    }
    harness.shutdown().await.expect("shutdown");
}
