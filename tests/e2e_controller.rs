//! End to end on the real local API server: controller process + ADO simulator + node harness + agent
//! entrypoint + stand-in agent. Needs `tests/cluster/up.sh` (tests/run.sh does it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use azp_testbed::bed::{Bed, BedOptions, ORG, condition, eventually};
use azp_testbed::sim::RequestSpec;
use kube::Api;

const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_agents_while_idle_then_one_run_once_agent_per_request() {
    let bed = Bed::start(BedOptions::new("e2e-basic")).await.expect("bed");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 5))
        .await
        .expect("apply");
    bed.wait_ready("linux").await;

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
    let done = bed.wait_finished("linux", &ids).await;
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

/// Fails if a request has two unfinished agent Jobs waiting for it.
async fn no_request_with_two_unfinished_jobs(bed: &Bed) -> Result<(), String> {
    let jobs = bed.jobs().await.map_err(|e| e.to_string())?;
    let requests = bed.sim.requests(ORG, "linux").map_err(|e| e.to_string())?;
    let twice = azp_testbed::invariants::requests_with_two_unfinished_jobs(&jobs, &requests);
    match twice.iter().next() {
        Some((r, v)) => Err(format!(
            "request {r} has two unfinished agent Jobs waiting for it: {v:?}"
        )),
        None => Ok(()),
    }
}

/// Records the agent name of every agent Job that appears in the namespace, from a watch.
fn record_agent_jobs(
    bed: &Bed,
) -> (
    std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let api: Api<k8s_openapi::api::batch::v1::Job> =
        Api::namespaced(bed.client.clone(), &bed.namespace);
    let record = seen.clone();
    let task = tokio::spawn(async move {
        watcher(api, watcher::Config::default())
            .touched_objects()
            .for_each(|job| {
                if let Ok(job) = job
                    && let Some(agent) = job
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("azp-autoscaler.dev/agent-name"))
                {
                    record.lock().expect("lock").insert(agent.clone());
                }
                async {}
            })
            .await;
    });
    (seen, task)
}

async fn unfinished_jobs(bed: &Bed, agentpool: &str) -> usize {
    bed.jobs()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|j| {
            j.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("azp-autoscaler.dev/agentpool"))
                .is_some_and(|p| p == agentpool)
                && j.status
                    .as_ref()
                    .is_none_or(|s| s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0) == 0)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_agents_and_parallel_slots_cap_and_the_rest_is_reported_capped() {
    let mut opts = BedOptions::new("e2e-caps");
    opts.parallel_jobs = 3;
    let bed = Bed::start(opts).await.expect("bed");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 2))
        .await
        .expect("apply");
    bed.wait_ready("linux").await;
    // Long jobs: the agents stay busy while we look.
    let ids: Vec<u64> = (0..5)
        .map(|_| {
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new().duration(Duration::from_secs(6)),
                )
                .expect("queue")
        })
        .collect();
    let status = match eventually("status shows the capped requests", DEADLINE, || async {
        let s = bed.agentpool_status("linux").await?;
        (s["capped"].as_u64()? == 3 && s["agents"]["busy"].as_u64()? == 2).then_some(s)
    })
    .await
    {
        Ok(s) => s,
        Err(e) => panic!(
            "{e}: {:?}\n{}",
            bed.agentpool_status("linux").await,
            bed.controller_logs()
        ),
    };
    assert_eq!(
        status["pending"].as_u64(),
        Some(3),
        "two requests run, three wait: {status}"
    );
    assert!(
        unfinished_jobs(&bed, "linux").await <= 2,
        "maxAgents 2 holds"
    );
    // Everything is served eventually, never more than 2 agents at once.
    let done = bed.wait_finished("linux", &ids).await;
    assert!(done.values().all(|(r, _)| r == "succeeded"), "{done:?}");
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_by_demands_and_priority_with_spill_over() {
    let bed = Bed::start(BedOptions::new("e2e-route")).await.expect("bed");
    // `fast` is preferred (priority 10) but holds one agent; `slow` takes the spill-over.
    let mut fast = bed.agentpool("fast", "linux", 1);
    fast["spec"]["priority"] = 10.into();
    fast["spec"]["capabilities"] = serde_json::json!({"docker": "true"});
    let mut slow = bed.agentpool("slow", "linux", 5);
    slow["spec"]["capabilities"] = serde_json::json!({"docker": "true"});
    let mut java = bed.agentpool("java", "linux", 5);
    java["spec"]["capabilities"] = serde_json::json!({"java": "17"});
    for p in [fast, slow, java] {
        bed.apply_agentpool(p).await.expect("apply");
    }
    for p in ["fast", "slow", "java"] {
        bed.wait_ready(p).await;
    }
    let docker: Vec<u64> = (0..3)
        .map(|_| {
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new()
                        .demand("docker")
                        .duration(Duration::from_secs(3)),
                )
                .expect("queue")
        })
        .collect();
    let java_req = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new()
                .demand("JAVA -equals 17")
                .duration(Duration::from_secs(1)),
        )
        .expect("queue");
    let mut all = docker.clone();
    all.push(java_req);
    let done = bed.wait_finished("linux", &all).await;
    let pool_of = |agent: &str| agent.split('-').next().unwrap_or_default().to_owned();
    assert_eq!(pool_of(&done[&java_req].1), "java", "{done:?}");
    let by_pool: BTreeMap<String, usize> = docker.iter().fold(BTreeMap::new(), |mut m, id| {
        *m.entry(pool_of(&done[id].1)).or_default() += 1;
        m
    });
    assert_eq!(
        by_pool.get("fast"),
        Some(&1),
        "the preferred pool serves up to its max: {done:?}"
    );
    assert_eq!(
        by_pool.get("slow"),
        Some(&2),
        "the rest spills over: {done:?}"
    );
    assert!(done.values().all(|(r, _)| r == "succeeded"), "{done:?}");
    bed.teardown().await;
}

/// KEDA #7747 (a duplicate agent for a request already taken) and #7878 (no new agents while others run),
/// with the simulator pairing requests and agents in each order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keda_7747_and_7878_cannot_happen_in_any_assignment_order() {
    use azp_testbed::sim::AssignmentOrder;
    for order in [
        AssignmentOrder::OldestFirst,
        AssignmentOrder::NewestAgentFirst,
        AssignmentOrder::NewestRequestFirst,
        AssignmentOrder::Random { seed: 7 },
    ] {
        let mut opts = BedOptions::new("e2e-keda");
        opts.sim.assignment_order = order;
        let bed = Bed::start(opts).await.expect("bed");
        bed.apply_agentpool(bed.agentpool("linux", "linux", 10))
            .await
            .expect("apply");
        bed.wait_ready("linux").await;
        // #7878: three long jobs keep three agents busy...
        let busy: Vec<u64> = (0..3)
            .map(|_| {
                bed.sim
                    .queue(
                        ORG,
                        "linux",
                        RequestSpec::new().duration(Duration::from_secs(8)),
                    )
                    .expect("queue")
            })
            .collect();
        eventually("three busy agents", DEADLINE, || async {
            let reqs = bed.sim.requests(ORG, "linux").ok()?;
            (reqs.iter().filter(|r| r.receive_time.is_some()).count() == 3).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{order:?}: {e}\n{}", bed.controller_logs()));
        // ...and new requests still get new agents while those run.
        let more: Vec<u64> = (0..4)
            .map(|_| {
                bed.sim
                    .queue(
                        ORG,
                        "linux",
                        RequestSpec::new().duration(Duration::from_millis(500)),
                    )
                    .expect("queue")
            })
            .collect();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            no_request_with_two_unfinished_jobs(&bed)
                .await
                .unwrap_or_else(|e| panic!("{order:?}: {e}"));
            let reqs = bed.sim.requests(ORG, "linux").expect("requests");
            let more_done = reqs
                .iter()
                .filter(|r| more.contains(&r.request_id) && r.finish_time.is_some())
                .count();
            let busy_running = reqs
                .iter()
                .filter(|r| busy.contains(&r.request_id) && r.finish_time.is_none())
                .count();
            if more_done == more.len() {
                // #7878: the short ones finished while at least one long one still ran.
                assert!(
                    busy_running > 0,
                    "{order:?}: new requests waited for the busy agents to finish"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{order:?}: requests not served: {reqs:#?}\n{}",
                bed.controller_logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut all = busy.clone();
        all.extend(&more);
        let done = bed.wait_finished("linux", &all).await;
        let agents: BTreeSet<&String> = done.values().map(|(_, a)| a).collect();
        assert_eq!(
            agents.len(),
            all.len(),
            "{order:?}: one agent per request: {done:?}"
        );
        bed.teardown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_duplicate_agent_jobs_across_controller_restarts() {
    let mut opts = BedOptions::new("e2e-restart");
    opts.parallel_jobs = 20;
    let mut bed = Bed::start(opts).await.expect("bed");
    let (seen_jobs, watch) = record_agent_jobs(&bed);
    bed.apply_agentpool(bed.agentpool("linux", "linux", 20))
        .await
        .expect("apply");
    bed.wait_ready("linux").await;
    let ids: Vec<u64> = (0..12)
        .map(|_| {
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new().duration(Duration::from_secs(2)),
                )
                .expect("queue")
        })
        .collect();
    // Kill the controller as soon as it started creating, restart it twice.
    for _ in 0..2 {
        eventually("some agent Jobs", DEADLINE, || async {
            (!bed.jobs().await.ok()?.is_empty()).then_some(())
        })
        .await
        .expect("jobs");
        bed.kill_controller().await;
        no_request_with_two_unfinished_jobs(&bed)
            .await
            .expect("invariant");
        bed.start_controller().expect("restart");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        no_request_with_two_unfinished_jobs(&bed)
            .await
            .expect("invariant");
    }
    let done = bed.wait_finished("linux", &ids).await;
    assert!(done.values().all(|(r, _)| r == "succeeded"), "{done:?}");
    // No wasted agent: every agent Job ever created served exactly one of the requests (a duplicate made
    // across a restart would have served nothing, or been removed as surplus).
    // Every agent Job that ever existed, as the watch saw it (a duplicate removed as surplus included).
    let job_agents: BTreeSet<String> = seen_jobs.lock().expect("lock").clone();
    watch.abort();
    let served: BTreeSet<String> = done.values().map(|(_, a)| a.clone()).collect();
    assert_eq!(
        job_agents, served,
        "agent Jobs vs agents that served a request"
    );
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_agentpool_is_rejected_with_a_message_naming_the_field() {
    let mut opts = BedOptions::new("e2e-invalid");
    opts.start_controller = true;
    let bed = Bed::start(opts).await.expect("bed");
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            {
                let mut p = bed.agentpool("a", "linux", 2);
                p["spec"]["minIdle"] = 3.into();
                p
            },
            "spec.minIdle",
        ),
        (
            {
                let mut p = bed.agentpool("b", "linux", 2);
                p["spec"]["organization"] = "http://dev.azure.com/x".into();
                p
            },
            "spec.organization",
        ),
        (
            {
                let mut p = bed.agentpool("c", "linux", 2);
                p["spec"]["agentVersion"] = "latest".into();
                p
            },
            "spec.agentVersion",
        ),
        (
            {
                let mut p = bed.agentpool("d", "linux", 2);
                p["spec"]["maxAgents"] = 0.into();
                p
            },
            "spec.maxAgents",
        ),
        (
            {
                let mut p = bed.agentpool("e", "linux", 2);
                p["spec"]["auth"] =
                    serde_json::json!({"workloadIdentity": {}, "pat": {"secretName": "s"}});
                p
            },
            "spec.auth",
        ),
    ];
    for (manifest, field) in cases {
        let err = bed.apply_agentpool(manifest).await.expect_err(field);
        let text = err.to_string();
        assert!(
            text.contains(field),
            "the API server's message names {field}: {text}"
        );
    }
    // What the schema cannot see (no container named like spec.agentContainer) → Degraded, nothing created.
    let mut bad = bed.agentpool("nocontainer", "linux", 2);
    bad["spec"]["agentContainer"] = "runner".into();
    bed.apply_agentpool(bad).await.expect("schema-valid");
    let status = eventually("Degraded InvalidTemplate", DEADLINE, || async {
        let s = bed.agentpool_status("nocontainer").await?;
        let (st, reason, message) = condition(&s, "Degraded")?;
        (st == "True" && reason == "InvalidTemplate").then_some(message)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    assert!(status.contains("spec.agentContainer"), "{status}");
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(bed.client.clone(), &bed.namespace);
    eventually(
        "a Warning Event for the invalid template",
        DEADLINE,
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("InvalidTemplate")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("nocontainer")
                })
                .then_some(())
        },
    )
    .await
    .expect("event");
    bed.sim
        .queue(ORG, "linux", RequestSpec::new())
        .expect("queue");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        bed.jobs().await.expect("jobs").is_empty(),
        "an invalid AgentPool creates nothing"
    );
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plan_output_equals_what_the_controller_then_does() {
    let mut bed = Bed::start(BedOptions::new("e2e-plan")).await.expect("bed");
    let mut docker = bed.agentpool("docker", "linux", 1);
    docker["spec"]["capabilities"] = serde_json::json!({"docker": "true"});
    let plain = bed.agentpool("plain", "linux", 5);
    for p in [&docker, &plain] {
        bed.apply_agentpool(p.clone()).await.expect("apply");
    }
    bed.wait_ready("docker").await;
    bed.wait_ready("plain").await;
    // The controller is away (its placeholders stay); requests wait.
    bed.kill_controller().await;
    for spec in [
        RequestSpec::new().demand("docker"),
        RequestSpec::new().demand("docker"),
        RequestSpec::new(),
    ] {
        bed.sim
            .queue(ORG, "linux", spec.duration(Duration::from_millis(300)))
            .expect("queue");
    }
    let manifest = bed.dir.join("agentpools.json");
    // YAML is a superset of JSON: one document per AgentPool.
    std::fs::write(
        &manifest,
        format!(
            "{}\n---\n{}\n",
            serde_json::to_string(&docker).unwrap(),
            serde_json::to_string(&plain).unwrap()
        ),
    )
    .expect("write");
    let out = tokio::process::Command::new(azp_testbed::bed::bin_dir().join("azp-autoscaler"))
        .args(["plan", "-f"])
        .arg(&manifest)
        .args(["--output", "json"])
        .env_clear()
        .envs(bed.controller_env())
        .output()
        .await
        .expect("plan");
    assert!(
        out.status.success(),
        "plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let pools = report["pools"].as_array().expect("pools");
    let create_of = |name: &str| {
        pools
            .iter()
            .find(|p| {
                p["agentPool"]
                    .as_str()
                    .is_some_and(|a| a.ends_with(&format!("/{name}")))
            })
            .and_then(|p| p["create"].as_u64())
    };
    assert_eq!(create_of("docker"), Some(1), "{report}");
    assert_eq!(create_of("plain"), Some(1), "{report}");
    let capped_docker = pools
        .iter()
        .find(|p| {
            p["agentPool"]
                .as_str()
                .is_some_and(|a| a.ends_with("/docker"))
        })
        .and_then(|p| p["capped"].as_array().map(|c| c.len()));
    assert_eq!(capped_docker, Some(1), "{report}");
    assert!(
        bed.jobs().await.expect("jobs").is_empty(),
        "plan creates nothing"
    );

    bed.start_controller().expect("controller");
    let counts = eventually("the controller's first creations", DEADLINE, || async {
        let jobs = bed.jobs().await.ok()?;
        let n = |p: &str| {
            jobs.iter()
                .filter(|j| {
                    j.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("azp-autoscaler.dev/agentpool"))
                        .is_some_and(|x| x == p)
                })
                .count()
        };
        (jobs.len() >= 2).then(|| (n("docker"), n("plain")))
    })
    .await
    .expect("jobs");
    assert_eq!(counts, (1, 1), "the controller did what plan said");
    bed.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_allow_list_keeps_the_controller_identity_away_from_unlisted_organizations() {
    let file = std::env::temp_dir().join(format!("azp-allow-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "namespaces:\n  \"*\":\n    organizations: [https://dev.azure.com/somewhere-else]\n",
    )
    .expect("write");
    let mut opts = BedOptions::new("e2e-allow");
    opts.controller_args = vec!["--allow-list".to_owned(), file.display().to_string()];
    let bed = Bed::start(opts).await.expect("bed");
    bed.apply_agentpool(bed.agentpool("linux", "linux", 2))
        .await
        .expect("apply");
    let message = eventually("Degraded NotAllowed", DEADLINE, || async {
        let s = bed.agentpool_status("linux").await?;
        let (st, reason, message) = condition(&s, "Degraded")?;
        (st == "True" && reason == "NotAllowed").then_some(message)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    assert!(message.contains("allow-list"), "{message}");
    // The identity was never used against the organization: no placeholder, no call at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(bed.sim.agents(ORG, "linux").expect("agents").is_empty());
    assert_eq!(bed.sim.call_count("jobrequests.list"), 0);
    assert_eq!(
        bed.sim.call_count("entra.token"),
        0,
        "not even a token was requested"
    );
    bed.teardown().await;
    let _ = std::fs::remove_file(file);
}
