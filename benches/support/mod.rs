//! Shared by the `burst` and `keda` benches: env knobs, percentiles, a progress/waiting sampler over the
//! bed, and a replay of KEDA's documented scaling loop for Azure Pipelines (see [`keda`]).
//! Each bench uses part of it.
#![allow(dead_code)]

pub mod keda;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use azp_testbed::bed::{Bed, ORG};
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

/// The label selector of our agent Jobs.
pub const OURS: &str = "app.kubernetes.io/managed-by=azp-autoscaler";

pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Refuses to run under `cargo test --all-targets` (no `--bench` argument).
pub fn is_bench_run(name: &str) -> bool {
    if std::env::args().any(|a| a == "--bench") {
        return true;
    }
    println!("a benchmark: run it with `cargo bench --profile dev --bench {name}`");
    false
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn secs(a: Timestamp, b: Timestamp) -> f64 {
    (b - a).total(jiff::Unit::Second).unwrap_or(f64::NAN)
}

/// A fixed-seed xorshift64 stream: the same workload for every policy.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// Every object ever seen by a sampler, by name, with its creation time: Jobs an autoscaler deletes
/// (surplus, replaced) still count as created.
pub type Seen = BTreeMap<String, Option<Timestamp>>;

fn remember(seen: &mut Seen, meta: &kube::core::ObjectMeta) {
    if let Some(name) = &meta.name {
        seen.insert(name.clone(), meta.creation_timestamp.as_ref().map(|t| t.0));
    }
}

/// Jobs matching `selector`: (existing, unfinished); adds them to `seen`.
pub async fn job_counts(bed: &Bed, selector: &str, seen: &mut Seen) -> Option<(usize, usize)> {
    let jobs = Api::<Job>::namespaced(bed.client.clone(), &bed.namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .ok()?
        .items;
    for j in &jobs {
        remember(seen, &j.metadata);
    }
    Some((jobs.len(), jobs.iter().filter(|j| !finished(j)).count()))
}

/// Cheap counts for progress: Jobs (metadata only) and pods of the namespace, existing now; adds them
/// to the seen sets.
pub async fn object_counts(
    bed: &Bed,
    selector: &str,
    jobs_seen: &mut Seen,
    pods_seen: &mut Seen,
) -> Option<(usize, usize)> {
    let jobs = Api::<Job>::namespaced(bed.client.clone(), &bed.namespace)
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .ok()?
        .items;
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &bed.namespace)
        .list_metadata(&ListParams::default())
        .await
        .ok()?
        .items;
    for j in &jobs {
        remember(jobs_seen, &j.metadata);
    }
    for p in &pods {
        remember(pods_seen, &p.metadata);
    }
    Some((jobs.len(), pods.len()))
}

/// Requests of the bed's `linux` pool among `ids`: (received, finished).
pub fn request_counts(bed: &Bed, ids: &[u64]) -> (usize, usize) {
    let reqs = bed.sim.requests(ORG, "linux").unwrap_or_default();
    let mine = reqs
        .iter()
        .filter(|r| ids.binary_search(&r.request_id).is_ok());
    let (mut received, mut done) = (0, 0);
    for r in mine {
        received += usize::from(r.receive_time.is_some());
        done += usize::from(r.finish_time.is_some());
    }
    (received, done)
}

/// "Left waiting" at one instant: requests queued and not yet taken by an agent, beyond the agents that
/// exist and hold no request (unfinished Jobs minus requests being run). Those requests have no agent
/// now and none coming until the autoscaler acts again.
#[derive(Default, Debug, Clone)]
pub struct Waiting {
    samples: u64,
    sum: f64,
    pub peak: usize,
    /// Request-seconds spent without an agent.
    pub request_secs: f64,
}

impl Waiting {
    pub fn mean(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.sum / self.samples as f64
        }
    }
}

/// Samples every `every` until `expected` requests of the bed's `linux` pool were received or `deadline`
/// passes; prints progress every `print_every`. Returns the waiting statistics and whether all were
/// received.
pub async fn sample_until(
    bed: &Bed,
    selector: &str,
    expected: usize,
    every: Duration,
    print_every: Duration,
    deadline: Duration,
    seen: &mut Seen,
) -> (Waiting, bool) {
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut w = Waiting::default();
    let mut last_sample = Instant::now();
    loop {
        let tick = Instant::now();
        let reqs = bed.sim.requests(ORG, "linux").unwrap_or_default();
        let waiting = reqs
            .iter()
            .filter(|r| r.receive_time.is_none() && r.finish_time.is_none())
            .count();
        let running = reqs
            .iter()
            .filter(|r| r.receive_time.is_some() && r.finish_time.is_none())
            .count();
        let received = reqs.iter().filter(|r| r.receive_time.is_some()).count();
        if let Some((jobs, unfinished)) = job_counts(bed, selector, seen).await {
            let free = unfinished.saturating_sub(running);
            let left = waiting.saturating_sub(free);
            w.samples += 1;
            w.sum += left as f64;
            w.peak = w.peak.max(left);
            w.request_secs += left as f64 * last_sample.elapsed().as_secs_f64();
            last_sample = Instant::now();
            if last_print.elapsed() >= print_every {
                last_print = Instant::now();
                println!(
                    "  [{:>5.0} s] queued {}  waiting {waiting}  running {running}  received {received}  Jobs {jobs} ({unfinished} unfinished)  left waiting {left}",
                    started.elapsed().as_secs_f64(),
                    reqs.len()
                );
            }
        }
        if received >= expected {
            return (w, true);
        }
        if started.elapsed() >= deadline {
            return (w, false);
        }
        tokio::time::sleep(every.saturating_sub(tick.elapsed())).await;
    }
}
