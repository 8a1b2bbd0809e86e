//! Benchmark (issue 7, item 2) on the test bed: a burst of requests queued at once → time until that many
//! agent Jobs exist (the autoscaler's part), until their pods exist (the kube-controller-manager's Job
//! controller), until every request is received by an agent (scheduling by the node harness, agent start,
//! registration, ADO assignment). Node capacity caps how many agent pods run at once, so the last part
//! is bounded by capacity × agent lifetime, not by the autoscaler. Figures are printed, never asserted.
//!
//! Needs the control plane (`tests/cluster/up.sh`, `KUBECONFIG`) and `cargo build --workspace --bins`.
//! `cargo bench --profile dev --bench burst`. Knobs: `AZP_BURST_SIZE` (500) requests,
//! `AZP_BURST_NODE_PODS` (50) agent pods running at once, `AZP_BURST_JOB_MS` (1000) per job,
//! `AZP_BURST_DEADLINE_SECS` (900) per run, `AZP_BURST_KEDA` (0; 1 = also run the KEDA replay of
//! `support::keda` on the same burst, polling `AZP_KEDA_POLL_SECS` = 30 s, maxReplicaCount = the size).

mod support;

use std::time::{Duration, Instant};

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::sim::RequestSpec;
use jiff::Timestamp;
use support::{env, keda, object_counts, request_counts, secs};

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Ours,
    Keda,
}

struct Knobs {
    size: usize,
    node_pods: u32,
    job: Duration,
    deadline: Duration,
    keda_poll: Duration,
}

/// Times (s after queueing) at which the k-th object appeared, for k = 1, n/2, n; `None` when fewer.
struct Phase {
    times: Vec<f64>,
}

impl Phase {
    fn at(&self, k: usize) -> Option<f64> {
        self.times.get(k.checked_sub(1)?).copied()
    }
    fn cells(&self, n: usize) -> String {
        let f = |k: usize| match self.at(k) {
            Some(t) => format!("{t:.1}"),
            None => "—".to_owned(),
        };
        let all = match self.at(n) {
            Some(t) => format!("{t:.1}"),
            None => format!("not reached ({} of {n})", self.times.len()),
        };
        format!("{} | {} | {all}", f(1), f(n.div_ceil(2)))
    }
}

fn phase(queued: Timestamp, mut stamps: Vec<Timestamp>) -> Phase {
    stamps.sort();
    Phase {
        times: stamps
            .into_iter()
            .map(|t| secs(queued, t).max(0.0))
            .collect(),
    }
}

struct Outcome {
    jobs: Phase,
    pods: Phase,
    received: Phase,
    jobs_created: usize,
    wall: f64,
    keda: Option<keda::Record>,
}

async fn run(policy: Policy, k: &Knobs) -> Outcome {
    let n = k.size;
    let mut opts = BedOptions::new("bench-burst");
    opts.parallel_jobs = u32::try_from(n).unwrap_or(u32::MAX);
    opts.node_pods = k.node_pods;
    opts.start_controller = policy == Policy::Ours;
    let bed = Bed::start(opts).await.expect("bed");
    let selector = match policy {
        Policy::Ours => {
            let mut pool = bed.agentpool("burst", "linux", u32::try_from(n).unwrap_or(u32::MAX));
            pool["spec"]["pollIntervalSeconds"] = 5.into();
            bed.apply_agentpool(pool).await.expect("apply");
            bed.wait_ready("burst").await;
            support::OURS
        }
        Policy::Keda => keda::SELECTOR,
    };
    // Both start from an idle, polling autoscaler: ours is Ready, the replay has polled once (empty).
    let replay = match policy {
        Policy::Keda => Some(
            keda::Replay::start(
                &bed,
                keda::Settings {
                    polling_interval: k.keda_poll,
                    max_replica_count: u32::try_from(n).unwrap_or(u32::MAX),
                    jobs_to_fetch: 250,
                },
            )
            .await,
        ),
        Policy::Ours => None,
    };
    if replay.is_some() {
        eventually(
            "the replay's first poll",
            Duration::from_secs(60),
            || async { (bed.sim.call_count("jobrequests.list") >= 1).then_some(()) },
        )
        .await
        .expect("first poll");
    }
    // Queue at a random point of the poll cycle (the same for both policies).
    tokio::time::sleep(Duration::from_millis(1700)).await;

    let queued = Timestamp::now();
    let mut ids: Vec<u64> = (0..n)
        .map(|_| {
            bed.sim
                .queue(ORG, "linux", RequestSpec::new().duration(k.job))
                .expect("queue")
        })
        .collect();
    ids.sort_unstable();
    let started = Instant::now();
    let mut last_print = Instant::now();
    let (mut jobs_seen, mut pods_seen) = (support::Seen::new(), support::Seen::new());
    loop {
        let (jobs, pods) = object_counts(&bed, selector, &mut jobs_seen, &mut pods_seen)
            .await
            .unwrap_or_default();
        let (received, finished) = request_counts(&bed, &ids);
        let done = received >= n;
        if last_print.elapsed() >= Duration::from_secs(5) || done {
            last_print = Instant::now();
            println!(
                "  [{:>5.0} s] Jobs {jobs}  pods {pods}  received {received}  finished {finished}",
                started.elapsed().as_secs_f64()
            );
        }
        if done || started.elapsed() >= k.deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let keda = match replay {
        Some(r) => Some(r.stop().await),
        None => None,
    };

    let _ = object_counts(&bed, selector, &mut jobs_seen, &mut pods_seen).await;
    let reqs = bed.sim.requests(ORG, "linux").expect("requests");
    let outcome = Outcome {
        // creationTimestamp has whole seconds: ±1 s on these two.
        jobs: phase(queued, jobs_seen.values().flatten().copied().collect()),
        pods: phase(queued, pods_seen.values().flatten().copied().collect()),
        received: phase(
            queued,
            reqs.iter()
                .filter(|r| ids.binary_search(&r.request_id).is_ok())
                .filter_map(|r| r.receive_time)
                .collect(),
        ),
        jobs_created: jobs_seen.len(),
        wall,
        keda,
    };
    bed.teardown().await;
    outcome
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !support::is_bench_run(env!("CARGO_CRATE_NAME")) {
        return;
    }
    azp_testbed::install_crypto_provider();
    let k = Knobs {
        size: usize::try_from(env("AZP_BURST_SIZE", 500)).unwrap_or(500),
        node_pods: u32::try_from(env("AZP_BURST_NODE_PODS", 50)).unwrap_or(50),
        job: Duration::from_millis(env("AZP_BURST_JOB_MS", 1000)),
        deadline: Duration::from_secs(env("AZP_BURST_DEADLINE_SECS", 900)),
        keda_poll: Duration::from_secs(env("AZP_KEDA_POLL_SECS", 30)),
    };
    let mut policies = vec![Policy::Ours];
    if env("AZP_BURST_KEDA", 0) == 1 {
        policies.push(Policy::Keda);
    }
    let n = k.size;
    let mut rows = Vec::new();
    for policy in policies {
        let label = match policy {
            Policy::Ours => "ours (polling 5 s)".to_owned(),
            Policy::Keda => format!("KEDA replay (polling {} s)", k.keda_poll.as_secs()),
        };
        println!(
            "burst: {n} requests of {} ms queued at once; node runs {} agent pods at once; {label}",
            k.job.as_millis(),
            k.node_pods
        );
        let o = run(policy, &k).await;
        rows.push((label, o));
    }
    println!();
    println!(
        "| burst of {n}, {} pods at once | first (s) | half (s) | all {n} (s) |",
        k.node_pods
    );
    println!("|---|---:|---:|---:|");
    for (label, o) in &rows {
        println!(
            "| {label}: queued → agent Jobs exist | {} |",
            o.jobs.cells(n)
        );
        println!(
            "| {label}: queued → their pods exist | {} |",
            o.pods.cells(n)
        );
        println!(
            "| {label}: queued → received by agents | {} |",
            o.received.cells(n)
        );
    }
    println!();
    for (label, o) in &rows {
        println!(
            "{label}: {} Jobs created for {n} requests; run stopped after {:.0} s",
            o.jobs_created, o.wall
        );
        if let Some(r) = &o.keda {
            println!(
                "  replay polls (t s: listed / queue length / running Jobs / busy / created):"
            );
            for p in &r.polls {
                println!(
                    "    {:>5.0}: {} / {} / {} / {} / {}",
                    p.at_secs, p.listed, p.queue_length, p.running_jobs, p.busy, p.created
                );
            }
            for e in &r.errors {
                println!("  replay error: {e}");
            }
        }
    }
}
