//! Benchmark (issue 7, item 4): parse + plan of one 1000-item `jobrequests` response, mostly finished
//! history (980 finished, 20 waiting with demands), against 3 AgentPools. Prints time per phase (mean,
//! p50, p99) and allocations per iteration (count, bytes) from a counting global allocator. Figures are
//! printed, never asserted.
//!
//! `cargo bench --profile dev --bench planner` (debug build: compare ratios, not absolute figures; the
//! shared 2-core machine forbids a release build) — `AZP_BENCH_ITERATIONS` sets the iterations (200).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use azp_autoscaler::ado::models::{ListResponse, TaskAgentJobRequest};
use azp_autoscaler::controller::snapshot::ado_snapshot;
use azp_autoscaler::plan::{self, AgentPoolSpec, ClusterSnapshot, PoolRef};
use jiff::{SignedDuration, Timestamp};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A response shaped like ADO's (`{"count":n,"value":[...]}`, the fields ADO sends).
fn response(items: usize, waiting: usize, now: Timestamp) -> String {
    let demands = [
        vec!["Agent.Version -gtVersion 3.220.0"],
        vec!["docker", "Agent.Version -gtVersion 3.220.0"],
        vec!["java -equals 17", "Agent.OS -equals Linux"],
    ];
    let value: Vec<serde_json::Value> = (0..items)
        .map(|i| {
            let queued = now - SignedDuration::from_secs((items - i) as i64 * 30);
            let finished = i < items - waiting;
            let mut r = serde_json::json!({
                "requestId": 10_000 + i,
                "queueTime": queued.to_string(),
                "demands": demands[i % demands.len()],
                "data": {"ParallelismTag": "Private", "IsScheduled": "False"},
                "definition": {"_links": {"web": {"href": "https://dev.azure.com/contoso/p/_build/definition?definitionId=42"}}, "id": 42, "name": "example-ci"},
                "owner": {"_links": {"web": {"href": "https://dev.azure.com/contoso/p/_build/results?buildId=1"}}, "id": 5000 + i, "name": format!("20261126.{i}")},
                "poolId": 7, "queueId": 12,
                "jobId": format!("00000000-0000-0000-0000-{i:012}"),
                "jobName": "Compile",
                "planId": format!("00000000-0000-0000-0001-{i:012}"),
                "planType": "Build", "planGroup": "Build:p:5000",
                "orchestrationId": format!("00000000-0000-0000-0001-{i:012}.build.__default"),
                "hostId": "00000000-0000-0000-0000-00000000aaaa",
                "scopeId": "00000000-0000-0000-0000-00000000cccc",
                "serviceOwner": "00025394-6065-48ca-87d9-7f5672854ef7",
                "matchesAllAgentsInPool": false,
                "priority": 0,
            });
            if finished {
                let agent = serde_json::json!({"id": 100 + i % 50, "name": format!("agent-{}", i % 50), "version": "4.261.0", "enabled": true, "status": "offline"});
                let m = r.as_object_mut().unwrap();
                m.insert("assignTime".into(), (queued + SignedDuration::from_secs(5)).to_string().into());
                m.insert("receiveTime".into(), (queued + SignedDuration::from_secs(9)).to_string().into());
                m.insert("finishTime".into(), (queued + SignedDuration::from_secs(60)).to_string().into());
                m.insert("result".into(), "succeeded".into());
                m.insert("reservedAgent".into(), agent);
            }
            r
        })
        .collect();
    serde_json::json!({"count": items, "value": value}).to_string()
}

fn specs() -> Vec<AgentPoolSpec> {
    [
        ("linux", 10, &[][..]),
        ("docker", 5, &[("docker", "true")][..]),
        ("java", 0, &[("java", "17")][..]),
    ]
    .into_iter()
    .map(|(name, priority, caps)| AgentPoolSpec {
        agent_pool: PoolRef::new("ci", name),
        priority,
        capabilities: caps
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        agent_version: "4.261.0".to_owned(),
        min_idle: 0,
        max_agents: 50,
        paused: false,
        startup_timeout: SignedDuration::from_secs(600),
    })
    .collect()
}

struct Row {
    name: &'static str,
    times: Vec<Duration>,
    allocs: u64,
    bytes: u64,
}

fn measure<T>(name: &'static str, iterations: usize, mut f: impl FnMut() -> T) -> Row {
    let mut times = Vec::with_capacity(iterations);
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    for _ in 0..iterations {
        let start = Instant::now();
        std::hint::black_box(f());
        times.push(start.elapsed());
    }
    let n = iterations as u64;
    Row {
        name,
        allocs: (ALLOCS.load(Ordering::Relaxed) - a0) / n,
        bytes: (BYTES.load(Ordering::Relaxed) - b0) / n,
        times,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "a benchmark: run it with `cargo bench --profile dev --bench {}`",
            env!("CARGO_CRATE_NAME")
        );
        return;
    }
    let iterations: usize = std::env::var("AZP_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let now = Timestamp::now();
    let body = response(1000, 20, now);
    let specs = specs();
    let cluster = ClusterSnapshot::default();
    let parsed: ListResponse<TaskAgentJobRequest> = serde_json::from_str(&body).expect("parse");
    let snapshot = ado_snapshot("linux", &parsed.value, &[], None);
    let check = plan::plan(&snapshot, &cluster, &specs, now);
    let rows = [
        measure("parse (serde, 1000 items)", iterations, || {
            serde_json::from_str::<ListResponse<TaskAgentJobRequest>>(&body).expect("parse")
        }),
        measure("snapshot (ADO models -> planner)", iterations, || {
            ado_snapshot("linux", &parsed.value, &[], None)
        }),
        measure("plan (3 AgentPools)", iterations, || {
            plan::plan(&snapshot, &cluster, &specs, now)
        }),
        measure("total: parse + snapshot + plan", iterations, || {
            let parsed: ListResponse<TaskAgentJobRequest> =
                serde_json::from_str(&body).expect("parse");
            let snapshot = ado_snapshot("linux", &parsed.value, &[], None);
            plan::plan(&snapshot, &cluster, &specs, now)
        }),
    ];
    println!(
        "planner: 1000-item jobrequests response ({} KiB, 980 finished, 20 waiting), {} creates; {iterations} iterations, profile {}",
        body.len() / 1024,
        check.creates().count(),
        if cfg!(debug_assertions) {
            "dev (debug: compare ratios)"
        } else {
            "optimized"
        }
    );
    println!("| phase | mean | p50 | p99 | allocations/iter | bytes allocated/iter |");
    println!("|---|---:|---:|---:|---:|---:|");
    for mut row in rows {
        row.times.sort();
        let mean = row.times.iter().sum::<Duration>() / row.times.len() as u32;
        let pct = |p: f64| row.times[((row.times.len() - 1) as f64 * p).round() as usize];
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} KiB |",
            row.name,
            mean.as_secs_f64() * 1e3,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            row.allocs,
            row.bytes / 1024
        );
    }
}
