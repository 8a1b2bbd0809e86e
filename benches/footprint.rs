//! Benchmark (issue 7, item 5) on the test bed: the controller process's memory (RSS, peak RSS) and CPU
//! while idle, with 1 and with 50 AgentPools (each on its own ADO pool: 50 poll tasks, the worst case for
//! the call budget; polling every 5 s). Figures are printed, never asserted.
//!
//! Needs the control plane (`tests/cluster/up.sh`, `KUBECONFIG`) and `cargo build --workspace --bins`
//! (a debug controller: its figures are above a release build's). `cargo bench --profile dev --bench
//! footprint`; `AZP_BENCH_IDLE_SECS` (60) sets the measured window.

use std::time::{Duration, Instant};

use azp_testbed::bed::{Bed, BedOptions, eventually};

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of the process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name and state.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn measure(pools: usize, window: u64) -> (f64, f64, f64, f64, String) {
    let mut opts = BedOptions::new("bench-footprint");
    opts.ado_pools = (0..pools).map(|i| format!("pool{i}")).collect();
    let bed = Bed::start(opts).await.expect("bed");
    for i in 0..pools {
        let mut pool = bed.agentpool(&format!("p{i}"), &format!("pool{i}"), 10);
        pool["spec"]["pollIntervalSeconds"] = 5.into();
        bed.apply_agentpool(pool).await.expect("apply");
    }
    eventually(
        "every ADO pool polled",
        Duration::from_secs(180),
        || async { (bed.sim.call_count("jobrequests.list") >= pools as u64).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    // Let placeholders and statuses settle before measuring the steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = bed
        .controller
        .as_ref()
        .and_then(|c| c.id())
        .expect("controller pid");
    bed.sim.reset_calls();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid).expect("stat");
    tokio::time::sleep(Duration::from_secs(window)).await;
    let cpu = (cpu_ticks(pid).expect("stat") - c0) as f64 / clock_ticks();
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = proc_field(pid, "status", "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let peak = proc_field(pid, "status", "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let mut by_endpoint = std::collections::BTreeMap::<String, u64>::new();
    for c in bed.sim.calls() {
        *by_endpoint.entry(c.endpoint.clone()).or_default() += c.count;
    }
    bed.teardown().await;
    let per_5min = |n: u64| n as f64 * 300.0 / elapsed;
    let calls = per_5min(by_endpoint.values().sum());
    let mix = by_endpoint
        .iter()
        .map(|(e, n)| format!("{e} {:.0}", per_5min(*n) / pools as f64))
        .collect::<Vec<_>>()
        .join(", ");
    (rss, peak, 100.0 * cpu / elapsed, calls, mix)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "a benchmark: run it with `cargo bench --profile dev --bench {}`",
            env!("CARGO_CRATE_NAME")
        );
        return;
    }
    azp_testbed::install_crypto_provider();
    let window = std::env::var("AZP_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    println!(
        "footprint: controller process (debug build), idle, polling every 5 s, {window} s window"
    );
    println!(
        "| AgentPools (each its own ADO pool) | RSS MiB | peak RSS MiB | CPU % of one core | ADO calls / 5 min | per ADO pool per 5 min, by endpoint |"
    );
    println!("|---:|---:|---:|---:|---:|---|");
    for pools in [1, 50] {
        let (rss, peak, cpu, calls, mix) = measure(pools, window).await;
        println!("| {pools} | {rss:.1} | {peak:.1} | {cpu:.2} | {calls:.0} | {mix} |");
    }
}
