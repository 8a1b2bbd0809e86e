//! The ADO REST surface: routing, api-version, authentication (Entra access tokens, PATs, agent
//! OAuth tokens), pool permissions, rate limits, faults, and the endpoints.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};

use super::demands::Demand;
use super::entra::{self, now_unix};
use super::model::{Agent, AgentAction, AgentToken, Org, Session, World, add};
use super::ratelimit::{RateDecision, RateHeaders};
use super::{EndpointClass, FaultKind, PRIVATE_TAG, PoolRole, Shared, control};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// An ADO error, rendered in ADO's JSON shape.
pub(crate) struct AdoError {
    pub status: StatusCode,
    pub type_key: &'static str,
    pub message: String,
    pub www_authenticate: bool,
    pub retry_after: Option<u64>,
}

impl AdoError {
    pub(crate) fn new(
        status: StatusCode,
        type_key: &'static str,
        message: impl Into<String>,
    ) -> Self {
        AdoError {
            status,
            type_key,
            message: message.into(),
            www_authenticate: false,
            retry_after: None,
        }
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        AdoError {
            www_authenticate: true,
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "UnauthorizedRequestException",
                message,
            )
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ArgumentException", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "AccessDeniedException", message)
    }
    fn pool_not_found(id: u32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "TaskAgentPoolNotFoundException",
            format!("Agent pool {id} could not be found."),
        )
    }
    fn agent_not_found(pool: u32, id: u32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "TaskAgentNotFoundException",
            format!("Agent {id} could not be found in pool {pool}."),
        )
    }
    fn throttled(retry_after: u64) -> Self {
        AdoError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RequestBlockedException",
                "TF400733: The request has been canceled: Request was blocked due to exceeding usage of resource 'ATCPU' in namespace 'User'. For more information on why your request was blocked, see the topic \"Rate limits\" on the Microsoft Web site (https://go.microsoft.com/fwlink/?LinkId=823950).",
            )
        }
    }

    pub(crate) fn into_response(self, sh: &Shared) -> Response {
        let body = json!({
            "$id": "1",
            "innerException": null,
            "message": self.message,
            "typeName": format!("Microsoft.TeamFoundation.DistributedTask.WebApi.{}, Microsoft.TeamFoundation.DistributedTask.WebApi", self.type_key),
            "typeKey": self.type_key,
            "errorCode": 0,
            "eventId": 3000,
        });
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response();
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.message.replace(['\r', '\n'], " ")) {
            h.insert("x-tfs-serviceerror", v);
        }
        if self.www_authenticate {
            let tenant = sh.world().tenant_id.clone();
            let v = format!(
                "Bearer authorization_uri={}/{tenant}, Basic realm=\"{}/\"",
                sh.entra_base, sh.ado_base
            );
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            h.insert(header::RETRY_AFTER, v);
        }
        r
    }
}

type Reply = Result<(StatusCode, Option<Value>), AdoError>;

fn ok(v: Value) -> Reply {
    Ok((StatusCode::OK, Some(v)))
}

fn list(items: Vec<Value>) -> Reply {
    ok(json!({ "count": items.len(), "value": items }))
}

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// An Entra identity or a PAT acting for one.
    User { oid: String },
    /// A registered agent using its OAuth token.
    Agent { agent_id: u32 },
}

impl Caller {
    /// How the agent audit log names the caller.
    fn audit_name(&self) -> String {
        match self {
            Caller::User { oid } => oid.clone(),
            Caller::Agent { agent_id } => format!("agent:{agent_id}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Route {
    PoolsList,
    PoolGet(u32),
    JobRequestsList(u32),
    JobRequestGet(u32, u64),
    JobRequestUpdate(u32, u64),
    AgentsList(u32),
    AgentsAdd(u32),
    AgentGet(u32, u32),
    AgentReplace(u32, u32),
    AgentUpdate(u32, u32),
    AgentDelete(u32, u32),
    SessionCreate(u32),
    SessionDelete(u32, String),
    MessagesGet(u32),
    MessageDelete(u32, u64),
    ResourceUsage,
}

impl Route {
    fn endpoint(&self) -> &'static str {
        match self {
            Route::PoolsList => "pools.list",
            Route::PoolGet(_) => "pools.get",
            Route::JobRequestsList(_) => "jobrequests.list",
            Route::JobRequestGet(..) => "jobrequests.get",
            Route::JobRequestUpdate(..) => "jobrequests.update",
            Route::AgentsList(_) => "agents.list",
            Route::AgentsAdd(_) => "agents.add",
            Route::AgentGet(..) => "agents.get",
            Route::AgentReplace(..) => "agents.replace",
            Route::AgentUpdate(..) => "agents.update",
            Route::AgentDelete(..) => "agents.delete",
            Route::SessionCreate(_) => "sessions.create",
            Route::SessionDelete(..) => "sessions.delete",
            Route::MessagesGet(_) => "messages.get",
            Route::MessageDelete(..) => "messages.delete",
            Route::ResourceUsage => "resourceusage.get",
        }
    }
    fn class(&self) -> EndpointClass {
        match self {
            Route::PoolsList | Route::PoolGet(_) => EndpointClass::Pools,
            Route::JobRequestsList(_) | Route::JobRequestGet(..) | Route::JobRequestUpdate(..) => {
                EndpointClass::JobRequests
            }
            Route::AgentsList(_)
            | Route::AgentsAdd(_)
            | Route::AgentGet(..)
            | Route::AgentReplace(..)
            | Route::AgentUpdate(..)
            | Route::AgentDelete(..) => EndpointClass::Agents,
            Route::SessionCreate(_)
            | Route::SessionDelete(..)
            | Route::MessagesGet(_)
            | Route::MessageDelete(..) => EndpointClass::AgentFlow,
            Route::ResourceUsage => EndpointClass::ResourceUsage,
        }
    }
}

fn parse_route(method: &Method, rest: &[&str]) -> Result<Route, AdoError> {
    let num32 = |s: &str, what: &str| {
        s.parse::<u32>()
            .map_err(|_| AdoError::bad_request(format!("{what} {s:?} in the URL is not a number.")))
    };
    let num64 = |s: &str, what: &str| {
        s.parse::<u64>()
            .map_err(|_| AdoError::bad_request(format!("{what} {s:?} in the URL is not a number.")))
    };
    let r = match (method.clone(), rest) {
        (Method::GET, ["pools"]) => Route::PoolsList,
        (Method::GET, ["pools", p]) => Route::PoolGet(num32(p, "poolId")?),
        (Method::GET, ["pools", p, "jobrequests"]) => Route::JobRequestsList(num32(p, "poolId")?),
        (Method::GET, ["pools", p, "jobrequests", r]) => {
            Route::JobRequestGet(num32(p, "poolId")?, num64(r, "requestId")?)
        }
        (Method::PATCH, ["pools", p, "jobrequests", r]) => {
            Route::JobRequestUpdate(num32(p, "poolId")?, num64(r, "requestId")?)
        }
        (Method::GET, ["pools", p, "agents"]) => Route::AgentsList(num32(p, "poolId")?),
        (Method::POST, ["pools", p, "agents"]) => Route::AgentsAdd(num32(p, "poolId")?),
        (m, ["pools", p, "agents", a]) => {
            let (p, a) = (num32(p, "poolId")?, num32(a, "agentId")?);
            match m {
                Method::GET => Route::AgentGet(p, a),
                Method::PUT => Route::AgentReplace(p, a),
                Method::PATCH => Route::AgentUpdate(p, a),
                Method::DELETE => Route::AgentDelete(p, a),
                _ => return Err(method_not_allowed(method)),
            }
        }
        (Method::POST, ["pools", p, "sessions"]) => Route::SessionCreate(num32(p, "poolId")?),
        (Method::DELETE, ["pools", p, "sessions", s]) => {
            Route::SessionDelete(num32(p, "poolId")?, (*s).to_owned())
        }
        (Method::GET, ["pools", p, "messages"]) => Route::MessagesGet(num32(p, "poolId")?),
        (Method::DELETE, ["pools", p, "messages", m]) => {
            Route::MessageDelete(num32(p, "poolId")?, num64(m, "messageId")?)
        }
        (Method::GET, ["resourceusage"]) => Route::ResourceUsage,
        (_, ["pools", ..]) | (_, ["resourceusage"]) => return Err(method_not_allowed(method)),
        _ => {
            return Err(AdoError::new(
                StatusCode::NOT_FOUND,
                "ApiResourceNotFoundException",
                format!("API resource distributedtask/{} not found.", rest.join("/")),
            ));
        }
    };
    Ok(r)
}

fn method_not_allowed(m: &Method) -> AdoError {
    AdoError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowedException",
        format!("The requested resource does not support http method '{m}'."),
    )
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn query_bool(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The api-version of a call: query parameter or `Accept: application/json; api-version=…`.
fn api_version(q: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    if let Some(v) = q.get("api-version").filter(|v| !v.is_empty()) {
        return Some(v.clone());
    }
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    accept.split([';', ',']).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim().eq_ignore_ascii_case("api-version") && !v.trim().is_empty())
            .then(|| v.trim().to_owned())
    })
}

fn check_api_version(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    method: &Method,
    route: &Route,
) -> Result<(), AdoError> {
    let Some(v) = api_version(q, headers) else {
        return Err(AdoError::new(
            StatusCode::BAD_REQUEST,
            "VssVersionNotSpecifiedException",
            format!(
                "No api-version was supplied for the \"{method}\" request. The version must be supplied either as part of the Accept header (e.g. \"application/json; api-version=1.0\") or as a query parameter (e.g. '?api-version=1.0')."
            ),
        ));
    };
    let valid = {
        let base = v.split('-').next().unwrap_or("");
        let mut parts = base.split('.');
        parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
            && parts.all(|p| p.parse::<u32>().is_ok())
    };
    if !valid {
        return Err(AdoError::new(
            StatusCode::BAD_REQUEST,
            "VssInvalidApiVersionException",
            format!("The api-version '{v}' is not valid. Use e.g. 7.1 or 7.1-preview.1."),
        ));
    }
    if matches!(route, Route::ResourceUsage) && !v.to_ascii_lowercase().contains("-preview") {
        return Err(AdoError::new(
            StatusCode::BAD_REQUEST,
            "VssInvalidPreviewVersionException",
            format!(
                "The requested version \"{v}\" of the resource is under preview. The -preview flag must be supplied in the api-version for such requests. For example: \"{v}-preview\""
            ),
        ));
    }
    Ok(())
}

/// A caller presenting an Entra access token (as Bearer, or as the password of Basic auth).
fn entra_caller(sh: &Shared, w: &World, o: &Org, token: &str) -> Result<Caller, AdoError> {
    let claims =
        entra::validate_access_token(sh, token).map_err(|e| AdoError::unauthorized(e.message()))?;
    if !claims.tid.eq_ignore_ascii_case(&w.tenant_id) {
        return Err(AdoError::unauthorized(format!(
            "TF400813: The access token is from tenant {}, not the organization's tenant {}.",
            claims.tid, w.tenant_id
        )));
    }
    if !o.members.contains(&claims.oid.to_ascii_lowercase()) {
        return Err(AdoError {
            type_key: "IdentityNotFoundException",
            ..AdoError::unauthorized(format!(
                "TF401444: Please sign-in at least once as {}\\{}\\{} in a web browser to enable access to the service.",
                claims.tid, claims.tid, claims.oid
            ))
        });
    }
    Ok(Caller::User {
        oid: claims.oid.to_ascii_lowercase(),
    })
}

/// Authenticates a call to `org` (lower-case key).
fn authenticate(
    sh: &Shared,
    w: &World,
    org: &str,
    headers: &HeaderMap,
) -> Result<Caller, AdoError> {
    let Some(o) = w.orgs.get(org) else {
        return Err(AdoError::new(
            StatusCode::NOT_FOUND,
            "OrganizationNotFoundException",
            format!("Organization {org} not found."),
        ));
    };
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(AdoError::unauthorized(
            "TF400813: The user is not authorized to access this resource: no Authorization header (send `Bearer <Entra token>` or Basic `:<PAT>`).",
        ));
    };
    let (scheme, cred) = auth.split_once(' ').unwrap_or((auth, ""));
    let cred = cred.trim();
    let pat_user = |pat: &str| o.pats.get(pat).cloned();
    let oid = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(cred)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                AdoError::unauthorized(
                    "TF400813: The Basic credentials are not valid base64 of `user:pat`.",
                )
            })?;
        let pat = decoded.split_once(':').map(|(_, p)| p).unwrap_or(&decoded);
        match pat_user(pat) {
            Some(oid) => oid,
            // Like ADO, an Entra access token is accepted where a PAT is (`config.sh --auth pat`).
            None if pat.split('.').count() == 3 => return entra_caller(sh, w, o, pat),
            None => {
                return Err(AdoError::unauthorized(
                    "TF400813: The personal access token is not valid for this organization.",
                ));
            }
        }
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if cred.starts_with(AGENT_TOKEN_PREFIX) {
            let t = w.agent_tokens.get(cred).ok_or_else(|| {
                AdoError::unauthorized(
                    "TF400813: The agent access token is not valid (agent deleted or replaced?).",
                )
            })?;
            if t.expires_unix <= now_unix() {
                return Err(AdoError::unauthorized(
                    "TF400813: The agent access token has expired; request a new one.",
                ));
            }
            let a = w
                .agents
                .get(&t.agent_id)
                .filter(|a| a.org == org)
                .ok_or_else(|| {
                    AdoError::unauthorized(
                        "TF400813: The agent access token does not belong to this organization.",
                    )
                })?;
            return Ok(Caller::Agent { agent_id: a.id });
        }
        if let Some(oid) = pat_user(cred) {
            oid
        } else {
            return entra_caller(sh, w, o, cred);
        }
    } else {
        return Err(AdoError::unauthorized(format!(
            "TF400813: Authorization scheme {scheme:?} is not supported; use Bearer or Basic."
        )));
    };
    if !o.members.contains(&oid) {
        return Err(AdoError {
            type_key: "IdentityNotFoundException",
            ..AdoError::unauthorized(format!(
                "TF401444: Please sign-in at least once as {oid} in a web browser to enable access to the service."
            ))
        });
    }
    Ok(Caller::User { oid })
}

pub(crate) const AGENT_TOKEN_PREFIX: &str = "agt.";

fn caller_label(org: &str, c: &Caller) -> String {
    match c {
        Caller::User { oid } => format!("{org}/{oid}"),
        Caller::Agent { agent_id } => format!("{org}/agent:{agent_id}"),
    }
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_matches('/').to_owned();
    let seg: Vec<&str> = path.split('/').collect();
    let query = query_map(&uri);
    match seg.as_slice() {
        ["_testbed", rest @ ..] => control::handle(&sh, &method, rest, &query, &body).await,
        ["_vstoken", org, "oauth2", "token"] if method == Method::POST => {
            agent_oauth(&sh, org, &body)
        }
        [org, "_testbed", "requests", id, "report"] if method == Method::POST => {
            report(&sh, org, id, &body)
        }
        [org, "_apis", "distributedtask", rest @ ..] => {
            let org = org.to_ascii_lowercase();
            match parse_route(&method, rest) {
                Ok(route) => api(&sh, &org, route, &method, &headers, &query, &body).await,
                Err(e) => {
                    let status = e.status.as_u16();
                    sh.world().record_call("unrouted", "anonymous", status);
                    e.into_response(&sh)
                }
            }
        }
        _ => AdoError::new(
            StatusCode::NOT_FOUND,
            "ApiResourceNotFoundException",
            format!("No resource at /{path}."),
        )
        .into_response(&sh),
    }
}

/// Plays an injected fault: `Err` with the response that replaces the call's, `Ok(true)` when the
/// call's answer must be malformed, `Ok(false)` otherwise (no fault, or a delay served).
async fn apply_fault(
    sh: &Arc<Shared>,
    endpoint: &'static str,
    fault: Option<FaultKind>,
) -> Result<bool, Response> {
    match fault {
        Some(FaultKind::RateLimited { retry_after_secs }) => {
            sh.world().record_call(endpoint, "fault", 429);
            let mut r = AdoError::throttled(retry_after_secs).into_response(sh);
            RateHeaders {
                limit: 200.0,
                remaining: 0.0,
                reset_unix: now_unix() + retry_after_secs as i64,
                retry_after: Some(retry_after_secs),
            }
            .apply(r.headers_mut());
            Err(r)
        }
        Some(FaultKind::ServerError { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            sh.world().record_call(endpoint, "fault", status.as_u16());
            Err(AdoError::new(
                status,
                "SqlTimeoutException",
                "TF246017: Azure DevOps could not connect to the database (simulated fault). Retry later.",
            )
            .into_response(sh))
        }
        Some(FaultKind::Slow { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            Ok(false)
        }
        Some(FaultKind::MalformedJson) => Ok(true),
        _ => Ok(false),
    }
}

async fn api(
    sh: &Arc<Shared>,
    org: &str,
    route: Route,
    method: &Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    let endpoint = route.endpoint();
    let class = route.class();
    // Faults come first: an outage does not look at credentials.
    let fault = sh.world().take_fault(class, Some(org), |k| {
        !matches!(
            k,
            FaultKind::TokenOutage | FaultKind::ShortTokenLifetime { .. }
        )
    });
    let mut malformed = match apply_fault(sh, endpoint, fault).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    if let Err(e) = check_api_version(query, headers, method, &route) {
        sh.world()
            .record_call(endpoint, "anonymous", e.status.as_u16());
        return e.into_response(sh);
    }
    let (caller, rate) = {
        let mut w = sh.world();
        match authenticate(sh, &w, org, headers) {
            Err(e) => {
                w.record_call(endpoint, "anonymous", e.status.as_u16());
                drop(w);
                return e.into_response(sh);
            }
            Ok(c) => {
                let label = caller_label(org, &c);
                let decision = w.rate.charge(&label, Instant::now(), now_unix());
                if let Some(RateDecision::Blocked(h)) = &decision {
                    w.record_call(endpoint, &label, 429);
                    drop(w);
                    let mut r = AdoError::throttled(h.retry_after.unwrap_or(1)).into_response(sh);
                    h.apply(r.headers_mut());
                    return r;
                }
                let headers = match decision {
                    Some(RateDecision::Allowed(h)) => Some(h),
                    _ => None,
                };
                (c, headers)
            }
        }
    };
    // Faults scoped to this caller come once it is known.
    if let Caller::User { oid } = &caller {
        let fault = sh
            .world()
            .take_fault_of(class, Some(org), Some(oid.as_str()), |k| {
                !matches!(
                    k,
                    FaultKind::TokenOutage | FaultKind::ShortTokenLifetime { .. }
                )
            });
        match apply_fault(sh, endpoint, fault).await {
            Ok(m) => malformed |= m,
            Err(r) => return r,
        }
    }
    let label = caller_label(org, &caller);
    let ctx = Ctx {
        sh,
        org,
        caller: &caller,
        query,
        body,
    };
    let reply = match route {
        Route::MessagesGet(pool) => messages_get(&ctx, pool).await,
        other => {
            let mut w = sh.world();
            dispatch(&mut w, &ctx, other)
        }
    };
    let mut resp = match reply {
        Ok((status, Some(v))) => {
            let body = if malformed {
                let s = v.to_string();
                let mut cut = s.len() / 2;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s[..cut].to_owned()
            } else {
                v.to_string()
            };
            (
                status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                body,
            )
                .into_response()
        }
        Ok((status, None)) => status.into_response(),
        Err(e) => e.into_response(sh),
    };
    if let Some(h) = rate {
        h.apply(resp.headers_mut());
    }
    sh.world()
        .record_call(endpoint, &label, resp.status().as_u16());
    resp
}

struct Ctx<'a> {
    sh: &'a Arc<Shared>,
    org: &'a str,
    caller: &'a Caller,
    query: &'a HashMap<String, String>,
    body: &'a Bytes,
}

fn dispatch(w: &mut World, c: &Ctx<'_>, route: Route) -> Reply {
    match route {
        Route::PoolsList => pools_list(w, c),
        Route::PoolGet(p) => {
            require(w, c, p, PoolRole::Reader)?;
            let o = &w.orgs[c.org];
            ok(w.pool_json(o, &o.pools[&p]))
        }
        Route::JobRequestsList(p) => jobrequests_list(w, c, p),
        Route::JobRequestGet(p, r) => {
            require(w, c, p, PoolRole::Reader)?;
            let req = w
                .requests
                .get(&r)
                .filter(|x| x.org == c.org && x.pool_id == p && x.queue_time.is_some());
            match req {
                Some(req) => ok(w.request_json(req)),
                None => Err(job_not_found(r)),
            }
        }
        Route::JobRequestUpdate(p, r) => jobrequest_update(w, c, p, r),
        Route::AgentsList(p) => agents_list(w, c, p),
        Route::AgentsAdd(p) => agents_add(w, c, p),
        Route::AgentGet(p, a) => {
            require(w, c, p, PoolRole::Reader)?;
            let agent = find_agent(w, c, p, a)?;
            let q = c.query;
            ok(w.agent_json(
                agent,
                query_bool(q, "includecapabilities"),
                query_bool(q, "includeassignedrequest"),
                query_bool(q, "includelastcompletedrequest"),
                true,
            ))
        }
        Route::AgentReplace(p, a) => agent_replace(w, c, p, a),
        Route::AgentUpdate(p, a) => agent_update(w, c, p, a),
        Route::AgentDelete(p, a) => {
            require(w, c, p, PoolRole::Administrator)?;
            find_agent(w, c, p, a)?;
            w.log_agent_change(a, AgentAction::Deleted, c.caller.audit_name());
            w.delete_agent(a);
            Ok((StatusCode::NO_CONTENT, None))
        }
        Route::SessionCreate(p) => session_create(w, c, p),
        Route::SessionDelete(p, s) => {
            let aid = require_agent(w, c, p)?;
            match w.sessions.get(&s) {
                Some(sess) if sess.agent_id == aid => {
                    w.end_session(aid);
                    Ok((StatusCode::NO_CONTENT, None))
                }
                _ => Err(session_not_found(&s)),
            }
        }
        Route::MessageDelete(p, m) => {
            let aid = require_agent(w, c, p)?;
            let sid = c.query.get("sessionid").cloned().unwrap_or_default();
            let Some(sess) = w.sessions.get(&sid).filter(|s| s.agent_id == aid) else {
                return Err(session_not_found(&sid));
            };
            let _ = sess;
            ack_through(w, &sid, Some(m), None);
            Ok((StatusCode::NO_CONTENT, None))
        }
        Route::ResourceUsage => resource_usage(w, c),
        Route::MessagesGet(_) => Err(AdoError::bad_request("internal routing error")),
    }
}

fn job_not_found(r: u64) -> AdoError {
    AdoError::new(
        StatusCode::NOT_FOUND,
        "TaskAgentJobNotFoundException",
        format!("No job request {r} was found."),
    )
}

fn session_not_found(s: &str) -> AdoError {
    AdoError::new(
        StatusCode::NOT_FOUND,
        "TaskAgentSessionExpiredException",
        format!("The session {s} is not valid or has expired; create a new session."),
    )
}

/// Checks the pool exists and the caller (a user) holds at least `min` on it.
fn require(w: &World, c: &Ctx<'_>, pool: u32, min: PoolRole) -> Result<(), AdoError> {
    let o = &w.orgs[c.org];
    let Some(p) = o.pools.get(&pool) else {
        return Err(AdoError::pool_not_found(pool));
    };
    match c.caller {
        Caller::Agent { .. } => Err(AdoError::forbidden(
            "Access denied: an agent's own token may only use sessions, messages and its job requests.",
        )),
        Caller::User { oid } => {
            let role = w.role(o, p, oid);
            if role >= min {
                Ok(())
            } else {
                let need = if min == PoolRole::Administrator {
                    "Manage"
                } else {
                    "View"
                };
                Err(AdoError::forbidden(format!(
                    "Access denied. {oid} needs {need} permissions for pool {} to perform the action. Grant the identity the {} role on the pool (Organization settings > Agent pools > Security).",
                    p.name,
                    if min == PoolRole::Administrator {
                        "Administrator"
                    } else {
                        "Reader"
                    }
                )))
            }
        }
    }
}

/// Checks the pool exists and the caller is an agent of it; returns the agent id.
fn require_agent(w: &World, c: &Ctx<'_>, pool: u32) -> Result<u32, AdoError> {
    if !w.orgs[c.org].pools.contains_key(&pool) {
        return Err(AdoError::pool_not_found(pool));
    }
    match c.caller {
        Caller::Agent { agent_id } if w.agents.get(agent_id).is_some_and(|a| a.pool_id == pool) => {
            Ok(*agent_id)
        }
        Caller::Agent { .. } => Err(AdoError::forbidden(
            "Access denied: this agent belongs to another pool.",
        )),
        Caller::User { .. } => Err(AdoError::forbidden(
            "Access denied: sessions and messages require the agent's own OAuth token (from its authorizationUrl), not a user token or PAT.",
        )),
    }
}

fn find_agent<'w>(w: &'w World, c: &Ctx<'_>, pool: u32, id: u32) -> Result<&'w Agent, AdoError> {
    w.agents
        .get(&id)
        .filter(|a| a.org == c.org && a.pool_id == pool)
        .ok_or_else(|| AdoError::agent_not_found(pool, id))
}

fn pools_list(w: &World, c: &Ctx<'_>) -> Reply {
    let o = &w.orgs[c.org];
    let name = c.query.get("poolname");
    let Caller::User { oid } = c.caller else {
        return Err(AdoError::forbidden(
            "Access denied: an agent's own token cannot list pools.",
        ));
    };
    let items = o
        .pools
        .values()
        .filter(|p| name.is_none_or(|n| p.name.eq_ignore_ascii_case(n)))
        .filter(|p| w.role(o, p, oid) >= PoolRole::Reader)
        .map(|p| w.pool_json(o, p))
        .collect();
    list(items)
}

fn jobrequests_list(w: &World, c: &Ctx<'_>, pool: u32) -> Reply {
    require(w, c, pool, PoolRole::Reader)?;
    let parse_n = |k: &str| -> Result<Option<usize>, AdoError> {
        c.query
            .get(k)
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    AdoError::bad_request(format!("{k} must be a non-negative number, got {v:?}."))
                })
            })
            .transpose()
    };
    let completed = parse_n("completedrequestcount")?;
    let top = parse_n("$top")?.map(|t| t.min(200));
    let agent_filter = parse_n("agentid")?;
    let mut unfinished = Vec::new();
    let mut finished = Vec::new();
    for r in w.requests.values().rev() {
        if r.org != c.org || r.pool_id != pool || r.queue_time.is_none() {
            continue;
        }
        if agent_filter.is_some_and(|a| r.agent.map(|x| x as usize) != Some(a)) {
            continue;
        }
        if r.finish_time.is_some() {
            finished.push(r);
        } else {
            unfinished.push(r);
        }
    }
    if let Some(n) = completed {
        finished.truncate(n);
    }
    let mut all: Vec<_> = unfinished.into_iter().chain(finished).collect();
    all.sort_by_key(|r| std::cmp::Reverse(r.id));
    if let Some(t) = top {
        all.truncate(t);
    }
    list(all.into_iter().map(|r| w.request_json(r)).collect())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct JobRequestPatch {
    #[serde(default)]
    request_id: Option<u64>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    finish_time: Option<String>,
}

fn jobrequest_update(w: &mut World, c: &Ctx<'_>, pool: u32, rid: u64) -> Reply {
    if !w.orgs[c.org].pools.contains_key(&pool) {
        return Err(AdoError::pool_not_found(pool));
    }
    let patch: JobRequestPatch = serde_json::from_slice(c.body).map_err(|e| {
        AdoError::bad_request(format!(
            "The request body is not a valid TaskAgentJobRequest: {e}."
        ))
    })?;
    if patch.request_id.is_some_and(|id| id != rid) {
        return Err(AdoError::bad_request(format!(
            "requestId in the body ({:?}) differs from the URL ({rid}).",
            patch.request_id
        )));
    }
    let Some(r) = w
        .requests
        .get(&rid)
        .filter(|r| r.org == c.org && r.pool_id == pool && r.queue_time.is_some())
    else {
        return Err(job_not_found(rid));
    };
    match c.caller {
        Caller::Agent { agent_id } => {
            if r.agent != Some(*agent_id) {
                return Err(AdoError::forbidden(format!(
                    "Job request {rid} is not assigned to this agent."
                )));
            }
            let token = c.query.get("locktoken");
            if r.finish_time.is_none() && token.map(String::as_str) != r.lock_token.as_deref() {
                return Err(AdoError::new(
                    StatusCode::CONFLICT,
                    "TaskAgentJobTokenExpiredException",
                    format!(
                        "The lock token for job request {rid} is missing or not the current one."
                    ),
                ));
            }
        }
        Caller::User { .. } => require(w, c, pool, PoolRole::Administrator)?,
    }
    if r.finish_time.is_some() {
        return ok(w.request_json(r));
    }
    if let Some(result) = patch
        .result
        .or(patch.finish_time.as_ref().map(|_| "succeeded".to_owned()))
    {
        const RESULTS: [&str; 6] = [
            "succeeded",
            "succeededWithIssues",
            "failed",
            "canceled",
            "skipped",
            "abandoned",
        ];
        let Some(result) = RESULTS.iter().find(|x| x.eq_ignore_ascii_case(&result)) else {
            return Err(AdoError::bad_request(format!(
                "result {result:?} is not one of {RESULTS:?}."
            )));
        };
        w.finish(rid, result);
    } else {
        let until = add(Timestamp::now(), w.lock_duration);
        if let Some(r) = w.requests.get_mut(&rid) {
            r.locked_until = Some(until);
        }
    }
    ok(w.request_json(&w.requests[&rid]))
}

fn agents_list(w: &World, c: &Ctx<'_>, pool: u32) -> Reply {
    require(w, c, pool, PoolRole::Reader)?;
    let q = c.query;
    let name = q.get("agentname");
    let demands = q
        .get("demands")
        .map(|d| {
            d.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(Demand::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| AdoError::bad_request(e.to_string()))
        })
        .transpose()?;
    let (caps, assigned, last) = (
        query_bool(q, "includecapabilities"),
        query_bool(q, "includeassignedrequest"),
        query_bool(q, "includelastcompletedrequest"),
    );
    let items = w
        .agents
        .values()
        .filter(|a| a.org == c.org && a.pool_id == pool)
        .filter(|a| name.is_none_or(|n| a.name.eq_ignore_ascii_case(n)))
        .filter(|a| demands.as_ref().is_none_or(|d| a.caps.satisfy(d)))
        .map(|a| w.agent_json(a, caps, assigned, last, false))
        .collect();
    list(items)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AgentBody {
    name: Option<String>,
    version: Option<String>,
    os_description: Option<String>,
    max_parallelism: Option<i64>,
    enabled: Option<bool>,
    system_capabilities: Option<BTreeMap<String, Option<String>>>,
    user_capabilities: Option<BTreeMap<String, Option<String>>>,
    authorization: Option<AuthBody>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AuthBody {
    public_key: Option<PublicKeyBody>,
}

#[derive(Deserialize, Default)]
struct PublicKeyBody {
    exponent: Option<String>,
    modulus: Option<String>,
}

fn parse_agent_body(body: &[u8]) -> Result<AgentBody, AdoError> {
    serde_json::from_slice(body).map_err(|e| {
        AdoError::bad_request(format!("The request body is not a valid TaskAgent: {e}."))
    })
}

fn caps_of(m: Option<BTreeMap<String, Option<String>>>) -> BTreeMap<String, String> {
    m.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect()
}

fn b64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s.trim()).ok())
}

/// The agent's RSA public key from `authorization.publicKey`.
fn public_key(b: &AgentBody) -> Result<(Vec<u8>, Vec<u8>), AdoError> {
    let pk = b.authorization.as_ref().and_then(|a| a.public_key.as_ref()).ok_or_else(|| {
        AdoError::bad_request("authorization.publicKey {exponent, modulus} is required: the agent authenticates with that RSA key.")
    })?;
    let modulus = pk.modulus.as_deref().and_then(b64_any).filter(|m| m.len() >= 128).ok_or_else(|| {
        AdoError::bad_request("authorization.publicKey.modulus must be the base64 big-endian RSA modulus (≥ 1024 bits).")
    })?;
    let exponent = pk
        .exponent
        .as_deref()
        .and_then(b64_any)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| {
            AdoError::bad_request(
                "authorization.publicKey.exponent must be the base64 big-endian RSA exponent.",
            )
        })?;
    Ok((modulus, exponent))
}

fn agents_add(w: &mut World, c: &Ctx<'_>, pool: u32) -> Reply {
    require(w, c, pool, PoolRole::Administrator)?;
    let b = parse_agent_body(c.body)?;
    let name = b
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| AdoError::bad_request("Value cannot be null. Parameter name: agent.Name"))?;
    if w.agents
        .values()
        .any(|a| a.org == c.org && a.pool_id == pool && a.name.eq_ignore_ascii_case(&name))
    {
        let pool_name = &w.orgs[c.org].pools[&pool].name;
        return Err(AdoError::new(
            StatusCode::CONFLICT,
            "TaskAgentExistsException",
            format!(
                "An agent named {name} already exists in pool {pool_name}. Use --replace (PUT) to take it over."
            ),
        ));
    }
    let (modulus, exponent) = public_key(&b)?;
    let now = Timestamp::now();
    let id = w.next_agent_id();
    let mut agent = Agent {
        id,
        org: c.org.to_owned(),
        pool_id: pool,
        name,
        version: b.version.clone().unwrap_or_default(),
        os_description: b.os_description.clone(),
        enabled: b.enabled.unwrap_or(true),
        max_parallelism: b.max_parallelism.unwrap_or(1),
        system_caps: caps_of(b.system_capabilities),
        user_caps: caps_of(b.user_capabilities),
        caps: Default::default(),
        modulus,
        exponent,
        client_id: uuid::Uuid::new_v4().to_string(),
        created_on: now,
        status_changed_on: now,
        session: None,
        assigned: None,
        last_completed: None,
    };
    agent.refresh_caps();
    w.agents.insert(id, agent);
    w.log_agent_change(id, AgentAction::Registered, c.caller.audit_name());
    ok(w.agent_json(&w.agents[&id], true, false, false, true))
}

fn agent_replace(w: &mut World, c: &Ctx<'_>, pool: u32, id: u32) -> Reply {
    require(w, c, pool, PoolRole::Administrator)?;
    find_agent(w, c, pool, id)?;
    let b = parse_agent_body(c.body)?;
    let (modulus, exponent) = public_key(&b)?;
    w.log_agent_change(id, AgentAction::Replaced, c.caller.audit_name());
    // Taking over ends the old owner's session and revokes its tokens.
    w.end_session(id);
    w.agent_tokens.retain(|_, t| t.agent_id != id);
    let now = Timestamp::now();
    let Some(a) = w.agents.get_mut(&id) else {
        return Err(AdoError::agent_not_found(pool, id));
    };
    if let Some(n) = b.name.filter(|n| !n.trim().is_empty()) {
        a.name = n;
    }
    if let Some(v) = b.version {
        a.version = v;
    }
    if b.os_description.is_some() {
        a.os_description = b.os_description;
    }
    if let Some(e) = b.enabled {
        a.enabled = e;
    }
    if let Some(m) = b.max_parallelism {
        a.max_parallelism = m;
    }
    a.system_caps = caps_of(b.system_capabilities);
    if b.user_capabilities.is_some() {
        a.user_caps = caps_of(b.user_capabilities);
    }
    a.modulus = modulus;
    a.exponent = exponent;
    a.status_changed_on = now;
    a.refresh_caps();
    w.run_engine();
    ok(w.agent_json(&w.agents[&id], true, false, false, true))
}

fn agent_update(w: &mut World, c: &Ctx<'_>, pool: u32, id: u32) -> Reply {
    require(w, c, pool, PoolRole::Administrator)?;
    find_agent(w, c, pool, id)?;
    let b = parse_agent_body(c.body)?;
    w.log_agent_change(
        id,
        AgentAction::Updated { enabled: b.enabled },
        c.caller.audit_name(),
    );
    let Some(a) = w.agents.get_mut(&id) else {
        return Err(AdoError::agent_not_found(pool, id));
    };
    if let Some(e) = b.enabled {
        a.enabled = e;
    }
    if b.user_capabilities.is_some() {
        a.user_caps = caps_of(b.user_capabilities);
    }
    if b.system_capabilities.is_some() {
        a.system_caps = caps_of(b.system_capabilities);
    }
    if let Some(m) = b.max_parallelism {
        a.max_parallelism = m;
    }
    a.refresh_caps();
    w.run_engine();
    ok(w.agent_json(&w.agents[&id], true, false, false, false))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SessionBody {
    #[serde(default)]
    owner_name: Option<String>,
    #[serde(default)]
    agent: Option<SessionAgent>,
}

#[derive(Deserialize, Default)]
struct SessionAgent {
    #[serde(default)]
    id: Option<u32>,
}

fn session_create(w: &mut World, c: &Ctx<'_>, pool: u32) -> Reply {
    let aid = require_agent(w, c, pool)?;
    let b: SessionBody = serde_json::from_slice(c.body).map_err(|e| {
        AdoError::bad_request(format!(
            "The request body is not a valid TaskAgentSession: {e}."
        ))
    })?;
    if b.agent
        .as_ref()
        .and_then(|a| a.id)
        .is_some_and(|id| id != aid)
    {
        return Err(AdoError::forbidden(
            "agent.id in the session body is not the agent this token belongs to.",
        ));
    }
    let Some(agent) = w.agents.get(&aid) else {
        return Err(AdoError::agent_not_found(pool, aid));
    };
    if agent.session.is_some() {
        return Err(AdoError::new(
            StatusCode::CONFLICT,
            "TaskAgentSessionConflictException",
            format!("A session for agent {} already exists.", agent.name),
        ));
    }
    let sid = uuid::Uuid::new_v4().to_string();
    let owner = b.owner_name.unwrap_or_default();
    w.sessions.insert(
        sid.clone(),
        Session {
            agent_id: aid,
            messages: Default::default(),
            notify: Default::default(),
        },
    );
    if let Some(a) = w.agents.get_mut(&aid) {
        a.session = Some(sid.clone());
        a.status_changed_on = Timestamp::now();
    }
    w.run_engine();
    let agent = &w.agents[&aid];
    ok(json!({
        "sessionId": sid,
        "ownerName": owner,
        "agent": w.agent_ref_json(agent),
        "systemCapabilities": agent.system_caps,
    }))
}

/// Acknowledges messages of a session: `through` = this id exactly, `upto` = every id ≤ it.
/// A job message acknowledged sets its request's `receiveTime`.
fn ack_through(w: &mut World, sid: &str, exact: Option<u64>, upto: Option<u64>) {
    let Some(s) = w.sessions.get_mut(sid) else {
        return;
    };
    let mut received = Vec::new();
    s.messages.retain(|m| {
        let hit = exact == Some(m.id) || upto.is_some_and(|u| m.id <= u);
        if hit
            && m.kind == "PipelineAgentJobRequest"
            && let Some(r) = m.request
        {
            received.push(r);
        }
        !hit
    });
    let now = Timestamp::now();
    for rid in received {
        if let Some(r) = w.requests.get_mut(&rid)
            && r.receive_time.is_none()
            && r.finish_time.is_none()
        {
            r.receive_time = Some(now);
        }
    }
}

async fn messages_get(c: &Ctx<'_>, pool: u32) -> Reply {
    let sid = c.query.get("sessionid").cloned().unwrap_or_default();
    let last =
        match c.query.get("lastmessageid").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                AdoError::bad_request(format!("lastMessageId {v:?} is not a number."))
            })?),
        };
    let deadline = {
        let w = c.sh.world();
        tokio::time::Instant::now() + w.long_poll
    };
    loop {
        let notify = {
            let mut w = c.sh.world();
            let aid = require_agent(&w, c, pool)?;
            if w.sessions.get(&sid).is_none_or(|s| s.agent_id != aid) {
                return Err(session_not_found(&sid));
            }
            if last.is_some() {
                ack_through(&mut w, &sid, None, last);
            }
            let s = &w.sessions[&sid];
            if let Some(m) = s.messages.front() {
                return ok(json!({ "messageId": m.id, "messageType": m.kind, "body": m.body }));
            }
            s.notify.clone()
        };
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(deadline) => return Ok((StatusCode::ACCEPTED, None)),
        }
    }
}

fn resource_usage(w: &World, c: &Ctx<'_>) -> Reply {
    if matches!(c.caller, Caller::Agent { .. }) {
        return Err(AdoError::forbidden(
            "Access denied: an agent's own token cannot read resource usage.",
        ));
    }
    let o = &w.orgs[c.org];
    let tag = c
        .query
        .get("parallelismtag")
        .cloned()
        .unwrap_or_else(|| PRIVATE_TAG.to_owned());
    let hosted = query_bool(c.query, "poolishosted");
    let include = query_bool(c.query, "includerunningrequests");
    let running: Vec<_> = if hosted {
        Vec::new()
    } else {
        w.requests
            .values()
            .filter(|r| {
                r.org == c.org
                    && r.agent.is_some()
                    && r.finish_time.is_none()
                    && r.tag.eq_ignore_ascii_case(&tag)
            })
            .collect()
    };
    let total = if hosted {
        0
    } else if tag.eq_ignore_ascii_case(PRIVATE_TAG) {
        i64::from(o.parallel_jobs)
    } else {
        i64::from(i32::MAX)
    };
    let mut v = json!({
        "resourceLimit": {
            "resourceLimitsData": {},
            "hostId": o.host_id,
            "parallelismTag": tag,
            "isHosted": hosted,
            "totalCount": total,
            "totalMinutes": 0,
            "isPremium": false,
            "failedToReachAllProviders": false,
        },
        "usedCount": running.len(),
        "usedMinutes": 0,
    });
    if include {
        v["runningRequests"] =
            Value::Array(running.iter().take(50).map(|r| w.request_json(r)).collect());
    }
    ok(v)
}

// ---- agent OAuth and the probe report ------------------------------------------------------------

#[derive(Deserialize)]
struct AgentAssertion {
    #[serde(default)]
    sub: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: String) -> Response {
    let body = json!({ "error": error, "error_description": description });
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn agent_oauth(sh: &Arc<Shared>, org: &str, body: &Bytes) -> Response {
    let fault = sh
        .world()
        .take_fault(EndpointClass::AgentFlow, Some(org), |k| {
            matches!(
                k,
                FaultKind::ServerError { .. } | FaultKind::RateLimited { .. }
            )
        });
    match fault {
        Some(FaultKind::ServerError { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            sh.world()
                .record_call("oauth.agent", "fault", status.as_u16());
            return oauth_error(
                status,
                "server_error",
                "Simulated token service failure.".into(),
            );
        }
        Some(FaultKind::RateLimited { retry_after_secs }) => {
            sh.world().record_call("oauth.agent", "fault", 429);
            let mut r = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "Throttled.".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        _ => {}
    }
    let (resp, label) = agent_oauth_inner(sh, org, body);
    sh.world()
        .record_call("oauth.agent", &label, resp.status().as_u16());
    resp
}

fn agent_oauth_inner(sh: &Arc<Shared>, org: &str, body: &Bytes) -> (Response, String) {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let anon = "anonymous".to_owned();
    let bad = |d: &str| {
        (
            oauth_error(StatusCode::BAD_REQUEST, "invalid_request", d.to_owned()),
            anon.clone(),
        )
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return bad("grant_type must be client_credentials.");
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return bad(
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
        );
    }
    let Some(assertion) = form.get("client_assertion") else {
        return bad("client_assertion is required.");
    };
    let Ok(unverified) = jsonwebtoken::dangerous::insecure_decode::<AgentAssertion>(assertion)
    else {
        return bad("client_assertion is not a JWT.");
    };
    let client_id = unverified.claims.sub.unwrap_or_default();
    let mut w = sh.world();
    let org_key = org.to_ascii_lowercase();
    let Some(org_name) = w.orgs.get(&org_key).map(|o| o.name.clone()) else {
        return (
            oauth_error(
                StatusCode::NOT_FOUND,
                "invalid_request",
                format!("No organization {org}."),
            ),
            anon,
        );
    };
    let Some(agent) = w.agent_by_client(&client_id).filter(|a| a.org == org_key) else {
        return (
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                format!("No agent with client id {client_id:?} (deleted?)."),
            ),
            anon,
        );
    };
    let aid = agent.id;
    let key = jsonwebtoken::DecodingKey::from_rsa_raw_components(&agent.modulus, &agent.exponent);
    let url = format!("{}/_vstoken/{}/oauth2/token", w.ado_base, org_name);
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[url.as_str()]);
    v.set_issuer(&[client_id.as_str()]);
    v.leeway = 60;
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let label = format!("{org_key}/agent:{aid}");
    if let Err(e) = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v) {
        return (
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                format!(
                    "The client assertion was rejected: {e} (it must be RS256-signed with the agent's registered key, iss=sub=clientId, aud={url})."
                ),
            ),
            label,
        );
    }
    let token = format!("{AGENT_TOKEN_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let lifetime = w.agent_token_lifetime;
    w.agent_tokens.insert(
        token.clone(),
        AgentToken {
            agent_id: aid,
            expires_unix: now_unix() + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
        },
    );
    let body = json!({ "access_token": token, "token_type": "Bearer", "expires_in": lifetime.as_secs(), "scope": "/" });
    (
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response(),
        label,
    )
}

fn report(sh: &Arc<Shared>, org: &str, id: &str, body: &Bytes) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return AdoError::bad_request(format!("request id {id:?} is not a number."))
            .into_response(sh);
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return AdoError::bad_request(
            "the report body must be JSON {\"env\":{..},\"argv\":[..],\"readable\":{..}}.",
        )
        .into_response(sh);
    };
    let mut w = sh.world();
    let key = org.to_ascii_lowercase();
    let belongs = w.requests.get(&id).is_some_and(|r| r.org == key);
    let status = if belongs && w.add_report(id, v) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    w.record_call("testbed.report", "anonymous", status.as_u16());
    drop(w);
    if status == StatusCode::OK {
        (status, [(header::CONTENT_TYPE, "application/json")], "{}").into_response()
    } else {
        job_not_found(id).into_response(sh)
    }
}
