//! The whole test bed in one fixture, for end-to-end tests, the demo and benches: a namespace on the real
//! local API server, the CRD, the controller's and the agents' ServiceAccounts and RBAC, the ADO + Entra
//! simulator trusting the API server's service-account issuer, a node harness for the namespace that runs
//! agent pods (entrypoint `azp-autoscaler agent` over the stand-in agent), and the controller itself as a
//! process of the real binary, under a ServiceAccount token with only the RBAC below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::node::{self, NodeConfig, NodeHarness};
use crate::sim::{FederatedIssuer, IdentitySpec, JwksSource, OrgSpec, SimConfig, Simulator};

/// The organization every bed creates.
pub const ORG: &str = "contoso";
/// The image name the node harness maps to the agent entrypoint over the stand-in agent.
pub const AGENT_IMAGE: &str = "azp-agent:test";
/// ServiceAccount of the controller.
pub const CONTROLLER_SA: &str = "azp-autoscaler";
/// ServiceAccount of the agent pods.
pub const AGENT_SA: &str = "azp-agent";
/// Client id of the controller's managed identity.
pub const CONTROLLER_CLIENT_ID: &str = "00000000-0000-0000-0000-00000000c0de";
/// Client id of the agents' managed identity.
pub const AGENT_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000a9e17";

/// Errors of the bed (setup failures; tests unwrap them with the message).
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error("Kubernetes: {0} (is the local control plane up? run tests/cluster/up.sh)")]
    Kube(#[from] kube::Error),
    #[error("node harness: {0}")]
    Node(#[from] node::NodeError),
    #[error("simulator: {0}")]
    Sim(#[from] crate::sim::SimError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Options of a bed.
#[derive(Debug, Clone)]
pub struct BedOptions {
    /// Namespace prefix (a random suffix is added).
    pub name: String,
    /// ADO pools to create in the organization.
    pub ado_pools: Vec<String>,
    /// Self-hosted parallel jobs of the organization.
    pub parallel_jobs: u32,
    /// Pods the node runs at once.
    pub node_pods: u32,
    /// Start the controller right away.
    pub start_controller: bool,
    /// Extra arguments for `azp-autoscaler controller`.
    pub controller_args: Vec<String>,
    /// The simulator's configuration (orgs, identities and issuers are added by the bed).
    pub sim: SimConfig,
    /// Join this simulator instead of starting one (a second cluster sharing the ADO organization and
    /// its pools): `sim`, `ado_pools` and `parallel_jobs` are then ignored, the bed only adds its own
    /// identities as members. Give it other client ids than the bed it shares with.
    pub share_sim: Option<Arc<Simulator>>,
    /// Client id of the controller's managed identity.
    pub controller_client_id: String,
    /// Client id of the agents' managed identity.
    pub agent_client_id: String,
    /// The controller's `--cluster-id` (default `bed-<namespace>`).
    pub cluster_id: Option<String>,
}

impl BedOptions {
    /// Defaults: one ADO pool `linux`, 10 parallel jobs, 50 pods, controller started.
    pub fn new(name: &str) -> Self {
        let sim = SimConfig {
            long_poll_secs: 2,
            ..SimConfig::default()
        };
        BedOptions {
            name: name.to_owned(),
            ado_pools: vec!["linux".to_owned()],
            parallel_jobs: 10,
            node_pods: 50,
            start_controller: true,
            controller_args: Vec::new(),
            sim,
            share_sim: None,
            controller_client_id: CONTROLLER_CLIENT_ID.to_owned(),
            agent_client_id: AGENT_CLIENT_ID.to_owned(),
            cluster_id: None,
        }
    }
}

/// A running bed. Call [`Bed::teardown`] at the end (it also runs, best effort, on drop of the pieces).
pub struct Bed {
    pub client: Client,
    pub namespace: String,
    /// The ADO + Entra simulator (shared with another bed when started with `share_sim`).
    pub sim: Arc<Simulator>,
    pub node: Option<NodeHarness>,
    pub dir: PathBuf,
    /// The running controller process, if any.
    pub controller: Option<tokio::process::Child>,
    /// The controller's admin address (metrics).
    pub admin_addr: String,
    controller_env: Vec<(String, String)>,
    controller_args: Vec<String>,
    /// How many times the controller was started (names its log files).
    starts: u32,
    /// Whether this bed started the simulator (and stops it at teardown).
    owns_sim: bool,
}

/// Where the workspace's binaries are (`target/debug`).
pub fn bin_dir() -> PathBuf {
    node::config::default_path_prefix()
        .into_iter()
        .next()
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// A binary of this workspace (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

impl Bed {
    /// Starts everything.
    pub async fn start(opts: BedOptions) -> Result<Bed, BedError> {
        crate::install_crypto_provider();
        let client = node::try_client().await?;
        let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
        let namespace = format!("{}-{suffix}", opts.name);
        let dir = std::env::temp_dir().join("azp-bed").join(&namespace);
        std::fs::create_dir_all(&dir)?;

        let ns_api: Api<Namespace> = Api::all(client.clone());
        ns_api
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            "azp-testbed".to_owned(),
                            "e2e".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await?;
        install_crd(&client).await?;

        // Identities: the controller's and the agents' managed identities, federated with their
        // ServiceAccounts through the API server's issuer; both added to the organization.
        let issuer = service_account_issuer(&client).await?;
        let controller_identity = IdentitySpec::new(&opts.controller_client_id).federated_sa(
            &issuer,
            &namespace,
            CONTROLLER_SA,
        );
        let agent_identity =
            IdentitySpec::new(&opts.agent_client_id).federated_sa(&issuer, &namespace, AGENT_SA);
        let owns_sim = opts.share_sim.is_none();
        let sim = match opts.share_sim.clone() {
            Some(sim) => {
                // The shared simulator trusts the API server's issuer already.
                for identity in [controller_identity, agent_identity] {
                    sim.add_member(ORG, &identity.object_id)?;
                    sim.add_identity(identity);
                }
                sim
            }
            None => {
                let ca_pem = cluster_ca_pem()?;
                let mut sim_cfg = opts.sim.clone();
                sim_cfg.federated_issuers.push(FederatedIssuer {
                    issuer: issuer.clone(),
                    jwks: JwksSource::Url {
                        url: format!("{}/openid/v1/jwks", issuer.trim_end_matches('/')),
                        ca_pem: Some(ca_pem),
                        bearer_token: None,
                    },
                });
                let mut org = OrgSpec::new(ORG)
                    .member(controller_identity.object_id.clone())
                    .member(agent_identity.object_id.clone())
                    .parallel_jobs(opts.parallel_jobs);
                for pool in &opts.ado_pools {
                    org = org.pool(pool.clone());
                }
                sim_cfg.identities.push(controller_identity);
                sim_cfg.identities.push(agent_identity);
                sim_cfg.orgs.push(org);
                sim_cfg.state_dir = Some(dir.join("sim"));
                Arc::new(Simulator::start(sim_cfg).await?)
            }
        };
        let ca_path = sim
            .ca_pem_path()
            .map(Path::to_path_buf)
            .ok_or_else(|| BedError::Other("the simulator runs without TLS".into()))?;

        create_service_accounts(
            &client,
            &namespace,
            &opts.controller_client_id,
            &opts.agent_client_id,
        )
        .await?;
        create_controller_rbac(&client, &namespace).await?;

        // The node: agent pods run `azp-autoscaler agent` in a folder holding the stand-in agent, as the
        // agent image holds the official one.
        let mut node_cfg = NodeConfig::for_namespace(&namespace);
        node_cfg.work_dir = dir.join("node");
        node_cfg.capacity.pods = opts.node_pods;
        node_cfg
            .extra_env
            .push(("SSL_CERT_FILE".to_owned(), ca_path.display().to_string()));
        node_cfg.workload_identity.authority_host = sim.entra_url();
        node_cfg.workload_identity.default_tenant_id = Some(sim.tenant_id());
        node_cfg.images.insert(
            AGENT_IMAGE.to_owned(),
            node::config::ImageConfig {
                entrypoint: vec![
                    "sh".to_owned(),
                    "-c".to_owned(),
                    "azp-testbed standin-layout \"$PWD\" >/dev/null && exec azp-autoscaler agent \"$@\""
                        .to_owned(),
                    "azp-agent".to_owned(),
                ],
                cmd: Vec::new(),
                working_dir: Some("/azp".to_owned()),
                // The bed runs its "containers" as root, which the agent (like the official one) refuses
                // unless told; a real agent image runs as a non-root user.
                env: vec![("AGENT_ALLOW_RUNASROOT".to_owned(), "1".to_owned())],
            },
        );
        let node = NodeHarness::start(client.clone(), node_cfg).await?;

        let controller_env = controller_env(
            &client,
            &namespace,
            &dir,
            &sim,
            &ca_path,
            &opts.controller_client_id,
        )
        .await?;
        let admin_port = free_port()?;
        let mut controller_args = vec![
            "controller".to_owned(),
            "--namespace".to_owned(),
            namespace.clone(),
            "--cluster-id".to_owned(),
            opts.cluster_id
                .clone()
                .unwrap_or_else(|| format!("bed-{namespace}")),
            "--admin-addr".to_owned(),
            format!("127.0.0.1:{admin_port}"),
            "--agents-every-seconds".to_owned(),
            "3".to_owned(),
        ];
        controller_args.extend(opts.controller_args.iter().cloned());
        let mut bed = Bed {
            client,
            namespace,
            sim,
            node: Some(node),
            dir,
            controller: None,
            admin_addr: format!("127.0.0.1:{admin_port}"),
            controller_env,
            controller_args,
            starts: 0,
            owns_sim,
        };
        if opts.start_controller {
            bed.start_controller()?;
        }
        Ok(bed)
    }

    /// The organization URL in the simulator.
    pub fn org_url(&self) -> String {
        self.sim.org_url(ORG)
    }

    /// Starts (or restarts) the controller process.
    pub fn start_controller(&mut self) -> Result<(), BedError> {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("controller-{}.log", self.starts)))?;
        let child = tokio::process::Command::new(bin("azp-autoscaler"))
            .args(&self.controller_args)
            .env_clear()
            .envs(self.controller_env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BedError::Other(format!(
                    "cannot start {}: {e} (run `cargo build --workspace --bins` first)",
                    bin("azp-autoscaler").display()
                ))
            })?;
        self.controller = Some(child);
        Ok(())
    }

    /// The environment the controller process runs with (for running other commands as the controller).
    pub fn controller_env(&self) -> Vec<(String, String)> {
        self.controller_env.clone()
    }

    /// A ServiceAccount `name` in the bed's namespace bound to exactly `rules`, and a kubeconfig with its
    /// token (for running a command as it, e.g. the chart's uninstall hook). Returns the kubeconfig path.
    pub async fn service_account_kubeconfig(
        &self,
        name: &str,
        rules: Vec<PolicyRule>,
    ) -> Result<PathBuf, BedError> {
        let ns = &self.namespace;
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        ..ObjectMeta::default()
                    },
                    ..ServiceAccount::default()
                },
            )
            .await?;
        Api::<Role>::namespaced(self.client.clone(), ns)
            .create(
                &PostParams::default(),
                &Role {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        ..ObjectMeta::default()
                    },
                    rules: Some(rules),
                },
            )
            .await?;
        bind_role_to(&self.client, ns, name, name).await?;
        let token = sa_token(&self.client, ns, name, None).await?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, name, &token, ns)?;
        Ok(path)
    }

    /// Kills the controller with SIGKILL (no cleanup on its side) and waits for it.
    pub async fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill().await;
        }
    }

    /// The controller's logs so far (all starts), for failure messages.
    pub fn controller_logs(&self) -> String {
        (1..=self.starts)
            .filter_map(|i| {
                std::fs::read_to_string(self.dir.join(format!("controller-{i}.log"))).ok()
            })
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// Applies an AgentPool given as JSON (server-side apply); the API server's validation error comes back as is.
    pub async fn apply_agentpool(&self, manifest: serde_json::Value) -> Result<(), kube::Error> {
        let name = manifest["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let api: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &agentpool_resource());
        api.patch(
            &name,
            &PatchParams::apply("azp-testbed").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .map(|_| ())
    }

    /// An AgentPool manifest for this bed (template: the agent image, the agents' ServiceAccount).
    pub fn agentpool(&self, name: &str, ado_pool: &str, max_agents: u32) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "azp-autoscaler.dev/v1alpha1",
            "kind": "AgentPool",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "organization": self.org_url(),
                "pool": ado_pool,
                "agentVersion": crate::standin::AGENT_VERSION,
                "maxAgents": max_agents,
                "pollIntervalSeconds": 1,
                "ttlSecondsAfterFinished": 600,
                "template": {
                    "spec": {
                        "serviceAccountName": AGENT_SA,
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{"name": "agent", "image": AGENT_IMAGE}]
                    }
                }
            }
        })
    }

    /// The status of an AgentPool (None while it has none).
    pub async fn agentpool_status(&self, name: &str) -> Option<serde_json::Value> {
        let api: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &agentpool_resource());
        api.get(name).await.ok()?.data.get("status").cloned()
    }

    /// Waits until the AgentPool reports Ready=True (its placeholder registered, polling works); panics
    /// with its status and the controller's logs otherwise.
    pub async fn wait_ready(&self, name: &str) {
        let r = eventually(
            &format!("AgentPool {name} Ready"),
            Duration::from_secs(120),
            || async {
                let status = self.agentpool_status(name).await?;
                let (s, _, _) = condition(&status, "Ready")?;
                (s == "True").then_some(())
            },
        )
        .await;
        if let Err(e) = r {
            panic!(
                "{e}\nstatus: {:?}\ncontroller logs:\n{}",
                self.agentpool_status(name).await,
                self.controller_logs()
            );
        }
    }

    /// Waits until every given request of the ADO pool finished; returns request id → (result, agent
    /// name). Panics with the requests, the Jobs and the controller's logs otherwise.
    pub async fn wait_finished(&self, pool: &str, ids: &[u64]) -> BTreeMap<u64, (String, String)> {
        let r = eventually("requests finished", Duration::from_secs(120), || async {
            let reqs = self.sim.requests(ORG, pool).ok()?;
            let done: BTreeMap<u64, (String, String)> = reqs
                .iter()
                .filter(|r| ids.contains(&r.request_id))
                .filter_map(|r| {
                    Some((
                        r.request_id,
                        (r.result.clone()?, r.agent_name.clone().unwrap_or_default()),
                    ))
                })
                .collect();
            (done.len() == ids.len()).then_some(done)
        })
        .await;
        match r {
            Ok(v) => v,
            Err(e) => panic!(
                "{e}\nrequests: {:#?}\njobs: {:?}\ncontroller logs:\n{}",
                self.sim.requests(ORG, pool),
                self.jobs()
                    .await
                    .map(|j| j.into_iter().map(|j| j.metadata.name).collect::<Vec<_>>()),
                self.controller_logs()
            ),
        }
    }

    /// The controller's `/metrics` text (None while it does not answer).
    pub async fn metrics_text(&self) -> Option<String> {
        reqwest::get(format!("http://{}/metrics", self.admin_addr))
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// Agent Jobs in the namespace.
    pub async fn jobs(&self) -> Result<Vec<Job>, kube::Error> {
        Ok(Api::<Job>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=azp-autoscaler"))
            .await?
            .items)
    }

    /// The controller's `--cluster-id`.
    pub fn cluster_id(&self) -> String {
        self.controller_args
            .windows(2)
            .find(|w| w[0] == "--cluster-id")
            .map(|w| w[1].clone())
            .unwrap_or_default()
    }

    /// The owner capability (`azp-autoscaler.owner`) of the agents this bed's controller registers for
    /// an AgentPool.
    pub fn owner(&self, agentpool: &str) -> String {
        format!("{}/{}/{agentpool}", self.cluster_id(), self.namespace)
    }

    /// Points the controller's kubeconfig at another address of the API server (e.g. a
    /// [`crate::proxy::TcpProxy`] in front of it); applies to controller processes started afterwards.
    pub fn route_controller_api_through(&self, addr: std::net::SocketAddr) -> Result<(), BedError> {
        let path = self.dir.join("controller.kubeconfig");
        let text = std::fs::read_to_string(&path)?;
        let routed: Vec<String> = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix("server:") {
                Some(_) => format!("    server: https://{addr}"),
                None => l.to_owned(),
            })
            .collect();
        std::fs::write(&path, routed.join("\n") + "\n")?;
        Ok(())
    }

    /// Lets the controller's ServiceAccount hold the leader Lease in the bed's namespace (the chart
    /// grants this in the controller's own namespace only).
    pub async fn grant_lease(&self) -> Result<(), BedError> {
        let name = "azp-autoscaler-leader";
        Api::<Role>::namespaced(self.client.clone(), &self.namespace)
            .create(
                &PostParams::default(),
                &Role {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..ObjectMeta::default()
                    },
                    rules: Some(vec![PolicyRule {
                        api_groups: Some(vec!["coordination.k8s.io".into()]),
                        resources: Some(vec!["leases".into()]),
                        verbs: vec!["get".into(), "create".into(), "update".into()],
                        ..PolicyRule::default()
                    }]),
                },
            )
            .await?;
        bind_to_controller(&self.client, &self.namespace, name).await
    }

    /// Starts another replica of the controller: same binary, identity and arguments, its own admin
    /// address and log file (`controller-<label>.log` in the bed's folder).
    pub fn spawn_replica(&self, label: &str) -> Result<Replica, BedError> {
        let admin_addr = format!("127.0.0.1:{}", free_port()?);
        let mut args = self.controller_args.clone();
        if let Some(i) = args.iter().position(|a| a == "--admin-addr") {
            args[i + 1] = admin_addr.clone();
        }
        let log = self.dir.join(format!("controller-{label}.log"));
        let child = tokio::process::Command::new(bin("azp-autoscaler"))
            .args(&args)
            .env_clear()
            .envs(self.controller_env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Replica {
            child: Some(child),
            admin_addr,
            log,
        })
    }

    /// Registers an offline agent through ADO's REST API as another identity (another cluster's
    /// controller, or a hand-made agent) with the given capabilities; the identity is added to the
    /// organization. Returns the agent's id.
    pub async fn register_agent_as(
        &self,
        identity: &IdentitySpec,
        ado_pool: &str,
        name: &str,
        capabilities: serde_json::Value,
    ) -> Result<u32, BedError> {
        self.sim.add_identity(identity.clone());
        self.sim.add_member(ORG, &identity.object_id)?;
        let token = self.sim.mint_access_token(
            &identity.client_id,
            &identity.object_id,
            Duration::from_secs(3600),
        );
        let pool_id = self.sim.pool_id(ORG, ado_pool)?;
        let body = serde_json::json!({
            "name": name,
            "version": crate::standin::AGENT_VERSION,
            "maxParallelism": 1,
            "enabled": true,
            "systemCapabilities": capabilities,
            // A throwaway 2040-bit "key": the agent never connects.
            "authorization": {"publicKey": {"exponent": "AQAB", "modulus": "////".repeat(85)}},
        });
        let response = self
            .sim
            .http_client()
            .post(format!(
                "{}/_apis/distributedtask/pools/{pool_id}/agents?api-version=7.1",
                self.org_url()
            ))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|e| BedError::Other(format!("registering {name}: {e}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(BedError::Other(format!(
                "registering {name}: {status} {text}"
            )));
        }
        let agent: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BedError::Other(format!("registering {name}: {e}: {text}")))?;
        agent["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| BedError::Other(format!("registering {name}: no id in {text}")))
    }

    /// Stops the controller and the node, deletes the namespace (its Jobs and pods go with it).
    pub async fn teardown(mut self) {
        self.kill_controller().await;
        if let Some(node) = self.node.take() {
            let _ = node.shutdown().await;
        }
        // With the controller gone nothing drains the AgentPools: drop their finalizers, or the namespace
        // would stay Terminating.
        let pools: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &agentpool_resource());
        if let Ok(list) = pools.list(&ListParams::default()).await {
            for pool in list.items {
                if let Some(name) = pool.metadata.name {
                    let _ = pools
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
                        )
                        .await;
                }
            }
        }
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::background())
            .await;
        if self.owns_sim {
            self.sim.shutdown();
        }
    }
}

/// Another controller process of a bed (see [`Bed::spawn_replica`]); killed on drop.
pub struct Replica {
    pub child: Option<tokio::process::Child>,
    /// Its admin address (metrics).
    pub admin_addr: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Replica {
    /// Kills it with SIGKILL and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Its logs so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The value of a metric (summed over its label sets) on a controller's `/metrics` at `admin_addr`;
/// `needle` is the line prefix, e.g. `azp_autoscaler_leader ` or `azp_autoscaler_cleanups_total{`.
pub async fn scrape_metric(admin_addr: &str, needle: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin_addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| l.starts_with(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// The API server's address, from the admin kubeconfig (to put a proxy in front of it).
pub fn api_server_addr() -> Result<std::net::SocketAddr, BedError> {
    let url = client_server_url()?;
    let hostport = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    std::net::ToSocketAddrs::to_socket_addrs(hostport)?
        .next()
        .ok_or_else(|| BedError::Other(format!("no address for the API server {url}")))
}

/// The AgentPool API resource (dynamic, so the bed does not link the product).
pub fn agentpool_resource() -> kube::core::ApiResource {
    kube::core::ApiResource {
        group: "azp-autoscaler.dev".to_owned(),
        version: "v1alpha1".to_owned(),
        api_version: "azp-autoscaler.dev/v1alpha1".to_owned(),
        kind: "AgentPool".to_owned(),
        plural: "agentpools".to_owned(),
    }
}

/// Installs (or updates) the CRD from `azp-autoscaler crd` and waits until it is established.
pub async fn install_crd(client: &Client) -> Result<(), BedError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let out = std::process::Command::new(bin("azp-autoscaler"))
        .arg("crd")
        .output()
        .map_err(|e| {
            BedError::Other(format!(
                "cannot run azp-autoscaler crd: {e} (run `cargo build --workspace --bins` first)"
            ))
        })?;
    if !out.status.success() {
        return Err(BedError::Other(format!(
            "azp-autoscaler crd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text)
        .map_err(|e| BedError::Other(format!("azp-autoscaler crd printed no CRD: {e}")))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("azp-testbed").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    for _ in 0..100 {
        let current = api.get(&name).await?;
        let established = current
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BedError::Other(
        "the AgentPool CRD did not become established".into(),
    ))
}

async fn service_account_issuer(client: &Client) -> Result<String, BedError> {
    let req = http::Request::get("/.well-known/openid-configuration")
        .body(Vec::new())
        .map_err(|e| BedError::Other(e.to_string()))?;
    let doc: serde_json::Value = client.request(req).await?;
    doc["issuer"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| BedError::Other("the API server serves no service-account issuer".into()))
}

fn cluster_state_dir() -> PathBuf {
    node::kubeconfig_path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cluster_ca_pem() -> Result<String, BedError> {
    let path = cluster_state_dir().join("pki").join("ca.crt");
    std::fs::read_to_string(&path).map_err(|e| {
        BedError::Other(format!(
            "cannot read the cluster CA {}: {e}",
            path.display()
        ))
    })
}

async fn create_service_accounts(
    client: &Client,
    namespace: &str,
    controller_client_id: &str,
    agent_client_id: &str,
) -> Result<(), BedError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    for (name, client_id) in [
        (CONTROLLER_SA, controller_client_id),
        (AGENT_SA, agent_client_id),
    ] {
        api.create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    annotations: Some(BTreeMap::from([(
                        "azure.workload.identity/client-id".to_owned(),
                        client_id.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
    }
    Ok(())
}

/// The controller's permissions in its namespace (what the Helm chart grants per watched namespace).
pub fn controller_role_rules() -> Vec<PolicyRule> {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| (*s).to_owned()).collect()),
        resources: Some(resources.iter().map(|s| (*s).to_owned()).collect()),
        verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
        ..PolicyRule::default()
    };
    vec![
        rule(
            &["azp-autoscaler.dev"],
            &["agentpools"],
            &["get", "list", "watch", "patch", "update"],
        ),
        rule(
            &["azp-autoscaler.dev"],
            &["agentpools/status"],
            &["get", "patch", "update"],
        ),
        rule(
            &["azp-autoscaler.dev"],
            &["agentpools/finalizers"],
            &["update"],
        ),
        rule(
            &["batch"],
            &["jobs"],
            &["get", "list", "watch", "create", "delete", "patch"],
        ),
        rule(&[""], &["pods"], &["get", "list", "watch", "patch"]),
        rule(
            &["policy"],
            &["poddisruptionbudgets"],
            &["get", "create", "patch"],
        ),
        rule(&[""], &["secrets"], &["get", "create", "delete"]),
        rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
    ]
}

async fn create_controller_rbac(client: &Client, namespace: &str) -> Result<(), BedError> {
    let name = "azp-autoscaler-controller";
    Api::<Role>::namespaced(client.clone(), namespace)
        .create(
            &PostParams::default(),
            &Role {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                rules: Some(controller_role_rules()),
            },
        )
        .await?;
    bind_to_controller(client, namespace, name).await
}

/// Binds the Role `name` to the controller's ServiceAccount.
async fn bind_to_controller(client: &Client, namespace: &str, name: &str) -> Result<(), BedError> {
    bind_role_to(client, namespace, name, CONTROLLER_SA).await
}

/// Binds the Role `role` of `namespace` to the ServiceAccount `sa` of the same namespace.
async fn bind_role_to(
    client: &Client,
    namespace: &str,
    role: &str,
    sa: &str,
) -> Result<(), BedError> {
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some(role.to_owned()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "Role".to_owned(),
                    name: role.to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: sa.to_owned(),
                    namespace: Some(namespace.to_owned()),
                    ..Subject::default()
                }]),
            },
        )
        .await?;
    Ok(())
}

/// Writes a kubeconfig for the local API server that authenticates as `user` with a bearer `token`.
pub fn write_kubeconfig(
    path: &Path,
    user: &str,
    token: &str,
    namespace: &str,
) -> Result<(), BedError> {
    let server = client_server_url()?;
    let ca = cluster_state_dir().join("pki").join("ca.crt");
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: bed\n  context: {{cluster: bed, user: {user}, namespace: {namespace}}}\ncurrent-context: bed\n",
            ca.display()
        ),
    )?;
    Ok(())
}

async fn sa_token(
    client: &Client,
    namespace: &str,
    sa: &str,
    audience: Option<&str>,
) -> Result<String, BedError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
            expiration_seconds: Some(4 * 3600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    let out: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await?;
    out.status
        .map(|s| s.token)
        .ok_or_else(|| BedError::Other("TokenRequest returned no token".into()))
}

/// The environment of the controller process: a kubeconfig with its ServiceAccount's token (so it runs
/// with exactly the RBAC above), and the workload-identity variables a labelled pod would get.
async fn controller_env(
    client: &Client,
    namespace: &str,
    dir: &Path,
    sim: &Simulator,
    ca_path: &Path,
    client_id: &str,
) -> Result<Vec<(String, String)>, BedError> {
    let api_token = sa_token(client, namespace, CONTROLLER_SA, None).await?;
    let kubeconfig = dir.join("controller.kubeconfig");
    write_kubeconfig(&kubeconfig, "controller", &api_token, namespace)?;
    let federated = sa_token(
        client,
        namespace,
        CONTROLLER_SA,
        Some("api://AzureADTokenExchange"),
    )
    .await?;
    let token_file = dir.join("controller-federated-token");
    std::fs::write(&token_file, federated)?;
    let mut env = vec![
        ("KUBECONFIG".to_owned(), kubeconfig.display().to_string()),
        ("AZURE_CLIENT_ID".to_owned(), client_id.to_owned()),
        ("AZURE_TENANT_ID".to_owned(), sim.tenant_id()),
        ("AZURE_AUTHORITY_HOST".to_owned(), sim.entra_url()),
        (
            "AZURE_FEDERATED_TOKEN_FILE".to_owned(),
            token_file.display().to_string(),
        ),
        ("SSL_CERT_FILE".to_owned(), ca_path.display().to_string()),
        (
            "RUST_LOG".to_owned(),
            std::env::var("AZP_BED_LOG").unwrap_or_else(|_| "info,azp_autoscaler=debug".to_owned()),
        ),
    ];
    if let Ok(path) = std::env::var("PATH") {
        env.push(("PATH".to_owned(), path));
    }
    Ok(env)
}

fn client_server_url() -> Result<String, BedError> {
    let text = std::fs::read_to_string(node::kubeconfig_path())?;
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("server:")
                .map(|s| s.trim().to_owned())
        })
        .ok_or_else(|| BedError::Other("no server in the admin kubeconfig".into()))
}

fn free_port() -> Result<u16, BedError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A condition of a status: (status, reason, message).
pub fn condition(status: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
    status["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == type_).then(|| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout` with `what` (a deadline
/// against hangs, not a speed assertion).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
