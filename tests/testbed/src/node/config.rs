//! Configuration of a [`NodeHarness`](super::NodeHarness).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::NodeError;
use super::process::StopSignalTarget;

/// The resources the node reports (`status.capacity` = `status.allocatable`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCapacity {
    /// e.g. `"8"`.
    pub cpu: String,
    /// e.g. `"32Gi"`.
    pub memory: String,
    /// How many pods the harness runs at once; further pods stay unbound (Pending) until one finishes.
    pub pods: u32,
}

impl Default for NodeCapacity {
    fn default() -> Self {
        Self {
            cpu: "16".into(),
            memory: "64Gi".into(),
            pods: 110,
        }
    }
}

/// What an image would run when the container has no `command` (`ENTRYPOINT`) / no `args` (`CMD`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `WORKDIR` (an in-container path; mapped like any other).
    pub working_dir: Option<String>,
    /// `ENV` of the image (below the pod's env).
    pub env: Vec<(String, String)>,
}

/// How the harness plays the AKS workload-identity webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadIdentityConfig {
    /// `AZURE_AUTHORITY_HOST` injected into labelled pods (the simulator's Entra URL in tests).
    pub authority_host: String,
    /// `AZURE_TENANT_ID` when the ServiceAccount has no `azure.workload.identity/tenant-id` annotation.
    pub default_tenant_id: Option<String>,
    /// `expirationSeconds` of the federated token (the API server's minimum is 600).
    pub token_expiration_seconds: i64,
}

impl Default for WorkloadIdentityConfig {
    fn default() -> Self {
        Self {
            authority_host: "https://login.microsoftonline.com/".into(),
            default_tenant_id: None,
            token_expiration_seconds: 3600,
        }
    }
}

/// Configuration of one fake node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name (a DNS subdomain, unique per harness).
    pub node_name: String,
    /// Namespaces whose unscheduled pods this node binds; empty = every namespace.
    pub namespaces: Vec<String>,
    /// Extra node labels (besides `kubernetes.io/hostname`, `kubernetes.io/os`, `kubernetes.io/arch`).
    pub labels: BTreeMap<String, String>,
    pub capacity: NodeCapacity,
    /// Per-pod folders are created under it (see [`super::volumes`]).
    pub work_dir: PathBuf,
    /// Folders searched first for executables (the cargo target folder, so `azp-autoscaler` and
    /// `azp-testbed` are found); also prepended to each process's `PATH`.
    pub path_prefix: Vec<PathBuf>,
    /// Environment every process gets (as a node image would carry it, e.g. `SSL_CERT_FILE` for the test
    /// CA); the pod's env overrides it.
    pub extra_env: Vec<(String, String)>,
    /// Image → entrypoint, for containers without `command`.
    pub images: HashMap<String, ImageConfig>,
    /// Lease renewal and Ready heartbeat interval (kubelet: 10 s; must be below the lease duration).
    pub heartbeat_interval: Duration,
    /// `spec.leaseDurationSeconds` of the node Lease (kubelet: 40).
    pub lease_duration_seconds: i32,
    /// The pods' IP (`status.podIP`).
    pub pod_ip: IpAddr,
    pub workload_identity: WorkloadIdentityConfig,
    /// Refresh every service-account token file at least this often (tests: to observe a refresh without
    /// waiting for 80 % of the token lifetime, which is the kubelet's rule and always applies).
    pub token_refresh_interval: Option<Duration>,
    /// Delay before restarting a container of a pod with `restartPolicy` `OnFailure`/`Always`.
    pub restart_backoff: Duration,
    /// Retry interval while a container cannot be configured (missing Secret, ServiceAccount, ...).
    pub config_retry_interval: Duration,
    /// Who gets SIGTERM when a pod is deleted (default: the main process, as in Kubernetes).
    pub stop_signal_target: StopSignalTarget,
}

impl NodeConfig {
    /// Defaults for node `node_name` with per-pod folders under `work_dir`: all namespaces, 110 pods, the
    /// folder of the running executable as PATH prefix (`target/debug` from a test binary in
    /// `target/debug/deps`), 10 s heartbeats.
    pub fn new(node_name: impl Into<String>, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_name: node_name.into(),
            namespaces: Vec::new(),
            labels: BTreeMap::new(),
            capacity: NodeCapacity::default(),
            work_dir: work_dir.into(),
            path_prefix: default_path_prefix(),
            extra_env: Vec::new(),
            images: HashMap::new(),
            heartbeat_interval: Duration::from_secs(10),
            lease_duration_seconds: 40,
            pod_ip: IpAddr::from([127, 0, 0, 1]),
            workload_identity: WorkloadIdentityConfig::default(),
            token_refresh_interval: None,
            restart_backoff: Duration::from_secs(1),
            config_retry_interval: Duration::from_secs(1),
            stop_signal_target: StopSignalTarget::default(),
        }
    }

    /// A node for one test namespace: named `testbed-<namespace>`, binding only that namespace, pod
    /// folders under `<system temp folder>/azp-testbed-node/<namespace>/` (kept after the test for
    /// post-mortems).
    pub fn for_namespace(namespace: &str) -> Self {
        let mut c = Self::new(
            format!("testbed-{namespace}"),
            std::env::temp_dir().join("azp-testbed-node"),
        );
        c.namespaces = vec![namespace.to_owned()];
        c
    }

    /// Checks the fields, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |field: &'static str, message: String| Err(NodeError::Config { field, message });
        let name_ok = !self.node_name.is_empty()
            && self.node_name.len() <= 253
            && self
                .node_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && self
                .node_name
                .starts_with(|c: char| c.is_ascii_alphanumeric())
            && self
                .node_name
                .ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok {
            return bad(
                "node_name",
                format!(
                    "{:?} is not a DNS subdomain (lower-case letters, digits, '-', '.'; at most 253)",
                    self.node_name
                ),
            );
        }
        if self.capacity.pods == 0 {
            return bad("capacity.pods", "must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero()
            || self.heartbeat_interval.as_secs_f64() * 2.0 > f64::from(self.lease_duration_seconds)
        {
            return bad(
                "heartbeat_interval",
                format!(
                    "{:?} must be positive and at most half of lease_duration_seconds ({} s)",
                    self.heartbeat_interval, self.lease_duration_seconds
                ),
            );
        }
        if self.workload_identity.token_expiration_seconds < 600 {
            return bad(
                "workload_identity.token_expiration_seconds",
                format!(
                    "{} is below the API server's minimum of 600; use token_refresh_interval to see refreshes sooner",
                    self.workload_identity.token_expiration_seconds
                ),
            );
        }
        if self.work_dir.as_os_str().is_empty() {
            return bad("work_dir", "must be set".into());
        }
        Ok(())
    }
}

/// The folder of the running executable, or its parent when that is a cargo `deps` folder.
pub fn default_path_prefix() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let Some(dir) = exe.parent() else {
        return Vec::new();
    };
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = dir.parent()
    {
        return vec![parent.to_path_buf()];
    }
    vec![dir.to_path_buf()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut c = NodeConfig::new("Bad_Name", "/tmp/x");
        let err = c.validate().expect_err("bad name");
        assert!(err.to_string().contains("node_name"), "{err}");
        c.node_name = "ok-node".into();
        c.validate().expect("valid");
        c.heartbeat_interval = Duration::from_secs(30);
        let err = c.validate().expect_err("heartbeat too slow for the lease");
        assert!(err.to_string().contains("heartbeat_interval"), "{err}");
        c.heartbeat_interval = Duration::from_secs(10);
        c.workload_identity.token_expiration_seconds = 60;
        let err = c.validate().expect_err("below minimum");
        assert!(
            err.to_string().contains("token_expiration_seconds"),
            "{err}"
        );
    }

    #[test]
    fn namespace_config_binds_only_that_namespace() {
        let c = NodeConfig::for_namespace("t-1");
        assert_eq!(c.node_name, "testbed-t-1");
        assert_eq!(c.namespaces, vec!["t-1".to_owned()]);
        c.validate().expect("valid");
    }
}
