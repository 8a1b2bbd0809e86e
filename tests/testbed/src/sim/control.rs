//! The control surface over HTTP, under `{ado}/_testbed/`, for out-of-process users (demo, bench
//! scripts). JSON in, JSON out; the same operations as the in-process `Simulator` methods.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/_testbed` | → `{ado, entra, tenantId}` |
//! | POST | `/_testbed/orgs` | `OrgSpec` |
//! | POST | `/_testbed/orgs/{org}/pools` | `{name}` → `{id}` |
//! | POST | `/_testbed/identities` | `IdentitySpec` |
//! | POST | `/_testbed/federated-issuers` | `FederatedIssuer` |
//! | POST / DELETE | `/_testbed/orgs/{org}/members[/{oid}]` | `{objectId}` |
//! | PUT | `/_testbed/orgs/{org}/pools/{pool}/roles/{oid}` | `{role}` (`none`/`reader`/`administrator`) |
//! | POST | `/_testbed/orgs/{org}/pats` | `{token, objectId}` |
//! | PUT | `/_testbed/orgs/{org}/parallel-jobs` | `{count}` |
//! | PUT | `/_testbed/settings` | `{assignmentOrder?, tokenLifetimeSecs?, rateLimit?}` |
//! | POST | `/_testbed/orgs/{org}/pools/{pool}/requests` | `RequestSpec` + optional `count` → `{requestIds}` |
//! | POST | `/_testbed/orgs/{org}/requests/{id}/cancel` | |
//! | GET | `/_testbed/orgs/{org}/pools/{pool}/requests` | → `[RequestInfo]` |
//! | GET | `/_testbed/orgs/{org}/requests/{id}` | → `RequestInfo` |
//! | GET | `/_testbed/orgs/{org}/pools/{pool}/agents` | → `[AgentInfo]` |
//! | GET | `/_testbed/requests/{id}/reports` | → `[Report]` |
//! | GET / DELETE | `/_testbed/calls` | → `[CallCount]` / reset |
//! | POST / DELETE | `/_testbed/faults` | `Fault` / clear all |
//! | POST | `/_testbed/tokens` | `{clientId, objectId, lifetimeSecs?}` → `{accessToken}` |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    AssignmentOrder, Fault, FederatedIssuer, IdentitySpec, OrgSpec, PatSpec, PoolRole,
    RateLimitConfig, RequestSpec, Shared, SimError, entra, model,
};

struct CtlError {
    status: StatusCode,
    label: &'static str,
    message: String,
}

impl From<SimError> for CtlError {
    fn from(e: SimError) -> Self {
        let status = match &e {
            SimError::UnknownOrg(_)
            | SimError::UnknownPool { .. }
            | SimError::UnknownRequest(_) => StatusCode::NOT_FOUND,
            SimError::OrgExists(_) | SimError::PoolExists { .. } | SimError::AlreadyFinished(_) => {
                StatusCode::CONFLICT
            }
            SimError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        CtlError {
            status,
            label: e.metric_label(),
            message: e.to_string(),
        }
    }
}

fn bad(message: String) -> CtlError {
    CtlError {
        status: StatusCode::BAD_REQUEST,
        label: "bad_request",
        message,
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, CtlError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body)
        .map_err(|e| bad(format!("control body is not valid for this call: {e}")))
}

fn to_json(v: impl serde::Serialize) -> Result<Value, CtlError> {
    serde_json::to_value(v).map_err(|e| bad(e.to_string()))
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectId {
    object_id: String,
}

#[derive(Deserialize)]
struct Role {
    role: PoolRole,
}

#[derive(Deserialize)]
struct Count {
    count: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Settings {
    #[serde(default)]
    assignment_order: Option<AssignmentOrder>,
    #[serde(default)]
    token_lifetime_secs: Option<u64>,
    #[serde(default)]
    rate_limit: Option<RateLimitConfig>,
}

#[derive(Deserialize)]
struct QueueBody {
    #[serde(flatten)]
    spec: RequestSpec,
    #[serde(default)]
    count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MintBody {
    client_id: String,
    object_id: String,
    #[serde(default)]
    lifetime_secs: Option<u64>,
}

pub(crate) async fn handle(
    sh: &Arc<Shared>,
    method: &Method,
    rest: &[&str],
    _query: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    let r = route(sh, method, rest, body);
    let (status, v) = match r {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (e.status, json!({ "error": e.label, "message": e.message })),
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn route(
    sh: &Arc<Shared>,
    method: &Method,
    rest: &[&str],
    body: &Bytes,
) -> Result<Value, CtlError> {
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| bad(format!("{s:?} is not a request id")))
    };
    let done = || Ok(json!({}));
    match (method.clone(), rest) {
        (Method::GET, [] | [""]) => {
            let tenant = sh.world().tenant_id.clone();
            Ok(
                json!({ "ado": sh.ado_base, "entra": format!("{}/", sh.entra_base), "tenantId": tenant }),
            )
        }
        (Method::POST, ["orgs"]) => {
            sh.world().add_org(parse::<OrgSpec>(body)?)?;
            done()
        }
        (Method::POST, ["orgs", org, "pools"]) => {
            let n: Name = parse(body)?;
            Ok(json!({ "id": sh.world().add_pool(org, &n.name)? }))
        }
        (Method::POST, ["identities"]) => {
            sh.world().add_identity(parse::<IdentitySpec>(body)?);
            done()
        }
        (Method::POST, ["federated-issuers"]) => {
            let i: FederatedIssuer = parse(body)?;
            sh.jwks_cache.forget(&i.issuer);
            sh.world().add_federated_issuer(i);
            done()
        }
        (Method::POST, ["orgs", org, "members"]) => {
            let o: ObjectId = parse(body)?;
            sh.world().set_member(org, &o.object_id, true)?;
            done()
        }
        (Method::DELETE, ["orgs", org, "members", oid]) => {
            sh.world().set_member(org, oid, false)?;
            done()
        }
        (Method::PUT, ["orgs", org, "pools", pool, "roles", oid]) => {
            let r: Role = parse(body)?;
            sh.world().set_pool_role(org, pool, oid, r.role)?;
            done()
        }
        (Method::POST, ["orgs", org, "pats"]) => {
            let p: PatSpec = parse(body)?;
            sh.world().add_pat(org, &p.token, &p.object_id)?;
            done()
        }
        (Method::PUT, ["orgs", org, "parallel-jobs"]) => {
            let c: Count = parse(body)?;
            let mut w = sh.world();
            w.set_parallel_jobs(org, c.count)?;
            w.run_engine();
            done()
        }
        (Method::PUT, ["settings"]) => {
            let s: Settings = parse(body)?;
            let mut w = sh.world();
            if let Some(o) = s.assignment_order {
                w.set_assignment_order(o);
            }
            if let Some(t) = s.token_lifetime_secs {
                w.token_lifetime = Duration::from_secs(t);
            }
            if let Some(r) = s.rate_limit {
                w.rate.set_config(r);
            }
            done()
        }
        (Method::POST, ["orgs", org, "pools", pool, "requests"]) => {
            let q: QueueBody = parse(body)?;
            let n = q.count.unwrap_or(1);
            let mut ids = Vec::with_capacity(n as usize);
            for _ in 0..n {
                ids.push(model::queue(sh, org, pool, q.spec.clone())?);
            }
            Ok(json!({ "requestIds": ids }))
        }
        (Method::POST, ["orgs", org, "requests", id, "cancel"]) => {
            model::cancel(sh, org, num(id)?)?;
            done()
        }
        (Method::GET, ["orgs", org, "pools", pool, "requests"]) => {
            to_json(sh.world().requests_info(org, pool)?)
        }
        (Method::GET, ["orgs", org, "requests", id]) => {
            to_json(sh.world().request_info(org, num(id)?)?)
        }
        (Method::GET, ["orgs", org, "pools", pool, "agents"]) => {
            to_json(sh.world().agents_info(org, pool)?)
        }
        (Method::GET, ["requests", id, "reports"]) => to_json(sh.world().reports_of(num(id)?)),
        (Method::GET, ["calls"]) => to_json(sh.world().calls()),
        (Method::DELETE, ["calls"]) => {
            sh.world().reset_calls();
            done()
        }
        (Method::POST, ["faults"]) => {
            let f: Fault = parse(body)?;
            sh.world().faults.push(f);
            done()
        }
        (Method::DELETE, ["faults"]) => {
            sh.world().faults.clear();
            done()
        }
        (Method::POST, ["tokens"]) => {
            let m: MintBody = parse(body)?;
            let tenant = sh.world().tenant_id.clone();
            let lifetime = Duration::from_secs(m.lifetime_secs.unwrap_or(3600));
            Ok(
                json!({ "accessToken": entra::mint_access_token(sh, &tenant, &m.client_id, &m.object_id, lifetime) }),
            )
        }
        _ => Err(CtlError {
            status: StatusCode::NOT_FOUND,
            label: "no_route",
            message: format!(
                "no control route {method} /_testbed/{}; see sim/control.rs for the list",
                rest.join("/")
            ),
        }),
    }
}
