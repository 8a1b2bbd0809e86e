//! `azp-testbed node`: run a node harness until SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{NodeConfig, NodeError, NodeHarness, try_client};

/// Arguments of `azp-testbed node`.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// Node name.
    #[arg(long, default_value = "testbed-node")]
    pub name: String,
    /// Namespace whose pods the node binds (repeatable); none = every namespace (never while tests run:
    /// it would take their pods).
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Folder for per-pod folders (default: REPO/.cache/node/NAME).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Folder searched first for executables (repeatable; default: this executable's folder).
    #[arg(long = "path-prefix")]
    pub path_prefix: Vec<PathBuf>,
    /// Pods the node runs at once.
    #[arg(long, default_value_t = 110)]
    pub pods: u32,
    /// CPU capacity.
    #[arg(long, default_value = "16")]
    pub cpu: String,
    /// Memory capacity.
    #[arg(long, default_value = "64Gi")]
    pub memory: String,
    /// Extra node label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Env var KEY=VALUE every process gets (repeatable), e.g. SSL_CERT_FILE for the test CA.
    #[arg(long = "env", value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// AZURE_AUTHORITY_HOST for workload-identity pods (the simulator's Entra URL).
    #[arg(long)]
    pub authority_host: Option<String>,
    /// AZURE_TENANT_ID when the ServiceAccount has no tenant annotation.
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// Lifetime of federated tokens (seconds, at least 600).
    #[arg(long, default_value_t = 3600)]
    pub token_expiration_seconds: i64,
    /// Rewrite token files at least this often (seconds).
    #[arg(long)]
    pub token_refresh_seconds: Option<u64>,
    /// Lease / Ready heartbeat interval (seconds).
    #[arg(long, default_value_t = 10)]
    pub heartbeat_seconds: u64,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl NodeArgs {
    /// The harness configuration these arguments describe.
    pub fn to_config(&self) -> NodeConfig {
        let work_dir = self.work_dir.clone().unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../.cache/node")
                .join(&self.name)
        });
        let mut c = NodeConfig::new(self.name.clone(), work_dir);
        c.namespaces = self.namespaces.clone();
        if !self.path_prefix.is_empty() {
            c.path_prefix = self.path_prefix.clone();
        }
        c.capacity.pods = self.pods;
        c.capacity.cpu = self.cpu.clone();
        c.capacity.memory = self.memory.clone();
        c.labels = self.labels.iter().cloned().collect::<BTreeMap<_, _>>();
        c.extra_env = self.env.clone();
        if let Some(h) = &self.authority_host {
            c.workload_identity.authority_host = h.clone();
        }
        c.workload_identity.default_tenant_id = self.tenant_id.clone();
        c.workload_identity.token_expiration_seconds = self.token_expiration_seconds;
        c.token_refresh_interval = self.token_refresh_seconds.map(Duration::from_secs);
        c.heartbeat_interval = Duration::from_secs(self.heartbeat_seconds);
        c
    }
}

/// Runs the node until SIGINT or SIGTERM, printing `{"node": ..., "workDir": ...}` once it is registered,
/// then shuts it down (pods terminated, Node deleted).
pub async fn run(args: NodeArgs) -> Result<(), NodeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = args.to_config();
    let io = |source| NodeError::Io {
        path: PathBuf::from("<signal handler>"),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let client = try_client().await?;
    let harness = NodeHarness::start(client, config).await?;
    println!(
        "{}",
        serde_json::json!({"node": harness.node_name(), "workDir": harness.config().work_dir})
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    harness.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn arguments_map_to_the_config() {
        let cli = Cli::try_parse_from([
            "node",
            "--name",
            "n1",
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--pods",
            "300",
            "--env",
            "SSL_CERT_FILE=/ca.pem",
            "--authority-host",
            "https://127.0.0.1:1/",
            "--token-refresh-seconds",
            "5",
        ])
        .expect("parses");
        let c = cli.node.to_config();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.namespaces, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(c.capacity.pods, 300);
        assert_eq!(
            c.extra_env,
            vec![("SSL_CERT_FILE".to_owned(), "/ca.pem".to_owned())]
        );
        assert_eq!(c.workload_identity.authority_host, "https://127.0.0.1:1/");
        assert_eq!(c.token_refresh_interval, Some(Duration::from_secs(5)));
        c.validate().expect("valid");
        assert!(Cli::try_parse_from(["node", "--env", "novalue"]).is_err());
    }
}
