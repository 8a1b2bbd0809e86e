//! Node harness on the real API server under a burst: many Jobs all complete, and the node never runs more
//! pods than its capacity (checked on the API server's ordered watch events).
//! Needs the local control plane (`tests/cluster/up.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use azp_testbed::node::testing::{TestNamespace, init_tracing, job_finished, shell_job};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};

const JOBS: usize = 60;
const CAPACITY: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_burst_of_jobs_completes_within_node_capacity() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-burst").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    config.capacity.pods = CAPACITY;
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");
    let jobs: Api<Job> = ns.api();
    let pods: Api<Pod> = ns.api();

    // Follow the pods: bound and not finished = occupying the node.
    let follow = tokio::spawn({
        let pods = pods.clone();
        async move {
            let mut running: BTreeMap<String, bool> = BTreeMap::new();
            let mut peak = 0usize;
            let mut succeeded: BTreeSet<String> = BTreeSet::new();
            let mut events = watcher::watcher(pods, watcher::Config::default()).boxed();
            while let Some(ev) = events.try_next().await.expect("pod watch") {
                let pod = match ev {
                    Event::Apply(p) | Event::InitApply(p) => p,
                    _ => continue,
                };
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let bound = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some();
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                let finished = phase == "Succeeded" || phase == "Failed";
                running.insert(uid.clone(), bound && !finished);
                peak = peak.max(running.values().filter(|r| **r).count());
                if phase == "Succeeded" {
                    succeeded.insert(uid);
                    if succeeded.len() == JOBS {
                        return peak;
                    }
                }
            }
            peak
        }
    });

    let started = Instant::now();
    stream::iter(0..JOBS)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                jobs.create(
                    &PostParams::default(),
                    &shell_job(&format!("burst-{i}"), "exit 0"),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("create the Jobs");
    let peak = tokio::time::timeout(TIMEOUT, follow)
        .await
        .expect("all pods succeed in time")
        .expect("follower");
    let elapsed = started.elapsed();

    assert!(
        peak <= CAPACITY as usize,
        "at most {CAPACITY} pods ran at once, saw {peak}"
    );
    assert!(peak >= 2, "pods ran concurrently (peak {peak})");
    // The Job controller's view: every Job ends Complete (followed through a watch).
    let all_complete = async {
        let mut state: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut events = watcher::watcher(jobs.clone(), watcher::Config::default()).boxed();
        while let Some(ev) = events.try_next().await.expect("job watch") {
            if let Event::Apply(j) | Event::InitApply(j) = ev {
                let name = j.metadata.name.clone().unwrap_or_default();
                state.insert(name, job_finished(&j).map(str::to_owned));
                let failed: Vec<_> = state
                    .iter()
                    .filter(|(_, c)| c.as_deref() == Some("Failed"))
                    .collect();
                assert!(failed.is_empty(), "failed Jobs: {failed:?}");
                if state
                    .values()
                    .filter(|c| c.as_deref() == Some("Complete"))
                    .count()
                    == JOBS
                {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(TIMEOUT, all_complete)
        .await
        .expect("every Job Complete in time");
    println!(
        "{JOBS} Jobs through a {CAPACITY}-pod node: all pods Succeeded {:.1} s after the first create (peak {peak} running)",
        elapsed.as_secs_f64()
    );
    harness.shutdown().await.expect("shutdown");
}
