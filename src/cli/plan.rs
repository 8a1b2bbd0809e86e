//! `azp-autoscaler plan -f <AgentPool manifests>`: a dry run for users. Reads ADO (and the cluster when it
//! is reachable), runs the same planner as the controller, prints per AgentPool what is pending, matched,
//! capped, unservable, what it would create and why. Creates nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::ado::{AdoClient, AgentQuery};
use crate::controller::{GroupKey, group_key, snapshot, token_source};
use crate::k8s::crd::AgentPool;
use crate::k8s::job::{LABEL_AGENTPOOL, MANAGED_BY};
use crate::plan;

/// Output format of `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    /// Readable text.
    #[default]
    Text,
    /// `{"pools":[...]}` as documented in the README.
    Json,
}

/// Flags of `plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// AgentPool manifests (YAML, several documents allowed). Repeat for several files.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Treat the cluster as empty (no agent Jobs) instead of reading it.
    #[arg(long)]
    pub no_cluster: bool,
    /// Namespace for manifests that name none.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
}

/// Errors of `plan`, each naming the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a list of AgentPool manifests: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{path}: document {index} is a {kind}, not an AgentPool (apiVersion azp-autoscaler.dev/v1alpha1)"
    )]
    NotAgentPool {
        path: PathBuf,
        index: usize,
        kind: String,
    },
    #[error("ADO pool {pool:?} of {organization}: {message}")]
    Ado {
        organization: String,
        pool: String,
        message: String,
    },
}

/// Reads AgentPools from YAML files (several documents per file).
pub fn read_manifests(
    files: &[PathBuf],
    default_namespace: &str,
) -> Result<Vec<AgentPool>, PlanError> {
    let mut pools = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.clone(),
            source,
        })?;
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| PlanError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for (index, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let kind = doc
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("document without kind");
            if kind != "AgentPool" {
                return Err(PlanError::NotAgentPool {
                    path: path.clone(),
                    index: index + 1,
                    kind: kind.to_owned(),
                });
            }
            let mut pool: AgentPool =
                serde_json::from_value(doc).map_err(|e| PlanError::Parse {
                    path: path.clone(),
                    message: format!("document {}: {e}", index + 1),
                })?;
            if pool.metadata.namespace.is_none() {
                pool.metadata.namespace = Some(default_namespace.to_owned());
            }
            pools.push(pool);
        }
    }
    Ok(pools)
}

/// Runs `plan` and prints the result. Exit code 0 when every ADO pool could be read.
pub async fn run(args: PlanArgs) -> ExitCode {
    match plan_report(&args).await {
        Ok(report) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".to_owned())
                ),
                Output::Text => print!("{}", text(&report)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("azp-autoscaler plan: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Computes the report (what `run` prints as JSON).
pub async fn plan_report(args: &PlanArgs) -> Result<plan::PlanReport, PlanError> {
    let pools = read_manifests(&args.files, &args.namespace)?;
    let client = if args.no_cluster {
        None
    } else {
        Client::try_default().await.ok()
    };
    let mut groups: BTreeMap<GroupKey, Vec<AgentPool>> = BTreeMap::new();
    for pool in pools {
        groups.entry(group_key(&pool)).or_default().push(pool);
    }
    let mut reports = Vec::new();
    for (key, members) in groups {
        let ado_pool = members[0].spec.pool.clone();
        let ado_err = |message: String| PlanError::Ado {
            organization: key.organization.clone(),
            pool: ado_pool.clone(),
            message,
        };
        let tokens = token_source(client.as_ref(), &key.auth, true)
            .await
            .map_err(|e| ado_err(e.to_string()))?;
        let ado = AdoClient::new(&members[0].spec.organization, tokens)
            .map_err(|e| ado_err(e.to_string()))?;
        let pool = ado
            .pool_by_name(&ado_pool)
            .await
            .map_err(|e| ado_err(e.to_string()))?
            .ok_or_else(|| {
                ado_err("no such ADO pool (or the identity cannot see it)".to_owned())
            })?;
        let requests = ado
            .job_requests(pool.id)
            .await
            .map_err(|e| ado_err(e.to_string()))?;
        let agents = ado
            .agents(
                pool.id,
                &AgentQuery::all()
                    .with_capabilities()
                    .with_assigned_request(),
            )
            .await
            .map_err(|e| ado_err(e.to_string()))?;
        let usage = ado.resource_usage().await.ok();
        let ado_snapshot = snapshot::ado_snapshot(&ado_pool, &requests, &agents, usage.as_ref());
        let seen = snapshot::AgentsSeen::from_agents(&agents);
        let cluster = match &client {
            Some(client) => read_cluster(client, &members, &seen).await,
            None => plan::ClusterSnapshot::default(),
        };
        let specs: Vec<plan::AgentPoolSpec> =
            members.iter().filter_map(snapshot::plan_spec).collect();
        let planned = plan::plan(&ado_snapshot, &cluster, &specs, Timestamp::now());
        reports.extend(plan::report(&planned).pools);
    }
    Ok(plan::PlanReport { pools: reports })
}

async fn read_cluster(
    client: &Client,
    members: &[AgentPool],
    seen: &snapshot::AgentsSeen<'_>,
) -> plan::ClusterSnapshot {
    let namespaces: HashSet<String> = members
        .iter()
        .filter_map(|p| p.metadata.namespace.clone())
        .collect();
    let names: HashSet<(String, String)> = members
        .iter()
        .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
        .collect();
    let selector = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let mut jobs = Vec::new();
    let mut pods = Vec::new();
    for ns in &namespaces {
        if let Ok(list) = Api::<Job>::namespaced(client.clone(), ns)
            .list(&selector)
            .await
        {
            jobs.extend(list.items);
        }
        if let Ok(list) = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&selector)
            .await
        {
            pods.extend(list.items);
        }
    }
    let ours = |meta: &kube::api::ObjectMeta| {
        let ns = meta.namespace.clone().unwrap_or_default();
        meta.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_AGENTPOOL))
            .is_some_and(|n| names.contains(&(ns, n.clone())))
    };
    let pod_refs: Vec<&Pod> = pods.iter().filter(|p| ours(&p.metadata)).collect();
    snapshot::cluster_snapshot(jobs.iter().filter(|j| ours(&j.metadata)), &pod_refs, seen)
}

fn text(report: &plan::PlanReport) -> String {
    let mut out = String::new();
    for p in &report.pools {
        out.push_str(&format!(
            "{} (ADO pool {}): {} pending, {} capped, {} unservable; agents {} starting, {} idle, {} busy; would create {}\n",
            p.agent_pool,
            p.ado_pool,
            p.pending.len(),
            p.capped.len(),
            p.unservable.len(),
            p.agents.starting,
            p.agents.idle,
            p.agents.busy,
            p.create
        ));
        for reason in &p.reasons {
            out.push_str(&format!("  - {reason}\n"));
        }
    }
    if report.pools.is_empty() {
        out.push_str("no AgentPools\n");
    }
    out
}
