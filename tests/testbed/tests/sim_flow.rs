//! The agent-side flow and ADO's assignment semantics in the simulator: sessions, long poll, ack,
//! lock renewal, finish, the "no agent found" rule, parallel slots, assignment orders, cancellation.

mod sim_support;

use std::time::Duration;

use azp_testbed::sim::{AssignmentOrder, RequestSpec, SimConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sim_support::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn register_session_job_message_ack_renew_finish_and_readback() {
    let b = bed_with(quick(), |o| o).await;
    let mut a = b.register("agent-1", &[("docker", "")]).await;
    a.login(&b).await;
    let listed = b
        .get(&format!("pools/{}/agents?agentName=agent-1", b.pool_id))
        .await
        .json();
    assert_eq!(listed["value"][0]["status"], "offline");
    let s = a.open_session(&b).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text);
    assert_eq!(s.json()["agent"]["id"], a.id);
    let listed = b
        .get(&format!("pools/{}/agents?agentName=agent-1", b.pool_id))
        .await
        .json();
    assert_eq!(
        listed["value"][0]["status"], "online",
        "online while a session exists"
    );
    let dup = a.open_session(&b).await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "one session per agent");

    // Nothing queued: the long poll ends empty.
    assert!(a.poll(&b).await.is_none());

    let id = b
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new()
                .demand("DOCKER")
                .duration(Duration::from_millis(1500))
                .probe(),
        )
        .unwrap();
    let job = a.take_job(&b, WAIT).await;
    assert_eq!(job.kind, "PipelineAgentJobRequest");
    assert_eq!(job.body["requestId"], id);
    assert_eq!(
        job.body["workload"],
        json!({ "durationMs": 1500, "result": "succeeded", "probe": true })
    );
    assert!(job.body["lockToken"].as_str().is_some());
    assert!(job.body["jobId"].as_str().is_some());

    let r = b.sim.request(ORG, id).unwrap();
    assert!(r.assign_time.is_some() && r.receive_time.is_some() && r.finish_time.is_none());
    assert_eq!(r.agent_name.as_deref(), Some("agent-1"));
    let wire = b
        .get(&format!("pools/{}/jobrequests/{id}", b.pool_id))
        .await
        .json();
    assert_eq!(wire["reservedAgent"]["name"], "agent-1");
    assert!(wire["lockedUntil"].as_str().is_some());
    let agent = b
        .get(&format!(
            "pools/{}/agents/{}?includeAssignedRequest=true",
            b.pool_id, a.id
        ))
        .await
        .json();
    assert_eq!(agent["assignedRequest"]["requestId"], id);

    let lock = job.body["lockToken"].as_str().unwrap();
    let renew = a
        .patch_request(&b, id, lock, json!({ "requestId": id }))
        .await;
    assert_eq!(renew.status, StatusCode::OK, "{}", renew.text);
    assert!(renew.json().get("finishTime").is_none());
    let wrong_lock = a
        .patch_request(&b, id, "not-the-lock", json!({ "requestId": id }))
        .await;
    assert_eq!(wrong_lock.status, StatusCode::CONFLICT);

    // The probe step's report.
    let rep = b
        .http
        .post(format!("{}/_testbed/requests/{id}/report", b.sim.org_url(ORG)))
        .json(&json!({ "env": { "PATH": "/bin" }, "argv": ["step"], "readable": { "/var/run/secrets/token": false } }))
        .send()
        .await
        .unwrap();
    assert_eq!(rep.status(), StatusCode::OK);
    let reports = b.sim.reports(id);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].body["env"]["PATH"], "/bin");

    let fin = a.finish(&b, &job, "failed").await;
    assert_eq!(fin.status, StatusCode::OK, "{}", fin.text);
    assert_eq!(fin.json()["result"], "failed");
    let r = b.sim.request(ORG, id).unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"));
    assert!(r.finish_time.is_some());
    let agents = b.sim.agents(ORG, POOL).unwrap();
    assert_eq!(agents[0].assigned_request, None);
    assert_eq!(agents[0].last_completed_request, Some(id));

    assert_eq!(a.close_session(&b).await, StatusCode::NO_CONTENT);
    assert!(
        !b.sim.agents(ORG, POOL).unwrap()[0].online,
        "offline once the session is gone"
    );
    // The agent's token cannot do user things.
    let r = b
        .call(
            Method::GET,
            &b.url(&format!("pools/{}/agents", b.pool_id)),
            Some(&a.bearer()),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // User tokens cannot open agent sessions.
    let r = b
        .send(
            Method::POST,
            &format!("pools/{}/sessions", b.pool_id),
            json!({ "agent": { "id": a.id } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_waiting_long_poll_wakes_when_a_job_is_assigned() {
    let b = bed_with(
        SimConfig {
            long_poll_secs: 30,
            ..SimConfig::default()
        },
        |o| o,
    )
    .await;
    let mut a = b.online("a", &[]).await;
    let sim_queue = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap()
    };
    let (msg, id) = tokio::join!(a.poll(&b), sim_queue);
    let msg = msg.expect("the poll returns the job, not a timeout");
    assert_eq!(msg.body["requestId"], id);
}

#[tokio::test]
async fn no_agent_found_fails_at_once_and_when_the_last_matching_agent_is_deleted() {
    let b = bed_with(quick(), |o| o).await;
    let id = b
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new()
                .demand("java")
                .demand("Agent.OS -equals Linux"),
        )
        .unwrap();
    let r = b.sim.request(ORG, id).unwrap();
    assert_eq!(r.result.as_deref(), Some("failed"));
    assert!(r.finish_time.is_some());
    assert_eq!(
        r.status_message.as_deref(),
        Some(
            "No agent found in pool linux which satisfies the specified demands: java, Agent.OS -equals Linux"
        )
    );

    // An offline, even disabled, matching agent keeps requests queueable (the placeholder trick).
    let placeholder = b
        .register("placeholder", &[("java", ""), ("Agent.OS", "linux")])
        .await;
    b.send(
        Method::PATCH,
        &format!("pools/{}/agents/{}", b.pool_id, placeholder.id),
        json!({ "enabled": false }),
    )
    .await;
    let waiting = b
        .sim
        .queue(ORG, POOL, RequestSpec::new().demand("java"))
        .unwrap();
    let other = b
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().demand("Agent.Version -gtVersion 4.0"),
        )
        .unwrap();
    assert!(b.sim.request(ORG, waiting).unwrap().finish_time.is_none());
    assert!(
        b.sim.request(ORG, other).unwrap().finish_time.is_none(),
        "Agent.Version comes from the agent's version"
    );

    let del = b
        .call(
            Method::DELETE,
            &b.url(&format!("pools/{}/agents/{}", b.pool_id, placeholder.id)),
            Some(&b.bearer()),
            None,
        )
        .await;
    assert!(del.status.is_success());
    let r = b.sim.request(ORG, waiting).unwrap();
    assert_eq!(
        r.result.as_deref(),
        Some("failed"),
        "deleting the last matching agent fails the waiting request"
    );
    assert!(
        r.status_message
            .unwrap()
            .starts_with("No agent found in pool linux")
    );
}

#[tokio::test]
async fn demands_route_requests_to_matching_agents_only() {
    let b = bed_with(quick(), |o| o).await;
    let mut plain = b.online("plain", &[]).await;
    let mut gpu = b.online("gpu", &[("GPU", "A100")]).await;
    let id = b
        .sim
        .queue(ORG, POOL, RequestSpec::new().demand("gpu -equals a100"))
        .unwrap();
    let job = gpu.take_job(&b, WAIT).await;
    assert_eq!(job.body["requestId"], id);
    assert!(
        plain.poll(&b).await.is_none(),
        "the agent without the capability gets nothing"
    );
    // A disabled agent gets nothing either.
    b.send(
        Method::PATCH,
        &format!("pools/{}/agents/{}", b.pool_id, plain.id),
        json!({ "enabled": false }),
    )
    .await;
    let id2 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    assert!(plain.poll(&b).await.is_none());
    assert!(b.sim.request(ORG, id2).unwrap().assign_time.is_none());
    b.send(
        Method::PATCH,
        &format!("pools/{}/agents/{}", b.pool_id, plain.id),
        json!({ "enabled": true }),
    )
    .await;
    assert_eq!(
        plain.take_job(&b, WAIT).await.body["requestId"],
        id2,
        "enabling assigns the waiting request"
    );
}

#[tokio::test]
async fn requests_beyond_the_parallel_jobs_wait_for_a_free_slot() {
    let b = bed_with(quick(), |o| o.parallel_jobs(1)).await;
    let mut a1 = b.online("a1", &[]).await;
    let mut a2 = b.online("a2", &[]).await;
    let r1 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let r2 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let job = a1.take_job(&b, WAIT).await;
    assert_eq!(job.body["requestId"], r1);
    assert!(
        a2.poll(&b).await.is_none(),
        "second request waits: no free parallel slot"
    );
    let waiting = b.sim.request(ORG, r2).unwrap();
    assert!(waiting.assign_time.is_none());
    assert!(
        waiting
            .status_message
            .unwrap()
            .contains("Current position in queue: 1")
    );
    // A public-tag request does not need a private slot.
    let public = b
        .sim
        .queue(ORG, POOL, RequestSpec::new().tag("Public"))
        .unwrap();
    assert_eq!(a2.take_job(&b, WAIT).await.body["requestId"], public);
    let pj = a2.finish(&b, &azp_support_job(public), "succeeded").await;
    assert_eq!(
        pj.status,
        StatusCode::CONFLICT,
        "a finish without the lock token is refused"
    );

    a1.finish(&b, &job, "succeeded").await;
    let next = tokio::select! {
        j = a1.take_job(&b, WAIT) => j,
        j = a2.take_job(&b, WAIT) => j,
    };
    assert_eq!(
        next.body["requestId"], r2,
        "the slot freed by r1 goes to r2"
    );
    assert!(b.sim.request(ORG, r2).unwrap().status_message.is_none());

    b.sim.set_parallel_jobs(ORG, 5).unwrap();
}

/// A job message stand-in without a lock token (to prove the lock is checked).
fn azp_support_job(request_id: u64) -> JobMessage {
    JobMessage {
        message_id: 0,
        kind: "PipelineAgentJobRequest".into(),
        body: json!({ "requestId": request_id, "lockToken": "" }),
    }
}

/// Two requests wait (no agent online), two agents come online one after the other; returns which
/// request each agent got.
async fn pairing(order: AssignmentOrder, batch: bool) -> (u64, u64, u64, u64) {
    let b = bed_with(quick(), |o| o).await;
    b.sim.set_assignment_order(order);
    let mut a1 = b.register("first", &[]).await;
    let mut a2 = b.register("second", &[]).await;
    a1.login(&b).await;
    a2.login(&b).await;
    let old = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let new = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    if batch {
        // Both agents online while no slot is free, then one slot opens: the order picks the agent.
        b.sim.set_parallel_jobs(ORG, 0).unwrap();
        a1.open_session(&b).await;
        a2.open_session(&b).await;
        b.sim.set_parallel_jobs(ORG, 1).unwrap();
        let got = b.sim.request(ORG, old).unwrap();
        let got_new = b.sim.request(ORG, new).unwrap();
        let winner = got.agent_id.or(got_new.agent_id).unwrap();
        let req = if got.agent_id.is_some() { old } else { new };
        return (old, new, u64::from(winner), req);
    }
    a1.open_session(&b).await;
    let j1 = a1.take_job(&b, WAIT).await;
    (
        old,
        new,
        j1.body["requestId"].as_u64().unwrap(),
        u64::from(a1.id),
    )
}

#[tokio::test]
async fn assignment_order_oldest_first_newest_request_first_newest_agent_first_and_random() {
    // oldest-first: the first agent online takes the oldest request.
    let (old, _new, got, _) = pairing(AssignmentOrder::OldestFirst, false).await;
    assert_eq!(got, old);
    // newest-request-first: it takes the newest one instead (not the one it was "started for").
    let (_old, new, got, _) = pairing(AssignmentOrder::NewestRequestFirst, false).await;
    assert_eq!(got, new);
    // With two free agents and one slot: oldest-first gives it to the first agent, newest-agent-first
    // to the second; both take the oldest request.
    let (old, _, winner_oldest, req) = pairing(AssignmentOrder::OldestFirst, true).await;
    assert_eq!(req, old);
    let (old2, _, winner_newest, req2) = pairing(AssignmentOrder::NewestAgentFirst, true).await;
    assert_eq!(req2, old2);
    assert_eq!(winner_oldest, 1, "oldest-first: the agent registered first");
    assert_eq!(
        winner_newest, 2,
        "newest-agent-first: the agent registered last"
    );
    // random: reproducible for a seed, and across seeds both requests get picked sometimes.
    let mut seen = std::collections::HashSet::new();
    for seed in 0..12u64 {
        let (old, _new, got, _) = pairing(AssignmentOrder::Random { seed }, false).await;
        seen.insert(got == old);
        let (old_again, _, got_again, _) = pairing(AssignmentOrder::Random { seed }, false).await;
        assert_eq!(got - old, got_again - old_again, "same seed, same choice");
    }
    assert_eq!(
        seen.len(),
        2,
        "random order picks both the old and the new request across seeds"
    );
}

#[tokio::test]
async fn cancel_queued_and_running_requests_with_a_forced_finish_after_the_timeout() {
    let b = bed_with(
        SimConfig {
            long_poll_secs: 2,
            cancel_timeout_secs: 1,
            ..SimConfig::default()
        },
        |o| o,
    )
    .await;
    let _offline = b.register("offline", &[]).await;
    let queued = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    b.sim.cancel(ORG, queued).unwrap();
    let r = b.sim.request(ORG, queued).unwrap();
    assert_eq!(r.result.as_deref(), Some("canceled"));
    assert!(r.cancel_requested);
    assert_eq!(
        b.sim.cancel(ORG, queued).unwrap_err().metric_label(),
        "already_finished"
    );

    let mut a = b.online("runner", &[]).await;
    let running = b
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(60)),
        )
        .unwrap();
    let job = a.take_job(&b, WAIT).await;
    b.sim.cancel(ORG, running).unwrap();
    let cancel = a.take_job(&b, WAIT).await;
    assert_eq!(cancel.kind, "JobCancellation");
    assert_eq!(cancel.body["jobId"], job.body["jobId"]);
    assert!(
        b.sim.request(ORG, running).unwrap().finish_time.is_none(),
        "the agent gets time to cancel"
    );
    // The agent ignores it: the simulator finishes the request after the cancel timeout.
    let r = b
        .sim
        .wait_request(ORG, running, WAIT, |r| r.is_finished())
        .await
        .unwrap();
    assert_eq!(r.result.as_deref(), Some("canceled"));
    assert_eq!(
        b.sim
            .agents(ORG, POOL)
            .unwrap()
            .iter()
            .find(|x| x.id == a.id)
            .unwrap()
            .assigned_request,
        None
    );

    // An agent that cancels in time reports the result itself.
    let second = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let job = a.take_job(&b, WAIT).await;
    assert_eq!(job.body["requestId"], second);
    b.sim.cancel(ORG, second).unwrap();
    let _ = a.take_job(&b, WAIT).await;
    assert_eq!(a.finish(&b, &job, "canceled").await.status, StatusCode::OK);
    assert_eq!(
        b.sim.request(ORG, second).unwrap().result.as_deref(),
        Some("canceled")
    );
}

#[tokio::test]
async fn deleting_an_agent_ends_its_session_and_abandons_its_job() {
    let b = bed_with(quick(), |o| o).await;
    let mut a = b.online("doomed", &[]).await;
    let id = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    a.take_job(&b, WAIT).await;
    let del = b
        .call(
            Method::DELETE,
            &b.url(&format!("pools/{}/agents/{}", b.pool_id, a.id)),
            Some(&b.bearer()),
            None,
        )
        .await;
    assert!(del.status.is_success());
    assert_eq!(
        b.sim.request(ORG, id).unwrap().result.as_deref(),
        Some("abandoned")
    );
    let r = b
        .call(
            Method::GET,
            &b.url(&format!(
                "pools/{}/messages?sessionId={}",
                b.pool_id, a.session
            )),
            Some(&a.bearer()),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the deleted agent's token is revoked"
    );
}

#[tokio::test]
async fn an_unreceived_assignment_returns_to_the_queue_when_the_session_ends() {
    let b = bed_with(quick(), |o| o).await;
    let mut a = b.online("flaky", &[]).await;
    let id = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    assert!(b.sim.request(ORG, id).unwrap().is_assigned());
    assert_eq!(a.close_session(&b).await, StatusCode::NO_CONTENT);
    let r = b.sim.request(ORG, id).unwrap();
    assert!(
        !r.is_assigned() && !r.is_finished(),
        "back in the queue: {r:?}"
    );
    let mut other = b.online("steady", &[]).await;
    assert_eq!(other.take_job(&b, WAIT).await.body["requestId"], id);
}

#[tokio::test]
async fn delayed_requests_appear_later_and_burst_of_500_is_served() {
    let b = bed_with(quick(), |o| o.parallel_jobs(1000)).await;
    let later = b
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().delay(Duration::from_millis(300)),
        )
        .unwrap();
    assert!(b.sim.request(ORG, later).unwrap().queue_time.is_none());
    assert!(
        b.sim.requests(ORG, POOL).unwrap().is_empty(),
        "not visible before its time"
    );
    let r = b
        .sim
        .wait_request(ORG, later, WAIT, |r| r.queue_time.is_some())
        .await
        .unwrap();
    assert_eq!(
        r.result.as_deref(),
        Some("failed"),
        "no agent at all: fails once it appears"
    );

    let _placeholder = b.register("placeholder", &[]).await;
    let ids: Vec<u64> = (0..500)
        .map(|_| b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap())
        .collect();
    let open = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=0",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(open["count"], 500);
    let mut agents = Vec::new();
    for i in 0..20 {
        agents.push(b.online(&format!("burst-{i}"), &[]).await);
    }
    let assigned = b
        .sim
        .requests(ORG, POOL)
        .unwrap()
        .iter()
        .filter(|r| r.is_assigned())
        .count();
    assert_eq!(assigned, 20, "each online agent holds exactly one request");
    assert!(ids.len() == 500);
}

#[tokio::test]
async fn control_surface_over_http() {
    let b = bed_with(quick(), |o| o).await;
    let ctl = format!("{}/_testbed", b.sim.ado_url());
    let info: serde_json::Value = b.http.get(&ctl).send().await.unwrap().json().await.unwrap();
    assert_eq!(info["tenantId"], b.sim.tenant_id());
    let r = b.http.post(format!("{ctl}/orgs")).json(&json!({ "name": "fabrikam", "parallelJobs": 3, "pools": [{ "name": "p" }], "members": [b.oid] })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = b
        .http
        .post(format!("{ctl}/orgs/fabrikam/pools"))
        .json(&json!({ "name": "q" }))
        .send()
        .await
        .unwrap();
    assert!(
        r.json::<serde_json::Value>().await.unwrap()["id"]
            .as_u64()
            .is_some()
    );
    b.sim.add_pool(ORG, "second").unwrap();
    let r = b
        .http
        .post(format!("{ctl}/orgs/{ORG}/pools/{POOL}/requests"))
        .json(&json!({ "demands": [], "workload": { "durationMs": 5 }, "count": 3 }))
        .send()
        .await
        .unwrap();
    let ids = r.json::<serde_json::Value>().await.unwrap()["requestIds"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(ids.len(), 3);
    let list: Vec<azp_testbed::sim::RequestInfo> = b
        .http
        .get(format!("{ctl}/orgs/{ORG}/pools/{POOL}/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 3);
    assert!(
        list.iter().all(|r| r.result.as_deref() == Some("failed")),
        "no agents: all failed at once"
    );
    let r = b
        .http
        .post(format!("{ctl}/faults"))
        .json(
            &json!({ "class": "pools", "kind": { "serverError": { "status": 502 } }, "count": 1 }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(b.get("pools").await.status, StatusCode::BAD_GATEWAY);
    let r = b
        .http
        .put(format!("{ctl}/settings"))
        .json(&json!({ "assignmentOrder": { "random": { "seed": 3 } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let calls: Vec<azp_testbed::sim::CallCount> = b
        .http
        .get(format!("{ctl}/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        calls
            .iter()
            .any(|c| c.endpoint == "pools.list" && c.status == 502)
    );
    let r = b
        .http
        .get(format!("{ctl}/orgs/nope/pools/x/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let tok: serde_json::Value = b
        .http
        .post(format!("{ctl}/tokens"))
        .json(&json!({ "clientId": b.client_id, "objectId": b.oid }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = tok["accessToken"].as_str().unwrap();
    assert_eq!(
        b.call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {t}")),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_job_whose_lock_is_not_renewed_is_abandoned() {
    let b = bed_with(
        SimConfig {
            long_poll_secs: 1,
            lock_secs: 1,
            ..SimConfig::default()
        },
        |o| o,
    )
    .await;
    let mut quiet = b.online("quiet", &[]).await;
    let mut diligent = b.online("diligent", &[]).await;
    let r1 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let r2 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let j1 = quiet.take_job(&b, WAIT).await;
    let j2 = diligent.take_job(&b, WAIT).await;
    let (quiet_req, diligent_req) = (
        j1.body["requestId"].as_u64().unwrap(),
        j2.body["requestId"].as_u64().unwrap(),
    );
    assert_eq!(
        [quiet_req.min(diligent_req), quiet_req.max(diligent_req)],
        [r1, r2]
    );
    let lock = j2.body["lockToken"].as_str().unwrap().to_owned();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let renew = diligent
            .patch_request(
                &b,
                diligent_req,
                &lock,
                json!({ "requestId": diligent_req }),
            )
            .await;
        assert_eq!(renew.status, StatusCode::OK, "{}", renew.text);
    }
    let abandoned = b.sim.request(ORG, quiet_req).unwrap();
    assert_eq!(
        abandoned.result.as_deref(),
        Some("abandoned"),
        "{abandoned:?}"
    );
    assert!(
        b.sim
            .request(ORG, diligent_req)
            .unwrap()
            .finish_time
            .is_none(),
        "renewed lock keeps the job"
    );
    assert_eq!(
        b.sim
            .agents(ORG, POOL)
            .unwrap()
            .iter()
            .find(|a| a.id == quiet.id)
            .unwrap()
            .assigned_request,
        None
    );
}

#[tokio::test]
async fn parallel_jobs_are_counted_across_the_pools_of_the_organization() {
    let b = bed_with(quick(), |o| o.parallel_jobs(1).pool("windows")).await;
    let mut linux = b.online("linux-agent", &[]).await;
    // An agent of the second pool, registered through the same helpers.
    let win_pool = b.sim.pool_id(ORG, "windows").unwrap();
    let key = shared_key();
    let r = b
        .send(
            Method::POST,
            &format!("pools/{win_pool}/agents"),
            json!({ "name": "win-agent", "version": "4.261.0", "authorization": { "publicKey": key.public_key_json() } }),
        )
        .await;
    let v = r.json();
    let mut win = TestAgent {
        id: v["id"].as_u64().unwrap() as u32,
        name: "win-agent".into(),
        client_id: v["authorization"]["clientId"].as_str().unwrap().into(),
        auth_url: v["authorization"]["authorizationUrl"]
            .as_str()
            .unwrap()
            .into(),
        key,
        token: String::new(),
        session: String::new(),
        pool_id: win_pool,
        last_message: None,
    };
    win.login(&b).await;
    assert_eq!(win.open_session(&b).await.status, StatusCode::OK);
    let r1 = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    let r2 = b.sim.queue(ORG, "windows", RequestSpec::new()).unwrap();
    let job = linux.take_job(&b, WAIT).await;
    assert_eq!(job.body["requestId"], r1);
    assert!(
        win.poll(&b).await.is_none(),
        "the org's only slot is taken by the other pool's job"
    );
    assert!(!b.sim.request(ORG, r2).unwrap().is_assigned());
    linux.finish(&b, &job, "succeeded").await;
    assert_eq!(win.take_job(&b, WAIT).await.body["requestId"], r2);
}

#[tokio::test]
async fn completed_request_count_limits_history_and_agents_filter_by_demands() {
    let b = bed_with(quick(), |o| o).await;
    let _a = b
        .register("java-agent", &[("java", "17"), ("Agent.OS", "Linux")])
        .await;
    let _c = b.register("plain-agent", &[("Agent.OS", "Linux")]).await;
    let ids: Vec<u64> = (0..4)
        .map(|_| b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap())
        .collect();
    for id in &ids[..3] {
        b.sim.cancel(ORG, *id).unwrap();
    }
    let v = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=2",
            b.pool_id
        ))
        .await
        .json();
    let got: Vec<u64> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requestId"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        vec![ids[3], ids[2], ids[1]],
        "the unfinished one plus the two newest finished"
    );
    let v = b
        .get(&format!(
            "pools/{}/agents?demands=java,Agent.OS%20-equals%20linux",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(v["count"], 1);
    assert_eq!(v["value"][0]["name"], "java-agent");
}
