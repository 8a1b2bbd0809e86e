//! Node harness: a fake Kubernetes node that plays scheduler and kubelet through the real API server.
//!
//! There is no scheduler and no kubelet in the test control plane (`tests/cluster/up.sh`). A
//! [`NodeHarness`], started in-process by a test (or by `azp-testbed node`):
//!
//! 1. registers a Node (Ready, capacity from [`NodeCapacity`]) and keeps its Lease in `kube-node-lease` and
//!    its Ready heartbeat fresh, so the node-lifecycle controller never evicts its pods; deletes it on
//!    [`NodeHarness::shutdown`];
//! 2. binds unscheduled, ungated pods of its namespaces to itself (`pods/binding`), oldest first,
//!    honouring its pod capacity, cordon, `NoSchedule`/`NoExecute` taints against the pod's tolerations,
//!    and `nodeSelector` (affinity, topology spread and resource requests are not evaluated);
//! 3. runs each bound pod's main container (the `kubectl.kubernetes.io/default-container` or the first;
//!    init and other containers are not run) as a local process with the pod's env, a per-pod folder and
//!    volumes mapped to folders ([`volumes`] documents the layout and the path mapping), and writes pod
//!    status back (Pending → Running → Succeeded/Failed with exit codes) so the real Job controller sees it;
//! 4. on pod deletion sends SIGTERM to the main process (as a container runtime does; or to its process
//!    group, see [`StopSignalTarget`]), waits the grace period, sends SIGKILL to every process the
//!    container started (its session, see [`process`]), writes the terminal status and deletes the pod with
//!    grace 0; hooks simulate node events ([`NodeHarness::kill_pod`],
//!    [`NodeHarness::evict_pod`], [`NodeHarness::drain`], [`NodeHarness::stop_heartbeats`],
//!    [`NodeHarness::lose_node`]);
//! 5. plays the AKS workload-identity webhook for pods labelled `azure.workload.identity/use: "true"`
//!    ([`identity`]).
//!
//! Tests get the admin client with [`client`] (from `KUBECONFIG`, default `<repo>/.cache/cluster/kubeconfig`)
//! and a throw-away namespace from [`testing::TestNamespace`].
//!
//! Every process starts with exactly: `PATH` (the configured prefix, then the harness's own `PATH`),
//! `HOME` (the pod's `home/`), `HOSTNAME` (the pod name), [`POD_ROOT_ENV`], [`POD_DIR_ENV`], the image's
//! `env` ([`ImageConfig`]), [`NodeConfig::extra_env`], then the pod's `envFrom` and `env`, then the
//! workload-identity variables. Emulated besides: `restartPolicy` (`OnFailure`/`Always` restart in the
//! same pod), the pod's `activeDeadlineSeconds`, re-registration of a deleted Node. Not emulated: init
//! containers, sidecars and other containers (reported as waiting), probes, resource limits and requests,
//! service-link env vars and in-cluster API access (the service-account token is written, but
//! `KUBERNETES_SERVICE_HOST` is not set and absolute paths cannot be used), Events.

pub mod cli;
pub mod config;
pub mod env;
pub mod identity;
mod kubelet;
mod node_object;
pub mod process;
mod scheduler;
pub mod status;
pub mod testing;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, EvictParams};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

pub use cli::{NodeArgs, run as run_cli};
pub use config::{ImageConfig, NodeCapacity, NodeConfig, WorkloadIdentityConfig};
pub use process::StopSignalTarget;
pub use volumes::PodLayout;

/// The env var a process finds its pod's `root/` folder in (mount paths live under it).
pub const POD_ROOT_ENV: &str = "TESTBED_POD_ROOT";
/// The env var with the pod's folder (logs, volumes, root).
pub const POD_DIR_ENV: &str = "TESTBED_POD_DIR";

/// Errors of the node harness.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "cannot load the kubeconfig {path}: {source}. Start the local control plane with `tests/cluster/up.sh` \
         (or run the tests through `tests/run.sh`) and set KUBECONFIG to the file it prints"
    )]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "the Kubernetes API server of {path} is not reachable: {source}. Start the local control plane with \
         `tests/cluster/up.sh` (or run the tests through `tests/run.sh`)"
    )]
    ControlPlaneDown {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    #[error("invalid node configuration: {field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("Kubernetes API call failed: {action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot configure the container of pod {pod}: {message}")]
    ContainerConfig { pod: String, message: String },
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {namespace}/{name} is not running on node {node}")]
    NoSuchPod {
        namespace: String,
        name: String,
        node: String,
    },
}

impl NodeError {
    /// A stable label for metrics and test assertions.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kubeconfig { .. } => "kubeconfig",
            Self::ControlPlaneDown { .. } => "control_plane_down",
            Self::Config { .. } => "config",
            Self::Api { .. } => "api",
            Self::ContainerConfig { .. } => "container_config",
            Self::Spawn { .. } => "spawn",
            Self::Io { .. } => "io",
            Self::NoSuchPod { .. } => "no_such_pod",
        }
    }

    pub(crate) fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Api { action, source }
    }
}

/// Whether `e` is an API answer with HTTP status `code`.
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The kubeconfig the tests use: `KUBECONFIG` (first entry), else `<repo>/.cache/cluster/kubeconfig`.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v)
            .next()
            .unwrap_or_else(|| PathBuf::from(v)),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/cluster/kubeconfig"),
    }
}

/// An admin client for the local control plane, checked to answer (`/version`).
pub async fn try_client() -> Result<Client, NodeError> {
    // The process's one rustls provider (a no-op when the program installed it already).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let path = kubeconfig_path();
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).map_err(|source| NodeError::Kubeconfig {
            path: path.clone(),
            source,
        })?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|source| NodeError::Kubeconfig {
        path: path.clone(),
        source,
    })?;
    let client = Client::try_from(config).map_err(|source| NodeError::ControlPlaneDown {
        path: path.clone(),
        source,
    })?;
    client
        .apiserver_version()
        .await
        .map_err(|source| NodeError::ControlPlaneDown { path, source })?;
    Ok(client)
}

/// [`try_client`] for tests: panics with how to start the control plane when it is not up, so a test
/// without a control plane fails instead of passing silently.
pub async fn client() -> Client {
    match try_client().await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// A message to a pod's worker.
#[derive(Debug)]
pub(crate) enum Control {
    /// SIGKILL the process group now; the container terminates with `reason` (e.g. `OOMKilled`).
    Kill { reason: String },
    /// SIGTERM, then SIGKILL after `grace`; the pod ends Failed with `reason` (node shutdown).
    Terminate { grace: Duration, reason: String },
    /// SIGKILL and write nothing more (the node is lost).
    Abandon,
}

/// What the node knows about a pod bound to it.
pub(crate) struct PodEntry {
    pub namespace: String,
    pub name: String,
    /// Latest pod object for the worker; `None` once the worker finished.
    pub updates: Option<watch::Sender<Pod>>,
    pub control: Option<mpsc::UnboundedSender<Control>>,
    pub pid: Option<i32>,
    pub force_deleted: bool,
}

/// State shared by the harness's tasks.
pub(crate) struct Shared {
    pub client: Client,
    pub config: NodeConfig,
    pub pod_ip: String,
    pub host_ip: String,
    /// UIDs of pods holding one of the node's pod slots.
    slots: Mutex<HashSet<String>>,
    pub slot_freed: Notify,
    pods: Mutex<HashMap<String, PodEntry>>,
    /// Folder of every pod seen, by `(namespace, name)` (the latest of a name), kept after deletion.
    layouts: Mutex<HashMap<(String, String), PodLayout>>,
    pub cordoned: AtomicBool,
    /// `true` while heartbeats are sent.
    pub heartbeats: watch::Sender<bool>,
    /// Number of running pod workers.
    pub workers: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn pods(&self) -> MutexGuard<'_, HashMap<String, PodEntry>> {
        lock(&self.pods)
    }

    pub(crate) fn remember_layout(&self, namespace: &str, name: &str, layout: &PodLayout) {
        lock(&self.layouts).insert((namespace.to_owned(), name.to_owned()), layout.clone());
    }

    /// Takes a slot for `uid`; `false` when the node is full (a pod that already holds one keeps it).
    pub(crate) fn take_slot(&self, uid: &str, force: bool) -> bool {
        let mut slots = lock(&self.slots);
        if slots.contains(uid) {
            return true;
        }
        if !force && slots.len() >= self.config.capacity.pods as usize {
            return false;
        }
        slots.insert(uid.to_owned());
        true
    }

    pub(crate) fn release_slot(&self, uid: &str) {
        if lock(&self.slots).remove(uid) {
            self.slot_freed.notify_one();
        }
    }

    fn find(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(String, mpsc::UnboundedSender<Control>)> {
        self.pods().iter().find_map(|(uid, e)| {
            (e.namespace == namespace && e.name == name)
                .then(|| e.control.clone().map(|c| (uid.clone(), c)))
                .flatten()
        })
    }
}

/// What [`NodeHarness::drain_until_empty`] did.
#[derive(Debug, Clone, Default)]
pub struct DrainReport {
    /// Pods evicted (`namespace/name`), in order.
    pub evicted: Vec<String>,
    /// Evictions refused by a PodDisruptionBudget (each retry counts).
    pub refused: u32,
    /// Pods still running when the timeout passed (empty when the node was drained).
    pub left: Vec<String>,
}

/// A running fake node. Stop it with [`NodeHarness::shutdown`]; dropping it instead (a test that panicked)
/// kills its processes and deletes the Node through a fresh client from `KUBECONFIG`.
pub struct NodeHarness {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    stopped: bool,
}

impl NodeHarness {
    /// Registers the node and starts binding and running pods.
    pub async fn start(client: Client, config: NodeConfig) -> Result<Self, NodeError> {
        config.validate()?;
        std::fs::create_dir_all(&config.work_dir).map_err(|source| NodeError::Io {
            path: config.work_dir.clone(),
            source,
        })?;
        let ip = config.pod_ip.to_string();
        let shared = Arc::new(Shared {
            client,
            pod_ip: ip.clone(),
            host_ip: ip,
            config,
            slots: Mutex::new(HashSet::new()),
            slot_freed: Notify::new(),
            pods: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            cordoned: AtomicBool::new(false),
            heartbeats: watch::Sender::new(true),
            workers: watch::Sender::new(0),
        });
        node_object::register(&shared).await?;
        let tasks = vec![
            tokio::spawn(node_object::heartbeat_loop(shared.clone())),
            tokio::spawn(kubelet::run(shared.clone())),
            tokio::spawn(scheduler::run(shared.clone())),
        ];
        tracing::info!(node = %shared.config.node_name, namespaces = ?shared.config.namespaces, "node harness started");
        Ok(Self {
            shared,
            tasks,
            stopped: false,
        })
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.config.node_name
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// The local folder of pod `namespace/name` (most recent one of that name) once the node has seen it,
    /// also after the pod is deleted.
    pub fn pod_layout(&self, namespace: &str, name: &str) -> Option<PodLayout> {
        lock(&self.shared.layouts)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The main process id of pod `namespace/name` while it runs.
    pub fn pod_pid(&self, namespace: &str, name: &str) -> Option<i32> {
        self.shared
            .pods()
            .values()
            .find(|e| e.namespace == namespace && e.name == name)
            .and_then(|e| e.pid)
    }

    /// Kills the pod's processes with SIGKILL as the kernel's OOM killer would: the container terminates
    /// with exit code 137 and reason `OOMKilled` (the pod fails under `restartPolicy: Never`).
    pub fn kill_pod(&self, namespace: &str, name: &str) -> Result<(), NodeError> {
        let (_, control) = self.running(namespace, name)?;
        control
            .send(Control::Kill {
                reason: "OOMKilled".into(),
            })
            .map_err(|_| self.no_such_pod(namespace, name))
    }

    /// Evicts the pod through the Eviction API (honouring PodDisruptionBudgets); the node then stops it
    /// like any deleted pod.
    pub async fn evict_pod(&self, namespace: &str, name: &str) -> Result<(), NodeError> {
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace);
        api.evict(name, &EvictParams::default())
            .await
            .map_err(NodeError::api(format!("evict pod {namespace}/{name}")))?;
        Ok(())
    }

    /// Marks the node unschedulable (`spec.unschedulable`); the harness binds nothing more.
    pub async fn cordon(&self) -> Result<(), NodeError> {
        self.shared.cordoned.store(true, Ordering::SeqCst);
        node_object::set_unschedulable(&self.shared, true).await
    }

    /// Makes the node schedulable again.
    pub async fn uncordon(&self) -> Result<(), NodeError> {
        node_object::set_unschedulable(&self.shared, false).await?;
        self.shared.cordoned.store(false, Ordering::SeqCst);
        self.shared.slot_freed.notify_one();
        Ok(())
    }

    /// `kubectl drain`: cordon, then evict every pod on the node. Returns the pods evicted; an eviction
    /// refused by a PodDisruptionBudget is an error.
    pub async fn drain(&self) -> Result<Vec<String>, NodeError> {
        self.cordon().await?;
        let targets: Vec<(String, String)> = self
            .shared
            .pods()
            .values()
            .filter(|e| e.updates.is_some())
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .collect();
        let mut evicted = Vec::new();
        for (ns, name) in targets {
            match self.evict_pod(&ns, &name).await {
                Ok(()) => evicted.push(format!("{ns}/{name}")),
                Err(NodeError::Api { source, .. }) if is_status(&source, 404) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(evicted)
    }

    /// `kubectl drain` as it behaves: cordon, then evict every pod running on the node, retrying every
    /// `retry` the evictions a PodDisruptionBudget refuses (429), until no pod runs on the node or
    /// `timeout` passes. Pods the Job controller makes meanwhile are not bound (the node is cordoned).
    pub async fn drain_until_empty(
        &self,
        retry: Duration,
        timeout: Duration,
    ) -> Result<DrainReport, NodeError> {
        self.cordon().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut report = DrainReport::default();
        loop {
            let running: Vec<(String, String)> = self
                .shared
                .pods()
                .values()
                .filter(|e| e.updates.is_some())
                .map(|e| (e.namespace.clone(), e.name.clone()))
                .collect();
            if running.is_empty() {
                return Ok(report);
            }
            if tokio::time::Instant::now() >= deadline {
                report.left = running
                    .into_iter()
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .collect();
                return Ok(report);
            }
            for (ns, name) in running {
                let pod = format!("{ns}/{name}");
                if report.evicted.contains(&pod) {
                    continue; // terminating
                }
                match self.evict_pod(&ns, &name).await {
                    Ok(()) => report.evicted.push(pod),
                    Err(NodeError::Api { source, .. }) if is_status(&source, 429) => {
                        report.refused += 1;
                    }
                    Err(NodeError::Api { source, .. }) if is_status(&source, 404) => {}
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Stops the Lease renewals and Ready heartbeats (a hung kubelet): the node-lifecycle controller marks
    /// the node `Unknown` after its grace period. Processes keep running.
    pub fn stop_heartbeats(&self) {
        self.shared.heartbeats.send_replace(false);
    }

    /// Resumes heartbeats after [`Self::stop_heartbeats`].
    pub fn resume_heartbeats(&self) {
        self.shared.heartbeats.send_replace(true);
    }

    /// Node loss: stops heartbeats, binding and status updates, kills every process without reporting it,
    /// and, when `delete_node`, deletes the Node object (pod GC then removes its pods).
    pub async fn lose_node(&mut self, delete_node: bool) -> Result<(), NodeError> {
        self.stop_heartbeats();
        for t in &self.tasks {
            t.abort();
        }
        let controls: Vec<_> = self
            .shared
            .pods()
            .values()
            .filter_map(|e| e.control.clone())
            .collect();
        for c in controls {
            let _ = c.send(Control::Abandon);
        }
        self.wait_workers().await;
        self.stopped = true;
        if delete_node {
            node_object::delete(&self.shared).await?;
        }
        Ok(())
    }

    /// Stops the node: no more binding, every running pod gets SIGTERM (SIGKILL after its grace period,
    /// at most 10 s) and ends Failed (`reason: Terminated`, as a node shutdown reports it), then the Node
    /// is deleted.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&mut self) -> Result<(), NodeError> {
        if self.stopped {
            return Ok(());
        }
        if let Some(t) = self.tasks.get(2) {
            t.abort(); // the scheduler
        }
        let controls: Vec<_> = self
            .shared
            .pods()
            .values()
            .filter_map(|e| e.control.clone())
            .collect();
        for c in controls {
            let _ = c.send(Control::Terminate {
                grace: Duration::from_secs(10),
                reason: "Terminated".into(),
            });
        }
        self.wait_workers().await;
        for t in &self.tasks {
            t.abort();
        }
        self.stopped = true;
        node_object::delete(&self.shared).await?;
        tracing::info!(node = %self.shared.config.node_name, "node harness stopped");
        Ok(())
    }

    async fn wait_workers(&self) {
        let mut rx = self.shared.workers.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn running(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(String, mpsc::UnboundedSender<Control>), NodeError> {
        self.shared
            .find(namespace, name)
            .ok_or_else(|| self.no_such_pod(namespace, name))
    }

    fn no_such_pod(&self, namespace: &str, name: &str) -> NodeError {
        NodeError::NoSuchPod {
            namespace: namespace.into(),
            name: name.into(),
            node: self.shared.config.node_name.clone(),
        }
    }
}

impl Drop for NodeHarness {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        for t in &self.tasks {
            t.abort();
        }
        for e in self.shared.pods().values() {
            if let Some(pid) = e.pid {
                process::kill_session(pid);
            }
            if let Some(c) = &e.control {
                let _ = c.send(Control::Abandon);
            }
        }
        // Delete the Node (a test that panicked never reached `shutdown`): pod GC then removes its pods,
        // so the test's namespace can finish terminating. From a thread of its own with a fresh client,
        // since the test's runtime may be unwinding.
        let name = self.shared.config.node_name.clone();
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = try_client().await {
                    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
                    let _ = nodes
                        .delete(&name, &kube::api::DeleteParams::default())
                        .await;
                }
            });
        });
        let _ = done.join();
    }
}
