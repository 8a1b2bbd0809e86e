//! Helpers for tests on the local control plane: throw-away namespaces, watch-based waits, JWT claims.

use std::fmt::Debug;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

/// A namespace created for one test and deleted when dropped (also when the test panics).
pub struct TestNamespace {
    name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` and waits until its `default` ServiceAccount exists (pods are rejected
    /// before that). Panics with the API error: this is test setup.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let suffix: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .take(6)
            .collect();
        let name = format!("{prefix}-{suffix}");
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"azp-testbed/test": "true"}},
        }))
        .unwrap_or_else(|e| panic!("namespace object: {e}"));
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            &sas,
            "default",
            Duration::from_secs(60),
            "the default ServiceAccount",
            |sa: Option<&ServiceAccount>| sa.is_some(),
        )
        .await;
        Self {
            name,
            client: client.clone(),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A namespaced API in it.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Deleted from a thread of its own with a fresh client: the test's runtime may be unwinding.
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = super::try_client().await {
                    let api: Api<Namespace> = Api::all(client);
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        });
        let _ = done.join();
    }
}

/// Waits (through a watch, not polling) until `condition` holds for object `name`; panics after `timeout`
/// naming `what` and showing the object's last state.
pub async fn wait_for<K, C>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    condition: C,
) -> Option<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    C: Condition<K>,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(obj)) => obj,
        Ok(Err(e)) => panic!("waiting for {what} ({name}): {e}"),
        Err(_) => {
            let last = api.get_opt(name).await;
            panic!("timed out after {timeout:?} waiting for {what} ({name}); last state: {last:#?}")
        }
    }
}

/// The Job condition (`Complete`, `Failed`, ...) that is `True`, if any.
pub fn job_finished(job: &Job) -> Option<&str> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
        .map(|c| c.type_.as_str())
}

/// The claims of a JWT (its payload, decoded without verifying the signature).
pub fn jwt_claims(token: &str) -> Result<serde_json::Value, String> {
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .ok_or_else(|| "not a JWT: no payload segment".to_owned())?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("JWT payload is not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("JWT payload is not JSON: {e}"))
}

/// Installs a test-friendly tracing subscriber once (`RUST_LOG` filters it; default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A Job running `script` with `sh -c` once (`backoffLimit: 0`, `restartPolicy: Never`).
pub fn shell_job(name: &str, script: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "main", "image": "testbed/shell", "command": ["sh", "-c", script]}],
            }},
        },
    }))
    .unwrap_or_else(|e| panic!("job object: {e}"))
}

/// A bare Pod running `script` with `sh -c` (`restartPolicy: Never`).
pub fn shell_pod(name: &str, script: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": "testbed/shell", "command": ["sh", "-c", script]}],
        },
    }))
    .unwrap_or_else(|e| panic!("pod object: {e}"))
}

/// Waits until Job `name` is `Complete` or `Failed` and returns which.
pub async fn wait_job_finished(api: &Api<Job>, name: &str, timeout: Duration) -> String {
    let job = wait_for(
        api,
        name,
        timeout,
        "the Job to finish",
        |j: Option<&Job>| j.and_then(job_finished).is_some(),
    )
    .await;
    job.as_ref()
        .and_then(job_finished)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The pod's phase.
pub fn pod_phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Waits until pod `name` has phase `phase`.
pub async fn wait_pod_phase(api: &Api<Pod>, name: &str, phase: &str, timeout: Duration) -> Pod {
    let what = format!("phase {phase}");
    wait_for(api, name, timeout, &what, |p: Option<&Pod>| {
        p.and_then(pod_phase) == Some(phase)
    })
    .await
    .unwrap_or_else(|| panic!("pod {name} vanished while waiting for {what}"))
}

/// Follows one pod from the moment it is started (a watch from the pod's current resourceVersion, so no
/// event is missed), to see the last state the pod had before it was deleted.
pub struct PodFollower {
    name: String,
    last: Pod,
    events: futures::stream::BoxStream<'static, Result<kube::api::WatchEvent<Pod>, kube::Error>>,
}

impl PodFollower {
    /// Reads pod `name` and opens a watch on it from that version. Call it before deleting the pod.
    pub async fn start(api: &Api<Pod>, name: &str) -> Self {
        use futures::StreamExt;
        let pod = api
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get pod {name}: {e}"));
        let version = pod.metadata.resource_version.clone().unwrap_or_default();
        let params = kube::api::WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(290);
        let events = api
            .watch(&params, &version)
            .await
            .unwrap_or_else(|e| panic!("watch pod {name}: {e}"))
            .boxed();
        Self {
            name: name.to_owned(),
            last: pod,
            events,
        }
    }

    /// Waits until the pod is deleted and returns its last state before that.
    pub async fn until_deleted(mut self, timeout: Duration) -> Pod {
        use futures::StreamExt;
        use kube::api::WatchEvent;
        let name = self.name.clone();
        let follow = async {
            while let Some(ev) = self.events.next().await {
                match ev {
                    Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) => self.last = p,
                    Ok(WatchEvent::Deleted(_)) => return Some(self.last),
                    Ok(WatchEvent::Bookmark(_)) => {}
                    Ok(WatchEvent::Error(e)) => panic!("watching pod {name}: {e:?}"),
                    Err(e) => panic!("watching pod {name}: {e}"),
                }
            }
            None
        };
        match tokio::time::timeout(timeout, follow).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("the watch of pod {name} ended before it was deleted"),
            Err(_) => panic!("pod {name} was not deleted within {timeout:?}"),
        }
    }
}

/// Waits (through a watch) for the first pod matching `label_selector`, e.g. `job-name=<job>`.
pub async fn first_pod(api: &Api<Pod>, label_selector: &str, timeout: Duration) -> Pod {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let cfg = watcher::Config::default().labels(label_selector);
    let mut stream = watcher::watcher(api.clone(), cfg).boxed();
    let find = async {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Apply(p) | Event::InitApply(p)) => return Some(p),
                Ok(_) => {}
                Err(e) => panic!("watching pods {label_selector}: {e}"),
            }
        }
        None
    };
    match tokio::time::timeout(timeout, find).await {
        Ok(Some(p)) => p,
        Ok(None) => panic!("the watch of pods {label_selector} ended"),
        Err(_) => panic!("no pod {label_selector} within {timeout:?}"),
    }
}

/// The main container's terminated state (exit code, reason) in a pod status.
pub fn terminated(pod: &Pod) -> Option<(i32, String)> {
    let t = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_claims_decode_the_payload() {
        let enc = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let token = format!(
            "{}.{}.sig",
            enc(&json!({"alg": "RS256"})),
            enc(&json!({"sub": "x", "aud": ["a"]}))
        );
        let claims = jwt_claims(&token).expect("decodes");
        assert_eq!(claims["sub"], "x");
        assert!(jwt_claims("nodots").is_err());
    }
}
