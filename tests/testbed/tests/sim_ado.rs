//! ADO REST surface of the simulator: shapes, status codes, authentication, permissions, rate
//! limits and faults — driven with plain reqwest over HTTPS with the simulator's test CA.

mod sim_support;

use std::time::Duration;

use azp_testbed::sim::{
    EndpointClass, Fault, FaultKind, PoolRole, RateLimitConfig, RequestSpec, SimConfig,
};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sim_support::*;

#[tokio::test]
async fn api_version_is_required_on_every_call_query_or_accept_header() {
    let b = bed().await;
    let no_version = format!("{}/_apis/distributedtask/pools", b.sim.org_url(ORG));
    let r = b
        .call(Method::GET, &no_version, Some(&b.bearer()), None)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("No api-version was supplied"),
        "{}",
        r.text
    );
    // The official agent sends it in the Accept header.
    let r = b
        .http
        .get(&no_version)
        .header("authorization", b.bearer())
        .header("accept", "application/json; api-version=7.1-preview.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = b.get("pools?api-version=bogus").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "first api-version wins: {}",
        r.text
    );
}

#[tokio::test]
async fn pools_by_name_by_id_and_404() {
    let b = bed().await;
    b.sim.add_pool(ORG, "windows").unwrap();
    let r = b.get("pools?poolName=LINUX").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["count"], 1);
    let p = &v["value"][0];
    assert_eq!(p["name"], POOL);
    assert_eq!(p["id"], b.pool_id);
    assert_eq!(p["isHosted"], false);
    assert_eq!(p["poolType"], "automation");
    let r = b.get("pools?poolName=nope").await;
    assert_eq!(r.json()["count"], 0);
    assert_eq!(b.get("pools").await.json()["count"], 2);
    let r = b.get(&format!("pools/{}", b.pool_id)).await;
    assert_eq!(r.json()["name"], POOL);
    let r = b.get("pools/999").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["typeKey"], "TaskAgentPoolNotFoundException");
}

#[tokio::test]
async fn unauthenticated_expired_forged_and_wrong_audience_tokens_get_401_with_www_authenticate() {
    let b = bed().await;
    let url = b.url("pools");
    let none = b.call(Method::GET, &url, None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(
        none.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );

    let expired = b
        .sim
        .mint_access_token(&b.client_id, &b.oid, Duration::ZERO);
    let r = b
        .call(Method::GET, &url, Some(&format!("Bearer {expired}")), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.json()["message"].as_str().unwrap().contains("expired"),
        "{}",
        r.text
    );
    assert!(r.header("www-authenticate").is_some());

    // Same claims, signed by a key the simulator never issued.
    let forged = b.issuer.sign(&json!({
        "aud": azp_testbed::sim::ADO_RESOURCE_ID, "iss": "x", "iat": 0, "nbf": 0, "exp": 4_000_000_000i64,
        "oid": b.oid, "tid": b.sim.tenant_id(), "appid": b.client_id, "azp": b.client_id, "sub": b.oid,
        "ver": "2.0", "idtyp": "app",
    }));
    let r = b
        .call(Method::GET, &url, Some(&format!("Bearer {forged}")), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.json()["message"].as_str().unwrap().contains("signature"),
        "{}",
        r.text
    );

    let r = b
        .call(Method::GET, &url, Some("Bearer not-a-jwt"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Signed by the simulator's own key, but for another resource.
    let wrong_aud = b.sim.sign_claims(&json!({
        "aud": "https://graph.microsoft.com", "iss": "x", "iat": 0, "nbf": 0, "exp": 4_000_000_000i64,
        "oid": b.oid, "tid": b.sim.tenant_id(), "appid": b.client_id, "azp": b.client_id, "sub": b.oid,
        "ver": "2.0", "idtyp": "app",
    }));
    let r = b
        .call(
            Method::GET,
            &url,
            Some(&format!("Bearer {wrong_aud}")),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.json()["message"].as_str().unwrap().contains("audience"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn identity_not_in_the_org_gets_401_tf401444_and_missing_pool_role_gets_403() {
    let b = bed().await;
    let stranger = b.sim.mint_access_token(
        "other-app",
        "00000000-0000-0000-0000-00000000abcd",
        Duration::from_secs(60),
    );
    let r = b
        .call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {stranger}")),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.json()["message"].as_str().unwrap().contains("TF401444"),
        "{}",
        r.text
    );

    b.sim.remove_member(ORG, &b.oid).unwrap();
    let r = b.get("pools").await;
    assert!(r.text.contains("TF401444"));
    b.sim.add_member(ORG, &b.oid).unwrap();

    b.sim
        .set_pool_role(ORG, POOL, &b.oid, PoolRole::Reader)
        .unwrap();
    assert_eq!(
        b.get(&format!("pools/{}/agents", b.pool_id)).await.status,
        StatusCode::OK
    );
    let key = azp_testbed::sim::testing::AgentKey::new().unwrap();
    let r = b
        .send(
            Method::POST,
            &format!("pools/{}/agents", b.pool_id),
            json!({ "name": "a1", "version": "4.0.0", "authorization": { "publicKey": key.public_key_json() } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.json()["message"].as_str().unwrap().contains("Manage"),
        "{}",
        r.text
    );

    b.sim
        .set_pool_role(ORG, POOL, &b.oid, PoolRole::None)
        .unwrap();
    assert_eq!(
        b.get(&format!("pools/{}/jobrequests", b.pool_id))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        b.get("pools?poolName=linux").await.json()["count"],
        0,
        "a pool without access is not listed"
    );
}

#[tokio::test]
async fn pats_work_as_basic_and_bearer_for_azure_devops_server_mode() {
    let b = bed().await;
    b.sim.add_pat(ORG, "pat-secret-value", &b.oid).unwrap();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(":pat-secret-value")
    );
    assert_eq!(
        b.call(Method::GET, &b.url("pools"), Some(&basic), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        b.call(
            Method::GET,
            &b.url("pools"),
            Some("Bearer pat-secret-value"),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    // `config.sh --auth pat --token <Entra token>` sends the access token as the Basic password.
    let entra_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(":{}", b.token))
    );
    assert_eq!(
        b.call(Method::GET, &b.url("pools"), Some(&entra_basic), None)
            .await
            .status,
        StatusCode::OK
    );
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(":nope")
    );
    assert_eq!(
        b.call(Method::GET, &b.url("pools"), Some(&wrong), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn agents_add_list_get_update_replace_delete() {
    let b = bed().await;
    let a = b
        .register("agent-1", &[("Agent.OS", "Linux"), ("docker", "")])
        .await;
    let key2 = azp_testbed::sim::testing::AgentKey::new().unwrap();
    let dup = b
        .send(
            Method::POST,
            &format!("pools/{}/agents", b.pool_id),
            json!({ "name": "AGENT-1", "version": "4.0.0", "authorization": { "publicKey": key2.public_key_json() } }),
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    let nokey = b
        .send(
            Method::POST,
            &format!("pools/{}/agents", b.pool_id),
            json!({ "name": "x" }),
        )
        .await;
    assert_eq!(nokey.status, StatusCode::BAD_REQUEST);
    assert!(nokey.text.contains("publicKey"));

    let r = b
        .get(&format!("pools/{}/agents?agentName=agent-1", b.pool_id))
        .await;
    let v = r.json();
    assert_eq!(v["count"], 1);
    assert_eq!(v["value"][0]["status"], "offline");
    assert!(
        v["value"][0].get("systemCapabilities").is_none(),
        "capabilities only on request"
    );
    let r = b
        .get(&format!(
            "pools/{}/agents?agentName=agent-1&includeCapabilities=true",
            b.pool_id
        ))
        .await;
    assert_eq!(
        r.json()["value"][0]["systemCapabilities"]["Agent.OS"],
        "Linux"
    );

    let r = b
        .send(
            Method::PATCH,
            &format!("pools/{}/agents/{}", b.pool_id, a.id),
            json!({ "id": a.id, "enabled": false, "userCapabilities": { "gpu": "1" } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g = b
        .get(&format!(
            "pools/{}/agents/{}?includeCapabilities=true",
            b.pool_id, a.id
        ))
        .await
        .json();
    assert_eq!(g["enabled"], false);
    assert_eq!(g["userCapabilities"]["gpu"], "1");

    // --replace: PUT takes the agent over with a new key; the id stays, the old key stops working.
    let r = b
        .send(
            Method::PUT,
            &format!("pools/{}/agents/{}", b.pool_id, a.id),
            json!({ "id": a.id, "name": "agent-1", "version": "4.262.0", "systemCapabilities": { "new": "yes" }, "authorization": { "publicKey": key2.public_key_json() } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["id"], a.id);
    assert_eq!(v["version"], "4.262.0");
    assert_eq!(v["systemCapabilities"], json!({ "new": "yes" }));
    let old = b
        .http
        .post(&a.auth_url)
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            (
                "client_assertion",
                a.key.client_assertion(&a.client_id, &a.auth_url).as_str(),
            ),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(
        old.status(),
        StatusCode::UNAUTHORIZED,
        "the replaced key must not get a token"
    );

    assert_eq!(
        b.send(
            Method::PUT,
            &format!("pools/{}/agents/999", b.pool_id),
            json!({})
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        b.get(&format!("pools/{}/agents/999", b.pool_id))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let del = b
        .call(
            Method::DELETE,
            &b.url(&format!("pools/{}/agents/{}", b.pool_id, a.id)),
            Some(&b.bearer()),
            None,
        )
        .await;
    assert!(del.status.is_success());
    let del = b
        .call(
            Method::DELETE,
            &b.url(&format!("pools/{}/agents/{}", b.pool_id, a.id)),
            Some(&b.bearer()),
            None,
        )
        .await;
    assert_eq!(del.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn jobrequests_shape_completed_filter_newest_first_and_top_cap() {
    let b = bed().await;
    let _a = b.register("idle", &[("docker", "")]).await; // offline, but makes requests servable
    let first = b
        .sim
        .queue(ORG, POOL, RequestSpec::new().demand("docker"))
        .unwrap();
    let second = b
        .sim
        .queue(ORG, POOL, RequestSpec::new().demand("docker"))
        .unwrap();
    b.sim.cancel(ORG, first).unwrap();

    let all = b
        .get(&format!("pools/{}/jobrequests", b.pool_id))
        .await
        .json();
    assert_eq!(all["count"], 2);
    assert_eq!(all["value"][0]["requestId"], second, "newest first");
    assert_eq!(all["value"][1]["result"], "canceled");
    let open = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=0",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(open["count"], 1);
    let r = &open["value"][0];
    assert_eq!(r["requestId"], second);
    assert_eq!(r["demands"], json!(["docker"]));
    assert_eq!(r["data"]["ParallelismTag"], "Private");
    assert_eq!(r["poolId"], b.pool_id);
    for k in [
        "queueTime",
        "jobId",
        "planId",
        "planType",
        "definition",
        "owner",
        "matchesAllAgentsInPool",
    ] {
        assert!(r.get(k).is_some(), "{k} missing in {r}");
    }
    for k in [
        "assignTime",
        "receiveTime",
        "finishTime",
        "result",
        "reservedAgent",
        "lockedUntil",
    ] {
        assert!(r.get(k).is_none(), "{k} must be omitted while null: {r}");
    }

    for _ in 0..230 {
        b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    }
    let top = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=0&$top=500",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(top["count"], 200, "$top is capped at 200");
    let top = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=0&$top=5",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(top["count"], 5);
    let all_open = b
        .get(&format!(
            "pools/{}/jobrequests?completedRequestCount=0",
            b.pool_id
        ))
        .await
        .json();
    assert_eq!(
        all_open["count"], 231,
        "without $top every unfinished request is listed"
    );
}

#[tokio::test]
async fn resourceusage_reports_the_parallel_job_limit_and_running_requests_preview_only() {
    let b = bed_with(quick(), |o| o.parallel_jobs(2)).await;
    let mut a = b.online("a1", &[]).await;
    let id = b.sim.queue(ORG, POOL, RequestSpec::new()).unwrap();
    a.take_job(&b, Duration::from_secs(10)).await;
    let path =
        "resourceusage?parallelismTag=Private&poolIsHosted=false&includeRunningRequests=true";
    let url = format!(
        "{}/_apis/distributedtask/{path}&api-version=7.1-preview.1",
        b.sim.org_url(ORG)
    );
    let r = b.call(Method::GET, &url, Some(&b.bearer()), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["resourceLimit"]["totalCount"], 2);
    assert_eq!(v["resourceLimit"]["parallelismTag"], "Private");
    assert_eq!(v["resourceLimit"]["isHosted"], false);
    assert_eq!(v["usedCount"], 1);
    assert_eq!(v["runningRequests"][0]["requestId"], id);
    let r = b.get(path).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "non-preview api-version is refused: {}",
        r.text
    );
}

#[tokio::test]
async fn rate_limit_headers_retry_after_near_the_limit_and_429_tf400733_when_blocked() {
    let cfg = SimConfig {
        rate_limit: RateLimitConfig {
            enabled: true,
            limit: 4.0,
            window_secs: 300,
            cost_per_call: 1.0,
            near_fraction: 0.75,
        },
        ..SimConfig::default()
    };
    let b = bed_with(cfg, |o| o).await;
    let r = b.get("pools").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-limit"), Some("4"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("3"));
    assert_eq!(r.header("x-ratelimit-resource"), Some("ATCPU"));
    assert!(
        r.header("x-ratelimit-reset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    assert!(r.header("x-ratelimit-delay").is_some());
    assert!(r.header("retry-after").is_none());
    b.get("pools").await;
    let near = b.get("pools").await;
    assert_eq!(near.status, StatusCode::OK);
    assert!(
        near.header("retry-after").is_some(),
        "a 200 near the limit carries Retry-After"
    );
    b.get("pools").await;
    let blocked = b.get("pools").await;
    assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        blocked.json()["message"]
            .as_str()
            .unwrap()
            .contains("TF400733")
    );
    assert!(
        blocked
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    // Another identity of the same org has its own budget.
    b.sim.add_pat(ORG, "other-pat", "someone-else").unwrap();
    b.sim.add_member(ORG, "someone-else").unwrap();
    let other = b
        .call(Method::GET, &b.url("pools"), Some("Bearer other-pat"), None)
        .await;
    assert_eq!(other.status, StatusCode::OK);
    let calls = b.sim.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.endpoint == "pools.list" && c.status == 429 && c.count == 1)
    );
}

#[tokio::test]
async fn faults_per_endpoint_class_429_5xx_slow_malformed_one_shot_and_counted() {
    let b = bed().await;
    let jr = format!("pools/{}/jobrequests", b.pool_id);

    b.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::RateLimited {
            retry_after_secs: 7,
        },
    ));
    assert_eq!(
        b.get("pools").await.status,
        StatusCode::OK,
        "other classes unaffected"
    );
    let r = b.get(&jr).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert!(r.text.contains("TF400733"));
    assert_eq!(b.get(&jr).await.status, StatusCode::OK, "one-shot");

    b.sim.inject_fault(Fault::times(
        EndpointClass::Agents,
        FaultKind::ServerError { status: 503 },
        2,
    ));
    let agents = format!("pools/{}/agents", b.pool_id);
    assert_eq!(b.get(&agents).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.get(&agents).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        b.get(&agents).await.status,
        StatusCode::OK,
        "counted fault used up"
    );

    b.sim
        .inject_fault(Fault::once(EndpointClass::Pools, FaultKind::MalformedJson));
    let r = b.get("pools").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        serde_json::from_str::<serde_json::Value>(&r.text).is_err(),
        "body must not parse: {}",
        r.text
    );

    b.sim.inject_fault(Fault::once(
        EndpointClass::ResourceUsage,
        FaultKind::Slow { delay_ms: 300 },
    ));
    let url = format!(
        "{}/_apis/distributedtask/resourceusage?api-version=7.1-preview",
        b.sim.org_url(ORG)
    );
    let started = std::time::Instant::now();
    let r = b.call(Method::GET, &url, Some(&b.bearer()), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "slow fault delays the answer"
    );

    b.sim.inject_fault(Fault::always(
        EndpointClass::Any,
        FaultKind::ServerError { status: 500 },
    ));
    assert_eq!(
        b.get("pools").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(b.get(&jr).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    b.sim.clear_faults();
    assert_eq!(b.get(&jr).await.status, StatusCode::OK);
}

#[tokio::test]
async fn call_counters_count_per_endpoint_and_identity() {
    let b = bed().await;
    b.sim.reset_calls();
    b.get(&format!(
        "pools/{}/jobrequests?completedRequestCount=0",
        b.pool_id
    ))
    .await;
    b.get(&format!(
        "pools/{}/jobrequests?completedRequestCount=0",
        b.pool_id
    ))
    .await;
    b.get("pools").await;
    assert_eq!(b.sim.call_count("jobrequests.list"), 2);
    assert_eq!(b.sim.call_count("pools.list"), 1);
    let c = b.sim.calls();
    let me = format!("{ORG}/{}", b.oid);
    assert!(
        c.iter().any(|c| c.endpoint == "jobrequests.list"
            && c.identity == me
            && c.status == 200
            && c.count == 2),
        "{c:?}"
    );
}

#[tokio::test]
async fn plain_http_mode_serves_the_same_api() {
    let b = bed_with(SimConfig::plain_http(), |o| o).await;
    assert!(b.sim.ado_url().starts_with("http://"));
    assert!(b.sim.ca_pem_path().is_none());
    assert_eq!(b.get("pools").await.status, StatusCode::OK);
}
