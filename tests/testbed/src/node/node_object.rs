//! The Node object and its heartbeats (Lease in `kube-node-lease` + Ready condition).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::status::{micro_time, time};
use super::{NodeError, Shared, is_status};

/// Namespace of node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

fn labels(shared: &Shared) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            "kubernetes.io/hostname".to_owned(),
            shared.config.node_name.clone(),
        ),
        (
            "kubernetes.io/os".to_owned(),
            std::env::consts::OS.to_owned(),
        ),
        ("kubernetes.io/arch".to_owned(), go_arch().to_owned()),
        ("azp-testbed/node-harness".to_owned(), "true".to_owned()),
    ]);
    labels.extend(shared.config.labels.clone());
    labels
}

/// The architecture name Kubernetes uses (`GOARCH`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn conditions(now: &str) -> Value {
    json!([
        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
         "message": "kubelet has sufficient memory available", "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
         "message": "kubelet has no disk pressure", "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
         "message": "kubelet has sufficient PID available", "lastHeartbeatTime": now, "lastTransitionTime": now},
        {"type": "Ready", "status": "True", "reason": "KubeletReady",
         "message": "node harness is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now},
    ])
}

fn node_status(shared: &Shared, now: &str) -> Value {
    let c = &shared.config.capacity;
    let resources = json!({"cpu": c.cpu, "memory": c.memory, "pods": c.pods.to_string(), "ephemeral-storage": "100Gi"});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": conditions(now),
        "addresses": [
            {"type": "InternalIP", "address": shared.host_ip},
            {"type": "Hostname", "address": shared.config.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "azp-testbed node harness",
            "containerRuntimeVersion": "testbed://0", "kubeletVersion": "v0.0.0-testbed", "kubeProxyVersion": "",
            "operatingSystem": std::env::consts::OS, "architecture": go_arch(),
        },
    })
}

/// Creates (or takes over) the Node and its Lease.
pub(crate) async fn register(shared: &Shared) -> Result<(), NodeError> {
    let name = &shared.config.node_name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let now = time(Timestamp::now());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels(shared)},
        "spec": {},
        "status": node_status(shared, &now),
    }))
    .map_err(|e| NodeError::Config {
        field: "capacity",
        message: format!("the node object cannot be built: {e}"),
    })?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {
            // A node of this name is left from an earlier run: take it over.
            let patch = json!({"metadata": {"labels": labels(shared)}, "spec": {"unschedulable": null, "taints": null}});
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(NodeError::api(format!("take over node {name}")))?;
        }
        Err(e) => return Err(NodeError::api(format!("create node {name}"))(e)),
    }
    // The status on create may be dropped by the API server's strategy: write it through /status.
    let created = nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": node_status(shared, &now)})),
        )
        .await
        .map_err(NodeError::api(format!("write status of node {name}")))?;
    let uid = created.metadata.uid.unwrap_or_default();
    renew_lease(shared, &uid).await
}

async fn renew_lease(shared: &Shared, node_uid: &str) -> Result<(), NodeError> {
    let name = &shared.config.node_name;
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), LEASE_NAMESPACE);
    let now = micro_time(Timestamp::now());
    let spec = json!({
        "holderIdentity": name,
        "leaseDurationSeconds": shared.config.lease_duration_seconds,
        "renewTime": now,
    });
    match leases
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": LEASE_NAMESPACE,
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
                },
                "spec": spec,
            }))
            .map_err(|e| NodeError::Config {
                field: "lease_duration_seconds",
                message: format!("the lease cannot be built: {e}"),
            })?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map_err(NodeError::api(format!(
                    "create lease {LEASE_NAMESPACE}/{name}"
                )))?;
            Ok(())
        }
        Err(e) => Err(NodeError::api(format!(
            "renew lease {LEASE_NAMESPACE}/{name}"
        ))(e)),
    }
}

async fn heartbeat(shared: &Shared) -> Result<(), NodeError> {
    let name = &shared.config.node_name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let now = time(Timestamp::now());
    // Strategic merge: conditions merge by type, so only the heartbeat times move.
    let patch = json!({"status": {"conditions": conditions(&now).as_array().map(|cs| {
        cs.iter().map(|c| json!({"type": c["type"], "status": c["status"], "reason": c["reason"],
            "message": c["message"], "lastHeartbeatTime": now})).collect::<Vec<_>>()
    })}});
    match nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
    {
        Ok(node) => renew_lease(shared, node.metadata.uid.as_deref().unwrap_or_default()).await,
        // Someone deleted the Node: register again, as a kubelet does.
        Err(e) if is_status(&e, 404) => {
            tracing::warn!(node = %name, "the Node was deleted; registering it again");
            register(shared).await
        }
        Err(e) => Err(NodeError::api(format!("heartbeat of node {name}"))(e)),
    }
}

/// Renews the Lease and the Ready heartbeat every `heartbeat_interval` while heartbeats are enabled.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut enabled = shared.heartbeats.subscribe();
    let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !*enabled.borrow_and_update() {
            if enabled.wait_for(|on| *on).await.is_err() {
                return;
            }
            continue;
        }
        if let Err(e) = heartbeat(&shared).await {
            tracing::warn!(node = %shared.config.node_name, error = %e, "node heartbeat failed; retrying next interval");
        }
    }
}

/// Sets `spec.unschedulable` (cordon / uncordon).
pub(crate) async fn set_unschedulable(
    shared: &Shared,
    unschedulable: bool,
) -> Result<(), NodeError> {
    let name = &shared.config.node_name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let value = if unschedulable {
        json!(true)
    } else {
        Value::Null
    };
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": value}})),
        )
        .await
        .map_err(NodeError::api(format!(
            "set unschedulable={unschedulable} on node {name}"
        )))?;
    shared.cordoned.store(unschedulable, Ordering::SeqCst);
    Ok(())
}

/// Deletes the Node (its Lease is garbage-collected through the owner reference) — and the Lease directly,
/// so nothing is left when the garbage collector is slow. Absent objects are fine.
pub(crate) async fn delete(shared: &Shared) -> Result<(), NodeError> {
    let name = &shared.config.node_name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    match nodes.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) => {}
        Err(e) => return Err(NodeError::api(format!("delete node {name}"))(e)),
    }
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), LEASE_NAMESPACE);
    match leases.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(NodeError::api(format!(
            "delete lease {LEASE_NAMESPACE}/{name}"
        ))(e)),
    }
}
