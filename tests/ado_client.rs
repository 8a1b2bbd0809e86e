//! The ADO client against the ADO + Entra simulator, over HTTPS with the simulator's test CA:
//! every call's shape, rate limiting (Retry-After on 200 and 429, X-RateLimit headroom), error
//! mapping (TF401444, 403, 5xx, malformed JSON) and the token sources (workload identity, PAT).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azp_autoscaler::ado::{
    AdoClient, AdoClientConfig, AdoError, AgentQuery, AgentStatus, AgentUpdate, DeleteOutcome,
    TaskAgent, TaskAgentAuthorization, TaskAgentPublicKey,
};
use azp_autoscaler::ado::{TokenSource, WorkloadIdentityConfig};
use azp_testbed::sim::testing::TestIssuer;
use azp_testbed::sim::{
    EndpointClass, Fault, FaultKind, IdentitySpec, PoolRole, RateLimitConfig, RequestSpec,
};
use support::{Bed, RecordingObserver};

fn new_agent(name: &str, caps: &[(&str, &str)]) -> TaskAgent {
    TaskAgent {
        name: name.to_owned(),
        version: Some("4.260.0".to_owned()),
        os_description: Some("Linux test".to_owned()),
        max_parallelism: Some(1),
        system_capabilities: caps
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        authorization: Some(TaskAgentAuthorization {
            public_key: Some(TaskAgentPublicKey {
                exponent: vec![1, 0, 1],
                modulus: support::fake_modulus(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn pools_and_job_requests_have_their_shape() {
    let bed = Bed::start().await;
    let client = bed.client();

    let pool = client
        .pool_by_name("linux")
        .await
        .unwrap()
        .expect("pool exists");
    assert_eq!(pool.name, "linux");
    assert_eq!(pool.id as u32, bed.pool_id());
    assert!(client.pool_by_name("no-such-pool").await.unwrap().is_none());

    assert!(client.job_requests(pool.id).await.unwrap().is_empty());
    // Without an agent (even offline) matching its demands ADO fails a request at once.
    client
        .add_agent(
            pool.id,
            &new_agent(
                "placeholder",
                &[
                    ("docker", ""),
                    ("gpu", "true"),
                    ("Agent.Version", "4.260.0"),
                ],
            ),
        )
        .await
        .unwrap();
    let first = bed
        .sim
        .queue(&bed.org, "linux", RequestSpec::new().demand("docker"))
        .unwrap();
    let second = bed
        .sim
        .queue(
            &bed.org,
            "linux",
            RequestSpec::new()
                .demand("Agent.Version -gtVersion 3.0.0")
                .demand("gpu -equals true"),
        )
        .unwrap();
    let requests = client.job_requests(pool.id).await.unwrap();
    let ids: Vec<i64> = requests.iter().map(|r| r.request_id).collect();
    assert!(
        ids.contains(&(first as i64)) && ids.contains(&(second as i64)),
        "{ids:?}"
    );
    let r2 = requests
        .iter()
        .find(|r| r.request_id == second as i64)
        .unwrap();
    let demands: Vec<&str> = r2.demands.iter().map(|d| d.as_str()).collect();
    assert_eq!(
        demands,
        ["Agent.Version -gtVersion 3.0.0", "gpu -equals true"]
    );
    assert!(r2.queue_time.is_some());
    assert!(r2.assign_time.is_none() && r2.result.is_none() && r2.reserved_agent.is_none());
    assert_eq!(r2.parallelism_tag(), Some("Private"));
    assert_eq!(bed.sim.call_count("jobrequests.list"), 2);
}

#[tokio::test]
async fn agent_lifecycle_add_list_get_replace_update_delete() {
    let bed = Bed::start().await;
    let client = bed.client();
    let pool_id = bed.pool_id() as i32;

    let added = client
        .add_agent(
            pool_id,
            &new_agent("placeholder-1", &[("os", "linux"), ("docker", "")]),
        )
        .await
        .unwrap();
    assert!(added.id > 0);
    assert_eq!(added.name, "placeholder-1");
    let auth = added
        .authorization
        .as_ref()
        .expect("authorization in the answer");
    assert!(auth.client_id.is_some() && auth.authorization_url.is_some());
    assert_eq!(added.status, Some(AgentStatus::Offline));

    let listed = client
        .agents(
            pool_id,
            &AgentQuery::named("placeholder-1").with_capabilities(),
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].capability("OS"), Some("linux"));
    assert!(
        client
            .agents(pool_id, &AgentQuery::named("someone-else"))
            .await
            .unwrap()
            .is_empty()
    );

    let one = client
        .agent(pool_id, added.id)
        .await
        .unwrap()
        .expect("agent exists");
    assert_eq!(one.name, "placeholder-1");
    assert!(one.assigned_request.is_none());
    assert!(
        client
            .agent(pool_id, added.id + 1000)
            .await
            .unwrap()
            .is_none()
    );

    let mut replacement = new_agent("placeholder-1", &[("os", "linux"), ("gpu", "true")]);
    replacement.version = Some("4.261.0".to_owned());
    let replaced = client
        .replace_agent(pool_id, added.id, &replacement)
        .await
        .unwrap();
    assert_eq!(replaced.id, added.id);
    let after = client.agent(pool_id, added.id).await.unwrap().unwrap();
    assert_eq!(after.version.as_deref(), Some("4.261.0"));
    assert_eq!(after.capability("gpu"), Some("true"));

    let disabled = client
        .update_agent(pool_id, added.id, &AgentUpdate::enabled(false))
        .await
        .unwrap();
    assert_eq!(disabled.enabled, Some(false));
    let after = client.agent(pool_id, added.id).await.unwrap().unwrap();
    assert!(!after.is_enabled());

    assert_eq!(
        client.delete_agent(pool_id, added.id).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        client.delete_agent(pool_id, added.id).await.unwrap(),
        DeleteOutcome::AlreadyGone
    );
    assert!(
        client
            .agents(pool_id, &AgentQuery::all())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn resource_usage_reports_the_parallel_job_limit() {
    let bed = Bed::start().await;
    let client = bed.client();
    bed.sim.set_parallel_jobs(&bed.org, 3).unwrap();
    let usage = client.resource_usage().await.unwrap();
    let limit = usage.resource_limit.expect("resourceLimit");
    assert_eq!(limit.total_count, Some(3));
    assert_eq!(limit.parallelism_tag.as_deref(), Some("Private"));
    assert!(!limit.is_hosted);
    assert_eq!(usage.used_count, 0);
}

#[tokio::test]
async fn a_429_holds_every_call_of_the_client_until_retry_after_passes() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = bed.client_with(AdoClientConfig {
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    let pool_id = bed.pool_id() as i32;
    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::RateLimited {
            retry_after_secs: 2,
        },
    ));
    let err = client.job_requests(pool_id).await.unwrap_err();
    assert_eq!(err.metric_label(), "ado_throttled");
    assert!(err.is_transient());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert!(err.to_string().contains("TF400733"), "{err}");
    let held_from = Instant::now();
    assert!(client.retry_after_remaining() > Duration::ZERO);

    // A clone (another ADO pool of the same organization) and another endpoint are held too.
    let other = client.clone();
    let before = bed.sim.calls().iter().map(|c| c.count).sum::<u64>();
    let call = tokio::spawn(async move { other.agents(pool_id, &AgentQuery::all()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = bed.sim.calls().iter().map(|c| c.count).sum::<u64>();
    assert_eq!(
        during, before,
        "no call may reach ADO before Retry-After passes"
    );
    call.await.unwrap().unwrap();
    assert!(held_from.elapsed() >= Duration::from_millis(1900));
    assert!(
        observer
            .delays()
            .iter()
            .any(|(reason, _)| *reason == "retry_after")
    );
}

#[tokio::test]
async fn retry_after_on_a_200_is_obeyed_and_low_remaining_lowers_headroom() {
    let bed = Bed::start().await;
    let client = bed.client();
    let pool_id = bed.pool_id() as i32;
    assert_eq!(client.headroom(), 1.0);
    // Every call costs a quarter of the budget: the second is over the "near" threshold.
    bed.sim.set_rate_limit(RateLimitConfig {
        enabled: true,
        limit: 4.0,
        window_secs: 2,
        cost_per_call: 1.0,
        near_fraction: 0.5,
    });
    client.job_requests(pool_id).await.unwrap();
    client.job_requests(pool_id).await.unwrap();
    assert!(client.headroom() < 1.0, "headroom {}", client.headroom());
    assert!(client.slow_down_factor() >= 1.0);
    let hold = client.retry_after_remaining();
    assert!(
        hold > Duration::ZERO,
        "a 200 with Retry-After must hold the next call"
    );
    let before = bed.sim.call_count("jobrequests.list");
    let started = Instant::now();
    client.job_requests(pool_id).await.unwrap();
    assert!(started.elapsed() >= hold.saturating_sub(Duration::from_millis(50)));
    assert_eq!(bed.sim.call_count("jobrequests.list"), before + 1);
}

#[tokio::test]
async fn low_rate_limit_remaining_asks_the_poll_loop_to_slow_down() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = bed.client_with(AdoClientConfig {
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    let pool_id = bed.pool_id() as i32;
    bed.sim.set_rate_limit(RateLimitConfig {
        enabled: true,
        limit: 10.0,
        window_secs: 300,
        cost_per_call: 1.0,
        near_fraction: 0.95,
    });
    client.job_requests(pool_id).await.unwrap();
    assert!(
        (client.headroom() - 0.9).abs() < 1e-9,
        "{}",
        client.headroom()
    );
    assert_eq!(client.slow_down_factor(), 1.0);
    for _ in 0..8 {
        client.job_requests(pool_id).await.unwrap();
    }
    // X-RateLimit-Remaining: 1 of 10.
    assert!(
        (client.headroom() - 0.1).abs() < 1e-9,
        "{}",
        client.headroom()
    );
    assert!((client.slow_down_factor() - 2.5).abs() < 1e-9);
    assert_eq!(client.retry_after_remaining(), Duration::ZERO);
    assert_eq!(observer.headroom().last().copied(), Some(client.headroom()));
}

#[tokio::test]
async fn retry_after_is_per_identity_not_global() {
    let bed = Bed::start().await;
    let held = bed.client();
    let pool_id = bed.pool_id() as i32;
    let other_client = uuid::Uuid::new_v4().to_string();
    let other_object = uuid::Uuid::new_v4().to_string();
    bed.sim
        .add_identity(IdentitySpec::new(&other_client).object_id(&other_object));
    bed.sim.add_member(&bed.org, &other_object).unwrap();
    let other_token =
        bed.sim
            .mint_access_token(&other_client, &other_object, Duration::from_secs(3600));
    let other = AdoClient::new(
        &bed.sim.org_url(&bed.org),
        support::fixed_token(&other_token),
    )
    .unwrap();

    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::RateLimited {
            retry_after_secs: 60,
        },
    ));
    held.job_requests(pool_id).await.unwrap_err();
    other.job_requests(pool_id).await.unwrap();
    assert!(
        held.retry_after_remaining() > Duration::from_secs(50),
        "the other identity's call completed while this one is still held"
    );
    assert_eq!(other.retry_after_remaining(), Duration::ZERO);
}

#[tokio::test]
async fn our_own_budget_spaces_out_a_burst() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = bed.client_with(AdoClientConfig {
        requests_per_second: NonZeroU32::new(5).unwrap(),
        burst: NonZeroU32::new(5).unwrap(),
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    let pool_id = bed.pool_id() as i32;
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let c = client.clone();
        calls.spawn(async move { c.agents(pool_id, &AgentQuery::all()).await });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    // 5 go at once, the other 5 wait for budget at 5/s: at least ~1 s in all (a lower bound).
    assert!(started.elapsed() >= Duration::from_millis(900));
    let budget_waits = observer
        .delays()
        .iter()
        .filter(|(reason, _)| *reason == "budget")
        .count();
    assert!(budget_waits >= 4, "{:?}", observer.delays());
    assert_eq!(bed.sim.call_count("agents.list"), 10);
}

#[tokio::test]
async fn concurrent_callers_share_one_token_exchange() {
    let wi = WorkloadIdentityBed::start().await;
    wi.write_token("ci", "agents", "");
    let tokens = wi.tokens();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let t = tokens.clone();
        set.spawn(async move { t.token().await.map(|t| t.expose_secret().to_owned()) });
    }
    let mut secrets = std::collections::BTreeSet::new();
    while let Some(r) = set.join_next().await {
        secrets.insert(r.unwrap().unwrap());
    }
    assert_eq!(secrets.len(), 1);
    assert_eq!(wi.bed.sim.call_count("entra.token"), 1);
}

#[tokio::test]
async fn identity_not_in_the_organization_is_tf401444_with_the_fix() {
    let bed = Bed::start().await;
    bed.sim.remove_member(&bed.org, &bed.object_id).unwrap();
    let err = bed.client().pool_by_name("linux").await.unwrap_err();
    assert!(matches!(err, AdoError::NotInOrganization { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("Organization settings → Users"), "{msg}");
    assert!(msg.contains(&bed.org), "{msg}");
    assert!(
        msg.contains(&bed.object_id),
        "ADO's own words name the object id: {msg}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn missing_pool_permission_is_403_naming_the_role() {
    let bed = Bed::start().await;
    bed.sim
        .set_pool_role(&bed.org, "linux", &bed.object_id, PoolRole::Reader)
        .unwrap();
    let client = bed.client();
    let pool_id = bed.pool_id() as i32;
    client.agents(pool_id, &AgentQuery::all()).await.unwrap();
    let err = client
        .add_agent(pool_id, &new_agent("a", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "ado_forbidden");
    assert!(
        err.to_string()
            .contains("Administrator role on the agent pool"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn server_errors_and_malformed_answers_are_transient() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = bed.client_with(AdoClientConfig {
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    let pool_id = bed.pool_id() as i32;
    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::ServerError { status: 503 },
    ));
    let err = client.job_requests(pool_id).await.unwrap_err();
    assert_eq!(
        (err.metric_label(), err.status()),
        ("ado_server_error", Some(503))
    );
    assert!(err.is_transient());

    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::MalformedJson,
    ));
    let err = client.job_requests(pool_id).await.unwrap_err();
    assert_eq!(err.metric_label(), "ado_malformed_json");
    assert!(err.is_transient());
    match &err {
        AdoError::MalformedJson { excerpt, .. } => assert!(!excerpt.is_empty()),
        other => panic!("{other:?}"),
    }
    // The observer counts a 200 that does not parse as a failed call.
    assert_eq!(
        observer.calls().last().copied(),
        Some(("jobrequests", Some(200), "ado_malformed_json"))
    );
    // The faults were one-shot: the client recovers by itself.
    client.job_requests(pool_id).await.unwrap();
    assert_eq!(
        observer.calls(),
        [
            ("jobrequests", Some(503), "ado_server_error"),
            ("jobrequests", Some(200), "ado_malformed_json"),
            ("jobrequests", Some(200), "ok"),
        ]
    );
}

#[tokio::test]
async fn a_slow_answer_times_out_as_a_transient_error() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = bed.client_with(AdoClientConfig {
        request_timeout: Duration::from_millis(300),
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    bed.sim.inject_fault(Fault::once(
        EndpointClass::JobRequests,
        FaultKind::Slow { delay_ms: 3000 },
    ));
    let err = client.job_requests(bed.pool_id() as i32).await.unwrap_err();
    assert_eq!(err.metric_label(), "ado_timeout");
    assert!(err.is_transient());
    assert_eq!(observer.calls(), [("jobrequests", None, "ado_timeout")]);
}

#[tokio::test]
async fn a_rejected_token_is_unauthorized_and_the_observer_sees_every_call() {
    let bed = Bed::start().await;
    let observer = Arc::new(RecordingObserver::default());
    let client = AdoClient::with_config(
        &bed.sim.org_url(&bed.org),
        support::fixed_token("not-a-jwt"),
        AdoClientConfig {
            observer: observer.clone(),
            ..AdoClientConfig::default()
        },
    )
    .unwrap();
    let err = client.pool_by_name("linux").await.unwrap_err();
    assert_eq!(err.metric_label(), "ado_unauthorized");
    let calls = observer.calls();
    // One retry with a new token before giving up.
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.iter().all(|c| c.0 == "pools" && c.1 == Some(401)));

    let good = bed.client_with(AdoClientConfig {
        observer: observer.clone(),
        ..AdoClientConfig::default()
    });
    good.pool_by_name("linux").await.unwrap();
    assert_eq!(
        observer.calls().last().map(|c| (c.0, c.1)),
        Some(("pools", Some(200)))
    );
}

#[tokio::test]
async fn pat_mode_sends_basic_from_a_file_with_a_trailing_newline() {
    let bed = Bed::start().await;
    let path = bed.scratch("pat");
    std::fs::write(&path, "pat-value-1234\n").unwrap();
    bed.sim
        .add_pat(&bed.org, "pat-value-1234", &bed.object_id)
        .unwrap();
    let client = AdoClient::new(
        &bed.sim.org_url(&bed.org),
        azp_autoscaler::ado::TokenSource::pat_file(&path),
    )
    .unwrap();
    let pool = client.pool_by_name("linux").await.unwrap().unwrap();
    assert_eq!(pool.name, "linux");

    std::fs::write(&path, "wrong\n").unwrap();
    client.tokens().invalidate().await;
    let err = client.pool_by_name("linux").await.unwrap_err();
    assert_eq!(err.metric_label(), "ado_unauthorized");
}

#[tokio::test]
async fn capabilities_update_through_patch() {
    let bed = Bed::start().await;
    let client = bed.client();
    let pool_id = bed.pool_id() as i32;
    let added = client
        .add_agent(pool_id, &new_agent("cap", &[]))
        .await
        .unwrap();
    let update = AgentUpdate {
        user_capabilities: Some(BTreeMap::from([("team".to_owned(), "blue".to_owned())])),
        ..AgentUpdate::default()
    };
    client
        .update_agent(pool_id, added.id, &update)
        .await
        .unwrap();
    let after = client.agent(pool_id, added.id).await.unwrap().unwrap();
    assert_eq!(after.capability("team"), Some("blue"));
}

/// Workload identity against the simulated Entra: a test issuer (static JWKS) signs the federated
/// tokens, as the kube-apiserver would.
struct WorkloadIdentityBed {
    bed: Bed,
    issuer: TestIssuer,
    token_file: std::path::PathBuf,
    observer: Arc<RecordingObserver>,
}

impl WorkloadIdentityBed {
    async fn start() -> Self {
        let bed = Bed::start().await;
        let issuer =
            TestIssuer::new(format!("https://issuer.test/{}", uuid::Uuid::new_v4())).unwrap();
        bed.sim.add_federated_issuer(issuer.federated_issuer());
        bed.sim.add_identity(
            IdentitySpec::new(&bed.client_id)
                .object_id(&bed.object_id)
                .federated_sa(&issuer.issuer, "ci", "agents"),
        );
        let token_file = bed.scratch("federated-token");
        Self {
            bed,
            issuer,
            token_file,
            observer: Arc::new(RecordingObserver::default()),
        }
    }

    fn config(&self) -> WorkloadIdentityConfig {
        let sim = &self.bed.sim;
        let env = |k: &str| match k {
            "AZURE_CLIENT_ID" => Some(self.bed.client_id.clone()),
            "AZURE_TENANT_ID" => Some(sim.tenant_id()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some(self.token_file.display().to_string()),
            "AZURE_AUTHORITY_HOST" => Some(sim.entra_url()),
            _ => None,
        };
        let mut config = WorkloadIdentityConfig::from_lookup(None, env).unwrap();
        config.max_retries = 1;
        config
    }

    fn tokens(&self) -> TokenSource {
        TokenSource::workload_identity(self.config())
            .unwrap()
            .with_observer(self.observer.clone())
    }

    fn write_token(&self, namespace: &str, sa: &str, suffix: &str) {
        let jwt = self
            .issuer
            .sa_token(namespace, sa, Duration::from_secs(3600));
        std::fs::write(&self.token_file, format!("{jwt}{suffix}")).unwrap();
    }
}

#[tokio::test]
async fn workload_identity_rereads_the_federated_token_file_at_every_exchange() {
    let wi = WorkloadIdentityBed::start().await;
    let tokens = wi.tokens();

    // A token of a service account without a federated credential: Entra refuses, with its code.
    wi.write_token("ci", "intruder", "");
    let err = tokens.fresh_token().await.unwrap_err();
    assert_eq!(err.aadsts(), Some("AADSTS70021"), "{err}");
    assert!(
        err.to_string().contains("federated identity credential"),
        "{err}"
    );
    assert!(!err.is_transient());

    // The file changes (kubelet rotation): the next exchange reads it. A trailing newline is fine.
    wi.write_token("ci", "agents", "\n");
    let first = tokens.fresh_token().await.unwrap();
    assert!(first.expires_at().is_some());
    let client = AdoClient::new(&wi.bed.sim.org_url(&wi.bed.org), tokens.clone()).unwrap();
    assert!(client.pool_by_name("linux").await.unwrap().is_some());

    // `token()` serves the cache; `fresh_token()` exchanges again and so sees a broken file.
    std::fs::write(&wi.token_file, "not-a-jwt").unwrap();
    let cached = tokens.token().await.unwrap();
    assert_eq!(cached.expose_secret(), first.expose_secret());
    let err = tokens.fresh_token().await.unwrap_err();
    assert_eq!(err.aadsts(), Some("AADSTS50027"), "{err}");
    assert_eq!(wi.bed.sim.call_count("entra.token"), 3);

    let events = wi.observer.tokens();
    assert_eq!(
        events,
        [
            ("workload_identity", false),
            ("workload_identity", true),
            ("workload_identity", false)
        ]
    );
}

#[tokio::test]
async fn workload_identity_token_file_missing_or_empty_is_explained() {
    let wi = WorkloadIdentityBed::start().await;
    let tokens = wi.tokens();
    let err = tokens.token().await.unwrap_err();
    assert_eq!(err.metric_label(), "auth_token_file_unreadable");
    assert!(
        err.to_string()
            .contains(&wi.token_file.display().to_string()),
        "{err}"
    );
    std::fs::write(&wi.token_file, "\n").unwrap();
    let err = tokens.token().await.unwrap_err();
    assert_eq!(err.metric_label(), "auth_token_file_empty");
    // No exchange was attempted.
    assert_eq!(wi.bed.sim.call_count("entra.token"), 0);
}

#[tokio::test]
async fn token_endpoint_outage_is_transient_and_recovers() {
    let wi = WorkloadIdentityBed::start().await;
    wi.write_token("ci", "agents", "");
    let client = AdoClient::new(&wi.bed.sim.org_url(&wi.bed.org), wi.tokens()).unwrap();
    wi.bed
        .sim
        .inject_fault(Fault::always(EndpointClass::Token, FaultKind::TokenOutage));
    let err = client.pool_by_name("linux").await.unwrap_err();
    assert_eq!(err.metric_label(), "auth_entra_unavailable");
    assert!(err.is_transient());
    // The small retry budget: one try plus one retry, not the SDK's default ~80 s of retries.
    assert_eq!(wi.bed.sim.call_count("entra.token"), 2);
    assert_eq!(
        wi.bed.sim.call_count("pools.list"),
        0,
        "no ADO call without a token"
    );
    wi.bed.sim.clear_faults();
    assert!(client.pool_by_name("linux").await.unwrap().is_some());
}

#[tokio::test]
async fn an_expiring_token_is_exchanged_again_before_it_expires() {
    let wi = WorkloadIdentityBed::start().await;
    wi.write_token("ci", "agents", "");
    wi.bed.sim.set_token_lifetime(Duration::from_secs(1));
    let tokens = wi.tokens();
    let first = tokens.token().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = tokens.token().await.unwrap();
    assert_ne!(first.expose_secret(), second.expose_secret());
    assert_eq!(wi.bed.sim.call_count("entra.token"), 2);
}

/// Runs a scripted `az` instead of the real CLI (none is installed here): prints a token the
/// simulator minted, or fails as `az` does without a login.
#[derive(Debug)]
struct ScriptedAz {
    token: Option<String>,
    commands: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl azure_identity::Executor for ScriptedAz {
    async fn run(
        &self,
        _program: &std::ffi::OsStr,
        args: &[&std::ffi::OsStr],
    ) -> std::io::Result<std::process::Output> {
        use std::os::unix::process::ExitStatusExt;
        let command = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        self.commands.lock().unwrap().push(command);
        let expires = jiff::Timestamp::now().as_second() + 3600;
        Ok(match &self.token {
            Some(token) => std::process::Output {
                status: std::process::ExitStatus::from_raw(0),
                stdout: format!(
                    r#"{{"accessToken":"{token}","expires_on":{expires},"tokenType":"Bearer"}}"#
                )
                .into_bytes(),
                stderr: Vec::new(),
            },
            None => std::process::Output {
                status: std::process::ExitStatus::from_raw(1 << 8),
                stdout: Vec::new(),
                stderr: b"ERROR: Please run 'az login' to setup account.".to_vec(),
            },
        })
    }
}

#[tokio::test]
async fn azure_cli_login_is_a_token_source_for_plan() {
    let bed = Bed::start().await;
    let token =
        bed.sim
            .mint_access_token(&bed.client_id, &bed.object_id, Duration::from_secs(3600));
    let az = Arc::new(ScriptedAz {
        token: Some(token),
        commands: Default::default(),
    });
    let options = azure_identity::AzureCliCredentialOptions {
        executor: Some(az.clone()),
        ..Default::default()
    };
    let tokens = TokenSource::azure_cli_with(options).unwrap();
    let client = AdoClient::new(&bed.sim.org_url(&bed.org), tokens).unwrap();
    assert!(client.pool_by_name("linux").await.unwrap().is_some());
    let commands = az.commands.lock().unwrap().clone();
    assert_eq!(commands.len(), 1);
    assert!(
        commands[0].contains("az account get-access-token")
            && commands[0].contains("--scope 499b84ac-1321-427f-aa17-267ca6975798/.default"),
        "{commands:?}"
    );

    let logged_out = azure_identity::AzureCliCredentialOptions {
        executor: Some(Arc::new(ScriptedAz {
            token: None,
            commands: Default::default(),
        })),
        ..Default::default()
    };
    let err = TokenSource::azure_cli_with(logged_out)
        .unwrap()
        .token()
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "auth_azure_cli");
    assert!(err.to_string().contains("az login"), "{err}");
}

mod support {
    //! The test bed of this file: a simulator per test, trusted through `SSL_CERT_DIR`.

    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use azp_autoscaler::ado::{
        AccessToken, AdoClient, AdoClientConfig, AdoObserver, AuthScheme, CallRecord, DelayReason,
        TokenEvent, TokenSource,
    };
    use azp_testbed::sim::{IdentitySpec, OrgSpec, SimConfig, Simulator};

    /// Every simulator has its own CA; the product trusts extra CAs only through `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`. One folder per test process collects them all, set once before any client
    /// is built (every test calls [`Bed::start`] first, and the `OnceLock` blocks the others).
    fn ca_dir() -> &'static PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("azp-ado-tests-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create CA folder");
            // SAFETY: set once, before any test builds an HTTP client or reads this variable.
            unsafe { std::env::set_var("SSL_CERT_DIR", &dir) };
            dir
        })
    }

    pub struct Bed {
        pub sim: Simulator,
        pub org: String,
        pub client_id: String,
        pub object_id: String,
        /// This test's files (token files), removed with the bed.
        scratch: PathBuf,
        /// This simulator's CA in the shared CA folder, removed with the bed.
        ca_copy: PathBuf,
    }

    impl Drop for Bed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.scratch);
            let _ = std::fs::remove_file(&self.ca_copy);
        }
    }

    impl Bed {
        pub async fn start() -> Bed {
            Self::start_with(SimConfig::default()).await
        }

        pub async fn start_with(config: SimConfig) -> Bed {
            let dir = ca_dir();
            let sim = Simulator::start(config).await.expect("simulator starts");
            let ca = sim.ca_pem_path().expect("HTTPS simulator");
            let ca_copy = dir.join(format!("{}.pem", uuid::Uuid::new_v4()));
            std::fs::copy(ca, &ca_copy).expect("copy CA");
            let scratch =
                std::env::temp_dir().join(format!("azp-ado-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&scratch).expect("create scratch folder");
            let client_id = uuid::Uuid::new_v4().to_string();
            let object_id = uuid::Uuid::new_v4().to_string();
            sim.add_identity(IdentitySpec::new(&client_id).object_id(&object_id));
            sim.add_org(OrgSpec::new("contoso").pool("linux").member(&object_id))
                .expect("org");
            Bed {
                sim,
                org: "contoso".to_owned(),
                client_id,
                object_id,
                scratch,
                ca_copy,
            }
        }

        /// A path for a file of this test, inside its scratch folder.
        pub fn scratch(&self, name: &str) -> PathBuf {
            self.scratch.join(name)
        }

        pub fn pool_id(&self) -> u32 {
            self.sim.pool_id(&self.org, "linux").expect("pool")
        }

        /// A token minted by the simulator for this identity (no exchange).
        pub fn tokens(&self) -> TokenSource {
            let lifetime = Duration::from_secs(3600);
            let secret = self
                .sim
                .mint_access_token(&self.client_id, &self.object_id, lifetime);
            TokenSource::fixed(AccessToken::new(secret, AuthScheme::Bearer, Some(lifetime)))
        }

        pub fn client(&self) -> AdoClient {
            self.client_with(AdoClientConfig::default())
        }

        pub fn client_with(&self, config: AdoClientConfig) -> AdoClient {
            AdoClient::with_config(&self.sim.org_url(&self.org), self.tokens(), config)
                .expect("client")
        }
    }

    pub fn fixed_token(secret: &str) -> TokenSource {
        TokenSource::fixed(AccessToken::new(secret, AuthScheme::Bearer, None))
    }

    /// A 2048-bit-looking modulus (top bit set, odd); the simulator only stores it here.
    pub fn fake_modulus() -> Vec<u8> {
        let mut m: Vec<u8> = (0..256u32).map(|i| (i * 37 % 251) as u8).collect();
        m[0] |= 0x80;
        m[255] |= 1;
        m
    }

    type CallRow = (&'static str, Option<u16>, &'static str);

    #[derive(Default)]
    pub struct RecordingObserver {
        calls: Mutex<Vec<CallRow>>,
        delays: Mutex<Vec<(&'static str, Duration)>>,
        tokens: Mutex<Vec<(&'static str, bool)>>,
        headroom: Mutex<Vec<f64>>,
    }

    impl RecordingObserver {
        pub fn calls(&self) -> Vec<CallRow> {
            self.calls.lock().unwrap().clone()
        }
        pub fn delays(&self) -> Vec<(&'static str, Duration)> {
            self.delays.lock().unwrap().clone()
        }
        pub fn tokens(&self) -> Vec<(&'static str, bool)> {
            self.tokens.lock().unwrap().clone()
        }
        pub fn headroom(&self) -> Vec<f64> {
            self.headroom.lock().unwrap().clone()
        }
    }

    impl AdoObserver for RecordingObserver {
        fn on_call(&self, call: &CallRecord<'_>) {
            self.calls
                .lock()
                .unwrap()
                .push((call.endpoint, call.status, call.outcome));
        }
        fn on_rate_limit(&self, _organization: &str, state: &azp_autoscaler::ado::RateLimitState) {
            self.headroom.lock().unwrap().push(state.headroom);
        }
        fn on_delay(&self, _organization: &str, reason: DelayReason, delay: Duration) {
            self.delays.lock().unwrap().push((reason.label(), delay));
        }
        fn on_token(&self, event: &TokenEvent<'_>) {
            let row = match event {
                TokenEvent::Refreshed { source, .. } => (*source, true),
                TokenEvent::Failed { source, .. } => (*source, false),
            };
            self.tokens.lock().unwrap().push(row);
        }
    }
}
