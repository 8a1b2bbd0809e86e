//! The kubelet part: runs the pods bound to the node as local processes and reports their status.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_pods};
use tokio::sync::{mpsc, watch};

use super::env::{self as podenv, EnvVars, Fetched, PodPlacement};
use super::process::{ProcessSpec, Running, StopSignalTarget, exit_code, resolve_program};
use super::status::{ContainerState, PodStatusInput, Termination, pod_status};
use super::volumes::{self, PodLayout, TokenFile};
use super::{Control, NodeError, POD_DIR_ENV, POD_ROOT_ENV, PodEntry, Shared, identity, is_status};

/// Annotation naming the main container.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// Status writes are retried this many times.
const STATUS_ATTEMPTS: u32 = 6;

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn phase_of(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(phase_of(pod), Some("Succeeded" | "Failed"))
}

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// The pod's grace period: what the deletion set, else `terminationGracePeriodSeconds`, else 30 s.
fn grace_period(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// The main container: the `kubectl.kubernetes.io/default-container` one, else the first.
pub fn main_container(pod: &Pod) -> Option<&Container> {
    let containers = &pod.spec.as_ref()?.containers;
    let wanted = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION));
    wanted
        .and_then(|w| containers.iter().find(|c| &c.name == w))
        .or_else(|| containers.first())
}

/// Watches the pods bound to the node and keeps one worker per live pod.
pub(crate) async fn run(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", shared.config.node_name));
    let mut events = watch_pods(api, config).default_backoff().boxed();
    let mut relisted: Option<HashSet<String>> = None;
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Apply(pod)) => on_pod(&shared, pod),
            Ok(Event::InitApply(pod)) => {
                if let Some(seen) = relisted.as_mut() {
                    seen.insert(uid_of(&pod));
                }
                on_pod(&shared, pod);
            }
            Ok(Event::Delete(pod)) => on_gone(&shared, &uid_of(&pod)),
            Ok(Event::Init) => relisted = Some(HashSet::new()),
            Ok(Event::InitDone) => {
                if let Some(seen) = relisted.take() {
                    let gone: Vec<String> = shared
                        .pods()
                        .keys()
                        .filter(|u| !seen.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        on_gone(&shared, &uid);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(node = %shared.config.node_name, error = %e, "pod watch (kubelet) failed; retrying")
            }
        }
    }
}

/// The pod no longer exists: its worker (if any) kills the process and ends.
fn on_gone(shared: &Shared, uid: &str) {
    let entry = shared.pods().remove(uid);
    // A pod deleted right after binding may never have had a worker: free the slot the binder took.
    // (A live worker frees it itself once its process is gone.)
    if entry.is_none_or(|e| e.updates.is_none()) {
        shared.release_slot(uid);
    }
}

fn on_pod(shared: &Arc<Shared>, pod: Pod) {
    let uid = uid_of(&pod);
    if uid.is_empty() {
        return;
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut pods = shared.pods();
    if let Some(entry) = pods.get_mut(&uid) {
        if let Some(tx) = &entry.updates {
            tx.send_replace(pod);
        } else if deleting(&pod) && !entry.force_deleted {
            // Finished before the deletion reached the worker: finish the deletion as the kubelet would.
            entry.force_deleted = true;
            tokio::spawn(force_delete(shared.clone(), pod));
        }
        return;
    }
    let layout = PodLayout::new(&shared.config.work_dir, &ns, &name, &uid);
    shared.remember_layout(&ns, &name, &layout);
    let mut entry = PodEntry {
        namespace: ns,
        name,
        updates: None,
        control: None,
        pid: None,
        force_deleted: false,
    };
    if is_terminal(&pod) {
        shared.release_slot(&uid);
        if deleting(&pod) {
            entry.force_deleted = true;
            tokio::spawn(force_delete(shared.clone(), pod));
        }
        pods.insert(uid, entry);
        return;
    }
    if phase_of(&pod) == Some("Running") {
        // Running on this node name before this harness started: its process is gone.
        pods.insert(uid, entry);
        tokio::spawn(report_lost(shared.clone(), pod));
        return;
    }
    let (tx, rx) = watch::channel(pod);
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    entry.updates = Some(tx);
    entry.control = Some(ctl_tx);
    pods.insert(uid.clone(), entry);
    drop(pods);
    shared.workers.send_modify(|n| *n += 1);
    let guard = WorkerGuard {
        shared: shared.clone(),
        uid,
    };
    tokio::spawn(async move {
        let guard = guard;
        worker(&guard.shared, rx, ctl_rx, layout).await;
    });
}

/// Releases the worker's slot and marks it finished, however the worker ends.
struct WorkerGuard {
    shared: Arc<Shared>,
    uid: String,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if let Some(e) = self.shared.pods().get_mut(&self.uid) {
            e.updates = None;
            e.control = None;
            e.pid = None;
        }
        self.shared.release_slot(&self.uid);
        self.shared
            .workers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn report_lost(shared: Arc<Shared>, pod: Pod) {
    let container = main_container(&pod)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let state = ContainerState::Terminated(Termination {
        exit_code: 137,
        signal: None,
        reason: "ContainerStatusUnknown".into(),
        message: Some("the node harness restarted and lost the container's process".into()),
        started_at: None,
        finished_at: Timestamp::now(),
    });
    let start = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or_else(Timestamp::now, |t| t.0);
    let st = StatusCtx::new(&shared, &pod, &container, start);
    st.write(&shared, &pod, &state, Some("Failed"), None, 0, None)
        .await;
}

async fn force_delete(shared: Arc<Shared>, pod: Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
        Err(e) => {
            tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "final pod deletion failed")
        }
    }
}

/// Fixed parts of a pod's status.
struct StatusCtx {
    container: String,
    image: String,
    others: Vec<String>,
    start_time: Timestamp,
}

impl StatusCtx {
    fn new(shared: &Shared, pod: &Pod, container: &str, start_time: Timestamp) -> Self {
        let _ = shared;
        let spec = pod.spec.as_ref();
        let image = spec
            .and_then(|s| s.containers.iter().find(|c| c.name == container))
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let others = spec
            .map(|s| {
                s.containers
                    .iter()
                    .filter(|c| c.name != container)
                    .map(|c| c.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            container: container.to_owned(),
            image,
            others,
            start_time,
        }
    }

    /// Writes the status; gives up (with a warning) when the pod is gone or the API keeps failing.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        shared: &Shared,
        pod: &Pod,
        state: &ContainerState,
        terminal_phase: Option<&str>,
        pid: Option<i32>,
        restart_count: i32,
        last: Option<&Termination>,
    ) -> bool {
        let pod_reason = match (terminal_phase, state) {
            (Some(_), ContainerState::Terminated(t))
                if t.reason == "Terminated" || t.reason == "DeadlineExceeded" =>
            {
                Some(t.reason.as_str())
            }
            _ => None,
        };
        let body = pod_status(&PodStatusInput {
            container: &self.container,
            image: &self.image,
            other_containers: self.others.iter().map(String::as_str).collect(),
            pod_ip: &shared.pod_ip,
            host_ip: &shared.host_ip,
            start_time: self.start_time,
            now: Timestamp::now(),
            pid,
            restart_count,
            last_termination: last,
            state,
            terminal_phase,
            pod_reason,
        });
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=STATUS_ATTEMPTS {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&body))
                .await
            {
                Ok(_) => return true,
                Err(e) if is_status(&e, 404) => return false,
                Err(kube::Error::Api(status))
                    if (400..500).contains(&status.code)
                        && status.code != 409
                        && status.code != 429 =>
                {
                    // Rejected (e.g. validation): retrying the same document cannot help.
                    tracing::error!(pod = %format!("{ns}/{name}"), code = status.code, message = %status.message, "pod status rejected by the API server");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), attempt, error = %e, "pod status write failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(3));
                }
            }
        }
        false
    }
}

/// A container ready to start.
struct Prepared {
    process: ProcessSpec,
    tokens: Vec<(TokenFile, Timestamp)>,
}

enum PrepareError {
    /// Retried (the kubelet's `CreateContainerConfigError` / mount failures).
    Retry(NodeError),
    /// The container cannot run (`StartError`).
    Fatal(String),
}

async fn fetch(shared: &Shared, pod: &Pod, container: &Container) -> Result<Fetched, NodeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let env_refs = podenv::references(container);
    let (vol_secrets, vol_cms) = volumes::references(pod);
    let secrets: Api<Secret> = Api::namespaced(shared.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &ns);
    let mut fetched = Fetched::default();
    for name in env_refs.secrets.iter().chain(vol_secrets.keys()) {
        if !fetched.secrets.contains_key(name) {
            let s = secrets
                .get_opt(name)
                .await
                .map_err(NodeError::api(format!("read secret {ns}/{name}")))?;
            fetched.secrets.insert(name.clone(), s);
        }
    }
    for name in env_refs.config_maps.iter().chain(vol_cms.keys()) {
        if !fetched.config_maps.contains_key(name) {
            let c = cms
                .get_opt(name)
                .await
                .map_err(NodeError::api(format!("read configmap {ns}/{name}")))?;
            fetched.config_maps.insert(name.clone(), c);
        }
    }
    Ok(fetched)
}

async fn prepare(shared: &Shared, pod: &Pod, layout: &PodLayout) -> Result<Prepared, PrepareError> {
    let config = &shared.config;
    let container = main_container(pod)
        .ok_or_else(|| PrepareError::Fatal("the pod has no containers".into()))?;
    let placement = PodPlacement {
        node_name: config.node_name.clone(),
        pod_ip: shared.pod_ip.clone(),
        host_ip: shared.host_ip.clone(),
    };
    let fetched = fetch(shared, pod, container)
        .await
        .map_err(PrepareError::Retry)?;
    let mut plan =
        volumes::plan(pod, container, layout, &placement, &fetched).map_err(PrepareError::Retry)?;

    let mut injected_env = Vec::new();
    if identity::wants(pod) {
        let sa_name = podenv::service_account_name(pod);
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let sas: Api<ServiceAccount> = Api::namespaced(shared.client.clone(), &ns);
        let sa = sas
            .get_opt(&sa_name)
            .await
            .map_err(|e| {
                PrepareError::Retry(NodeError::api(format!(
                    "read serviceaccount {ns}/{sa_name}"
                ))(e))
            })?
            .ok_or_else(|| {
                PrepareError::Retry(NodeError::ContainerConfig {
                    pod: podenv::pod_key(pod),
                    message: format!(
                        "serviceaccount {sa_name:?} not found (needed for workload identity)"
                    ),
                })
            })?;
        let inj = identity::injection(pod, &sa, &config.workload_identity, layout);
        plan.dirs.push(layout.volume(identity::TOKEN_VOLUME));
        plan.mounts.add(
            identity::TOKEN_MOUNT_PATH,
            layout.volume(identity::TOKEN_VOLUME),
        );
        plan.tokens.push(inj.token);
        injected_env = inj.env;
    }
    volumes::materialize(layout, &plan).map_err(PrepareError::Retry)?;
    let mut tokens = Vec::new();
    for t in &plan.tokens {
        let expiry = identity::write_token(&shared.client, pod, t)
            .await
            .map_err(PrepareError::Retry)?;
        tokens.push((t.clone(), expiry));
    }

    // The image's environment, then the pod's, then the webhook's.
    let image = container
        .image
        .as_deref()
        .and_then(|i| config.images.get(i));
    let host_path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        config
            .path_prefix
            .iter()
            .cloned()
            .chain(std::env::split_paths(&host_path)),
    )
    .map(|p| p.to_string_lossy().into_owned())
    .unwrap_or_default();
    let mut vars = EnvVars::default();
    vars.set("PATH", path);
    vars.set("HOME", layout.home.to_string_lossy());
    vars.set("HOSTNAME", pod.metadata.name.clone().unwrap_or_default());
    vars.set(POD_ROOT_ENV, layout.root.to_string_lossy());
    vars.set(POD_DIR_ENV, layout.dir.to_string_lossy());
    for (k, v) in image
        .iter()
        .flat_map(|i| i.env.iter())
        .chain(config.extra_env.iter())
    {
        vars.set(k.clone(), v.clone());
    }
    let rewrite = |s: &str| plan.mounts.rewrite(s);
    podenv::apply_container_env(&mut vars, pod, container, &placement, &fetched, &rewrite)
        .map_err(PrepareError::Retry)?;
    let defined: HashSet<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    for (k, v) in injected_env {
        if !defined.contains(k.as_str()) {
            vars.set(k, v);
        }
    }

    // command/args with the image's ENTRYPOINT/CMD rules; `$(VAR)` expansion and mount-path rewriting
    // apply to what the pod spec gives, not to the image's own words (as in Kubernetes).
    let from_pod = |words: &[String]| -> Vec<String> {
        words
            .iter()
            .map(|a| plan.mounts.rewrite(&vars.expand(a)))
            .collect()
    };
    let entrypoint = image.map(|i| i.entrypoint.clone()).unwrap_or_default();
    let argv: Vec<String> = match (&container.command, &container.args) {
        (Some(c), a) if !c.is_empty() => {
            let mut v = from_pod(c);
            v.extend(from_pod(a.as_deref().unwrap_or_default()));
            v
        }
        (_, Some(a)) if !a.is_empty() => entrypoint.into_iter().chain(from_pod(a)).collect(),
        _ => entrypoint
            .into_iter()
            .chain(image.map(|i| i.cmd.clone()).unwrap_or_default())
            .collect(),
    };
    let cwd = match container
        .working_dir
        .as_deref()
        .filter(|d| !d.is_empty())
        .or_else(|| image.and_then(|i| i.working_dir.as_deref()))
    {
        Some(dir) => {
            let local = plan
                .mounts
                .map_path(dir)
                .unwrap_or_else(|| layout.in_root(dir));
            std::fs::create_dir_all(&local).map_err(|source| {
                PrepareError::Retry(NodeError::Io {
                    path: local.clone(),
                    source,
                })
            })?;
            local
        }
        None => layout.root.clone(),
    };
    let Some((program, rest)) = argv.split_first() else {
        return Err(PrepareError::Fatal(format!(
            "container {:?} has no command and image {:?} has no configured entrypoint (set NodeConfig::images)",
            container.name,
            container.image.as_deref().unwrap_or_default()
        )));
    };
    let program = resolve_program(
        program,
        &config.path_prefix,
        vars.get("PATH"),
        &plan.mounts,
        &cwd,
    )
    .map_err(PrepareError::Fatal)?;
    Ok(Prepared {
        process: ProcessSpec {
            program,
            args: rest.to_vec(),
            env: vars
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            cwd,
            stdout: layout.stdout.clone(),
            stderr: layout.stderr.clone(),
        },
        tokens,
    })
}

/// Keeps token files fresh: each is rewritten at 80 % of its lifetime (the kubelet's rule) or after
/// `token_refresh_interval`, whichever comes first.
async fn refresh_tokens(shared: Arc<Shared>, pod: Pod, mut tokens: Vec<(TokenFile, Timestamp)>) {
    if tokens.is_empty() {
        return;
    }
    let now = Timestamp::now();
    let mut issued: Vec<Timestamp> = vec![now; tokens.len()];
    loop {
        let due: Vec<Timestamp> = tokens
            .iter()
            .zip(&issued)
            .map(|((_, expiry), issued)| {
                let life = expiry
                    .as_millisecond()
                    .saturating_sub(issued.as_millisecond())
                    .max(0);
                let mut at = issued.as_millisecond() + life * 8 / 10;
                if let Some(every) = shared.config.token_refresh_interval {
                    let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
                    at = at.min(issued.as_millisecond().saturating_add(every));
                }
                Timestamp::from_millisecond(at).unwrap_or(*issued)
            })
            .collect();
        let Some((i, when)) = due.iter().enumerate().min_by_key(|(_, t)| **t) else {
            return;
        };
        let wait = Timestamp::now().duration_until(*when).unsigned_abs();
        let wait = if *when > Timestamp::now() {
            wait
        } else {
            Duration::ZERO
        };
        tokio::time::sleep(wait).await;
        match identity::write_token(&shared.client, &pod, &tokens[i].0).await {
            Ok(expiry) => {
                tokens[i].1 = expiry;
                issued[i] = Timestamp::now();
            }
            Err(e) => {
                tracing::warn!(pod = %podenv::pod_key(&pod), error = %e, "token refresh failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How one run of the main process ended.
enum Outcome {
    Exited {
        status: std::io::Result<std::process::ExitStatus>,
        /// Set when the node ended it (e.g. `OOMKilled`, `Terminated`).
        reason: Option<String>,
    },
    /// The pod no longer exists, or the node was lost: write nothing.
    Abandoned,
}

async fn supervise(
    target: StopSignalTarget,
    proc: &mut Running,
    pod_rx: &mut watch::Receiver<Pod>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    deadline: Option<tokio::time::Instant>,
) -> Outcome {
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut reason: Option<String> = None;
    let mut terminating = false;
    let mut deadline = deadline;
    // A deletion that happened before the process started.
    {
        let pod = pod_rx.borrow_and_update();
        if deleting(&pod) {
            terminating = true;
            proc.stop(target);
            kill_at = Some(tokio::time::Instant::now() + grace_period(&pod));
        }
    }
    loop {
        tokio::select! {
            status = proc.wait() => return Outcome::Exited { status, reason },
            changed = pod_rx.changed() => {
                if changed.is_err() {
                    proc.kill_all();
                    let _ = proc.wait().await;
                    return Outcome::Abandoned;
                }
                let pod = pod_rx.borrow_and_update().clone();
                if deleting(&pod) && !terminating {
                    terminating = true;
                    proc.stop(target);
                    kill_at = Some(tokio::time::Instant::now() + grace_period(&pod));
                }
            }
            msg = control.recv() => match msg {
                Some(Control::Kill { reason: r }) => {
                    reason = Some(r);
                    proc.kill_all();
                }
                Some(Control::Terminate { grace, reason: r }) => {
                    reason = Some(r);
                    if !terminating {
                        terminating = true;
                        proc.stop(target);
                        let pod_grace = grace_period(&pod_rx.borrow());
                        kill_at = Some(tokio::time::Instant::now() + grace.min(pod_grace));
                    }
                }
                Some(Control::Abandon) | None => {
                    proc.kill_all();
                    let _ = proc.wait().await;
                    return Outcome::Abandoned;
                }
            },
            () = async {
                match kill_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                kill_at = None;
                proc.kill_all();
            }
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                // The pod's activeDeadlineSeconds passed: the kubelet stops it and fails the pod.
                deadline = None;
                reason = Some("DeadlineExceeded".into());
                if !terminating {
                    terminating = true;
                    proc.stop(target);
                    kill_at = Some(tokio::time::Instant::now() + grace_period(&pod_rx.borrow()));
                }
            }
        }
    }
}

/// When the pod's `activeDeadlineSeconds` (counted from its start on the node) runs out.
fn pod_deadline(pod: &Pod, start_time: Timestamp) -> Option<tokio::time::Instant> {
    let secs = pod.spec.as_ref()?.active_deadline_seconds?;
    let elapsed = Timestamp::now().duration_since(start_time).unsigned_abs();
    let total = Duration::from_secs(u64::try_from(secs).ok()?);
    Some(tokio::time::Instant::now() + total.saturating_sub(elapsed))
}

fn restarts(pod: &Pod, exit_code: i32) -> bool {
    match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Always") => true,
        Some("OnFailure") => exit_code != 0,
        _ => false,
    }
}

/// Waits `d`, or until the pod is deleted / gone or a control message arrives; `false` = stop.
async fn pause(
    d: Duration,
    pod_rx: &mut watch::Receiver<Pod>,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<(), Option<Control>> {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return Ok(()),
            changed = pod_rx.changed() => {
                if changed.is_err() {
                    return Err(Some(Control::Abandon));
                }
                if deleting(&pod_rx.borrow_and_update()) {
                    return Err(None);
                }
            }
            msg = control.recv() => return Err(Some(msg.unwrap_or(Control::Abandon))),
        }
    }
}

async fn worker(
    shared: &Arc<Shared>,
    mut pod_rx: watch::Receiver<Pod>,
    mut control: mpsc::UnboundedReceiver<Control>,
    layout: PodLayout,
) {
    let pod = pod_rx.borrow_and_update().clone();
    let uid = uid_of(&pod);
    let key = podenv::pod_key(&pod);
    shared.take_slot(&uid, true);
    let container = main_container(&pod)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let start_time = Timestamp::now();
    let st = StatusCtx::new(shared, &pod, &container, start_time);

    // 1. Configure the container, retrying what may fix itself (a Secret created later, ...).
    let mut last_error: Option<String> = None;
    let prepared = loop {
        let current = pod_rx.borrow().clone();
        if deleting(&current) {
            end_without_start(
                shared,
                &st,
                &current,
                "the pod was deleted before its container started",
            )
            .await;
            return;
        }
        match prepare(shared, &current, &layout).await {
            Ok(p) => break p,
            Err(PrepareError::Fatal(message)) => {
                tracing::warn!(pod = %key, %message, "container cannot start");
                let state = ContainerState::Terminated(Termination {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(message),
                    started_at: None,
                    finished_at: Timestamp::now(),
                });
                st.write(shared, &current, &state, Some("Failed"), None, 0, None)
                    .await;
                let current = pod_rx.borrow().clone();
                if deleting(&current) {
                    force_delete(shared.clone(), current).await;
                }
                return;
            }
            Err(PrepareError::Retry(e)) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::info!(pod = %key, error = %message, "container not configurable yet; retrying");
                    let state = ContainerState::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: message.clone(),
                    };
                    st.write(shared, &current, &state, None, None, 0, None)
                        .await;
                    last_error = Some(message);
                }
                match pause(
                    shared.config.config_retry_interval,
                    &mut pod_rx,
                    &mut control,
                )
                .await
                {
                    Ok(()) | Err(None) => continue,
                    Err(Some(Control::Abandon)) => return,
                    Err(Some(Control::Kill { reason } | Control::Terminate { reason, .. })) => {
                        let current = pod_rx.borrow().clone();
                        end_without_start(shared, &st, &current, &reason).await;
                        return;
                    }
                }
            }
        }
    };

    // 2. Keep its tokens fresh while the pod lives.
    let _refresher = AbortOnDrop(tokio::spawn(refresh_tokens(
        shared.clone(),
        pod_rx.borrow().clone(),
        prepared.tokens.clone(),
    )));

    // 3. Run (and restart, per restartPolicy).
    let mut restart_count = 0;
    let mut last: Option<Termination> = None;
    loop {
        let current = pod_rx.borrow().clone();
        let mut proc = match Running::spawn(&prepared.process) {
            Ok(p) => p,
            Err(e) => {
                let state = ContainerState::Terminated(Termination {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(e.to_string()),
                    started_at: None,
                    finished_at: Timestamp::now(),
                });
                st.write(
                    shared,
                    &current,
                    &state,
                    Some("Failed"),
                    None,
                    restart_count,
                    last.as_ref(),
                )
                .await;
                return;
            }
        };
        let pid = proc.pid();
        if let Some(e) = shared.pods().get_mut(&uid) {
            e.pid = Some(pid);
        }
        let started_at = Timestamp::now();
        tracing::debug!(pod = %key, pid, program = %prepared.process.program.display(), "container started");
        st.write(
            shared,
            &current,
            &ContainerState::Running { started_at },
            None,
            Some(pid),
            restart_count,
            last.as_ref(),
        )
        .await;
        let deadline = pod_deadline(&current, start_time);
        let outcome = supervise(
            shared.config.stop_signal_target,
            &mut proc,
            &mut pod_rx,
            &mut control,
            deadline,
        )
        .await;
        if let Some(e) = shared.pods().get_mut(&uid) {
            e.pid = None;
        }
        let (status, reason) = match outcome {
            Outcome::Abandoned => return,
            Outcome::Exited { status, reason } => (status, reason),
        };
        let (code, signal) = match &status {
            Ok(s) => exit_code(s),
            Err(_) => (255, None),
        };
        let node_ended = reason.is_some();
        let term = Termination {
            exit_code: code,
            signal,
            reason: reason
                .clone()
                .unwrap_or_else(|| Termination::reason_for(code).to_owned()),
            message: status
                .as_ref()
                .err()
                .map(|e| format!("waiting for the process failed: {e}")),
            started_at: Some(started_at),
            finished_at: Timestamp::now(),
        };
        let current = pod_rx.borrow().clone();
        let shutting_down = matches!(reason.as_deref(), Some("Terminated" | "DeadlineExceeded"));
        if !deleting(&current) && !shutting_down && restarts(&current, code) {
            restart_count += 1;
            let waiting = ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!("back-off restarting the container (exit code {code})"),
            };
            st.write(
                shared,
                &current,
                &waiting,
                None,
                None,
                restart_count,
                Some(&term),
            )
            .await;
            last = Some(term);
            match pause(shared.config.restart_backoff, &mut pod_rx, &mut control).await {
                Ok(()) => continue,
                Err(Some(Control::Abandon)) => return,
                Err(_) => {
                    let current = pod_rx.borrow().clone();
                    let done =
                        ContainerState::Terminated(last.clone().unwrap_or_else(|| Termination {
                            exit_code: code,
                            signal,
                            reason: "Error".into(),
                            message: None,
                            started_at: None,
                            finished_at: Timestamp::now(),
                        }));
                    st.write(
                        shared,
                        &current,
                        &done,
                        Some("Failed"),
                        None,
                        restart_count,
                        None,
                    )
                    .await;
                    if deleting(&current) {
                        force_delete(shared.clone(), current).await;
                    }
                    return;
                }
            }
        }
        let phase = if code == 0 && !node_ended {
            "Succeeded"
        } else {
            "Failed"
        };
        tracing::debug!(pod = %key, code, phase, "container finished");
        let written = st
            .write(
                shared,
                &current,
                &ContainerState::Terminated(term),
                Some(phase),
                Some(pid),
                restart_count,
                last.as_ref(),
            )
            .await;
        let current = pod_rx.borrow().clone();
        if written && deleting(&current) {
            force_delete(shared.clone(), current).await;
        }
        return;
    }
}

/// A pod that ends before its container ever ran (deleted while waiting, node shutdown).
async fn end_without_start(shared: &Arc<Shared>, st: &StatusCtx, pod: &Pod, message: &str) {
    let state = ContainerState::Terminated(Termination {
        exit_code: 137,
        signal: None,
        reason: "ContainerStatusUnknown".into(),
        message: Some(message.to_owned()),
        started_at: None,
        finished_at: Timestamp::now(),
    });
    st.write(shared, pod, &state, Some("Failed"), None, 0, None)
        .await;
    if deleting(pod) {
        force_delete(shared.clone(), pod.clone()).await;
    }
}
