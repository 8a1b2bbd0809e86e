//! Node harness on the real API server: the Lease and Ready heartbeats keep the node Ready past the
//! node-lifecycle controller's grace period (50 s); without heartbeats the controller marks it Unknown.
//! These tests take about a minute each (they wait out the controller's grace period on its clock).
//! Needs the local control plane (`tests/cluster/up.sh`).

use std::time::Duration;

use azp_testbed::node::testing::{
    TestNamespace, init_tracing, shell_pod, wait_for, wait_pod_phase,
};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use jiff::SignedDuration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

/// kube-controller-manager's `--node-monitor-grace-period` default (1.32+), plus one monitor period.
const GRACE_AND_MARGIN: SignedDuration = SignedDuration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(180);

fn ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

#[tokio::test]
async fn the_node_stays_ready_beyond_the_node_monitor_grace_period() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-alive").await;
    let harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    let pods: Api<Pod> = ns.api();
    pods.create(
        &PostParams::default(),
        &shell_pod("steady", "exec sleep 600"),
    )
    .await
    .expect("create pod");
    wait_pod_phase(&pods, "steady", "Running", TIMEOUT).await;

    let nodes: Api<Node> = Api::all(client.clone());
    let created = nodes
        .get(harness.node_name())
        .await
        .expect("get node")
        .metadata
        .creation_timestamp
        .expect("creationTimestamp")
        .0;
    // Heartbeat cycles, observed on the Lease, until the grace period has passed since registration.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    wait_for(
        &leases,
        harness.node_name(),
        TIMEOUT,
        "Lease renewals past the grace period",
        |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.renew_time.as_ref())
                .is_some_and(|t| t.0.duration_since(created) >= GRACE_AND_MARGIN)
        },
    )
    .await;

    let node = nodes.get(harness.node_name()).await.expect("get node");
    assert_eq!(
        ready_status(&node).as_deref(),
        Some("True"),
        "node conditions: {:?}",
        node.status
    );
    let heartbeat = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.clone())
        .expect("Ready lastHeartbeatTime")
        .0;
    assert!(
        heartbeat.duration_since(created) >= SignedDuration::from_secs(40),
        "the Ready heartbeat is renewed too (last {heartbeat}, node created {created})"
    );
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        !taints
            .iter()
            .any(|t| t.key.starts_with("node.kubernetes.io/")),
        "no not-ready/unreachable taints: {taints:?}"
    );
    let pod = pods.get("steady").await.expect("get pod");
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    let pod_ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_eq!(
        pod_ready.as_deref(),
        Some("True"),
        "the pod was not marked NotReady"
    );
    harness.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn without_heartbeats_the_node_turns_unknown_and_node_loss_deletes_it() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-silent").await;
    let mut harness = NodeHarness::start(client.clone(), NodeConfig::for_namespace(ns.name()))
        .await
        .expect("node harness starts");
    harness.stop_heartbeats();
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for(
        &nodes,
        harness.node_name(),
        TIMEOUT,
        "Ready=Unknown",
        |n: Option<&Node>| n.and_then(ready_status).as_deref() == Some("Unknown"),
    )
    .await;

    harness.resume_heartbeats();
    wait_for(
        &nodes,
        harness.node_name(),
        TIMEOUT,
        "Ready=True again",
        |n: Option<&Node>| n.and_then(ready_status).as_deref() == Some("True"),
    )
    .await;

    harness.lose_node(true).await.expect("node loss");
    assert!(
        nodes
            .get_opt(harness.node_name())
            .await
            .expect("get node")
            .is_none(),
        "the lost node is deleted"
    );
}

#[tokio::test]
async fn a_deleted_node_registers_again_like_a_kubelet() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-reregister").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    config.heartbeat_interval = Duration::from_secs(2);
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");
    let nodes: Api<Node> = Api::all(client.clone());
    let first_uid = nodes
        .get(harness.node_name())
        .await
        .expect("get node")
        .metadata
        .uid
        .expect("uid");
    nodes
        .delete(harness.node_name(), &Default::default())
        .await
        .expect("delete node");
    let again = wait_for(
        &nodes,
        harness.node_name(),
        TIMEOUT,
        "the Node registered again",
        |n: Option<&Node>| n.is_some_and(|n| n.metadata.uid.as_deref() != Some(first_uid.as_str())),
    )
    .await
    .expect("node");
    assert_eq!(ready_status(&again).as_deref(), Some("True"));
    harness.shutdown().await.expect("shutdown");
}
