//! Shared helpers of the simulator tests: a started simulator with one organization, one pool, one
//! identity, and plain-reqwest drivers for the ADO calls and the agent-side flow.
#![allow(dead_code)]

use std::time::Duration;

use azp_testbed::sim::testing::{AgentKey, TestIssuer};
use azp_testbed::sim::{IdentitySpec, OrgSpec, SimConfig, Simulator};
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

pub const ORG: &str = "contoso";
pub const POOL: &str = "linux";
pub const API: &str = "api-version=7.1";

pub struct Bed {
    pub sim: Simulator,
    pub http: reqwest::Client,
    pub issuer: TestIssuer,
    pub client_id: String,
    pub oid: String,
    pub token: String,
    pub pool_id: u32,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(|v| v.to_str().ok())
    }
}

pub async fn bed() -> Bed {
    bed_with(SimConfig::default(), |o| o).await
}

pub async fn bed_with(cfg: SimConfig, org: impl FnOnce(OrgSpec) -> OrgSpec) -> Bed {
    let sim = Simulator::start(cfg).await.expect("simulator starts");
    let issuer = TestIssuer::new("https://kubernetes.default.svc.cluster.local").expect("issuer");
    let client_id = uuid::Uuid::new_v4().to_string();
    let identity =
        IdentitySpec::new(&client_id).federated_sa(&issuer.issuer, "agents", "azp-agent");
    let oid = identity.object_id.clone();
    sim.add_identity(identity);
    sim.add_federated_issuer(issuer.federated_issuer());
    sim.add_org(org(OrgSpec::new(ORG).pool(POOL).member(&oid)))
        .expect("org");
    let pool_id = sim.pool_id(ORG, POOL).expect("pool");
    let token = sim.mint_access_token(&client_id, &oid, Duration::from_secs(600));
    let http = sim.http_client();
    Bed {
        sim,
        http,
        issuer,
        client_id,
        oid,
        token,
        pool_id,
    }
}

impl Bed {
    /// `{org}/_apis/distributedtask/{path}` with `api-version=7.1` appended.
    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "{}/_apis/distributedtask/{path}{sep}{API}",
            self.sim.org_url(ORG)
        )
    }

    pub async fn call(
        &self,
        method: Method,
        url: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.http.request(method, url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request sent");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        Resp {
            status,
            headers,
            text,
        }
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, &self.url(path), Some(&self.bearer()), None)
            .await
    }

    pub async fn send(&self, method: Method, path: &str, body: Value) -> Resp {
        self.call(method, &self.url(path), Some(&self.bearer()), Some(body))
            .await
    }

    /// Registers an agent (POST) with the given capabilities; returns it without a session.
    pub async fn register(&self, name: &str, caps: &[(&str, &str)]) -> TestAgent {
        let key = shared_key();
        let caps: serde_json::Map<String, Value> = caps
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let r = self
            .send(
                Method::POST,
                &format!("pools/{}/agents", self.pool_id),
                json!({
                    "name": name, "version": "4.261.0", "osDescription": "Linux", "maxParallelism": 1,
                    "systemCapabilities": caps,
                    "authorization": { "publicKey": key.public_key_json() },
                }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "register {name}: {}", r.text);
        let v = r.json();
        TestAgent {
            id: v["id"].as_u64().expect("id") as u32,
            name: name.to_owned(),
            client_id: v["authorization"]["clientId"]
                .as_str()
                .expect("clientId")
                .to_owned(),
            auth_url: v["authorization"]["authorizationUrl"]
                .as_str()
                .expect("authorizationUrl")
                .to_owned(),
            key,
            token: String::new(),
            session: String::new(),
            pool_id: self.pool_id,
            last_message: None,
        }
    }

    /// Registers an agent and brings it online (OAuth token + session).
    pub async fn online(&self, name: &str, caps: &[(&str, &str)]) -> TestAgent {
        let mut a = self.register(name, caps).await;
        a.login(self).await;
        a.open_session(self).await;
        a
    }
}

pub struct TestAgent {
    pub id: u32,
    pub name: String,
    pub client_id: String,
    pub auth_url: String,
    pub key: &'static AgentKey,
    pub token: String,
    pub session: String,
    pub pool_id: u32,
    pub last_message: Option<u64>,
}

/// A job message as the agent sees it.
#[derive(Debug)]
pub struct JobMessage {
    pub message_id: u64,
    pub kind: String,
    pub body: Value,
}

impl TestAgent {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub async fn login(&mut self, bed: &Bed) {
        let assertion = self.key.client_assertion(&self.client_id, &self.auth_url);
        let r = bed
            .http
            .post(&self.auth_url)
            .form(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
            ])
            .send()
            .await
            .expect("oauth");
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["token_type"], "Bearer");
        self.token = v["access_token"].as_str().expect("access_token").to_owned();
    }

    pub async fn open_session(&mut self, bed: &Bed) -> Resp {
        let r = bed
            .call(
                Method::POST,
                &bed.url(&format!("pools/{}/sessions", self.pool_id)),
                Some(&self.bearer()),
                Some(json!({ "ownerName": "test", "agent": { "id": self.id, "name": self.name, "version": "4.261.0" } })),
            )
            .await;
        if r.status == StatusCode::OK {
            self.session = r.json()["sessionId"]
                .as_str()
                .expect("sessionId")
                .to_owned();
        }
        r
    }

    pub async fn close_session(&mut self, bed: &Bed) -> StatusCode {
        bed.call(
            Method::DELETE,
            &bed.url(&format!("pools/{}/sessions/{}", self.pool_id, self.session)),
            Some(&self.bearer()),
            None,
        )
        .await
        .status
    }

    /// One long poll; `None` when it ended without a message.
    pub async fn poll(&mut self, bed: &Bed) -> Option<JobMessage> {
        let mut path = format!("pools/{}/messages?sessionId={}", self.pool_id, self.session);
        if let Some(l) = self.last_message {
            path.push_str(&format!("&lastMessageId={l}"));
        }
        let r = bed
            .call(Method::GET, &bed.url(&path), Some(&self.bearer()), None)
            .await;
        match r.status {
            StatusCode::OK => {
                let v = r.json();
                let body: Value = serde_json::from_str(v["body"].as_str().expect("body string"))
                    .expect("body JSON");
                Some(JobMessage {
                    message_id: v["messageId"].as_u64().expect("messageId"),
                    kind: v["messageType"].as_str().expect("messageType").to_owned(),
                    body,
                })
            }
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => None,
            s => panic!("messages poll: {s} {}", r.text),
        }
    }

    pub async fn ack(&mut self, bed: &Bed, message_id: u64) {
        let r = bed
            .call(
                Method::DELETE,
                &bed.url(&format!(
                    "pools/{}/messages/{message_id}?sessionId={}",
                    self.pool_id, self.session
                )),
                Some(&self.bearer()),
                None,
            )
            .await;
        assert!(r.status.is_success(), "ack: {} {}", r.status, r.text);
        self.last_message = Some(message_id);
    }

    /// Polls until a job message arrives (or panics after `timeout`), acknowledges it.
    pub async fn take_job(&mut self, bed: &Bed, timeout: Duration) -> JobMessage {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.poll(bed).await {
                self.ack(bed, m.message_id).await;
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {} got no job within {timeout:?}",
                self.name
            );
        }
    }

    pub async fn patch_request(&self, bed: &Bed, request_id: u64, lock: &str, body: Value) -> Resp {
        bed.call(
            Method::PATCH,
            &bed.url(&format!(
                "pools/{}/jobrequests/{request_id}?lockToken={lock}",
                self.pool_id
            )),
            Some(&self.bearer()),
            Some(body),
        )
        .await
    }

    pub async fn finish(&self, bed: &Bed, job: &JobMessage, result: &str) -> Resp {
        let rid = job.body["requestId"].as_u64().expect("requestId");
        let lock = job.body["lockToken"]
            .as_str()
            .expect("lockToken")
            .to_owned();
        self.patch_request(bed, rid, &lock, json!({ "requestId": rid, "finishTime": jiff::Timestamp::now().to_string(), "result": result }))
            .await
    }
}

/// One agent key per test process: RSA key generation is the slowest part of a test, and agents
/// sharing a key changes nothing the simulator checks (tests of a key takeover make their own).
pub fn shared_key() -> &'static AgentKey {
    static KEY: std::sync::OnceLock<AgentKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| AgentKey::new().expect("agent key"))
}

/// Config for tests that wait on long polls: short polls keep them quick.
pub fn quick() -> SimConfig {
    SimConfig {
        long_poll_secs: 1,
        ..SimConfig::default()
    }
}
