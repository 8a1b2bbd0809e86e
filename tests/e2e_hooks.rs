//! End to end: with polling slowed down to an hour, an ADO service hook makes the controller create the
//! agent Job for a waiting request at once; a refused hook wakes nothing. Needs the local control plane
//! (`tests/cluster/up.sh`) and `cargo build --workspace --bins`.
//!
//! The assertions are about the order of events (no poll and no Job before the hook; a Job and a received
//! request after it, long before the next scheduled poll), never about speed.

use std::time::{Duration, Instant};

use azp_testbed::bed::{Bed, BedOptions, ORG, eventually};
use azp_testbed::sim::RequestSpec;

const SAMPLE: &str = include_str!("hooks_data/job-state-changed.json");
const TOKEN: &str = "e2e-hook-token";
const POLL_INTERVAL_SECS: u64 = 3600;
const DEADLINE: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn hook_metric(bed: &Bed, outcome: &str) -> Option<u64> {
    let text = bed.metrics_text().await?;
    let needle = format!("azp_autoscaler_hook_requests_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_hook_creates_the_agent_job_before_the_next_poll() {
    let token_dir = std::env::temp_dir().join(format!("azp-e2e-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).unwrap();
    let token_file = token_dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let hooks_addr = format!("127.0.0.1:{}", free_port());
    let mut opts = BedOptions::new("e2e-hooks");
    opts.controller_args = vec![
        "--hooks-addr".into(),
        hooks_addr.clone(),
        "--hooks-token-file".into(),
        token_file.display().to_string(),
    ];
    let bed = Bed::start(opts).await.expect("bed");
    let mut pool = bed.agentpool("linux", "linux", 5);
    pool["spec"]["pollIntervalSeconds"] = POLL_INTERVAL_SECS.into();
    bed.apply_agentpool(pool).await.expect("apply");

    // The first poll runs at once; after it the next scheduled one is an hour away.
    let first_poll = eventually("the first poll", DEADLINE, || async {
        (bed.sim.call_count("jobrequests.list") >= 1).then(Instant::now)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    let url = format!("http://{hooks_addr}/hooks/ado");
    let http = reqwest::Client::new();
    eventually("the hook endpoint listens", DEADLINE, || async {
        http.get(format!("http://{hooks_addr}/healthz"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    // Let the first poll finish (placeholder, status) so the quiet period below is really between polls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let polls_before = bed.sim.call_count("jobrequests.list");

    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(1)),
        )
        .expect("queue");

    // A hook with a wrong token is refused and wakes nothing.
    let refused = http
        .post(&url)
        .header("x-azp-hook-token", "wrong")
        .header("content-type", "application/json")
        .body(SAMPLE)
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status().as_u16(), 401);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        bed.sim.call_count("jobrequests.list"),
        polls_before,
        "no poll without an accepted hook\n{}",
        bed.controller_logs()
    );
    assert!(
        bed.jobs().await.expect("jobs").is_empty(),
        "no agent Job before the hook"
    );

    let accepted = http
        .post(&url)
        .header("x-azp-hook-token", TOKEN)
        .header("content-type", "application/json; charset=utf-8")
        .body(SAMPLE)
        .send()
        .await
        .expect("post");
    assert_eq!(accepted.status().as_u16(), 202);
    let hooked = Instant::now();

    eventually("an agent Job after the hook", DEADLINE, || async {
        (!bed.jobs().await.ok()?.is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.controller_logs()));
    let received = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.receive_time.is_some())
        .await
        .expect("request");
    assert!(
        received.receive_time.is_some(),
        "the request was received: {received:?}\n{}",
        bed.controller_logs()
    );
    // All of it happened before the next scheduled poll could have run.
    assert!(
        hooked.elapsed() < first_poll.elapsed()
            && first_poll.elapsed() < Duration::from_secs(POLL_INTERVAL_SECS),
        "the Job came from the hook's wake-up, not from a scheduled poll"
    );
    assert!(bed.sim.call_count("jobrequests.list") > polls_before);
    assert_eq!(hook_metric(&bed, "accepted").await, Some(1));
    assert_eq!(hook_metric(&bed, "unauthorized").await, Some(1));
    bed.teardown().await;
    let _ = std::fs::remove_dir_all(&token_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_hooks_flow_polling_slows_down_and_a_hook_still_scales_up_at_once() {
    let token_dir = std::env::temp_dir().join(format!("azp-e2e-hooks-slow-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).unwrap();
    let token_file = token_dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let hooks_addr = format!("127.0.0.1:{}", free_port());
    let mut opts = BedOptions::new("e2e-hooks-slow");
    opts.controller_args = vec![
        format!("--hooks-addr={hooks_addr}"),
        format!("--hooks-token-file={}", token_file.display()),
        // Hooks flow: poll every hour instead of every second, for 10 minutes after the last hook.
        "--hooks-poll-interval-seconds=3600".into(),
        "--hooks-poll-window-seconds=600".into(),
    ];
    let bed = Bed::start(opts).await.expect("bed");
    let mut pool = bed.agentpool("linux", "linux", 5);
    pool["spec"]["pollIntervalSeconds"] = 1.into();
    bed.apply_agentpool(pool).await.expect("apply");
    bed.wait_ready("linux").await;
    let fail = |e: String| -> ! { panic!("{e}\n{}", bed.controller_logs()) };

    // No hook yet: polling every second.
    let polls = || bed.sim.call_count("jobrequests.list");
    let before = polls();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let without_hooks = polls() - before;
    assert!(
        without_hooks >= 3,
        "polling every second before any hook: {without_hooks} polls in 5 s"
    );

    // A hook: one poll at once, then the hour-long interval.
    let url = format!("http://{hooks_addr}/hooks/ado");
    let http = reqwest::Client::new();
    let post = || {
        http.post(&url)
            .header("x-azp-hook-token", TOKEN)
            .header("content-type", "application/json")
            .body(SAMPLE)
            .send()
    };
    let accepted = post().await.expect("post");
    assert!(accepted.status().is_success(), "{}", accepted.status());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_hook = polls();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let while_flowing = polls() - after_hook;
    assert!(
        while_flowing <= 1,
        "while hooks flow the 1 s polling waits for the next hook: {while_flowing} polls in 5 s"
    );

    // A waiting request and its hook: the agent Job is created at once, without a scheduled poll.
    let id = bed
        .sim
        .queue(
            ORG,
            "linux",
            RequestSpec::new().duration(Duration::from_secs(1)),
        )
        .expect("queue");
    let accepted = post().await.expect("post");
    assert!(accepted.status().is_success(), "{}", accepted.status());
    let done = bed
        .sim
        .wait_request(ORG, id, DEADLINE, |r| r.result.is_some())
        .await
        .unwrap_or_else(|e| fail(e.to_string()));
    assert_eq!(done.result.as_deref(), Some("succeeded"), "{done:?}");
    let _ = std::fs::remove_dir_all(&token_dir);
    bed.teardown().await;
}
