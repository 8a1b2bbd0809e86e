//! The controller runtime: thin shells around the pure planner.
//!
//! ```text
//! kube watches (AgentPools, agent Jobs, agent Pods) ──► caches ─┐
//!                                                               ├─► plan() ─► apply (create Jobs, remove agents)
//! ADO poll per ADO pool (1 jobrequests call per poll) ──────────┘            └► status, Events, metrics
//! ```
//!
//! One task per ADO pool group (organization, ADO pool, identity): every AgentPool of the group is planned
//! together, so one request never gets agents from two AgentPools and the ADO call budget is one
//! `jobrequests` per poll however many AgentPools share the pool.

pub mod allow;
pub mod placeholder;
pub mod registration;
pub mod snapshot;

mod apply;
mod finalizer;
pub mod leader;
pub mod poll;
mod protect;
mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::admin::Readiness;
use crate::ado::{
    AccessToken, AdoClientConfig, AdoClients, AdoError, AdoObserver, AuthScheme, TokenSource,
};
use crate::k8s::crd::AgentPool;
use crate::k8s::job::MANAGED_BY;
use crate::metrics::Metrics;

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// This cluster's identity in agent names and owner capabilities. None: the `kube-system` namespace UID.
    pub cluster_id: Option<String>,
    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub admin_addr: SocketAddr,
    /// How often the agents of an ADO pool are listed (job requests are read every poll).
    pub agents_every: Duration,
    /// How often the organization's parallel-job usage is read.
    pub usage_every: Duration,
    /// Agent Jobs created at once.
    pub create_concurrency: usize,
    /// Name of this replica, for Events.
    pub instance: String,
    /// How long one of our agents stays left behind (no unfinished agent Job, holding no request)
    /// before it is deleted from ADO.
    pub orphan_grace: Duration,
    /// Wakes every poll task at once (shared with the service-hook endpoint).
    pub wake: Arc<Notify>,
    /// Slower polling while service hooks flow (opt-in: every project using the pools must send hooks).
    pub hook_cadence: Option<crate::plan::cadence::HookCadence>,
    /// Leader election among replicas (None: this replica always writes).
    pub leader_election: Option<leader::LeaderConfig>,
    /// Which organizations / ADO pools each namespace may use with the controller's identity (None: any).
    pub allow_list: Option<allow::AllowList>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            cluster_id: None,
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            agents_every: Duration::from_secs(30),
            usage_every: Duration::from_secs(60),
            create_concurrency: 32,
            instance: std::env::var("POD_NAME").unwrap_or_else(|_| "azp-autoscaler".to_owned()),
            orphan_grace: Duration::from_secs(120),
            wake: Arc::new(Notify::new()),
            hook_cadence: None,
            leader_election: None,
            allow_list: None,
        }
    }
}

/// Errors that stop the controller (per-pool errors go to status and metrics instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot read the kube-system namespace to derive the cluster id ({0}); grant `get` on namespaces/kube-system or pass --cluster-id"
    )]
    ClusterId(#[source] kube::Error),
    #[error("the admin server on {addr} failed: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a watch cache stopped before it synced")]
    CacheNotSynced,
}

impl Error {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::ClusterId(_) => "cluster_id",
            Error::Admin { .. } => "admin_server",
            Error::CacheNotSynced => "cache_not_synced",
        }
    }
}

/// What every poll task shares.
pub(crate) struct Context {
    pub client: Client,
    pub config: Config,
    pub cluster_id: String,
    pub pools: Store<AgentPool>,
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
    pub ado: AdoClients,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Wakes every poll task at once (e.g. a service hook); polling goes on regardless.
    pub wake: Arc<Notify>,
    /// Whether this replica may write (holds the leader Lease, or no election).
    pub leadership: Arc<leader::Leadership>,
}

/// Which AgentPools are planned together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// Organization URL, lower case, without a trailing slash.
    pub organization: String,
    /// ADO pool name, lower case.
    pub ado_pool: String,
    /// The identity.
    pub auth: AuthKey,
}

/// The identity an AgentPool uses against ADO.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthKey {
    /// Workload identity, with an optional client id override.
    WorkloadIdentity(Option<String>),
    /// A PAT from a Secret.
    Pat {
        namespace: String,
        secret: String,
        key: String,
    },
}

/// The group of an AgentPool.
pub fn group_key(pool: &AgentPool) -> GroupKey {
    let auth = match (&pool.spec.auth.pat, &pool.spec.auth.workload_identity) {
        (Some(pat), _) => AuthKey::Pat {
            namespace: pool.metadata.namespace.clone().unwrap_or_default(),
            secret: pat.secret_name.clone(),
            key: pat.key.clone(),
        },
        (None, wi) => AuthKey::WorkloadIdentity(wi.as_ref().and_then(|w| w.client_id.clone())),
    };
    GroupKey {
        organization: pool
            .spec
            .organization
            .trim_end_matches('/')
            .to_ascii_lowercase(),
        ado_pool: pool.spec.pool.to_ascii_lowercase(),
        auth,
    }
}

/// The token source of an identity. `allow_cli`: fall back to the Azure CLI login when no workload
/// identity environment is present (the `plan` command on a laptop).
pub async fn token_source(
    client: Option<&Client>,
    auth: &AuthKey,
    allow_cli: bool,
) -> Result<TokenSource, poll::PollError> {
    match auth {
        AuthKey::WorkloadIdentity(client_id) => {
            match TokenSource::workload_identity_from_env(client_id.as_deref()) {
                Ok(t) => Ok(t),
                Err(e) if allow_cli => {
                    TokenSource::azure_cli().map_err(|_| AdoError::from(e).into())
                }
                Err(e) => Err(AdoError::from(e).into()),
            }
        }
        AuthKey::Pat {
            namespace,
            secret,
            key,
        } => {
            let err = |reason: String| poll::PollError::PatSecret {
                namespace: namespace.clone(),
                secret: secret.clone(),
                key: key.clone(),
                reason,
            };
            let client = client.ok_or_else(|| err("no cluster to read it from".to_owned()))?;
            let s = Api::<Secret>::namespaced(client.clone(), namespace)
                .get(secret)
                .await
                .map_err(|e| err(e.to_string()))?;
            let bytes = s
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .ok_or_else(|| err("the key is missing".to_owned()))?;
            let pat =
                String::from_utf8(bytes.0.clone()).map_err(|_| err("not UTF-8".to_owned()))?;
            Ok(TokenSource::fixed(AccessToken::new(
                pat.trim_end().to_owned(),
                AuthScheme::Basic,
                None,
            )))
        }
    }
}

/// Runs the controller until the process is stopped.
pub async fn run(client: Client, config: Config, metrics: Metrics) -> Result<(), Error> {
    let cluster_id = match &config.cluster_id {
        Some(id) => id.clone(),
        None => Api::<Namespace>::all(client.clone())
            .get("kube-system")
            .await
            .map_err(Error::ClusterId)?
            .metadata
            .uid
            .unwrap_or_else(|| "unknown-cluster".to_owned()),
    };
    tracing::info!(%cluster_id, namespace = ?config.namespace, "starting controller");

    let readiness = Arc::new(Readiness::default());
    let admin_addr = config.admin_addr;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| Error::Admin {
            addr: admin_addr,
            source,
        })?;
    tokio::spawn(crate::admin::serve(
        listener,
        metrics.clone(),
        readiness.clone(),
    ));
    let leadership = match &config.leader_election {
        Some(election) => leader::start(client.clone(), election.clone(), metrics.clone()),
        None => {
            metrics.leader.set(1);
            Arc::new(leader::Leadership::single())
        }
    };

    let (pools, pools_writer) = reflector::store::<AgentPool>();
    let (jobs, jobs_writer) = reflector::store::<Job>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let ours = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let (pool_api, job_api, pod_api) = match &config.namespace {
        Some(ns) => (
            Api::<AgentPool>::namespaced(client.clone(), ns),
            Api::<Job>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<AgentPool>::all(client.clone()),
            Api::<Job>::all(client.clone()),
            Api::<Pod>::all(client.clone()),
        ),
    };
    tokio::spawn(drive(reflector::reflector(
        pools_writer,
        watcher(pool_api, watcher::Config::default()).default_backoff(),
    )));
    tokio::spawn(drive(reflector::reflector(
        jobs_writer,
        watcher(job_api, watcher::Config::default().labels(&ours)).default_backoff(),
    )));
    // Every pod event passes the lost-job accounting: a disrupted pod may be gone by the next poll.
    let lost = protect::LostJobs::new(metrics.clone(), pools.clone(), leadership.clone());
    tokio::spawn(drive(
        reflector::reflector(
            pods_writer,
            watcher(pod_api, watcher::Config::default().labels(&ours)).default_backoff(),
        )
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => lost.observe(pod, false),
            watcher::Event::Delete(pod) => lost.observe(pod, true),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }),
    ));
    // Plan only once every cache has synced: an empty Job cache would look like "no agents" and
    // create duplicates.
    for synced in [
        pools.wait_until_ready().await,
        jobs.wait_until_ready().await,
        pods.wait_until_ready().await,
    ] {
        synced.map_err(|_| Error::CacheNotSynced)?;
    }
    readiness.set_synced();
    tracing::info!("caches synced; planning starts");

    let observer: Arc<dyn AdoObserver> = Arc::new(metrics.clone());
    let ado = AdoClients::new(AdoClientConfig {
        observer,
        ..AdoClientConfig::default()
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "azp-autoscaler".to_owned(),
            instance: Some(config.instance.clone()),
        },
    );
    let wake = config.wake.clone();
    let ctx = Arc::new(Context {
        client,
        config,
        cluster_id,
        pools,
        jobs,
        pods,
        ado,
        metrics,
        recorder,
        wake,
        leadership,
    });
    supervise(ctx).await;
    Ok(())
}

async fn drive<S, T, E>(stream: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watch error (retrying with backoff)");
            }
        })
        .await;
}

/// Keeps exactly one poll task per group of AgentPools.
async fn supervise(ctx: Arc<Context>) {
    let mut tasks: HashMap<GroupKey, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        if !ctx.leadership.is_leader() {
            // Only the leader polls and writes; the others keep their caches warm.
            for (_, task) in tasks.drain() {
                task.abort();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut wanted: Vec<GroupKey> = ctx.pools.state().iter().map(|p| group_key(p)).collect();
        wanted.sort();
        wanted.dedup();
        tasks.retain(|key, task| {
            let keep = wanted.contains(key) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            tasks.entry(key.clone()).or_insert_with(|| {
                tracing::info!(organization = %key.organization, ado_pool = %key.ado_pool, "polling ADO pool");
                tokio::spawn(poll::run_group(ctx.clone(), key))
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
