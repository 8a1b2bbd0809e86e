//! The newcomer's demo: the whole loop on this machine. A real API server, the ADO + Entra simulator, the
//! controller, the node harness and the agent entrypoint over the stand-in agent; a handful of requests with
//! different demands, progress until each is served by an ephemeral agent, and a summary with each wait.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::bed::{Bed, BedOptions, ORG, eventually};
use crate::sim::RequestSpec;

/// Runs the demo; prints to stdout.
pub async fn run() -> ExitCode {
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), String> {
    let t0 = Instant::now();
    println!(
        "azp-autoscaler demo: scale-to-zero, run-once Azure DevOps agents on a real Kubernetes API server\n"
    );
    println!(
        "[1/5] starting the ADO + Entra simulator, a node, and the controller (as ServiceAccount azp-autoscaler)"
    );
    let bed = Bed::start(BedOptions::new("demo"))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "      namespace {}, organization {}",
        bed.namespace,
        bed.org_url()
    );

    println!(
        "[2/5] applying two AgentPools for ADO pool 'linux': 'linux' (plain) and 'docker' (capability docker=true, priority 10)"
    );
    bed.apply_agentpool(bed.agentpool("linux", "linux", 4))
        .await
        .map_err(|e| e.to_string())?;
    let mut docker = bed.agentpool("docker", "linux", 2);
    docker["spec"]["priority"] = 10.into();
    docker["spec"]["capabilities"] = serde_json::json!({"docker": "true"});
    bed.apply_agentpool(docker)
        .await
        .map_err(|e| e.to_string())?;
    let ready = eventually(
        "both AgentPools Ready (placeholders registered)",
        Duration::from_secs(60),
        || async {
            let agents = bed.sim.agents(ORG, "linux").ok()?;
            (agents
                .iter()
                .filter(|a| a.name.starts_with("azp-placeholder-"))
                .count()
                == 2)
                .then_some(())
        },
    )
    .await;
    if let Err(e) = ready {
        return Err(format!("{e}\n{}", bed.controller_logs()));
    }
    let jobs = bed.jobs().await.map_err(|e| e.to_string())?;
    println!(
        "      placeholders registered (offline, keep the empty pool queueable); agent Jobs now: {}",
        jobs.len()
    );

    println!("[3/5] queueing 6 requests with different demands");
    let specs: Vec<(&str, RequestSpec)> = vec![
        (
            "(none)",
            RequestSpec::new().duration(Duration::from_secs(2)),
        ),
        (
            "(none)",
            RequestSpec::new().duration(Duration::from_secs(3)),
        ),
        (
            "(none)",
            RequestSpec::new().duration(Duration::from_secs(1)),
        ),
        (
            "docker",
            RequestSpec::new()
                .demand("docker")
                .duration(Duration::from_secs(2)),
        ),
        (
            "docker -equals true",
            RequestSpec::new()
                .demand("docker -equals true")
                .duration(Duration::from_secs(2)),
        ),
        (
            "Agent.Version -gtVersion 3.0.0",
            RequestSpec::new()
                .demand("Agent.Version -gtVersion 3.0.0")
                .duration(Duration::from_secs(1)),
        ),
    ];
    let mut ids = Vec::new();
    for (label, spec) in specs {
        let id = bed
            .sim
            .queue(ORG, "linux", spec)
            .map_err(|e| e.to_string())?;
        ids.push((id, label));
    }

    println!("[4/5] progress (every second):");
    let start = Instant::now();
    loop {
        let reqs = bed.sim.requests(ORG, "linux").map_err(|e| e.to_string())?;
        let ours: Vec<_> = reqs
            .iter()
            .filter(|r| ids.iter().any(|(id, _)| *id == r.request_id))
            .collect();
        let waiting = ours
            .iter()
            .filter(|r| r.assign_time.is_none() && r.finish_time.is_none())
            .count();
        let running = ours
            .iter()
            .filter(|r| r.assign_time.is_some() && r.finish_time.is_none())
            .count();
        let done = ours.iter().filter(|r| r.finish_time.is_some()).count();
        let jobs = bed.jobs().await.map(|j| j.len()).unwrap_or(0);
        println!(
            "      t+{:>4.1}s  waiting {waiting}  running {running}  done {done}/{}  agent Jobs created {jobs}",
            start.elapsed().as_secs_f64(),
            ids.len()
        );
        if done == ids.len() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "requests not served within 120 s\n{}",
                bed.controller_logs()
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    println!("[5/5] summary");
    let reqs: BTreeMap<u64, _> = bed
        .sim
        .requests(ORG, "linux")
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| (r.request_id, r))
        .collect();
    println!(
        "      {:<8} {:<32} {:<10} {:>9}  agent (one job, then gone)",
        "request", "demands", "result", "wait"
    );
    for (id, label) in &ids {
        let Some(r) = reqs.get(id) else { continue };
        let wait = match (r.queue_time, r.receive_time) {
            (Some(q), Some(rcv)) => format!("{:.1}s", rcv.duration_since(q).as_secs_f64()),
            _ => "-".to_owned(),
        };
        println!(
            "      {:<8} {:<32} {:<10} {:>9}  {}",
            id,
            label,
            r.result.clone().unwrap_or_default(),
            wait,
            r.agent_name.clone().unwrap_or_default()
        );
    }
    let remaining = bed.sim.agents(ORG, "linux").map_err(|e| e.to_string())?;
    println!(
        "      agents left in the ADO pool: {} (the placeholders only: every agent ran one job and deregistered)",
        remaining.len()
    );
    println!("\ndone in {:.0} s; cleaning up", t0.elapsed().as_secs_f64());
    bed.teardown().await;
    Ok(())
}
