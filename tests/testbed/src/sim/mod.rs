//! ADO + Entra simulator: real HTTPS (local test CA), real JSON shapes, token validation, rate limits,
//! fault injection and a scriptable workload. See tests/testbed/README.md for the agent-side contract.
//!
//! ```no_run
//! # async fn demo() -> Result<(), azp_testbed::sim::SimError> {
//! use azp_testbed::sim::{OrgSpec, RequestSpec, SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default()).await?;
//! sim.add_org(OrgSpec::new("contoso").pool("linux"))?;
//! let id = sim.queue("contoso", "linux", RequestSpec::new().demand("docker"))?;
//! println!("{} {}", sim.org_url("contoso"), id);
//! # Ok(()) }
//! ```
//!
//! # What is served
//!
//! ADO listener (`ado_url()`), every `_apis` call needs `api-version` (query or `Accept` header):
//!
//! | endpoint label (call counters) | route under `{org}/_apis/distributedtask/` | class |
//! |---|---|---|
//! | `pools.list`, `pools.get` | `GET pools?poolName=`, `GET pools/{id}` | `pools` |
//! | `jobrequests.list` | `GET pools/{id}/jobrequests?completedRequestCount=&$top=&agentId=` | `jobRequests` |
//! | `jobrequests.get`, `jobrequests.update` | `GET`/`PATCH pools/{id}/jobrequests/{rid}?lockToken=` | `jobRequests` |
//! | `agents.list`, `agents.add` | `GET pools/{id}/agents?agentName=&includeCapabilities=&includeAssignedRequest=&demands=`, `POST` | `agents` |
//! | `agents.get/replace/update/delete` | `GET`/`PUT`/`PATCH`/`DELETE pools/{id}/agents/{aid}` | `agents` |
//! | `sessions.create`, `sessions.delete` | `POST pools/{id}/sessions`, `DELETE pools/{id}/sessions/{sid}` | `agentFlow` |
//! | `messages.get`, `messages.delete` | `GET pools/{id}/messages?sessionId=&lastMessageId=`, `DELETE …/messages/{mid}?sessionId=` | `agentFlow` |
//! | `resourceusage.get` | `GET resourceusage?parallelismTag=&poolIsHosted=&includeRunningRequests=` (`*-preview*` only) | `resourceUsage` |
//! | `oauth.agent` | `POST {ado}/_vstoken/{org}/oauth2/token` (the agents' `authorizationUrl`) | `agentFlow` |
//! | `testbed.report` | `POST {org}/_testbed/requests/{id}/report` (probe steps; no auth) | — |
//!
//! Entra listener (`entra_url()`, usable as `AZURE_AUTHORITY_HOST`): `entra.token`
//! (`POST {tenant}/oauth2/v2.0/token`), `entra.openid` (`GET {tenant}/v2.0/.well-known/openid-configuration`),
//! `entra.jwks` (`GET {tenant}/discovery/v2.0/keys`).
//!
//! # Authentication
//!
//! `Bearer <access token>` (from the exchange or [`Simulator::mint_access_token`]), `Basic :<PAT>`,
//! `Bearer <PAT>`, or `Basic :<access token>` (`config.sh --auth pat` with an Entra token). Missing,
//! expired, forged or wrong-audience tokens → 401 + `WWW-Authenticate`; an identity not in the org →
//! 401 `TF401444`; reading a pool needs the `reader` role, changing agents `administrator` (else 403).
//! Sessions, messages and the agent's own job requests need the agent's OAuth token.
//! Call counters label identities as `{org}/{objectId}`, `{org}/agent:{id}`, `anonymous` (refused
//! before authentication) or `fault` (answered by an injected fault).
//!
//! # Semantics
//!
//! A request is assigned only to an online (has a session), enabled agent without a job whose
//! capabilities satisfy its demands, while one of the organization's parallel jobs is free (tag
//! `Private`; a slot is held from assignment to finish). Requests no agent of the pool (online or
//! not) can serve fail at once, and when the last matching agent is deleted. Unreceived assignments
//! return to the queue when the session ends; received jobs whose lock is not renewed are abandoned.

mod ado;
mod control;
pub mod demands;
mod entra;
mod model;
mod ratelimit;
pub mod testing;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ca::{CaError, TestCa};

pub use model::{AgentAction, AgentChange, AgentInfo, RequestInfo};

/// The ADO resource (application) id: the audience of access tokens for Azure DevOps.
pub const ADO_RESOURCE_ID: &str = "499b84ac-1321-427f-aa17-267ca6975798";
/// The scope a workload-identity client asks Entra for.
pub const ADO_SCOPE: &str = "499b84ac-1321-427f-aa17-267ca6975798/.default";
/// The audience a federated (Kubernetes service-account) token must carry.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Parallelism tag of self-hosted private jobs (the one that counts against the org's parallel jobs).
pub const PRIVATE_TAG: &str = "Private";
/// Default number of self-hosted parallel jobs of an organization created by [`OrgSpec::new`].
pub const DEFAULT_PARALLEL_JOBS: u32 = 10;

/// Errors of the simulator's control surface and start-up.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator: {0}")]
    Ca(#[from] CaError),
    #[error("simulator: binding {what} on 127.0.0.1 failed: {source}")]
    Bind {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("simulator: writing {path} failed: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("simulator: no organization {0:?}; add it with Simulator::add_org")]
    UnknownOrg(String),
    #[error(
        "simulator: no pool {pool:?} in organization {org:?}; add it with OrgSpec::pool or Simulator::add_pool"
    )]
    UnknownPool { org: String, pool: String },
    #[error("simulator: no request {0} in this organization")]
    UnknownRequest(u64),
    #[error("simulator: organization {0:?} exists already")]
    OrgExists(String),
    #[error("simulator: pool {pool:?} exists already in organization {org:?}")]
    PoolExists { org: String, pool: String },
    #[error("simulator: invalid request spec: {0}")]
    InvalidSpec(String),
    #[error("simulator: request {0} is finished already; nothing to cancel")]
    AlreadyFinished(u64),
    #[error(
        "simulator: must be called inside a tokio runtime (Simulator::start spawns the servers there)"
    )]
    NoRuntime,
}

impl SimError {
    /// Stable label for metrics and test assertions.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SimError::Ca(_) => "ca",
            SimError::Bind { .. } => "bind",
            SimError::Io { .. } => "io",
            SimError::UnknownOrg(_) => "unknown_org",
            SimError::UnknownPool { .. } => "unknown_pool",
            SimError::UnknownRequest(_) => "unknown_request",
            SimError::OrgExists(_) => "org_exists",
            SimError::PoolExists { .. } => "pool_exists",
            SimError::InvalidSpec(_) => "invalid_spec",
            SimError::AlreadyFinished(_) => "already_finished",
            SimError::NoRuntime => "no_runtime",
        }
    }
}

/// Which waiting request goes to which free agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentOrder {
    /// Oldest waiting request first, each to the free agent registered first (lowest id).
    #[default]
    OldestFirst,
    /// Newest free agent (highest id) first, each taking the oldest request it can serve.
    NewestAgentFirst,
    /// Newest waiting request first (LIFO), each to the free agent registered first.
    NewestRequestFirst,
    /// Random pairing from a seeded generator (reproducible for a given seed and call sequence).
    Random { seed: u64 },
}

/// A role on an ADO pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PoolRole {
    /// No access: every pool call answers 403.
    None,
    /// May read the pool, its agents and job requests.
    Reader,
    /// May also register, replace, update and delete agents.
    Administrator,
}

/// An identity (a user-assigned managed identity or app registration) known to the simulated Entra.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// Application (client) id, what `AZURE_CLIENT_ID` holds.
    pub client_id: String,
    /// Object id (`oid` in access tokens); org membership and pool roles are keyed by it.
    pub object_id: String,
    /// Display name (appears in error messages).
    #[serde(default)]
    pub display_name: String,
    /// Federated credentials: which (issuer, subject) may exchange a token for this identity.
    #[serde(default)]
    pub federated: Vec<FederatedCredential>,
}

impl IdentitySpec {
    /// An identity with random object id and no federated credential.
    pub fn new(client_id: impl Into<String>) -> Self {
        let client_id = client_id.into();
        IdentitySpec {
            display_name: format!("identity {client_id}"),
            client_id,
            object_id: uuid::Uuid::new_v4().to_string(),
            federated: Vec::new(),
        }
    }

    /// Sets the object id.
    pub fn object_id(mut self, oid: impl Into<String>) -> Self {
        self.object_id = oid.into();
        self
    }

    /// Trusts tokens of `issuer` with subject `system:serviceaccount:<namespace>:<sa>`.
    pub fn federated_sa(mut self, issuer: impl Into<String>, namespace: &str, sa: &str) -> Self {
        self.federated.push(FederatedCredential {
            issuer: issuer.into(),
            subject: format!("system:serviceaccount:{namespace}:{sa}"),
            audience: FEDERATED_AUDIENCE.into(),
        });
        self
    }
}

/// One federated identity credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    #[serde(default = "default_fed_audience")]
    pub audience: String,
}

fn default_fed_audience() -> String {
    FEDERATED_AUDIENCE.into()
}

/// A token issuer Entra trusts for federated credentials, with where its signing keys come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FederatedIssuer {
    /// The `iss` value, e.g. the kube-apiserver's `--service-account-issuer`.
    pub issuer: String,
    pub jwks: JwksSource,
}

/// Where the signing keys of a federated issuer come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JwksSource {
    /// Keys given up front (tests sign federated tokens with [`testing::TestIssuer`]).
    Static(jsonwebtoken::jwk::JwkSet),
    /// Keys fetched (and cached, refetched on an unknown `kid`) from a URL, e.g. the kube-apiserver's
    /// `https://127.0.0.1:<port>/openid/v1/jwks`.
    #[serde(rename_all = "camelCase")]
    Url {
        url: String,
        /// PEM of the CA that signed the URL's server certificate (else the system roots).
        #[serde(default)]
        ca_pem: Option<String>,
        /// Bearer token for the fetch (the apiserver allows anonymous access only if so bound).
        #[serde(default)]
        bearer_token: Option<String>,
    },
}

/// A personal access token (Azure DevOps Server mode), accepted as Basic `:pat` or Bearer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatSpec {
    pub token: String,
    /// The identity the PAT acts as (its object id; membership and roles apply as for Entra tokens).
    pub object_id: String,
}

/// An ADO pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    pub name: String,
    /// Roles per identity object id on this pool; others get the org's `default_pool_role`.
    #[serde(default)]
    pub roles: BTreeMap<String, PoolRole>,
}

/// An ADO organization.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgSpec {
    pub name: String,
    /// Self-hosted private parallel jobs (a slot is held from assignment to finish).
    #[serde(default = "default_parallel_jobs")]
    pub parallel_jobs: u32,
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// Object ids of identities added to the organization (others get 401 TF401444).
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub pats: Vec<PatSpec>,
    /// Role of a member on a pool without an explicit role.
    #[serde(default = "default_role")]
    pub default_pool_role: PoolRole,
}

fn default_parallel_jobs() -> u32 {
    DEFAULT_PARALLEL_JOBS
}
fn default_role() -> PoolRole {
    PoolRole::Administrator
}

impl OrgSpec {
    /// An organization with [`DEFAULT_PARALLEL_JOBS`] parallel jobs, no pools, no members; members are
    /// pool administrators unless a pool says otherwise.
    pub fn new(name: impl Into<String>) -> Self {
        OrgSpec {
            name: name.into(),
            parallel_jobs: DEFAULT_PARALLEL_JOBS,
            pools: Vec::new(),
            members: Vec::new(),
            pats: Vec::new(),
            default_pool_role: PoolRole::Administrator,
        }
    }
    /// Adds a pool.
    pub fn pool(mut self, name: impl Into<String>) -> Self {
        self.pools.push(PoolSpec {
            name: name.into(),
            roles: BTreeMap::new(),
        });
        self
    }
    /// Adds a member (identity object id).
    pub fn member(mut self, object_id: impl Into<String>) -> Self {
        self.members.push(object_id.into());
        self
    }
    /// Adds a PAT acting as `object_id` (who must also be a member to get past TF401444).
    pub fn pat(mut self, token: impl Into<String>, object_id: impl Into<String>) -> Self {
        self.pats.push(PatSpec {
            token: token.into(),
            object_id: object_id.into(),
        });
        self
    }
    /// Sets the parallel-job count.
    pub fn parallel_jobs(mut self, n: u32) -> Self {
        self.parallel_jobs = n;
        self
    }
}

/// What the stand-in agent does with a job (carried in the job message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// How long the job "runs".
    #[serde(default)]
    pub duration_ms: u64,
    /// `succeeded` or `failed`.
    #[serde(default = "default_result")]
    pub result: String,
    /// Run a step process that reports its environment through `_testbed/requests/{id}/report`.
    #[serde(default)]
    pub probe: bool,
}

fn default_result() -> String {
    "succeeded".into()
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            duration_ms: 0,
            result: default_result(),
            probe: false,
        }
    }
}

/// A job request to queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestSpec {
    #[serde(default)]
    pub demands: Vec<String>,
    #[serde(default)]
    pub workload: Workload,
    /// `Private` (default; counts against parallel jobs) or `Public`.
    #[serde(default)]
    pub parallelism_tag: Option<String>,
    /// Queue it this much later (the call returns the id at once; the request appears then).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Pipeline (definition) name shown in `definition.name`.
    #[serde(default)]
    pub definition: Option<String>,
    /// Job display name.
    #[serde(default)]
    pub job_name: Option<String>,
}

impl RequestSpec {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn demand(mut self, d: impl Into<String>) -> Self {
        self.demands.push(d.into());
        self
    }
    pub fn duration(mut self, d: Duration) -> Self {
        self.workload.duration_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self
    }
    pub fn result(mut self, r: impl Into<String>) -> Self {
        self.workload.result = r.into();
        self
    }
    pub fn probe(mut self) -> Self {
        self.workload.probe = true;
        self
    }
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.parallelism_tag = Some(tag.into());
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// Rate limiting per (organization, identity) in TSTUs over a sliding window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// TSTUs allowed per window (ADO: 200 per 5 minutes).
    pub limit: f64,
    pub window_secs: u64,
    /// TSTUs one call costs.
    pub cost_per_call: f64,
    /// Fraction of the limit from which a 200 carries `Retry-After`.
    pub near_fraction: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            limit: 200.0,
            window_secs: 300,
            cost_per_call: 0.05,
            near_fraction: 0.9,
        }
    }
}

/// Endpoint class a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointClass {
    Pools,
    JobRequests,
    Agents,
    ResourceUsage,
    /// The Entra token endpoint.
    Token,
    /// The agent-side flow: agent OAuth, sessions, messages.
    AgentFlow,
    /// Every endpoint above.
    Any,
}

/// What a fault does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultKind {
    /// 429 with a `TF400733` message and `Retry-After`.
    #[serde(rename_all = "camelCase")]
    RateLimited { retry_after_secs: u64 },
    /// The given 5xx status with an ADO-shaped (or Entra-shaped) error body.
    ServerError { status: u16 },
    /// Wait this long, then answer normally.
    Slow { delay_ms: u64 },
    /// Answer 200 with a body that is not valid JSON.
    MalformedJson,
    /// Entra token endpoint answers 503 (temporarily_unavailable).
    TokenOutage,
    /// Access tokens issued while active live this long.
    ShortTokenLifetime { secs: u64 },
}

/// A fault armed for an endpoint class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub class: EndpointClass,
    pub kind: FaultKind,
    /// How many calls it hits (`None` = until cleared).
    #[serde(default)]
    pub count: Option<u32>,
    /// Only this organization (Entra faults ignore it).
    #[serde(default)]
    pub org: Option<String>,
    /// Only calls by this identity (object id) to the ADO REST API, once authenticated: a fault for one
    /// caller (the controller) while other callers (agents) are served. Entra faults ignore it.
    #[serde(default)]
    pub caller: Option<String>,
}

impl Fault {
    /// A fault hitting the next call of `class` only.
    pub fn once(class: EndpointClass, kind: FaultKind) -> Self {
        Fault {
            class,
            kind,
            count: Some(1),
            org: None,
            caller: None,
        }
    }
    /// A fault hitting the next `n` calls of `class`.
    pub fn times(class: EndpointClass, kind: FaultKind, n: u32) -> Self {
        Fault {
            class,
            kind,
            count: Some(n),
            org: None,
            caller: None,
        }
    }
    /// A fault hitting every call of `class` until cleared.
    pub fn always(class: EndpointClass, kind: FaultKind) -> Self {
        Fault {
            class,
            kind,
            count: None,
            org: None,
            caller: None,
        }
    }
    /// Scopes the fault to the ADO calls of one identity (object id).
    pub fn by(mut self, object_id: impl Into<String>) -> Self {
        self.caller = Some(object_id.into());
        self
    }
}

/// Number of calls to one endpoint by one identity with one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallCount {
    /// Stable endpoint label, e.g. `jobrequests.list`, `agents.add`, `entra.token`.
    pub endpoint: String,
    /// Org and identity (`contoso/<oid>`, `contoso/agent:<id>`, `anonymous`).
    pub identity: String,
    pub status: u16,
    pub count: u64,
}

/// What a probe job step reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub request_id: u64,
    pub body: serde_json::Value,
}

/// Simulator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SimConfig {
    /// HTTPS with a fresh test CA (default) or plain HTTP.
    pub tls: bool,
    /// Port of the ADO listener (0 = any free port).
    pub ado_port: u16,
    /// Port of the Entra listener (0 = any free port).
    pub entra_port: u16,
    /// The tenant id Entra answers for.
    pub tenant_id: String,
    /// Lifetime of Entra access tokens.
    pub token_lifetime_secs: u64,
    /// Lifetime of the agents' OAuth tokens.
    pub agent_token_lifetime_secs: u64,
    /// Longest wait of a messages long poll (ADO: 50 s).
    pub long_poll_secs: u64,
    /// A running request whose cancellation the agent did not confirm is finished as canceled after this.
    pub cancel_timeout_secs: u64,
    /// Job lock duration (`lockedUntil` = assignment/renewal + this); a received request whose lock
    /// is not renewed in time is finished `abandoned` and its agent freed (checked every 250 ms).
    pub lock_secs: u64,
    pub assignment_order: AssignmentOrder,
    pub rate_limit: RateLimitConfig,
    pub federated_issuers: Vec<FederatedIssuer>,
    pub identities: Vec<IdentitySpec>,
    pub orgs: Vec<OrgSpec>,
    /// Folder for `ca.pem` (default: a fresh folder under the system temp dir).
    pub state_dir: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tls: true,
            ado_port: 0,
            entra_port: 0,
            tenant_id: uuid::Uuid::new_v4().to_string(),
            token_lifetime_secs: 3600,
            agent_token_lifetime_secs: 3600,
            long_poll_secs: 50,
            cancel_timeout_secs: 60,
            lock_secs: 300,
            assignment_order: AssignmentOrder::OldestFirst,
            rate_limit: RateLimitConfig::default(),
            federated_issuers: Vec::new(),
            identities: Vec::new(),
            orgs: Vec::new(),
            state_dir: None,
        }
    }
}

impl SimConfig {
    /// Plain HTTP (no CA, no TLS) — for unit tests of clients that do not care about TLS.
    pub fn plain_http() -> Self {
        SimConfig {
            tls: false,
            ..SimConfig::default()
        }
    }
}

/// State shared by the HTTP handlers and the control API.
pub(crate) struct Shared {
    pub(crate) world: Mutex<model::World>,
    pub(crate) keys: Arc<entra::SigningKeys>,
    pub(crate) jwks_cache: entra::JwksCache,
    pub(crate) ado_base: String,
    pub(crate) entra_base: String,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Shared {
    pub(crate) fn world(&self) -> MutexGuard<'_, model::World> {
        // A panicking handler must not wedge every later test call: take the data anyway.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running simulator. Dropping it stops both listeners.
pub struct Simulator {
    shared: Arc<Shared>,
    ado_addr: SocketAddr,
    entra_addr: SocketAddr,
    tls: bool,
    ca: Option<TestCa>,
    ca_pem_path: Option<PathBuf>,
    state_dir: PathBuf,
    remove_state_dir: bool,
    handles: Vec<axum_server::Handle<SocketAddr>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("ado", &self.ado_addr)
            .field("entra", &self.entra_addr)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Starts both listeners on 127.0.0.1 and returns once they accept connections.
    pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let bind = |port: u16, what: &'static str| {
            let l = std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|source| SimError::Bind { what, source })?;
            l.set_nonblocking(true)
                .map_err(|source| SimError::Bind { what, source })?;
            let addr = l
                .local_addr()
                .map_err(|source| SimError::Bind { what, source })?;
            Ok::<_, SimError>((l, addr))
        };
        let (ado_l, ado_addr) = bind(config.ado_port, "the ADO listener")?;
        let (entra_l, entra_addr) = bind(config.entra_port, "the Entra listener")?;
        let scheme = if config.tls { "https" } else { "http" };
        let ado_base = format!("{scheme}://{ado_addr}");
        let entra_base = format!("{scheme}://{entra_addr}");

        let (state_dir, remove_state_dir) = match &config.state_dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("azp-sim-{}", uuid::Uuid::new_v4())),
                true,
            ),
        };
        std::fs::create_dir_all(&state_dir).map_err(|source| SimError::Io {
            path: state_dir.display().to_string(),
            source,
        })?;

        let keys = entra::SigningKeys::shared()?;
        let world = model::World::new(&config, &ado_base)?;
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            keys,
            jwks_cache: entra::JwksCache::default(),
            ado_base: ado_base.clone(),
            entra_base: entra_base.clone(),
            runtime,
        });

        let ado_router = ado::router(shared.clone());
        let entra_router = entra::router(shared.clone());
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        let (ca, ca_pem_path) = if config.tls {
            let ca = TestCa::new()?;
            let leaf = ca.server_cert(&["127.0.0.1", "localhost"])?;
            let path = state_dir.join("ca.pem");
            ca.write_pem(&path)?;
            let rustls =
                axum_server::tls_rustls::RustlsConfig::from_config(leaf.rustls_server_config()?);
            for (l, router, what) in [
                (ado_l, ado_router, "the ADO listener"),
                (entra_l, entra_router, "the Entra listener"),
            ] {
                let handle = axum_server::Handle::new();
                let server = axum_server::tls_rustls::from_tcp_rustls(l, rustls.clone())
                    .map_err(|source| SimError::Bind { what, source })?
                    .handle(handle.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = server.serve(router.into_make_service()).await {
                        tracing::error!(error = %e, "simulator listener stopped");
                    }
                }));
                handles.push(handle);
            }
            (Some(ca), Some(path))
        } else {
            for (l, router, what) in [
                (ado_l, ado_router, "the ADO listener"),
                (entra_l, entra_router, "the Entra listener"),
            ] {
                let handle = axum_server::Handle::new();
                let server = axum_server::from_tcp(l)
                    .map_err(|source| SimError::Bind { what, source })?
                    .handle(handle.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = server.serve(router.into_make_service()).await {
                        tracing::error!(error = %e, "simulator listener stopped");
                    }
                }));
                handles.push(handle);
            }
            (None, None)
        };
        // Lock expiry: abandon running requests whose agent stopped renewing the lock.
        let ticker = Arc::downgrade(&shared);
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                let Some(sh) = ticker.upgrade() else { return };
                sh.world().expire_locks(jiff::Timestamp::now());
            }
        }));
        for h in &handles {
            // Returns once the accept loop runs (listening address known).
            let _ = h.listening().await;
        }
        Ok(Simulator {
            shared,
            ado_addr,
            entra_addr,
            tls: config.tls,
            ca,
            ca_pem_path,
            state_dir,
            remove_state_dir,
            handles,
            tasks,
        })
    }

    /// Base URL of the ADO listener, e.g. `https://127.0.0.1:41234` (no trailing `/`).
    pub fn ado_url(&self) -> String {
        self.shared.ado_base.clone()
    }

    /// URL of an organization, `{ado}/{org}` — what `AZP_URL` holds.
    pub fn org_url(&self, org: &str) -> String {
        format!("{}/{}", self.shared.ado_base, org)
    }

    /// The Entra authority host with a trailing `/` (`AZURE_AUTHORITY_HOST`).
    pub fn entra_url(&self) -> String {
        format!("{}/", self.shared.entra_base)
    }

    /// The token endpoint of the configured tenant.
    pub fn token_url(&self) -> String {
        let tenant = self.tenant_id();
        format!("{}/{tenant}/oauth2/v2.0/token", self.shared.entra_base)
    }

    /// The tenant id Entra answers for (`AZURE_TENANT_ID`).
    pub fn tenant_id(&self) -> String {
        self.shared.world().tenant_id.clone()
    }

    /// Path of the CA certificate (PEM) clients must trust, `None` in plain-HTTP mode.
    pub fn ca_pem_path(&self) -> Option<&Path> {
        self.ca_pem_path.as_deref()
    }

    /// The CA certificate PEM, `None` in plain-HTTP mode.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(TestCa::cert_pem)
    }

    /// A reqwest client trusting only this simulator's CA (or plain, in HTTP mode).
    pub fn http_client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(120));
        if let Some(ca) = &self.ca {
            match reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()) {
                Ok(cert) => b = b.tls_certs_only([cert]),
                Err(e) => tracing::error!(error = %e, "simulator CA not usable by reqwest"),
            }
        }
        b.build().unwrap_or_default()
    }

    /// The URLs as one JSON object (the `sim` subcommand prints it as one line).
    pub fn urls_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ado": self.ado_url(),
            "entra": self.entra_url(),
            "tenantId": self.tenant_id(),
            "caPem": self.ca_pem_path().map(|p| p.display().to_string()),
            "control": format!("{}/_testbed", self.shared.ado_base),
        })
    }

    // ---- configuration -------------------------------------------------------------------------

    /// Adds an organization with its pools, members and PATs.
    pub fn add_org(&self, spec: OrgSpec) -> Result<(), SimError> {
        self.shared.world().add_org(spec)
    }

    /// Adds a pool; returns its id.
    pub fn add_pool(&self, org: &str, pool: &str) -> Result<u32, SimError> {
        self.shared.world().add_pool(org, pool)
    }

    /// Id of a pool.
    pub fn pool_id(&self, org: &str, pool: &str) -> Result<u32, SimError> {
        self.shared.world().pool_id(org, pool)
    }

    /// Adds (or replaces, by client id) an identity.
    pub fn add_identity(&self, spec: IdentitySpec) {
        self.shared.world().add_identity(spec);
    }

    /// Trusts a federated issuer (replacing one with the same `issuer`).
    pub fn add_federated_issuer(&self, issuer: FederatedIssuer) {
        self.shared.jwks_cache.forget(&issuer.issuer);
        self.shared.world().add_federated_issuer(issuer);
    }

    /// Adds an identity (object id) to an organization.
    pub fn add_member(&self, org: &str, object_id: &str) -> Result<(), SimError> {
        self.shared.world().set_member(org, object_id, true)
    }

    /// Removes an identity from an organization (its calls then get 401 TF401444).
    pub fn remove_member(&self, org: &str, object_id: &str) -> Result<(), SimError> {
        self.shared.world().set_member(org, object_id, false)
    }

    /// Sets an identity's role on a pool.
    pub fn set_pool_role(
        &self,
        org: &str,
        pool: &str,
        object_id: &str,
        role: PoolRole,
    ) -> Result<(), SimError> {
        self.shared
            .world()
            .set_pool_role(org, pool, object_id, role)
    }

    /// Adds a PAT acting as `object_id`.
    pub fn add_pat(&self, org: &str, token: &str, object_id: &str) -> Result<(), SimError> {
        self.shared.world().add_pat(org, token, object_id)
    }

    /// Sets the organization's self-hosted private parallel jobs (waiting requests may get assigned).
    pub fn set_parallel_jobs(&self, org: &str, n: u32) -> Result<(), SimError> {
        let mut w = self.shared.world();
        w.set_parallel_jobs(org, n)?;
        w.run_engine();
        Ok(())
    }

    /// Switches the assignment order.
    pub fn set_assignment_order(&self, order: AssignmentOrder) {
        self.shared.world().set_assignment_order(order);
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.shared.world().token_lifetime = d;
    }

    /// Replaces the rate-limit settings (usage already counted is kept).
    pub fn set_rate_limit(&self, cfg: RateLimitConfig) {
        self.shared.world().rate.set_config(cfg);
    }

    /// Arms a fault.
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.world().faults.push(fault);
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        self.shared.world().faults.clear();
    }

    /// Signs an access token for `object_id` directly (as if Entra had issued it for `client_id`),
    /// for tests of ADO calls that do not exercise the exchange.
    pub fn mint_access_token(
        &self,
        client_id: &str,
        object_id: &str,
        lifetime: Duration,
    ) -> String {
        let tenant = self.tenant_id();
        entra::mint_access_token(&self.shared, &tenant, client_id, object_id, lifetime)
    }

    /// Signs arbitrary claims with the simulator's access-token key (for tests of token validation:
    /// wrong audience, odd claims).
    pub fn sign_claims(&self, claims: &serde_json::Value) -> String {
        entra::sign_claims(&self.shared, claims)
    }

    // ---- workload ------------------------------------------------------------------------------

    /// Queues a job request; returns its id. With `delay_ms` the request appears that much later
    /// (the id is reserved now).
    pub fn queue(&self, org: &str, pool: &str, spec: RequestSpec) -> Result<u64, SimError> {
        model::queue(&self.shared, org, pool, spec)
    }

    /// Cancels a request: a waiting one finishes `canceled` at once; an assigned one gets a
    /// `JobCancellation` message and is finished `canceled` after the cancel timeout if its agent
    /// does not finish it first.
    pub fn cancel(&self, org: &str, request_id: u64) -> Result<(), SimError> {
        model::cancel(&self.shared, org, request_id)
    }

    /// Every request of a pool (queued so far, delayed ones once they appear), oldest first.
    pub fn requests(&self, org: &str, pool: &str) -> Result<Vec<RequestInfo>, SimError> {
        self.shared.world().requests_info(org, pool)
    }

    /// One request.
    pub fn request(&self, org: &str, request_id: u64) -> Result<RequestInfo, SimError> {
        self.shared.world().request_info(org, request_id)
    }

    /// Every agent of a pool, by id.
    pub fn agents(&self, org: &str, pool: &str) -> Result<Vec<AgentInfo>, SimError> {
        self.shared.world().agents_info(org, pool)
    }

    /// Every change made to an agent through the REST API so far (registrations, takeovers, updates,
    /// deletions), oldest first, with the caller and the request the agent held at that moment.
    pub fn agent_changes(&self) -> Vec<AgentChange> {
        self.shared.world().agent_log.clone()
    }

    /// An identity known to Entra, by client id (to change its federated credentials and add it back).
    pub fn identity(&self, client_id: &str) -> Option<IdentitySpec> {
        self.shared
            .world()
            .identities
            .get(&client_id.to_ascii_lowercase())
            .cloned()
    }

    /// What probe steps of a request reported, in arrival order.
    pub fn reports(&self, request_id: u64) -> Vec<Report> {
        self.shared.world().reports_of(request_id)
    }

    /// Call counters, sorted by endpoint, identity, status.
    pub fn calls(&self) -> Vec<CallCount> {
        self.shared.world().calls()
    }

    /// Total calls to an endpoint label (any identity, any status).
    pub fn call_count(&self, endpoint: &str) -> u64 {
        self.calls()
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .map(|c| c.count)
            .sum()
    }

    /// Zeroes the call counters.
    pub fn reset_calls(&self) {
        self.shared.world().reset_calls();
    }

    /// Waits (polling every 20 ms) until `pred` holds for the request, or `timeout` passes; returns
    /// the last state seen either way.
    pub async fn wait_request(
        &self,
        org: &str,
        request_id: u64,
        timeout: Duration,
        pred: impl Fn(&RequestInfo) -> bool,
    ) -> Result<RequestInfo, SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.request(org, request_id)?;
            if pred(&r) || tokio::time::Instant::now() >= deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops both listeners.
    pub fn shutdown(&self) {
        for h in &self.handles {
            h.shutdown();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown();
        for t in &self.tasks {
            t.abort();
        }
        if self.remove_state_dir {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}
