//! Measurements of the simulator itself (not a timed test: it prints figures and asserts only
//! correctness). Run: `cargo test -p azp-testbed --test sim_bench -- --ignored --nocapture`.

mod sim_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use azp_testbed::sim::{ADO_SCOPE, RequestSpec, SimConfig, Simulator};
use reqwest::StatusCode;
use sim_support::*;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_simulator() {
    // Start-up (TLS: CA + leaf; the access-token RSA key is made once per process).
    let t = Instant::now();
    let first = Simulator::start(SimConfig::default()).await.unwrap();
    let first_start = t.elapsed();
    let t = Instant::now();
    for _ in 0..5 {
        let _s = Simulator::start(SimConfig::default()).await.unwrap();
    }
    println!(
        "start: first {:.1} ms (incl. RSA key), then {:.1} ms each",
        ms(first_start),
        ms(t.elapsed()) / 5.0
    );
    drop(first);

    let b = Arc::new(
        bed_with(
            SimConfig {
                long_poll_secs: 5,
                ..SimConfig::default()
            },
            |o| o.parallel_jobs(1000),
        )
        .await,
    );

    // Token exchange latency (sequential, HTTPS, keep-alive).
    let sa = b
        .issuer
        .sa_token("agents", "azp-agent", Duration::from_secs(600));
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        let r = b
            .http
            .post(b.sim.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", b.client_id.as_str()),
                ("scope", ADO_SCOPE),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", sa.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    println!(
        "token exchange: {:.2} ms mean over {n}",
        ms(t.elapsed()) / f64::from(n)
    );

    // Full agent cycle: 50 agents come online (RSA key, register, OAuth, session), then 500
    // requests are queued and served (poll, ack, finish).
    let t = Instant::now();
    let ready = Arc::new(tokio::sync::Barrier::new(51));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (b, ready) = (b.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut a = b.online(&format!("worker-{i}"), &[]).await;
            ready.wait().await;
            let mut served = 0u32;
            while let Some(m) = a.poll(&b).await {
                a.ack(&b, m.message_id).await;
                let r = a.finish(&b, &m, "succeeded").await;
                assert_eq!(r.status, StatusCode::OK);
                served += 1;
            }
            served
        }));
    }
    ready.wait().await;
    println!(
        "50 agents online (register, agent OAuth, session; one shared test key): {:.0} ms",
        ms(t.elapsed())
    );
    let t = Instant::now();
    for _ in 0..500 {
        b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    }
    println!(
        "queue 500 requests in-process (50 agents online, engine runs per call): {:.1} ms",
        ms(t.elapsed())
    );
    let t = Instant::now();
    for _ in 0..20 {
        let r = b
            .get(&format!(
                "pools/{}/jobrequests?completedRequestCount=0",
                b.pool_id
            ))
            .await;
        assert!(r.status.is_success());
    }
    println!(
        "GET jobrequests (≤500 unfinished, HTTPS, while serving): {:.2} ms mean over 20",
        ms(t.elapsed()) / 20.0
    );
    let last = b
        .sim
        .requests(ORG, POOL)
        .unwrap()
        .iter()
        .map(|r| r.request_id)
        .max()
        .unwrap();
    let done = b
        .sim
        .wait_request(ORG, last, Duration::from_secs(120), |r| r.is_finished())
        .await
        .unwrap();
    assert!(done.is_finished());
    let all_done = loop {
        let reqs = b.sim.requests(ORG, POOL).unwrap();
        if reqs.iter().all(|r| r.is_finished()) {
            break reqs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = t.elapsed();
    assert!(
        all_done
            .iter()
            .all(|r| r.result.as_deref() == Some("succeeded"))
    );
    println!(
        "500 requests served by 50 agents (poll, ack, finish over HTTPS): {:.0} ms after queueing",
        ms(took)
    );
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 500);
    println!(
        "calls counted: {}",
        b.sim.calls().iter().map(|c| c.count).sum::<u64>()
    );
}
