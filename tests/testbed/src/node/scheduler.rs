//! The scheduler part: binds unscheduled pods of the node's namespaces to the node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Binding, Node, Pod, Taint, Toleration};
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_pods};
use serde_json::json;

use super::{NodeError, Shared, is_status};

/// Bindings in flight at once.
const BIND_CONCURRENCY: usize = 16;
/// Wait before retrying after a failed binding (other than a conflict).
const BIND_RETRY: Duration = Duration::from_secs(1);

/// What the binder knows of its own Node (from a watch on it).
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub labels: BTreeMap<String, String>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
}

impl NodeView {
    fn from_node(node: &Node) -> Self {
        let spec = node.spec.as_ref();
        Self {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            taints: spec.and_then(|s| s.taints.clone()).unwrap_or_default(),
        }
    }
}

/// Whether `toleration` tolerates `taint` (the scheduler's rule).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => effect_ok && (key.is_empty() || key == taint.key),
        _ => {
            effect_ok
                && key == taint.key
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    }
}

/// Whether the node may bind `pod` (ignoring capacity): unscheduled, not being deleted, not finished,
/// without scheduling gates, the node not cordoned, every `NoSchedule`/`NoExecute` taint tolerated, and
/// the pod's `nodeSelector` matched by the node's labels (affinity is not evaluated).
pub fn bindable(pod: &Pod, node: &NodeView) -> bool {
    let Some(spec) = &pod.spec else { return false };
    if spec.node_name.as_deref().is_some_and(|n| !n.is_empty())
        || pod.metadata.deletion_timestamp.is_some()
        || node.unschedulable
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
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let tolerated = node
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| tolerations.iter().any(|tol| tolerates(tol, taint)));
    tolerated
        && spec
            .node_selector
            .iter()
            .flatten()
            .all(|(k, v)| node.labels.get(k) == Some(v))
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
    let node_config =
        watcher::Config::default().fields(&format!("metadata.name={}", shared.config.node_name));
    let mut node_events = watch_pods(Api::<Node>::all(shared.client.clone()), node_config)
        .default_backoff()
        .boxed();
    let mut view = NodeView {
        labels: node_labels(&shared),
        ..NodeView::default()
    };
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
            ev = node_events.next() => match ev {
                None => return,
                Some(Ok(Event::Apply(node) | Event::InitApply(node))) => view = NodeView::from_node(&node),
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(node = %shared.config.node_name, error = %e, "node watch (scheduler) failed; retrying"),
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
        let mut candidates: Vec<&Pod> = pending.values().filter(|p| bindable(p, &view)).collect();
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

    fn view() -> NodeView {
        NodeView {
            labels: BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]),
            ..NodeView::default()
        }
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn binds_only_unscheduled_ungated_matching_pods() {
        let node = view();
        assert!(bindable(&pod(PodSpec::default()), &node));
        assert!(!bindable(
            &pod(PodSpec {
                node_name: Some("other".into()),
                ..Default::default()
            }),
            &node
        ));
        assert!(!bindable(
            &pod(PodSpec {
                scheduling_gates: Some(vec![PodSchedulingGate {
                    name: "wait".into()
                }]),
                ..Default::default()
            }),
            &node
        ));
        assert!(bindable(
            &pod(PodSpec {
                node_selector: Some(node.labels.clone()),
                ..Default::default()
            }),
            &node
        ));
        assert!(!bindable(
            &pod(PodSpec {
                node_selector: Some(BTreeMap::from([(
                    "kubernetes.io/os".to_owned(),
                    "windows".to_owned()
                )])),
                ..Default::default()
            }),
            &node
        ));
        let cordoned = NodeView {
            unschedulable: true,
            ..view()
        };
        assert!(!bindable(&pod(PodSpec::default()), &cordoned));
    }

    #[test]
    fn taints_must_be_tolerated() {
        let unreachable = NodeView {
            taints: vec![
                taint("node.kubernetes.io/unreachable", "NoSchedule"),
                taint("soft", "PreferNoSchedule"),
            ],
            ..view()
        };
        assert!(!bindable(&pod(PodSpec::default()), &unreachable));
        let tolerant = PodSpec {
            tolerations: Some(vec![Toleration {
                key: Some("node.kubernetes.io/unreachable".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(bindable(&pod(tolerant), &unreachable));
        let everything = PodSpec {
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(bindable(&pod(everything), &unreachable));
        let wrong_value = Toleration {
            key: Some("dedicated".into()),
            value: Some("a".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        let dedicated_b = Taint {
            value: Some("b".into()),
            ..taint("dedicated", "NoSchedule")
        };
        assert!(!tolerates(&wrong_value, &dedicated_b));
        let right_value = Toleration {
            value: Some("b".into()),
            ..wrong_value
        };
        assert!(tolerates(&right_value, &dedicated_b));
    }
}
