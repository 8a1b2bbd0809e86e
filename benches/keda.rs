//! Benchmark (issue 7, item 6) on the test bed: our controller against a replay of the KEDA policy as
//! documented (`support::keda`: one `jobrequests` call per ScaledJob per poll, queue length = requests
//! with `result == null` and no `receiveTime`, ScaledJob `default` strategy, 30 s polling), on the same
//! workload: the same fixed-seed request schedule (arrival times and job durations), the same node
//! capacity, the same agent pod template, the same limit (`maxAgents` = `maxReplicaCount`). Each policy
//! gets its own fresh bed; nothing else runs in it. Figures are printed, never asserted.
//!
//! Policies: ours polling every 5 s (the default), ours polling every 30 s (KEDA's cadence: what is left
//! is the counting policy), and the KEDA replay. Ratios are KEDA ÷ ours (above 1: KEDA has more of it).
//!
//! Needs the control plane (`tests/cluster/up.sh`, `KUBECONFIG`) and `cargo build --workspace --bins`.
//! `cargo bench --profile dev --bench keda`. Knobs: `AZP_KEDA_REQUESTS` (40) queued at random times
//! over `AZP_KEDA_WINDOW_SECS` (150), each running a uniform random `AZP_KEDA_MIN_JOB_SECS` (2) to
//! `AZP_KEDA_MAX_JOB_SECS` (40) s; `AZP_KEDA_NODE_PODS` (20) agent pods at once; `AZP_KEDA_MAX_AGENTS`
//! (20); `AZP_KEDA_POLL_SECS` (30) for the replay; `AZP_KEDA_DEADLINE_SECS` (600) per run.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::sim::RequestSpec;
use support::{Rng, Waiting, env, job_counts, keda, percentile, sample_until, secs};

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Ours(u64),
    Keda,
}

impl Policy {
    fn label(self, keda_poll: u64) -> String {
        match self {
            Policy::Ours(s) => format!("ours, polling {s} s"),
            Policy::Keda => format!("KEDA replay, polling {keda_poll} s"),
        }
    }
}

struct Knobs {
    requests: u64,
    window: u64,
    min_job: u64,
    max_job: u64,
    node_pods: u32,
    max_agents: u32,
    keda_poll: u64,
    deadline: u64,
}

/// The workload: (offset from the start in ms, job duration in ms), sorted by offset.
fn schedule(k: &Knobs) -> Vec<(u64, u64)> {
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let mut v: Vec<(u64, u64)> = (0..k.requests)
        .map(|_| {
            let at = rng.below(k.window * 1000);
            let span = (k.max_job.saturating_sub(k.min_job)) * 1000;
            (at, k.min_job * 1000 + rng.below(span + 1))
        })
        .collect();
    v.sort_unstable();
    v
}

struct Outcome {
    to_receive: Vec<f64>,
    jobs_created: usize,
    received: usize,
    jobrequests_per_5min: f64,
    autoscaler_calls_per_5min: f64,
    waiting: Waiting,
    complete: bool,
    keda: Option<keda::Record>,
}

async fn run(policy: Policy, k: &Knobs, work: &[(u64, u64)]) -> Outcome {
    let mut opts = BedOptions::new("bench-keda");
    opts.parallel_jobs = 100;
    opts.node_pods = k.node_pods;
    opts.start_controller = matches!(policy, Policy::Ours(_));
    let bed = Bed::start(opts).await.expect("bed");
    let (selector, replay) = match policy {
        Policy::Ours(interval) => {
            let mut pool = bed.agentpool("ours", "linux", k.max_agents);
            pool["spec"]["pollIntervalSeconds"] = interval.into();
            bed.apply_agentpool(pool).await.expect("apply");
            bed.wait_ready("ours").await;
            (support::OURS, None)
        }
        Policy::Keda => {
            let replay = keda::Replay::start(
                &bed,
                keda::Settings {
                    polling_interval: Duration::from_secs(k.keda_poll),
                    max_replica_count: k.max_agents,
                    jobs_to_fetch: 250,
                },
            )
            .await;
            (keda::SELECTOR, Some(replay))
        }
    };
    eventually("the first poll", Duration::from_secs(120), || async {
        (bed.sim.call_count("jobrequests.list") >= 1).then_some(())
    })
    .await
    .expect("first poll");
    bed.sim.reset_calls();
    let started = Instant::now();

    let queue = async {
        for &(at, duration) in work {
            if let Some(wait) = Duration::from_millis(at).checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            bed.sim
                .queue(
                    ORG,
                    "linux",
                    RequestSpec::new().duration(Duration::from_millis(duration)),
                )
                .expect("queue");
        }
    };
    let mut seen = support::Seen::new();
    let sample = sample_until(
        &bed,
        selector,
        work.len(),
        Duration::from_secs(1),
        Duration::from_secs(10),
        Duration::from_secs(k.deadline),
        &mut seen,
    );
    let ((), (waiting, complete)) = tokio::join!(queue, sample);
    let elapsed = started.elapsed().as_secs_f64();
    let calls = bed.sim.calls();
    let keda = match replay {
        Some(r) => Some(r.stop().await),
        None => None,
    };

    let scale = 300.0 / elapsed;
    let jobrequests: u64 = calls
        .iter()
        .filter(|c| c.endpoint == "jobrequests.list")
        .map(|c| c.count)
        .sum();
    // The autoscaler's identity is the one that lists jobrequests; agents call as themselves.
    let pollers: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.endpoint == "jobrequests.list")
        .map(|c| c.identity.as_str())
        .collect();
    let autoscaler: u64 = calls
        .iter()
        .filter(|c| pollers.contains(c.identity.as_str()))
        .map(|c| c.count)
        .sum();
    let reqs = bed.sim.requests(ORG, "linux").expect("requests");
    let mut to_receive: Vec<f64> = reqs
        .iter()
        .filter_map(|r| Some(secs(r.queue_time?, r.receive_time?)))
        .collect();
    to_receive.sort_by(f64::total_cmp);
    let _ = job_counts(&bed, selector, &mut seen).await;
    let jobs_created = seen.len();
    bed.teardown().await;
    Outcome {
        received: to_receive.len(),
        to_receive,
        jobs_created,
        jobrequests_per_5min: jobrequests as f64 * scale,
        autoscaler_calls_per_5min: autoscaler as f64 * scale,
        waiting,
        complete,
        keda,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !support::is_bench_run(env!("CARGO_CRATE_NAME")) {
        return;
    }
    azp_testbed::install_crypto_provider();
    let k = Knobs {
        requests: env("AZP_KEDA_REQUESTS", 40),
        window: env("AZP_KEDA_WINDOW_SECS", 150),
        min_job: env("AZP_KEDA_MIN_JOB_SECS", 2),
        max_job: env("AZP_KEDA_MAX_JOB_SECS", 40),
        node_pods: u32::try_from(env("AZP_KEDA_NODE_PODS", 20)).unwrap_or(20),
        max_agents: u32::try_from(env("AZP_KEDA_MAX_AGENTS", 20)).unwrap_or(20),
        keda_poll: env("AZP_KEDA_POLL_SECS", 30),
        deadline: env("AZP_KEDA_DEADLINE_SECS", 600),
    };
    let work = schedule(&k);
    let n = work.len();
    println!(
        "workload: {n} requests at random times over {} s (fixed seed), jobs of {}–{} s; node runs {} agent pods at once; maxAgents = maxReplicaCount = {}",
        k.window, k.min_job, k.max_job, k.node_pods, k.max_agents
    );
    let policies = [Policy::Ours(5), Policy::Ours(30), Policy::Keda];
    let mut rows = Vec::new();
    for policy in policies {
        let label = policy.label(k.keda_poll);
        println!("{label}:");
        let o = run(policy, &k, &work).await;
        rows.push((label, o));
    }

    println!();
    println!(
        "| policy | queued → received p50 / p95 (s) | Jobs created / requests | jobrequests calls / 5 min | all autoscaler ADO calls / 5 min | left waiting: mean / peak / request-s |"
    );
    println!("|---|---|---:|---:|---:|---|");
    for (label, o) in &rows {
        let not_all = if o.complete {
            String::new()
        } else {
            format!(" (only {} of {n} received)", o.received)
        };
        println!(
            "| {label} | {:.1} / {:.1}{not_all} | {} / {n} = {:.2} | {:.0} | {:.0} | {:.2} / {} / {:.0} |",
            percentile(&o.to_receive, 0.5),
            percentile(&o.to_receive, 0.95),
            o.jobs_created,
            o.jobs_created as f64 / n as f64,
            o.jobrequests_per_5min,
            o.autoscaler_calls_per_5min,
            o.waiting.mean(),
            o.waiting.peak,
            o.waiting.request_secs
        );
    }

    let Some((_, keda)) = rows.iter().find(|(l, _)| l.starts_with("KEDA")) else {
        return;
    };
    println!();
    println!("KEDA replay ÷ ours (same workload; above 1: KEDA has more of it)");
    println!("| metric | ÷ ours, polling 5 s | ÷ ours, polling 30 s |");
    println!("|---|---:|---:|");
    let ours: Vec<&Outcome> = rows
        .iter()
        .filter(|(l, _)| l.starts_with("ours"))
        .map(|(_, o)| o)
        .collect();
    let ratio = |f: &dyn Fn(&Outcome) -> f64| {
        ours.iter()
            .map(|o| format!("{:.2}", f(keda) / f(o)))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| queued → received p50 | {} |",
        ratio(&|o| percentile(&o.to_receive, 0.5))
    );
    println!(
        "| queued → received p95 | {} |",
        ratio(&|o| percentile(&o.to_receive, 0.95))
    );
    println!(
        "| Jobs created per request | {} |",
        ratio(&|o| o.jobs_created as f64)
    );
    println!(
        "| jobrequests calls / 5 min | {} |",
        ratio(&|o| o.jobrequests_per_5min)
    );
    println!(
        "| all autoscaler ADO calls / 5 min | {} |",
        ratio(&|o| o.autoscaler_calls_per_5min)
    );
    println!(
        "| request-seconds left waiting without an agent | {} |",
        ratio(&|o| o.waiting.request_secs)
    );

    if let Some(record) = &keda.keda {
        println!();
        println!(
            "KEDA replay, poll by poll (t = s since the replay started, the workload starts right after its first poll; listed = requests in the response; queue = result null, no receiveTime; of which assigned = assigned to an agent, not yet received (#7747); running = unfinished Jobs; busy = of those, running a request (#7878); short = queued requests left without an agent by this decision)"
        );
        println!(
            "| t (s) | listed | queue | of which assigned | running Jobs | busy | created | short |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in &record.polls {
            println!(
                "| {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                p.at_secs,
                p.listed,
                p.queue_length,
                p.assigned_not_received,
                p.running_jobs,
                p.busy,
                p.created,
                p.short
            );
        }
        let short: usize = record.polls.iter().map(|p| p.short).sum();
        let short_by_busy: usize = record.polls.iter().map(|p| p.short.min(p.busy)).sum();
        let assigned: usize = record.polls.iter().map(|p| p.assigned_not_received).sum();
        println!(
            "#7878: {short} request-polls left without an agent, {short_by_busy} of them because busy Jobs were subtracted; #7747: {assigned} request-polls counted as queued while already assigned"
        );
        for e in &record.errors {
            println!("replay error: {e}");
        }
    }
}
