//! The scheduler part: binds unscheduled pods of the node's namespaces to the node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Binding, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_pods};
use serde_json::json;

use super::{NodeError, Shared, is_status};

/// Bindings in flight at once.
const BIND_CONCURRENCY: usize = 16;
/// Wait before retrying after a failed binding (other than a conflict).
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Whether the node may bind `pod` (ignoring capacity): unscheduled, not being deleted, not finished,
/// without scheduling gates, and its `nodeSelector` matched by `node_labels`.
pub fn bindable(pod: &Pod, node_labels: &BTreeMap<String, String>) -> bool {
    let Some(spec) = &pod.spec else { return false };
    if spec.node_name.as_deref().is_some_and(|n| !n.is_empty())
        || pod.metadata.deletion_timestamp.is_some()
    {
        return false;
    }
    if spec
        .scheduling_gates
        .as_ref()
        .is_some_and(|g| !g.is_empty())
    {
        return false;
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return false;
    }
    spec.node_selector
        .iter()
        .flatten()
        .all(|(k, v)| node_labels.get(k) == Some(v))
}

fn node_labels(shared: &Shared) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            "kubernetes.io/hostname".to_owned(),
            shared.config.node_name.clone(),
        ),
        (
            "kubernetes.io/os".to_owned(),
            std::env::consts::OS.to_owned(),
        ),
    ]);
    labels.insert(
        "kubernetes.io/arch".to_owned(),
        match std::env::consts::ARCH {
            "x86_64" => "amd64".to_owned(),
            "aarch64" => "arm64".to_owned(),
            other => other.to_owned(),
        },
    );
    labels.extend(shared.config.labels.clone());
    labels
}

async fn bind(shared: &Shared, pod: &Pod) -> Result<(), NodeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let binding: Binding = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": pod.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": shared.config.node_name},
    }))
    .map_err(|e| NodeError::ContainerConfig {
        pod: format!("{ns}/{name}"),
        message: format!("binding cannot be built: {e}"),
    })?;
    api.create_subresource::<Binding, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map_err(NodeError::api(format!(
        "bind pod {ns}/{name} to node {}",
        shared.config.node_name
    )))?;
    Ok(())
}

/// Watches the unscheduled pods of the node's namespaces and binds them while slots are free.
pub(crate) async fn run(shared: Arc<Shared>) {
    let config = watcher::Config::default().fields("spec.nodeName=");
    let streams: Vec<_> = if shared.config.namespaces.is_empty() {
        vec![
            watch_pods(Api::<Pod>::all(shared.client.clone()), config)
                .default_backoff()
                .boxed(),
        ]
    } else {
        shared
            .config
            .namespaces
            .iter()
            .map(|ns| {
                watch_pods(
                    Api::<Pod>::namespaced(shared.client.clone(), ns),
                    config.clone(),
                )
                .default_backoff()
                .boxed()
            })
            .collect()
    };
    let mut events = stream::select_all(streams);
    let labels = node_labels(&shared);
    // Unscheduled pods by uid.
    let mut pending: BTreeMap<String, Pod> = BTreeMap::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => {
                    if let Some(uid) = pod.metadata.uid.clone() {
                        pending.insert(uid, pod);
                    }
                }
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(uid) = &pod.metadata.uid {
                        pending.remove(uid);
                    }
                }
                // A re-list replays every pod; stale entries are dropped when a binding finds them gone.
                Some(Ok(Event::Init | Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(node = %shared.config.node_name, error = %e, "pod watch (scheduler) failed; retrying"),
            },
            () = shared.slot_freed.notified() => {}
            () = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => retry_at = None,
        }
        if shared.cordoned.load(Ordering::SeqCst) {
            continue;
        }
        let mut candidates: Vec<&Pod> = pending.values().filter(|p| bindable(p, &labels)).collect();
        candidates.sort_by(|a, b| {
            let key = |p: &Pod| {
                (
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    p.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut chosen = Vec::new();
        for pod in candidates {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if !shared.take_slot(&uid, false) {
                break;
            }
            chosen.push(pod.clone());
        }
        if chosen.is_empty() {
            continue;
        }
        let results: Vec<(String, Result<(), NodeError>)> = stream::iter(chosen)
            .map(|pod| {
                let shared = &shared;
                async move {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    (uid, bind(shared, &pod).await)
                }
            })
            .buffer_unordered(BIND_CONCURRENCY)
            .collect()
            .await;
        for (uid, result) in results {
            match result {
                Ok(()) => {
                    pending.remove(&uid);
                }
                Err(NodeError::Api { source, action }) => {
                    shared.release_slot(&uid);
                    if is_status(&source, 404) || is_status(&source, 409) {
                        // Gone, or bound elsewhere meanwhile: the watch will tell.
                        pending.remove(&uid);
                    } else {
                        tracing::warn!(node = %shared.config.node_name, %action, error = %source, "binding failed; retrying");
                        retry_at = Some(tokio::time::Instant::now() + BIND_RETRY);
                    }
                }
                Err(e) => {
                    shared.release_slot(&uid);
                    tracing::warn!(node = %shared.config.node_name, error = %e, "binding failed");
                    pending.remove(&uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSchedulingGate, PodSpec};

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            spec: Some(spec),
            ..Default::default()
        }
    }

    #[test]
    fn binds_only_unscheduled_ungated_matching_pods() {
        let labels = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
        assert!(bindable(&pod(PodSpec::default()), &labels));
        assert!(!bindable(
            &pod(PodSpec {
                node_name: Some("other".into()),
                ..Default::default()
            }),
            &labels
        ));
        assert!(!bindable(
            &pod(PodSpec {
                scheduling_gates: Some(vec![PodSchedulingGate {
                    name: "wait".into()
                }]),
                ..Default::default()
            }),
            &labels
        ));
        assert!(bindable(
            &pod(PodSpec {
                node_selector: Some(labels.clone()),
                ..Default::default()
            }),
            &labels
        ));
        assert!(!bindable(
            &pod(PodSpec {
                node_selector: Some(BTreeMap::from([(
                    "kubernetes.io/os".to_owned(),
                    "windows".to_owned()
                )])),
                ..Default::default()
            }),
            &labels
        ));
    }
}
