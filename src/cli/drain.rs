//! `azp-autoscaler drain`: deletes the selected AgentPools and waits until the controller has drained
//! them (busy agents finished, idle ones and the placeholder removed, finalizer released). The Helm
//! chart runs it as a pre-delete hook, so `helm uninstall` drains while the controller still runs
//! instead of leaving AgentPools stuck on their finalizer.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};

use crate::k8s::crd::AgentPool;

/// Flags of `drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// Namespace of the AgentPools. Repeat for several.
    #[arg(short, long = "namespace", required = true)]
    pub namespaces: Vec<String>,
    /// Label selector of the AgentPools to drain (the chart passes `app.kubernetes.io/instance=<release>`).
    #[arg(short = 'l', long)]
    pub selector: String,
    /// Give up (exit 1, AgentPools left draining) after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Print what is left every this many seconds.
    #[arg(long, default_value_t = 10)]
    pub progress_seconds: u64,
}

/// Where a drain stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainState {
    /// Every selected AgentPool is gone.
    Done,
    /// These are left, each with what it waits for.
    Waiting(Vec<String>),
}

/// What is left of the selected AgentPools, as lines for the log.
pub fn drain_state(left: &[AgentPool]) -> DrainState {
    if left.is_empty() {
        return DrainState::Done;
    }
    let mut lines: Vec<String> = left
        .iter()
        .map(|p| {
            let name = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            let draining = p
                .status
                .as_ref()
                .and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == "Ready" && c.reason == "Draining")
                })
                .map(|c| c.message.clone());
            match (p.metadata.deletion_timestamp.is_some(), draining) {
                (true, Some(message)) => format!("{name}: {message}"),
                (true, None) => format!(
                    "{name}: deleted, waiting for the controller to drain it (is the controller running?)"
                ),
                (false, _) => format!("{name}: not deleted yet"),
            }
        })
        .collect();
    lines.sort();
    DrainState::Waiting(lines)
}

/// Runs `drain`.
pub async fn run(args: DrainArgs) -> ExitCode {
    match drain(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("azp-autoscaler drain: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn drain(args: &DrainArgs) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client (in-cluster or KUBECONFIG): {e}"))?;
    let list = ListParams::default().labels(&args.selector);
    for ns in &args.namespaces {
        let api: Api<AgentPool> = Api::namespaced(client.clone(), ns);
        let pools = api
            .list(&list)
            .await
            .map_err(|e| format!("listing AgentPools in {ns} ({}): {e}", args.selector))?;
        for pool in pools.items {
            let name = pool.metadata.name.unwrap_or_default();
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => println!("deleting AgentPool {ns}/{name}: the controller drains it"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(format!("deleting AgentPool {ns}/{name}: {e}")),
            }
        }
    }
    let started = Instant::now();
    let mut last_progress: Option<Instant> = None;
    loop {
        let mut left = Vec::new();
        for ns in &args.namespaces {
            let api: Api<AgentPool> = Api::namespaced(client.clone(), ns);
            match api.list(&list).await {
                Ok(l) => left.extend(l.items),
                Err(e) => eprintln!("listing AgentPools in {ns} failed (retrying): {e}"),
            }
        }
        match drain_state(&left) {
            DrainState::Done => {
                println!(
                    "drained in {} s: no AgentPool of {} is left",
                    started.elapsed().as_secs(),
                    args.selector
                );
                return Ok(());
            }
            DrainState::Waiting(lines) => {
                if started.elapsed() >= Duration::from_secs(args.timeout_seconds) {
                    return Err(format!(
                        "{} AgentPool(s) still draining after {} s:\n  {}\nBusy agents finish their \
                         job first. Wait and run `helm uninstall` again (with a longer --timeout and \
                         uninstall.drain.timeoutSeconds), or `helm uninstall --no-hooks` to leave them \
                         (their finalizer then holds them until a controller runs again).",
                        lines.len(),
                        args.timeout_seconds,
                        lines.join("\n  ")
                    ));
                }
                if last_progress
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(args.progress_seconds))
                {
                    println!(
                        "[{:>4} s] {} AgentPool(s) draining:\n  {}",
                        started.elapsed().as_secs(),
                        lines.len(),
                        lines.join("\n  ")
                    );
                    last_progress = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(v: serde_json::Value) -> AgentPool {
        let mut base = serde_json::json!({
            "apiVersion": "azp-autoscaler.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": "linux", "namespace": "ci"},
            "spec": {
                "organization": "https://dev.azure.com/contoso", "pool": "linux", "maxAgents": 3,
                "agentVersion": "4.255.0",
                "template": {"spec": {"containers": [{"name": "agent", "image": "agent:1"}]}},
            },
        });
        if let (Some(b), Some(v)) = (base.as_object_mut(), v.as_object()) {
            for (k, val) in v {
                if k == "metadata" {
                    for (mk, mv) in val.as_object().into_iter().flatten() {
                        b["metadata"][mk] = mv.clone();
                    }
                } else {
                    b.insert(k.clone(), val.clone());
                }
            }
        }
        serde_json::from_value(base).expect("AgentPool")
    }

    #[test]
    fn drain_progress_says_what_each_agentpool_waits_for() {
        assert_eq!(drain_state(&[]), DrainState::Done);
        let deleting = serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["azp-autoscaler.dev/drain"]}});
        let mut draining = deleting.clone();
        draining["status"] = serde_json::json!({"conditions": [{
            "type": "Ready", "status": "False", "reason": "Draining",
            "message": "being deleted: waiting for 1 busy agent(s) to finish their job (linux-1-1-ab)",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]});
        let mut other = pool(serde_json::json!({}));
        other.metadata.name = Some("gpu".into());
        let state = drain_state(&[pool(draining), pool(deleting), other]);
        assert_eq!(
            state,
            DrainState::Waiting(vec![
                "ci/gpu: not deleted yet".into(),
                "ci/linux: being deleted: waiting for 1 busy agent(s) to finish their job (linux-1-1-ab)".into(),
                "ci/linux: deleted, waiting for the controller to drain it (is the controller running?)".into(),
            ])
        );
    }
}
