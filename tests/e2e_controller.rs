//! End to end on the real local API server: controller process + ADO simulator + node harness + agent
//! entrypoint + stand-in agent. Needs `tests/cluster/up.sh` (tests/run.sh does it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::sim::RequestSpec;
use kube::Api;

const DEADLINE: Duration = Duration::from_secs(120);

async fn agentpool_status(bed: &Bed, name: &str) -> Option<serde_json::Value> {
    let api: Api<kube::core::DynamicObject> = Api::namespaced_with(
        bed.client.clone(),
        &bed.namespace,
        &azp_testbed::bed::agentpool_resource(),
    );
    api.get(name).await.ok()?.data.get("status").cloned()
}

fn condition(status: &serde_json::Value, type_: &str) -> Option<(String, String, String)> {
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

async fn wait_ready(bed: &Bed, name: &str) {
    let r = eventually(&format!("AgentPool {name} Ready"), DEADLINE, || async {
        let status = agentpool_status(bed, name).await?;
        let (s, _, _) = condition(&status, "Ready")?;
        (s == "True").then_some(())
    })
    .await;
    if let Err(e) = r {
        panic!(
            "{e}\nstatus: {:?}\ncontroller logs:\n{}",
            agentpool_status(bed, name).await,
            bed.controller_logs()
        );
    }
}

/// Waits until every given request finished; returns request id → (result, agent name).
async fn wait_finished(bed: &Bed, pool: &str, ids: &[u64]) -> BTreeMap<u64, (String, String)> {
    let r = eventually("requests finished", DEADLINE, || async {
        let reqs = bed.sim.requests(ORG, pool).ok()?;
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
            bed.sim.requests(ORG, pool),
            bed.jobs()
                .await
                .map(|j| j.into_iter().map(|j| j.metadata.name).collect::<Vec<_>>()),
            bed.controller_logs()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_agents_while_idle_then_one_run_once_agent_per_request() {
    let bed = Bed::start(BedOptions::new("e2e-basic")).await.expect("bed");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 5))
        .await
        .expect("apply");
    wait_ready(&bed, "linux").await;

    // The placeholder keeps the empty pool queueable: an offline agent with our capabilities.
    let agents = bed.sim.agents(ORG, "linux").expect("agents");
    assert_eq!(agents.len(), 1, "only the placeholder: {agents:?}");
    assert!(agents[0].name.starts_with("azp-placeholder-"), "{agents:?}");

    // Nothing waits: several polls create nothing.
    let before = bed.sim.call_count("jobrequests.list");
    eventually("three more polls", DEADLINE, || async {
        (bed.sim.call_count("jobrequests.list") >= before + 3).then_some(())
    })
    .await
    .expect("polling");
    assert!(
        bed.jobs().await.expect("jobs").is_empty(),
        "no agent Job while nothing waits"
    );

    // Three requests → three run-once agents, each served, then gone from the pool.
    let ids: Vec<u64> = (0..3)
        .map(|_| {
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new().duration(Duration::from_millis(300)),
                )
                .expect("queue")
        })
        .collect();
    let done = wait_finished(&bed, "linux", &ids).await;
    for (id, (result, agent)) in &done {
        assert_eq!(result, "succeeded", "request {id}");
        assert!(
            agent.starts_with("linux-"),
            "request {id} served by {agent}"
        );
    }
    let served_by: BTreeSet<&String> = done.values().map(|(_, a)| a).collect();
    assert_eq!(
        served_by.len(),
        3,
        "each request had its own agent: {done:?}"
    );
    let jobs = bed.jobs().await.expect("jobs");
    assert_eq!(
        jobs.len(),
        3,
        "exactly one agent Job per request: {:?}",
        jobs.iter().map(|j| &j.metadata.name).collect::<Vec<_>>()
    );

    // Every agent deregistered after its one job; only the placeholder stays.
    eventually("agents deregistered", DEADLINE, || async {
        let agents = bed.sim.agents(ORG, "linux").ok()?;
        (agents.len() == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", bed.sim.agents(ORG, "linux")));
    // And the Jobs completed (the pod exited 0).
    eventually("agent Jobs complete", DEADLINE, || async {
        let jobs = bed.jobs().await.ok()?;
        jobs.iter()
            .all(|j| j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) == 1)
            .then_some(())
    })
    .await
    .expect("jobs complete");
    bed.teardown().await;
}
