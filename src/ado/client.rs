//! [`AdoClient`]: the REST calls the controller and the agent entrypoint make, for one (organization,
//! identity). Cheap to clone; clones share the HTTP connection pool, the token cache and the
//! rate-limit state, so every ADO pool of the organization polled with that identity obeys the same
//! `Retry-After`.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::auth::{TokenSource, error_chain, excerpt};
use super::error::AdoError;
use super::models::{ListResponse, ResourceUsage, TaskAgent, TaskAgentJobRequest, TaskAgentPool};
use super::observer::{AdoObserver, CallRecord, NoopObserver};
use super::ratelimit::Limiter;
use crate::tls;

/// `api-version` of the routes the 7.1 spec documents (pools, agents).
pub const API_VERSION: &str = "7.1";
/// `api-version` of `jobrequests` (not in the public spec; the agent's client calls it as a preview).
pub const JOBREQUESTS_API_VERSION: &str = "7.1-preview.1";
/// `api-version` of `resourceusage` (client-internal in ADO, preview only).
pub const RESOURCE_USAGE_API_VERSION: &str = "7.1-preview.1";

/// Settings of an [`AdoClient`].
#[derive(Clone)]
pub struct AdoClientConfig {
    /// Upper bound of one HTTP call (connect, send, read).
    pub request_timeout: Duration,
    /// Our own steady budget of calls per second to the organization with this identity.
    pub requests_per_second: NonZeroU32,
    /// Calls allowed in a burst above the steady budget.
    pub burst: NonZeroU32,
    /// How long to hold calls after a 429 that carries no `Retry-After`.
    pub throttle_default: Duration,
    /// Receives call, rate-limit and delay events.
    pub observer: Arc<dyn AdoObserver>,
}

impl Default for AdoClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            requests_per_second: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            throttle_default: Duration::from_secs(30),
            observer: Arc::new(NoopObserver),
        }
    }
}

impl std::fmt::Debug for AdoClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdoClientConfig")
            .field("request_timeout", &self.request_timeout)
            .field("requests_per_second", &self.requests_per_second)
            .field("burst", &self.burst)
            .field("throttle_default", &self.throttle_default)
            .finish_non_exhaustive()
    }
}

/// Which agents to list, and how much of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentQuery {
    /// Only the agent with this name (`agentName`).
    pub name: Option<String>,
    /// Include `systemCapabilities` / `userCapabilities`.
    pub include_capabilities: bool,
    /// Include `assignedRequest`.
    pub include_assigned_request: bool,
    /// Include `lastCompletedRequest`.
    pub include_last_completed_request: bool,
}

impl AgentQuery {
    /// Every agent, names and states only.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only the agent named `name`.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            ..Self::default()
        }
    }

    /// Also read capabilities.
    pub fn with_capabilities(mut self) -> Self {
        self.include_capabilities = true;
        self
    }

    /// Also read the request each agent holds.
    pub fn with_assigned_request(mut self) -> Self {
        self.include_assigned_request = true;
        self
    }

    /// Also read the request each agent last completed.
    pub fn with_last_completed_request(mut self) -> Self {
        self.include_last_completed_request = true;
        self
    }
}

/// A partial update of an agent (`PATCH`): only the fields set are sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentUpdate {
    /// Enable (true) or disable (false) assignment of work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New user capabilities (replaces them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_capabilities: Option<BTreeMap<String, String>>,
    /// New system capabilities (replaces them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_capabilities: Option<BTreeMap<String, String>>,
}

impl AgentUpdate {
    /// Only set `enabled`.
    pub fn enabled(enabled: bool) -> Self {
        Self {
            enabled: Some(enabled),
            ..Self::default()
        }
    }
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The agent existed and was deleted.
    Deleted,
    /// ADO answered 404: it was already gone (deregistered by itself, or by an earlier attempt).
    AlreadyGone,
}

/// The ADO REST client of one (organization, identity).
#[derive(Clone)]
pub struct AdoClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    organization: Url,
    organization_text: String,
    tokens: TokenSource,
    limiter: Limiter,
    config: AdoClientConfig,
}

impl std::fmt::Debug for AdoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdoClient")
            .field("organization", &self.inner.organization_text)
            .field("identity", &self.inner.tokens.identity())
            .finish_non_exhaustive()
    }
}

/// An answer with a 2xx status.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl AdoClient {
    /// A client for `organization_url` (e.g. `https://dev.azure.com/contoso`, or an Azure DevOps
    /// Server collection URL) with default settings.
    pub fn new(organization_url: &str, tokens: TokenSource) -> Result<Self, AdoError> {
        Self::with_config(organization_url, tokens, AdoClientConfig::default())
    }

    /// A client with explicit settings.
    pub fn with_config(
        organization_url: &str,
        tokens: TokenSource,
        config: AdoClientConfig,
    ) -> Result<Self, AdoError> {
        let organization = parse_organization(organization_url)?;
        let http = tls::http_client_builder()?
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            // Never follow a redirect with the token: ADO redirects unaccepted credentials to a
            // sign-in page, which is an authentication failure, not an answer.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AdoError::Config {
                field: "https client",
                reason: error_chain(&e),
            })?;
        let organization_text = organization.as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                organization,
                organization_text,
                tokens,
                limiter: Limiter::new(config.requests_per_second, config.burst),
                config,
            }),
        })
    }

    /// The organization URL (no trailing slash).
    pub fn organization(&self) -> &str {
        &self.inner.organization_text
    }

    /// Who the client calls as, for messages (e.g. `workload identity <client id>`).
    pub fn identity(&self) -> String {
        self.inner.tokens.identity()
    }

    /// The token source (the agent entrypoint takes its `fresh_token` from here).
    pub fn tokens(&self) -> &TokenSource {
        &self.inner.tokens
    }

    /// Fraction of ADO's rate budget left after the last answer (1.0 = no pressure).
    pub fn headroom(&self) -> f64 {
        self.inner.limiter.headroom()
    }

    /// Factor by which the poll loop should stretch its interval: 1.0 normally, up to
    /// [`super::ratelimit::MAX_SLOW_DOWN`] when `X-RateLimit-Remaining` runs low.
    pub fn slow_down_factor(&self) -> f64 {
        self.inner.limiter.slow_down_factor()
    }

    /// Time until calls may go out again after a `Retry-After` (zero when none is pending).
    pub fn retry_after_remaining(&self) -> Duration {
        self.inner.limiter.retry_after_remaining()
    }

    /// The pool named `name` (case-insensitive), or `None` when the organization has none.
    pub async fn pool_by_name(&self, name: &str) -> Result<Option<TaskAgentPool>, AdoError> {
        let call =
            Call::get("pools", self.url(&["distributedtask", "pools"])?).param("poolName", name);
        let list: ListResponse<TaskAgentPool> = self.execute(call, None::<&()>, decode).await?;
        Ok(list
            .value
            .into_iter()
            .find(|p| p.name.eq_ignore_ascii_case(name)))
    }

    /// Every unfinished job request of the pool (`completedRequestCount=0`, no `$top`: all of them).
    pub async fn job_requests(&self, pool_id: i32) -> Result<Vec<TaskAgentJobRequest>, AdoError> {
        let url = self.url(&[
            "distributedtask",
            "pools",
            &pool_id.to_string(),
            "jobrequests",
        ])?;
        let call = Call::get("jobrequests", url)
            .api_version(JOBREQUESTS_API_VERSION)
            .param("completedRequestCount", "0");
        let list: ListResponse<TaskAgentJobRequest> =
            self.execute(call, None::<&()>, decode).await?;
        Ok(list.value)
    }

    /// Agents of the pool.
    pub async fn agents(
        &self,
        pool_id: i32,
        query: &AgentQuery,
    ) -> Result<Vec<TaskAgent>, AdoError> {
        let url = self.url(&["distributedtask", "pools", &pool_id.to_string(), "agents"])?;
        let mut call = Call::get("agents", url);
        if let Some(name) = &query.name {
            call = call.param("agentName", name);
        }
        if query.include_capabilities {
            call = call.param("includeCapabilities", "true");
        }
        if query.include_assigned_request {
            call = call.param("includeAssignedRequest", "true");
        }
        if query.include_last_completed_request {
            call = call.param("includeLastCompletedRequest", "true");
        }
        let list: ListResponse<TaskAgent> = self.execute(call, None::<&()>, decode).await?;
        Ok(list.value)
    }

    /// One agent with its capabilities and the request it holds; `None` when it does not exist.
    pub async fn agent(&self, pool_id: i32, agent_id: i32) -> Result<Option<TaskAgent>, AdoError> {
        let call = Call::get("agent", self.agent_url(pool_id, agent_id)?)
            .param("includeCapabilities", "true")
            .param("includeAssignedRequest", "true");
        match self.execute(call, None::<&()>, decode).await {
            Ok(agent) => Ok(Some(agent)),
            Err(AdoError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Registers a new agent (`POST`); the answer has its `id` and `authorization`.
    pub async fn add_agent(&self, pool_id: i32, agent: &TaskAgent) -> Result<TaskAgent, AdoError> {
        let url = self.url(&["distributedtask", "pools", &pool_id.to_string(), "agents"])?;
        let call = Call::new("add_agent", Method::POST, url);
        self.execute(call, Some(agent), decode).await
    }

    /// Replaces an existing agent (`PUT`): new key, capabilities, version (what `--replace` does).
    pub async fn replace_agent(
        &self,
        pool_id: i32,
        agent_id: i32,
        agent: &TaskAgent,
    ) -> Result<TaskAgent, AdoError> {
        let mut body = agent.clone();
        body.id = agent_id;
        let call = Call::new(
            "replace_agent",
            Method::PUT,
            self.agent_url(pool_id, agent_id)?,
        );
        self.execute(call, Some(&body), decode).await
    }

    /// Updates some fields of an agent (`PATCH`), e.g. disables it before removal.
    pub async fn update_agent(
        &self,
        pool_id: i32,
        agent_id: i32,
        update: &AgentUpdate,
    ) -> Result<TaskAgent, AdoError> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: i32,
            #[serde(flatten)]
            update: &'a AgentUpdate,
        }
        let body = Body {
            id: agent_id,
            update,
        };
        let call = Call::new(
            "update_agent",
            Method::PATCH,
            self.agent_url(pool_id, agent_id)?,
        );
        self.execute(call, Some(&body), decode).await
    }

    /// Deletes an agent. A 404 is success: [`DeleteOutcome::AlreadyGone`].
    pub async fn delete_agent(
        &self,
        pool_id: i32,
        agent_id: i32,
    ) -> Result<DeleteOutcome, AdoError> {
        let call = Call::new(
            "delete_agent",
            Method::DELETE,
            self.agent_url(pool_id, agent_id)?,
        );
        match self.execute(call, None::<&()>, ignore_body).await {
            Ok(()) => Ok(DeleteOutcome::Deleted),
            Err(AdoError::NotFound { .. }) => Ok(DeleteOutcome::AlreadyGone),
            Err(e) => Err(e),
        }
    }

    /// Self-hosted private parallel-job usage and limit of the organization, with the running
    /// requests (at most 50, an ADO limit).
    pub async fn resource_usage(&self) -> Result<ResourceUsage, AdoError> {
        let url = self.url(&["distributedtask", "resourceusage"])?;
        let call = Call::get("resourceusage", url)
            .api_version(RESOURCE_USAGE_API_VERSION)
            .param("parallelismTag", "Private")
            .param("poolIsHosted", "false")
            .param("includeRunningRequests", "true");
        self.execute(call, None::<&()>, decode).await
    }

    /// `{organization}/_apis/<segments…>`, each segment escaped.
    fn url(&self, segments: &[&str]) -> Result<Url, AdoError> {
        let mut url = self.inner.organization.clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| AdoError::Config {
                field: "organization URL",
                reason: format!("`{}` cannot take a path", self.inner.organization_text),
            })?;
            path.pop_if_empty().push("_apis").extend(segments);
        }
        Ok(url)
    }

    fn agent_url(&self, pool_id: i32, agent_id: i32) -> Result<Url, AdoError> {
        self.url(&[
            "distributedtask",
            "pools",
            &pool_id.to_string(),
            "agents",
            &agent_id.to_string(),
        ])
    }

    /// One call: waits for the limiter, authenticates (once more with a new token after a plain
    /// 401), sends, records rate-limit headers, maps the status, parses the body with `parse`.
    async fn execute<B: Serialize + ?Sized, T>(
        &self,
        call: Call,
        body: Option<&B>,
        parse: Parse<T>,
    ) -> Result<T, AdoError> {
        let mut url = call.url;
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in &call.params {
                query.append_pair(k, v);
            }
            query.append_pair("api-version", call.api_version);
        }
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| AdoError::Config {
                field: "request body",
                reason: e.to_string(),
            })?;
        let mut fresh = false;
        loop {
            let result = self
                .attempt(
                    call.endpoint,
                    &call.method,
                    &url,
                    body.as_deref(),
                    fresh,
                    parse,
                )
                .await;
            match result {
                // The cached token may have been revoked or expired early: one more try with a
                // newly exchanged token before reporting.
                Err(AdoError::Unauthorized { .. }) if !fresh => {
                    self.inner.tokens.invalidate().await;
                    fresh = true;
                }
                other => return other,
            }
        }
    }

    async fn attempt<T>(
        &self,
        endpoint: &'static str,
        method: &Method,
        url: &Url,
        body: Option<&[u8]>,
        fresh: bool,
        parse: Parse<T>,
    ) -> Result<T, AdoError> {
        let inner = &*self.inner;
        let observer = &*inner.config.observer;
        inner
            .limiter
            .acquire(&inner.organization_text, observer)
            .await;
        let token = if fresh {
            inner.tokens.fresh_token().await?
        } else {
            inner.tokens.token().await?
        };
        let mut request = inner
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, token.authorization_header()?)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let started = Instant::now();
        let (status, answer) = self.send(endpoint, request).await;
        // A 2xx whose body does not parse counts as a failed call, not as "ok".
        let result = answer.and_then(|a| parse(endpoint, &a));
        let latency = started.elapsed();
        let status = status.map(|s| s.as_u16());
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.metric_label(),
        };
        observer.on_call(&CallRecord {
            organization: &inner.organization_text,
            endpoint,
            method: method_label(method),
            status,
            outcome,
            latency,
        });
        match &result {
            Ok(_) => tracing::debug!(
                endpoint,
                status,
                latency_ms = latency.as_millis() as u64,
                "ADO call"
            ),
            Err(e) => {
                tracing::debug!(endpoint, status, latency_ms = latency.as_millis() as u64, error = %e, "ADO call failed")
            }
        }
        result
    }

    /// Sends; returns the HTTP status when an answer came, and the answer when it was a 2xx.
    async fn send(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> (Option<StatusCode>, Result<Answer, AdoError>) {
        let inner = &*self.inner;
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return (None, Err(self.transport_error(endpoint, &e))),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let state = inner.limiter.observe(&headers);
        if let Some(wait) = state.retry_after {
            tracing::warn!(
                organization = %inner.organization_text,
                endpoint,
                status = status.as_u16(),
                retry_after_s = wait.as_secs_f64(),
                headroom = state.headroom,
                "Azure DevOps asked this identity to wait (Retry-After); holding every call to the organization until then"
            );
        }
        inner
            .config
            .observer
            .on_rate_limit(&inner.organization_text, &state);
        let body = match response.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => return (Some(status), Err(self.transport_error(endpoint, &e))),
        };
        // ADO answers a credential it does not accept with 203 and a sign-in page, not only 401.
        if status.is_success() && status != StatusCode::NON_AUTHORITATIVE_INFORMATION {
            return (Some(status), Ok(Answer { status, body }));
        }
        let err = self.status_error(endpoint, status, &headers, &body, state.retry_after);
        (Some(status), Err(err))
    }

    fn transport_error(&self, endpoint: &'static str, e: &reqwest::Error) -> AdoError {
        if e.is_timeout() {
            AdoError::Timeout {
                endpoint,
                timeout: self.inner.config.request_timeout,
            }
        } else {
            AdoError::Transport {
                endpoint,
                detail: error_chain(e),
            }
        }
    }

    fn status_error(
        &self,
        endpoint: &'static str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> AdoError {
        let inner = &*self.inner;
        let detail = error_detail(headers, body);
        let identity = || inner.tokens.identity();
        let organization = || inner.organization_text.clone();
        match status.as_u16() {
            401 if detail.contains("TF401444") => AdoError::NotInOrganization {
                identity: identity(),
                organization: organization(),
                detail,
            },
            401 => AdoError::Unauthorized {
                identity: identity(),
                organization: organization(),
                endpoint,
                detail,
            },
            s @ (203 | 300..=399) => {
                let location = headers
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|l| format!(" to {}", excerpt(l.split('?').next().unwrap_or(l), 120)))
                    .unwrap_or_default();
                AdoError::Unauthorized {
                    identity: identity(),
                    organization: organization(),
                    endpoint,
                    detail: format!(
                        "HTTP {s}{location}: a sign-in page or redirect instead of an API answer, \
                         so the credentials were not accepted"
                    ),
                }
            }
            403 => AdoError::Forbidden {
                identity: identity(),
                organization: organization(),
                endpoint,
                detail,
            },
            404 => AdoError::NotFound {
                endpoint,
                url: endpoint_path(&inner.organization_text, endpoint),
                detail,
            },
            429 => {
                let retry_after = retry_after.unwrap_or(inner.config.throttle_default);
                inner.limiter.hold_for(retry_after);
                AdoError::Throttled {
                    endpoint,
                    retry_after,
                    detail,
                }
            }
            s if s >= 500 => AdoError::Server {
                endpoint,
                status: s,
                detail,
            },
            s => AdoError::Status {
                endpoint,
                status: s,
                detail,
            },
        }
    }
}

/// One [`AdoClient`] per (organization, identity), so every AgentPool that names the same
/// organization and identity shares one rate-limit state and token cache.
#[derive(Clone, Default)]
pub struct AdoClients {
    clients: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), AdoClient>>>,
    config: AdoClientConfig,
}

impl std::fmt::Debug for AdoClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdoClients").finish_non_exhaustive()
    }
}

impl AdoClients {
    /// An empty registry whose clients get `config`.
    pub fn new(config: AdoClientConfig) -> Self {
        Self {
            clients: Arc::default(),
            config,
        }
    }

    /// The client of (`organization_url`, the identity of `tokens`): the existing one when there is
    /// one (then `tokens` is dropped and the existing token cache is used), else a new one.
    pub fn get(&self, organization_url: &str, tokens: TokenSource) -> Result<AdoClient, AdoError> {
        let key = tokens.identity_key();
        self.get_or_insert_with(organization_url, &key, || Ok(tokens))
    }

    /// The client of (`organization_url`, `identity_key`), calling `tokens` only when there is none
    /// yet: building a token source builds an HTTPS client, which is not free on every poll. Use
    /// [`super::WorkloadIdentityConfig::identity_key`] or [`TokenSource::identity_key`] as the key.
    pub fn get_or_insert_with<E: From<AdoError>>(
        &self,
        organization_url: &str,
        identity_key: &str,
        tokens: impl FnOnce() -> Result<TokenSource, E>,
    ) -> Result<AdoClient, E> {
        let org = parse_organization(organization_url)?;
        let key = (org.as_str().to_ascii_lowercase(), identity_key.to_owned());
        if let Some(existing) = self.lock().get(&key) {
            return Ok(existing.clone());
        }
        // Built outside the lock; if another caller won the race, its client is kept.
        let client = AdoClient::with_config(org.as_str(), tokens()?, self.config.clone())?;
        Ok(self.lock().entry(key).or_insert(client).clone())
    }

    /// Number of clients held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no client is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), AdoClient>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every client (e.g. after the identity configuration changed).
    pub fn clear(&self) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// What one REST call is: endpoint label, method, URL, query, api-version.
struct Call {
    endpoint: &'static str,
    method: Method,
    url: Url,
    params: Vec<(&'static str, String)>,
    api_version: &'static str,
}

impl Call {
    fn new(endpoint: &'static str, method: Method, url: Url) -> Self {
        Self {
            endpoint,
            method,
            url,
            params: Vec::new(),
            api_version: API_VERSION,
        }
    }

    fn get(endpoint: &'static str, url: Url) -> Self {
        Self::new(endpoint, Method::GET, url)
    }

    fn param(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.params.push((name, value.into()));
        self
    }

    fn api_version(mut self, version: &'static str) -> Self {
        self.api_version = version;
        self
    }
}

/// How a 2xx answer becomes a value.
type Parse<T> = fn(&'static str, &Answer) -> Result<T, AdoError>;

/// The body as JSON of type `T`; anything else is [`AdoError::MalformedJson`] with an excerpt.
fn decode<T: DeserializeOwned>(endpoint: &'static str, answer: &Answer) -> Result<T, AdoError> {
    serde_json::from_slice(&answer.body).map_err(|e| AdoError::MalformedJson {
        endpoint,
        error: format!("{e} (HTTP {})", answer.status.as_u16()),
        excerpt: excerpt(&String::from_utf8_lossy(&answer.body), 200),
    })
}

/// For calls whose answer carries nothing we need (DELETE).
fn ignore_body(_endpoint: &'static str, _answer: &Answer) -> Result<(), AdoError> {
    Ok(())
}

fn endpoint_path(organization: &str, endpoint: &str) -> String {
    format!("{organization}/_apis/distributedtask ({endpoint})")
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// What the server said about an error: the JSON `message`, the `X-TFS-ServiceError` header, or the
/// start of the body.
fn error_detail(headers: &HeaderMap, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "typeKey")]
        type_key: Option<String>,
    }
    let mut parts = Vec::new();
    if let Ok(wire) = serde_json::from_slice::<Wire>(body) {
        if let Some(m) = wire.message.filter(|m| !m.is_empty()) {
            parts.push(m);
        }
        if let Some(k) = wire.type_key.filter(|k| !k.is_empty()) {
            parts.push(format!("({k})"));
        }
    }
    if let Some(h) = headers
        .get("x-tfs-serviceerror")
        .and_then(|v| v.to_str().ok())
    {
        let decoded = percent_decode(h);
        if !parts.iter().any(|p| p.contains(&decoded)) {
            parts.push(decoded);
        }
    }
    if parts.is_empty() {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if !text.is_empty() {
            parts.push(excerpt(text, 300));
        }
    }
    if parts.is_empty() {
        "no details in the answer".to_owned()
    } else {
        excerpt(&parts.join(" "), 600)
    }
}

/// Decodes `%XX` escapes (ADO URL-encodes `X-TFS-ServiceError`); leaves anything malformed as is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16)),
                bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Validates and normalizes the organization URL (https, no query or fragment, trailing slash).
fn parse_organization(text: &str) -> Result<Url, AdoError> {
    let trimmed = text.trim();
    let mut url = Url::parse(trimmed).map_err(|e| AdoError::Config {
        field: "organization URL",
        reason: format!(
            "`{trimmed}` is not a URL ({e}); expected e.g. https://dev.azure.com/<organization>"
        ),
    })?;
    if url.scheme() != "https" {
        return Err(AdoError::Config {
            field: "organization URL",
            reason: format!(
                "`{trimmed}` must use https:// (the token must not travel in clear text)"
            ),
        });
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(AdoError::Config {
            field: "organization URL",
            reason: format!("`{trimmed}` has no host"),
        });
    }
    url.set_query(None);
    url.set_fragment(None);
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organization_url_is_normalized_and_checked() {
        let u = parse_organization(" https://dev.azure.com/contoso?x=1 ").unwrap();
        assert_eq!(u.as_str(), "https://dev.azure.com/contoso/");
        let u = parse_organization("https://tfs.example/tfs/DefaultCollection/").unwrap();
        assert_eq!(u.as_str(), "https://tfs.example/tfs/DefaultCollection/");
        let e = parse_organization("http://dev.azure.com/contoso").unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = parse_organization("dev.azure.com/contoso").unwrap_err();
        assert_eq!(e.metric_label(), "ado_config");
    }

    #[test]
    fn error_detail_prefers_json_message_and_decodes_header() {
        let body = br#"{"$id":"1","message":"TF401444: Please sign-in at least once","typeKey":"UnauthorizedRequestException"}"#;
        let d = error_detail(&HeaderMap::new(), body);
        assert!(d.starts_with("TF401444: Please sign-in"), "{d}");
        let mut h = HeaderMap::new();
        h.insert(
            "x-tfs-serviceerror",
            reqwest::header::HeaderValue::from_static("TF400733%3A+The+request+has+been+throttled"),
        );
        let d = error_detail(&h, b"");
        assert_eq!(d, "TF400733: The request has been throttled");
        assert_eq!(
            error_detail(&HeaderMap::new(), b""),
            "no details in the answer"
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn sign_in_pages_and_redirects_are_unauthorized() {
        let client = AdoClient::new(
            "https://dev.azure.com/contoso",
            TokenSource::pat_file("/pat"),
        )
        .unwrap();
        let html = b"<html><body>Sign in</body></html>";
        let e = client.status_error(
            "pools",
            StatusCode::NON_AUTHORITATIVE_INFORMATION,
            &HeaderMap::new(),
            html,
            None,
        );
        assert_eq!(e.metric_label(), "ado_unauthorized");
        assert!(e.to_string().contains("HTTP 203"), "{e}");
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::LOCATION,
            reqwest::header::HeaderValue::from_static(
                "https://spsprodweu5.vssps.visualstudio.com/_signin?realm=x&token=y",
            ),
        );
        let e = client.status_error("pools", StatusCode::FOUND, &h, b"", None);
        let msg = e.to_string();
        assert!(
            msg.contains("HTTP 302 to https://spsprodweu5.vssps.visualstudio.com/_signin"),
            "{msg}"
        );
        assert!(
            !msg.contains("token=y"),
            "the query of the location is not repeated: {msg}"
        );
        let e = client.status_error("pools", StatusCode::CONFLICT, &HeaderMap::new(), b"", None);
        assert_eq!(
            (e.metric_label(), e.status()),
            ("ado_unexpected_status", Some(409))
        );
        let e = client.status_error(
            "pools",
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            b"",
            None,
        );
        assert_eq!(
            e.retry_after(),
            Some(AdoClientConfig::default().throttle_default)
        );
        assert!(
            client.retry_after_remaining() > Duration::ZERO,
            "a 429 without Retry-After still holds calls"
        );
    }

    #[test]
    fn registry_shares_one_client_per_organization_and_identity() {
        let fixed = TokenSource::fixed(super::super::auth::AccessToken::new(
            "t",
            super::super::auth::AuthScheme::Bearer,
            None,
        ));
        let reg = AdoClients::default();
        let a = reg
            .get("https://dev.azure.com/contoso", fixed.clone())
            .unwrap();
        let b = reg
            .get("https://dev.azure.com/Contoso/", fixed.clone())
            .unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        let other_identity = TokenSource::pat_file("/p");
        let c = reg
            .get("https://dev.azure.com/contoso", other_identity)
            .unwrap();
        assert!(!Arc::ptr_eq(&a.inner, &c.inner));
        let d = reg.get("https://dev.azure.com/fabrikam", fixed).unwrap();
        assert!(!Arc::ptr_eq(&a.inner, &d.inner));
        // A new source holding the same token (the controller builds one per poll) is the same
        // identity: no new client, no unbounded growth.
        let same_token = TokenSource::fixed(super::super::auth::AccessToken::new(
            "t",
            super::super::auth::AuthScheme::Bearer,
            None,
        ));
        let e = reg
            .get("https://dev.azure.com/contoso", same_token)
            .unwrap();
        assert!(Arc::ptr_eq(&a.inner, &e.inner));
        assert_eq!(reg.len(), 3);
        let mut built = false;
        let f = reg
            .get_or_insert_with::<AdoError>(
                "https://dev.azure.com/contoso",
                &a.tokens().identity_key(),
                || {
                    built = true;
                    Ok(TokenSource::pat_file("/never"))
                },
            )
            .unwrap();
        assert!(Arc::ptr_eq(&a.inner, &f.inner));
        assert!(!built, "the token source is built only for a new client");
    }

    #[tokio::test]
    async fn urls_escape_segments_and_carry_api_version() {
        let client = AdoClient::new(
            "https://dev.azure.com/contoso",
            TokenSource::fixed(super::super::auth::AccessToken::new(
                "t",
                super::super::auth::AuthScheme::Bearer,
                None,
            )),
        )
        .unwrap();
        let url = client.url(&["distributedtask", "pools", "a b"]).unwrap();
        assert_eq!(
            url.as_str(),
            "https://dev.azure.com/contoso/_apis/distributedtask/pools/a%20b"
        );
        assert_eq!(client.organization(), "https://dev.azure.com/contoso");
        assert_eq!(client.headroom(), 1.0);
    }
}
