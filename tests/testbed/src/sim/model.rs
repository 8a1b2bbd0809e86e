//! The simulator's in-memory world: organizations, pools, agents, job requests, sessions, and the
//! assignment engine. Everything here runs under one mutex; nothing awaits while holding it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use super::demands::{Capabilities, Demand};
use super::ratelimit::RateLimiter;
use super::{
    AssignmentOrder, CallCount, EndpointClass, Fault, FaultKind, FederatedIssuer, IdentitySpec,
    OrgSpec, PRIVATE_TAG, PoolRole, Report, RequestSpec, Shared, SimConfig, SimError, Workload,
};

/// Formats a time as ADO does (UTC, fractional seconds, `Z`).
pub(crate) fn ts(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A job request as a test reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestInfo {
    pub request_id: u64,
    pub pool_id: u32,
    pub pool: String,
    pub demands: Vec<String>,
    pub parallelism_tag: String,
    pub workload: Workload,
    /// `None` while a delayed request has not appeared yet.
    pub queue_time: Option<Timestamp>,
    pub assign_time: Option<Timestamp>,
    pub receive_time: Option<Timestamp>,
    pub finish_time: Option<Timestamp>,
    pub result: Option<String>,
    pub agent_id: Option<u32>,
    pub agent_name: Option<String>,
    pub status_message: Option<String>,
    pub cancel_requested: bool,
}

impl RequestInfo {
    pub fn is_finished(&self) -> bool {
        self.finish_time.is_some()
    }
    pub fn is_assigned(&self) -> bool {
        self.assign_time.is_some()
    }
}

/// An agent as a test reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    pub id: u32,
    pub name: String,
    pub version: String,
    pub enabled: bool,
    /// Online = has a session.
    pub online: bool,
    pub system_capabilities: BTreeMap<String, String>,
    pub user_capabilities: BTreeMap<String, String>,
    pub assigned_request: Option<u64>,
    pub last_completed_request: Option<u64>,
    pub created_on: Timestamp,
}

/// What a call did to an agent (see [`AgentChange`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentAction {
    /// `POST agents`.
    Registered,
    /// `PUT agents/{id}` (a takeover, `config.sh --replace`).
    Replaced,
    /// `PATCH agents/{id}`; `enabled` when the body set it.
    Updated { enabled: Option<bool> },
    /// `DELETE agents/{id}`.
    Deleted,
}

/// One change made to an agent through the REST API, in the order the simulator applied them: who did
/// it, and which request the agent held at that moment (the audit trail a fault suite derives "no busy
/// agent removed" and "foreign agents untouched" from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentChange {
    pub time: Timestamp,
    pub org: String,
    pub pool_id: u32,
    pub agent_id: u32,
    pub agent_name: String,
    pub action: AgentAction,
    /// The caller: an identity's object id, or `agent:<id>` for an agent's own OAuth token.
    pub by: String,
    /// The unfinished request the agent held just before the change.
    pub held_request: Option<u64>,
    /// Whether the agent had received that request (its job was running).
    pub held_request_received: bool,
    /// Its system capabilities just before the change (after, for a registration).
    pub system_capabilities: BTreeMap<String, String>,
}

pub(crate) struct Org {
    pub name: String,
    pub parallel_jobs: u32,
    pub members: HashSet<String>,
    pub pats: HashMap<String, String>,
    pub default_role: PoolRole,
    pub pools: BTreeMap<u32, Pool>,
    pub host_id: String,
    pub project_id: String,
}

pub(crate) struct Pool {
    pub id: u32,
    pub name: String,
    pub roles: HashMap<String, PoolRole>,
    pub created_on: Timestamp,
    pub scope: String,
}

pub(crate) struct Request {
    pub id: u64,
    pub org: String,
    pub pool_id: u32,
    pub demands: Vec<String>,
    pub parsed: Vec<Demand>,
    pub workload: Workload,
    pub tag: String,
    pub definition: String,
    pub job_name: String,
    pub job_id: String,
    pub plan_id: String,
    pub queue_time: Option<Timestamp>,
    pub assign_time: Option<Timestamp>,
    pub receive_time: Option<Timestamp>,
    pub finish_time: Option<Timestamp>,
    pub result: Option<String>,
    pub agent: Option<u32>,
    pub agent_name: Option<String>,
    pub lock_token: Option<String>,
    pub locked_until: Option<Timestamp>,
    pub status_message: Option<String>,
    pub cancel_requested: bool,
    pub job_message: Option<u64>,
}

impl Request {
    fn waiting(&self) -> bool {
        self.queue_time.is_some() && self.finish_time.is_none() && self.agent.is_none()
    }
    fn holds_slot(&self) -> bool {
        self.agent.is_some()
            && self.finish_time.is_none()
            && self.tag.eq_ignore_ascii_case(PRIVATE_TAG)
    }
}

pub(crate) struct Agent {
    pub id: u32,
    pub org: String,
    pub pool_id: u32,
    pub name: String,
    pub version: String,
    pub os_description: Option<String>,
    pub enabled: bool,
    pub max_parallelism: i64,
    pub system_caps: BTreeMap<String, String>,
    pub user_caps: BTreeMap<String, String>,
    pub caps: Capabilities,
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
    pub client_id: String,
    pub created_on: Timestamp,
    pub status_changed_on: Timestamp,
    pub session: Option<String>,
    pub assigned: Option<u64>,
    pub last_completed: Option<u64>,
}

impl Agent {
    pub(crate) fn refresh_caps(&mut self) {
        let mut caps = Capabilities::new(&self.system_caps, &self.user_caps);
        caps.insert_default("Agent.Version", &self.version);
        caps.insert_default("Agent.Name", &self.name);
        self.caps = caps;
    }
}

pub(crate) struct Message {
    pub id: u64,
    pub kind: &'static str,
    pub body: String,
    pub request: Option<u64>,
}

pub(crate) struct Session {
    pub agent_id: u32,
    pub messages: VecDeque<Message>,
    pub notify: Arc<Notify>,
}

pub(crate) struct AgentToken {
    pub agent_id: u32,
    pub expires_unix: i64,
}

pub(crate) struct World {
    pub tenant_id: String,
    pub token_lifetime: Duration,
    pub agent_token_lifetime: Duration,
    pub long_poll: Duration,
    pub cancel_timeout: Duration,
    pub lock_duration: Duration,
    order: AssignmentOrder,
    rng: u64,
    pub rate: RateLimiter,
    pub faults: Vec<Fault>,
    calls: HashMap<(&'static str, String, u16), u64>,
    pub orgs: BTreeMap<String, Org>,
    pub identities: HashMap<String, IdentitySpec>,
    pub issuers: Vec<FederatedIssuer>,
    pub requests: BTreeMap<u64, Request>,
    pub agents: BTreeMap<u32, Agent>,
    pub sessions: HashMap<String, Session>,
    pub agent_tokens: HashMap<String, AgentToken>,
    reports: HashMap<u64, Vec<Value>>,
    next_request: u64,
    next_agent: u32,
    next_pool: u32,
    next_message: u64,
    pub ado_base: String,
    pub(crate) agent_log: Vec<AgentChange>,
}

fn org_key(org: &str) -> String {
    org.to_ascii_lowercase()
}

impl World {
    pub(crate) fn new(cfg: &SimConfig, ado_base: &str) -> Result<World, SimError> {
        let mut w = World {
            tenant_id: cfg.tenant_id.clone(),
            token_lifetime: Duration::from_secs(cfg.token_lifetime_secs),
            agent_token_lifetime: Duration::from_secs(cfg.agent_token_lifetime_secs),
            long_poll: Duration::from_secs(cfg.long_poll_secs),
            cancel_timeout: Duration::from_secs(cfg.cancel_timeout_secs),
            lock_duration: Duration::from_secs(cfg.lock_secs),
            order: cfg.assignment_order,
            rng: seed_of(cfg.assignment_order),
            rate: RateLimiter::new(cfg.rate_limit.clone()),
            faults: Vec::new(),
            calls: HashMap::new(),
            orgs: BTreeMap::new(),
            identities: HashMap::new(),
            issuers: Vec::new(),
            requests: BTreeMap::new(),
            agents: BTreeMap::new(),
            sessions: HashMap::new(),
            agent_tokens: HashMap::new(),
            reports: HashMap::new(),
            next_request: 1,
            next_agent: 1,
            next_pool: 1,
            next_message: 1,
            ado_base: ado_base.to_owned(),
            agent_log: Vec::new(),
        };
        for i in &cfg.identities {
            w.add_identity(i.clone());
        }
        for i in &cfg.federated_issuers {
            w.add_federated_issuer(i.clone());
        }
        for o in &cfg.orgs {
            w.add_org(o.clone())?;
        }
        Ok(w)
    }

    // ---- configuration -------------------------------------------------------------------------

    pub(crate) fn add_org(&mut self, spec: OrgSpec) -> Result<(), SimError> {
        let key = org_key(&spec.name);
        if spec.name.is_empty() || spec.name.starts_with('_') || spec.name.contains('/') {
            return Err(SimError::InvalidSpec(format!(
                "organization name {:?} must be non-empty, must not start with '_' nor contain '/'",
                spec.name
            )));
        }
        if self.orgs.contains_key(&key) {
            return Err(SimError::OrgExists(spec.name));
        }
        self.orgs.insert(
            key.clone(),
            Org {
                name: spec.name.clone(),
                parallel_jobs: spec.parallel_jobs,
                members: spec
                    .members
                    .iter()
                    .map(|m| m.to_ascii_lowercase())
                    .collect(),
                pats: spec
                    .pats
                    .iter()
                    .map(|p| (p.token.clone(), p.object_id.to_ascii_lowercase()))
                    .collect(),
                default_role: spec.default_pool_role,
                pools: BTreeMap::new(),
                host_id: uuid::Uuid::new_v4().to_string(),
                project_id: uuid::Uuid::new_v4().to_string(),
            },
        );
        for p in spec.pools {
            let id = self.add_pool(&spec.name, &p.name)?;
            for (oid, role) in p.roles {
                self.set_pool_role_by_id(&key, id, &oid, role);
            }
        }
        Ok(())
    }

    pub(crate) fn org(&self, org: &str) -> Result<&Org, SimError> {
        self.orgs
            .get(&org_key(org))
            .ok_or_else(|| SimError::UnknownOrg(org.to_owned()))
    }

    fn org_mut(&mut self, org: &str) -> Result<&mut Org, SimError> {
        self.orgs
            .get_mut(&org_key(org))
            .ok_or_else(|| SimError::UnknownOrg(org.to_owned()))
    }

    pub(crate) fn add_pool(&mut self, org: &str, pool: &str) -> Result<u32, SimError> {
        let id = self.next_pool;
        let o = self.org_mut(org)?;
        if o.pools.values().any(|p| p.name.eq_ignore_ascii_case(pool)) {
            return Err(SimError::PoolExists {
                org: org.to_owned(),
                pool: pool.to_owned(),
            });
        }
        o.pools.insert(
            id,
            Pool {
                id,
                name: pool.to_owned(),
                roles: HashMap::new(),
                created_on: Timestamp::now(),
                scope: uuid::Uuid::new_v4().to_string(),
            },
        );
        self.next_pool += 1;
        Ok(id)
    }

    pub(crate) fn pool_id(&self, org: &str, pool: &str) -> Result<u32, SimError> {
        self.org(org)?
            .pools
            .values()
            .find(|p| p.name.eq_ignore_ascii_case(pool))
            .map(|p| p.id)
            .ok_or_else(|| SimError::UnknownPool {
                org: org.to_owned(),
                pool: pool.to_owned(),
            })
    }

    pub(crate) fn add_identity(&mut self, spec: IdentitySpec) {
        self.identities
            .insert(spec.client_id.to_ascii_lowercase(), spec);
    }

    pub(crate) fn add_federated_issuer(&mut self, issuer: FederatedIssuer) {
        self.issuers.retain(|i| i.issuer != issuer.issuer);
        self.issuers.push(issuer);
    }

    pub(crate) fn set_member(
        &mut self,
        org: &str,
        oid: &str,
        member: bool,
    ) -> Result<(), SimError> {
        let o = self.org_mut(org)?;
        if member {
            o.members.insert(oid.to_ascii_lowercase());
        } else {
            o.members.remove(&oid.to_ascii_lowercase());
        }
        Ok(())
    }

    pub(crate) fn set_pool_role(
        &mut self,
        org: &str,
        pool: &str,
        oid: &str,
        role: PoolRole,
    ) -> Result<(), SimError> {
        let id = self.pool_id(org, pool)?;
        self.set_pool_role_by_id(&org_key(org), id, oid, role);
        Ok(())
    }

    fn set_pool_role_by_id(&mut self, org_key: &str, pool: u32, oid: &str, role: PoolRole) {
        if let Some(p) = self
            .orgs
            .get_mut(org_key)
            .and_then(|o| o.pools.get_mut(&pool))
        {
            p.roles.insert(oid.to_ascii_lowercase(), role);
        }
    }

    pub(crate) fn add_pat(&mut self, org: &str, token: &str, oid: &str) -> Result<(), SimError> {
        self.org_mut(org)?
            .pats
            .insert(token.to_owned(), oid.to_ascii_lowercase());
        Ok(())
    }

    pub(crate) fn set_parallel_jobs(&mut self, org: &str, n: u32) -> Result<(), SimError> {
        self.org_mut(org)?.parallel_jobs = n;
        Ok(())
    }

    pub(crate) fn set_assignment_order(&mut self, order: AssignmentOrder) {
        self.order = order;
        self.rng = seed_of(order);
    }

    /// Role of `oid` on a pool (membership is checked separately).
    pub(crate) fn role(&self, org: &Org, pool: &Pool, oid: &str) -> PoolRole {
        pool.roles
            .get(&oid.to_ascii_lowercase())
            .copied()
            .unwrap_or(org.default_role)
    }

    // ---- faults and counters -------------------------------------------------------------------

    /// Takes the first armed fault for `class` (and `org`) accepted by `want`, counting it down.
    pub(crate) fn take_fault(
        &mut self,
        class: EndpointClass,
        org: Option<&str>,
        want: impl Fn(&FaultKind) -> bool,
    ) -> Option<FaultKind> {
        self.take_fault_of(class, org, None, want)
    }

    /// [`Self::take_fault`] for faults scoped to one caller (`caller` = its object id; `None` takes only
    /// unscoped faults).
    pub(crate) fn take_fault_of(
        &mut self,
        class: EndpointClass,
        org: Option<&str>,
        caller: Option<&str>,
        want: impl Fn(&FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let idx = self.faults.iter().position(|f| {
            (f.class == class || f.class == EndpointClass::Any)
                && want(&f.kind)
                && match (&f.caller, caller) {
                    (None, None) => true,
                    (Some(fc), Some(c)) => fc.eq_ignore_ascii_case(c),
                    _ => false,
                }
                && match (&f.org, org) {
                    (Some(fo), Some(o)) => fo.eq_ignore_ascii_case(o),
                    (Some(_), None) => class == EndpointClass::Token,
                    (None, _) => true,
                }
        })?;
        let kind = self.faults[idx].kind.clone();
        if let Some(n) = self.faults[idx].count.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(idx);
            }
        }
        Some(kind)
    }

    pub(crate) fn record_call(&mut self, endpoint: &'static str, identity: &str, status: u16) {
        *self
            .calls
            .entry((endpoint, identity.to_owned(), status))
            .or_insert(0) += 1;
    }

    pub(crate) fn calls(&self) -> Vec<CallCount> {
        let mut v: Vec<CallCount> = self
            .calls
            .iter()
            .map(|((e, i, s), c)| CallCount {
                endpoint: (*e).to_owned(),
                identity: i.clone(),
                status: *s,
                count: *c,
            })
            .collect();
        v.sort_by(|a, b| {
            (&a.endpoint, &a.identity, a.status).cmp(&(&b.endpoint, &b.identity, b.status))
        });
        v
    }

    pub(crate) fn reset_calls(&mut self) {
        self.calls.clear();
    }

    pub(crate) fn add_report(&mut self, request_id: u64, body: Value) -> bool {
        if !self.requests.contains_key(&request_id) {
            return false;
        }
        self.reports.entry(request_id).or_default().push(body);
        true
    }

    pub(crate) fn reports_of(&self, request_id: u64) -> Vec<Report> {
        self.reports
            .get(&request_id)
            .map(|v| {
                v.iter()
                    .map(|b| Report {
                        request_id,
                        body: b.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    // ---- agents --------------------------------------------------------------------------------

    /// Records a change to an agent, with the request it holds now (call it before applying the change;
    /// after, for a registration).
    pub(crate) fn log_agent_change(&mut self, agent_id: u32, action: AgentAction, by: String) {
        let Some(a) = self.agents.get(&agent_id) else {
            return;
        };
        let held = a
            .assigned
            .and_then(|rid| self.requests.get(&rid))
            .filter(|r| r.finish_time.is_none());
        let change = AgentChange {
            time: Timestamp::now(),
            org: a.org.clone(),
            pool_id: a.pool_id,
            agent_id,
            agent_name: a.name.clone(),
            action,
            by,
            held_request: held.map(|r| r.id),
            held_request_received: held.is_some_and(|r| r.receive_time.is_some()),
            system_capabilities: a.system_caps.clone(),
        };
        self.agent_log.push(change);
    }

    pub(crate) fn next_agent_id(&mut self) -> u32 {
        let id = self.next_agent;
        self.next_agent += 1;
        id
    }

    pub(crate) fn agent_by_client(&self, client_id: &str) -> Option<&Agent> {
        self.agents
            .values()
            .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
    }

    /// Ends an agent's session (it goes offline). An assigned request the agent has not received yet
    /// goes back to the queue.
    pub(crate) fn end_session(&mut self, agent_id: u32) {
        let now = Timestamp::now();
        let Some(agent) = self.agents.get_mut(&agent_id) else {
            return;
        };
        let Some(sid) = agent.session.take() else {
            return;
        };
        agent.status_changed_on = now;
        if let Some(s) = self.sessions.remove(&sid) {
            s.notify.notify_waiters();
            s.notify.notify_one();
        }
        if let Some(rid) = agent.assigned
            && let Some(r) = self.requests.get_mut(&rid)
            && r.receive_time.is_none()
            && r.finish_time.is_none()
        {
            r.agent = None;
            r.agent_name = None;
            r.assign_time = None;
            r.lock_token = None;
            r.locked_until = None;
            r.job_message = None;
            agent.assigned = None;
        }
        self.run_engine();
    }

    /// Deletes an agent: ends its session, abandons a request it was running, and fails waiting
    /// requests of the pool that no remaining agent can serve.
    pub(crate) fn delete_agent(&mut self, agent_id: u32) {
        self.end_session(agent_id);
        let Some(agent) = self.agents.remove(&agent_id) else {
            return;
        };
        self.agent_tokens.retain(|_, t| t.agent_id != agent_id);
        if let Some(rid) = agent.assigned {
            self.finish(rid, "abandoned");
        }
        self.fail_unservable(&agent.org, agent.pool_id, None);
        self.run_engine();
    }

    // ---- requests ------------------------------------------------------------------------------

    fn pool_name(&self, org: &str, pool_id: u32) -> String {
        self.orgs
            .get(org)
            .and_then(|o| o.pools.get(&pool_id))
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// Fails waiting requests of a pool (or only `only`) that no agent of the pool — online or not,
    /// enabled or not — can serve, as ADO does.
    pub(crate) fn fail_unservable(&mut self, org: &str, pool_id: u32, only: Option<u64>) {
        let pool_name = self.pool_name(org, pool_id);
        let mut to_fail = Vec::new();
        for r in self.requests.values() {
            if r.org != org
                || r.pool_id != pool_id
                || !r.waiting()
                || only.is_some_and(|o| o != r.id)
            {
                continue;
            }
            let servable = self
                .agents
                .values()
                .any(|a| a.org == org && a.pool_id == pool_id && a.caps.satisfy(&r.parsed));
            if !servable {
                to_fail.push(r.id);
            }
        }
        let now = Timestamp::now();
        for id in to_fail {
            if let Some(r) = self.requests.get_mut(&id) {
                r.finish_time = Some(now);
                r.result = Some("failed".into());
                r.status_message = Some(format!(
                    "No agent found in pool {pool_name} which satisfies the specified demands: {}",
                    r.demands.join(", ")
                ));
            }
        }
    }

    /// Finishes a request (frees its agent and its parallel slot) and runs the engine.
    pub(crate) fn finish(&mut self, rid: u64, result: &str) {
        let now = Timestamp::now();
        let Some(r) = self.requests.get_mut(&rid) else {
            return;
        };
        if r.finish_time.is_some() {
            return;
        }
        r.finish_time = Some(now);
        r.result = Some(result.to_owned());
        r.locked_until = None;
        let job_message = r.job_message;
        if let Some(aid) = r.agent
            && let Some(a) = self.agents.get_mut(&aid)
            && a.assigned == Some(rid)
        {
            a.assigned = None;
            a.last_completed = Some(rid);
            if let Some(s) = a
                .session
                .as_ref()
                .and_then(|sid| self.sessions.get_mut(sid))
            {
                // A job message not yet fetched is withdrawn.
                s.messages
                    .retain(|m| Some(m.id) != job_message || m.request != Some(rid));
            }
        }
        self.run_engine();
    }

    /// Pushes a message to an agent's session.
    pub(crate) fn push_message(
        &mut self,
        agent_id: u32,
        kind: &'static str,
        body: String,
        request: Option<u64>,
    ) -> Option<u64> {
        let sid = self.agents.get(&agent_id)?.session.clone()?;
        let id = self.next_message;
        self.next_message += 1;
        let s = self.sessions.get_mut(&sid)?;
        s.messages.push_back(Message {
            id,
            kind,
            body,
            request,
        });
        s.notify.notify_one();
        Some(id)
    }

    /// Abandons running requests whose lock expired (the agent stopped renewing it: crashed, killed,
    /// partitioned), as ADO does; their agent becomes free again. Returns how many.
    pub(crate) fn expire_locks(&mut self, now: Timestamp) -> usize {
        let expired: Vec<u64> = self
            .requests
            .values()
            .filter(|r| r.finish_time.is_none() && r.agent.is_some() && r.receive_time.is_some())
            .filter(|r| r.locked_until.is_some_and(|t| t < now))
            .map(|r| r.id)
            .collect();
        for id in &expired {
            let mut agent = None;
            if let Some(r) = self.requests.get_mut(id) {
                r.status_message = Some(
                    "The agent did not renew the job lock in time; the request was abandoned."
                        .into(),
                );
                agent = r.agent;
            }
            // ADO stopped hearing from the agent: it goes offline, so no other request is assigned to a
            // dead agent (where it would wait forever, never received).
            if let Some(aid) = agent {
                self.end_session(aid);
            }
            self.finish(*id, "abandoned");
        }
        expired.len()
    }

    /// The assignment engine: pairs waiting requests with free agents in the configured order,
    /// within the organizations' parallel-job slots.
    pub(crate) fn run_engine(&mut self) {
        let orgs: Vec<String> = self.orgs.keys().cloned().collect();
        for org in orgs {
            self.run_engine_org(&org);
        }
    }

    fn run_engine_org(&mut self, org: &str) {
        let Some(limit) = self.orgs.get(org).map(|o| o.parallel_jobs) else {
            return;
        };
        let used = self
            .requests
            .values()
            .filter(|r| r.org == org && r.holds_slot())
            .count();
        let mut slots = (limit as usize).saturating_sub(used);
        let mut waiting: Vec<u64> = self
            .requests
            .values()
            .filter(|r| r.org == org && r.waiting())
            .map(|r| r.id)
            .collect();
        let mut free: Vec<u32> = self
            .agents
            .values()
            .filter(|a| a.org == org && a.session.is_some() && a.enabled && a.assigned.is_none())
            .map(|a| a.id)
            .collect();
        if !waiting.is_empty() && !free.is_empty() {
            let order = self.order;
            match order {
                AssignmentOrder::OldestFirst => {}
                AssignmentOrder::NewestRequestFirst => waiting.reverse(),
                AssignmentOrder::NewestAgentFirst => free.reverse(),
                AssignmentOrder::Random { .. } => {
                    self.shuffle(&mut waiting);
                    self.shuffle(&mut free);
                }
            }
            let mut pairs = Vec::new();
            if order == AssignmentOrder::NewestAgentFirst {
                for &aid in &free {
                    let Some(a) = self.agents.get(&aid) else {
                        continue;
                    };
                    let pick = waiting.iter().position(|rid| {
                        self.requests.get(rid).is_some_and(|r| {
                            r.pool_id == a.pool_id
                                && a.caps.satisfy(&r.parsed)
                                && (slots > 0 || !r.holds_slot_when_assigned())
                        })
                    });
                    if let Some(i) = pick {
                        let rid = waiting.remove(i);
                        if self
                            .requests
                            .get(&rid)
                            .is_some_and(Request::holds_slot_when_assigned)
                        {
                            slots -= 1;
                        }
                        pairs.push((rid, aid));
                    }
                }
            } else {
                for &rid in &waiting {
                    let Some(r) = self.requests.get(&rid) else {
                        continue;
                    };
                    let needs_slot = r.holds_slot_when_assigned();
                    if needs_slot && slots == 0 {
                        continue;
                    }
                    let pick = free.iter().position(|aid| {
                        self.agents
                            .get(aid)
                            .is_some_and(|a| a.pool_id == r.pool_id && a.caps.satisfy(&r.parsed))
                    });
                    if let Some(i) = pick {
                        let aid = free.remove(i);
                        if needs_slot {
                            slots -= 1;
                        }
                        pairs.push((rid, aid));
                    }
                }
            }
            for (rid, aid) in pairs {
                self.assign(rid, aid);
            }
        }
        // Queue position hint for requests held back by the parallel-job limit.
        let used = self
            .requests
            .values()
            .filter(|r| r.org == org && r.holds_slot())
            .count();
        let full = used >= limit as usize;
        let mut pos = 0usize;
        for r in self.requests.values_mut() {
            if r.org != org || !r.waiting() || !r.holds_slot_when_assigned() {
                continue;
            }
            if full {
                pos += 1;
                r.status_message = Some(format!(
                    "This agent request is not running because you have reached the maximum number of requests that can run for parallelism type 'Self-Hosted Private'. Current position in queue: {pos}"
                ));
            } else {
                r.status_message = None;
            }
        }
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_rand() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    /// splitmix64.
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn assign(&mut self, rid: u64, aid: u32) {
        let now = Timestamp::now();
        let lock = self.lock_duration;
        let Some(agent) = self.agents.get_mut(&aid) else {
            return;
        };
        agent.assigned = Some(rid);
        let agent_name = agent.name.clone();
        let Some(r) = self.requests.get_mut(&rid) else {
            return;
        };
        r.agent = Some(aid);
        r.agent_name = Some(agent_name);
        r.assign_time = Some(now);
        r.status_message = None;
        let token = uuid::Uuid::new_v4().to_string();
        r.lock_token = Some(token.clone());
        r.locked_until = Some(add(now, lock));
        let body = json!({
            "requestId": r.id,
            "jobId": r.job_id,
            "jobDisplayName": r.job_name,
            "jobName": r.job_name,
            "lockToken": token,
            "plan": { "planId": r.plan_id, "planType": "Build" },
            "demands": r.demands,
            "workload": r.workload,
        })
        .to_string();
        let mid = self.push_message(aid, "PipelineAgentJobRequest", body, Some(rid));
        if let Some(r) = self.requests.get_mut(&rid) {
            r.job_message = mid;
        }
    }

    // ---- read back -----------------------------------------------------------------------------

    fn info(&self, r: &Request) -> RequestInfo {
        RequestInfo {
            request_id: r.id,
            pool_id: r.pool_id,
            pool: self.pool_name(&r.org, r.pool_id),
            demands: r.demands.clone(),
            parallelism_tag: r.tag.clone(),
            workload: r.workload.clone(),
            queue_time: r.queue_time,
            assign_time: r.assign_time,
            receive_time: r.receive_time,
            finish_time: r.finish_time,
            result: r.result.clone(),
            agent_id: r.agent,
            agent_name: r.agent_name.clone(),
            status_message: r.status_message.clone(),
            cancel_requested: r.cancel_requested,
        }
    }

    pub(crate) fn requests_info(
        &self,
        org: &str,
        pool: &str,
    ) -> Result<Vec<RequestInfo>, SimError> {
        let pool_id = self.pool_id(org, pool)?;
        let key = org_key(org);
        Ok(self
            .requests
            .values()
            .filter(|r| r.org == key && r.pool_id == pool_id && r.queue_time.is_some())
            .map(|r| self.info(r))
            .collect())
    }

    pub(crate) fn request_info(&self, org: &str, id: u64) -> Result<RequestInfo, SimError> {
        let key = org_key(org);
        self.org(org)?;
        self.requests
            .get(&id)
            .filter(|r| r.org == key)
            .map(|r| self.info(r))
            .ok_or(SimError::UnknownRequest(id))
    }

    pub(crate) fn agents_info(&self, org: &str, pool: &str) -> Result<Vec<AgentInfo>, SimError> {
        let pool_id = self.pool_id(org, pool)?;
        let key = org_key(org);
        Ok(self
            .agents
            .values()
            .filter(|a| a.org == key && a.pool_id == pool_id)
            .map(|a| AgentInfo {
                id: a.id,
                name: a.name.clone(),
                version: a.version.clone(),
                enabled: a.enabled,
                online: a.session.is_some(),
                system_capabilities: a.system_caps.clone(),
                user_capabilities: a.user_caps.clone(),
                assigned_request: a.assigned,
                last_completed_request: a.last_completed,
                created_on: a.created_on,
            })
            .collect())
    }

    // ---- JSON shapes ---------------------------------------------------------------------------

    fn links(&self, org: &str, path: &str) -> Value {
        let name = self.orgs.get(org).map(|o| o.name.as_str()).unwrap_or(org);
        let href = format!("{}/{}/_apis/distributedtask/{}", self.ado_base, name, path);
        json!({ "self": { "href": href }, "web": { "href": format!("{}/{}/_settings/agentpools", self.ado_base, name) } })
    }

    pub(crate) fn agent_ref_json(&self, a: &Agent) -> Value {
        let mut m = Map::new();
        m.insert(
            "_links".into(),
            self.links(&a.org, &format!("pools/{}/agents/{}", a.pool_id, a.id)),
        );
        m.insert("id".into(), json!(a.id));
        m.insert("name".into(), json!(a.name));
        m.insert("version".into(), json!(a.version));
        if let Some(os) = &a.os_description {
            m.insert("osDescription".into(), json!(os));
        }
        m.insert("enabled".into(), json!(a.enabled));
        m.insert(
            "status".into(),
            json!(if a.session.is_some() {
                "online"
            } else {
                "offline"
            }),
        );
        m.insert("provisioningState".into(), json!("Provisioned"));
        m.insert("accessPoint".into(), json!("CodexAccessMapping"));
        Value::Object(m)
    }

    pub(crate) fn agent_json(
        &self,
        a: &Agent,
        caps: bool,
        assigned: bool,
        last: bool,
        authorization: bool,
    ) -> Value {
        let mut v = self.agent_ref_json(a);
        let Value::Object(m) = &mut v else { return v };
        m.insert("maxParallelism".into(), json!(a.max_parallelism));
        m.insert("createdOn".into(), json!(ts(a.created_on)));
        m.insert("statusChangedOn".into(), json!(ts(a.status_changed_on)));
        if caps {
            m.insert("systemCapabilities".into(), json!(a.system_caps));
            m.insert("userCapabilities".into(), json!(a.user_caps));
        }
        if assigned && let Some(r) = a.assigned.and_then(|id| self.requests.get(&id)) {
            m.insert("assignedRequest".into(), self.request_json(r));
        }
        if last && let Some(r) = a.last_completed.and_then(|id| self.requests.get(&id)) {
            m.insert("lastCompletedRequest".into(), self.request_json(r));
        }
        if authorization {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let name = self
                .orgs
                .get(&a.org)
                .map(|o| o.name.as_str())
                .unwrap_or(&a.org);
            m.insert(
                "authorization".into(),
                json!({
                    "authorizationUrl": format!("{}/_vstoken/{}/oauth2/token", self.ado_base, name),
                    "clientId": a.client_id,
                    "publicKey": { "exponent": b64.encode(&a.exponent), "modulus": b64.encode(&a.modulus) },
                }),
            );
        }
        v
    }

    pub(crate) fn request_json(&self, r: &Request) -> Value {
        let org = self.orgs.get(&r.org);
        let mut m = Map::new();
        m.insert("requestId".into(), json!(r.id));
        if let Some(t) = r.queue_time {
            m.insert("queueTime".into(), json!(ts(t)));
        }
        if let Some(t) = r.assign_time {
            m.insert("assignTime".into(), json!(ts(t)));
        }
        if let Some(t) = r.receive_time {
            m.insert("receiveTime".into(), json!(ts(t)));
        }
        if let Some(t) = r.finish_time {
            m.insert("finishTime".into(), json!(ts(t)));
        }
        if let Some(res) = &r.result {
            m.insert("result".into(), json!(res));
        }
        if let Some(t) = r.locked_until {
            m.insert("lockedUntil".into(), json!(ts(t)));
        }
        if let Some(o) = org {
            m.insert(
                "serviceOwner".into(),
                json!("00025394-6065-48ca-87d9-7f5672854ef7"),
            );
            m.insert("hostId".into(), json!(o.host_id));
            m.insert("scopeId".into(), json!(o.project_id));
        }
        m.insert("planType".into(), json!("Build"));
        m.insert("planId".into(), json!(r.plan_id));
        m.insert("jobId".into(), json!(r.job_id));
        m.insert("jobName".into(), json!(r.job_name));
        m.insert("demands".into(), json!(r.demands));
        if let Some(aid) = r.agent {
            if let Some(a) = self.agents.get(&aid) {
                m.insert("reservedAgent".into(), self.agent_ref_json(a));
            } else if let Some(name) = &r.agent_name {
                m.insert("reservedAgent".into(), json!({ "id": aid, "name": name }));
            }
        }
        let def_id = 1 + (r.definition.bytes().map(u64::from).sum::<u64>() % 1000);
        m.insert(
            "definition".into(),
            json!({ "_links": self.links(&r.org, "definitions"), "id": def_id, "name": r.definition }),
        );
        m.insert("owner".into(), json!({ "_links": self.links(&r.org, "runs"), "id": r.id, "name": format!("{}#{}", r.definition, r.id) }));
        m.insert(
            "data".into(),
            json!({ "ParallelismTag": r.tag, "IsScheduledKey": "False" }),
        );
        m.insert("poolId".into(), json!(r.pool_id));
        m.insert(
            "orchestrationId".into(),
            json!(format!("{}.{}", r.plan_id, r.job_name)),
        );
        m.insert("matchesAllAgentsInPool".into(), json!(r.parsed.is_empty()));
        if let Some(s) = &r.status_message {
            m.insert("statusMessage".into(), json!(s));
        }
        m.insert("priority".into(), json!(1));
        Value::Object(m)
    }

    pub(crate) fn pool_json(&self, org: &Org, p: &Pool) -> Value {
        let key = org_key(&org.name);
        let size = self
            .agents
            .values()
            .filter(|a| a.org == key && a.pool_id == p.id)
            .count();
        let owner = json!({ "displayName": "Project Collection Build Service", "id": "00000000-0000-0000-0000-000000000001", "uniqueName": "build@testbed" });
        json!({
            "createdOn": ts(p.created_on),
            "autoProvision": false,
            "autoUpdate": false,
            "autoSize": true,
            "createdBy": owner,
            "owner": owner,
            "id": p.id,
            "scope": p.scope,
            "name": p.name,
            "isHosted": false,
            "poolType": "automation",
            "size": size,
            "isLegacy": false,
            "options": "none",
        })
    }
}

impl Request {
    fn holds_slot_when_assigned(&self) -> bool {
        self.tag.eq_ignore_ascii_case(PRIVATE_TAG)
    }
}

fn seed_of(order: AssignmentOrder) -> u64 {
    match order {
        AssignmentOrder::Random { seed } => seed,
        _ => 0x5EED,
    }
}

pub(crate) fn add(t: Timestamp, d: Duration) -> Timestamp {
    let span = jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
    t.checked_add(span).unwrap_or(Timestamp::MAX)
}

// ---- workload operations that may schedule timers ------------------------------------------------

pub(crate) fn queue(
    shared: &Arc<Shared>,
    org: &str,
    pool: &str,
    spec: RequestSpec,
) -> Result<u64, SimError> {
    let parsed = spec
        .demands
        .iter()
        .map(|d| Demand::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SimError::InvalidSpec(e.to_string()))?;
    let result = spec.workload.result.to_ascii_lowercase();
    if !["succeeded", "failed", "canceled", "succeededwithissues"].contains(&result.as_str()) {
        return Err(SimError::InvalidSpec(format!(
            "workload.result {:?} must be succeeded, failed, succeededWithIssues or canceled",
            spec.workload.result
        )));
    }
    let tag = spec
        .parallelism_tag
        .clone()
        .unwrap_or_else(|| PRIVATE_TAG.to_owned());
    let mut w = shared.world();
    let pool_id = w.pool_id(org, pool)?;
    let key = org_key(org);
    let id = w.next_request;
    w.next_request += 1;
    let definition = spec
        .definition
        .clone()
        .unwrap_or_else(|| "testbed-pipeline".into());
    let job_name = spec.job_name.clone().unwrap_or_else(|| format!("Job {id}"));
    w.requests.insert(
        id,
        Request {
            id,
            org: key.clone(),
            pool_id,
            demands: spec.demands.clone(),
            parsed,
            workload: spec.workload.clone(),
            tag,
            definition,
            job_name,
            job_id: uuid::Uuid::new_v4().to_string(),
            plan_id: uuid::Uuid::new_v4().to_string(),
            queue_time: None,
            assign_time: None,
            receive_time: None,
            finish_time: None,
            result: None,
            agent: None,
            agent_name: None,
            lock_token: None,
            locked_until: None,
            status_message: None,
            cancel_requested: false,
            job_message: None,
        },
    );
    match spec.delay_ms.filter(|d| *d > 0) {
        None => activate(&mut w, id),
        Some(ms) => {
            drop(w);
            let sh = shared.clone();
            shared.runtime.spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                activate(&mut sh.world(), id);
            });
        }
    }
    Ok(id)
}

fn activate(w: &mut World, id: u64) {
    let Some(r) = w.requests.get_mut(&id) else {
        return;
    };
    if r.finish_time.is_some() || r.queue_time.is_some() {
        return;
    }
    r.queue_time = Some(Timestamp::now());
    let (org, pool) = (r.org.clone(), r.pool_id);
    w.fail_unservable(&org, pool, Some(id));
    w.run_engine();
}

pub(crate) fn cancel(shared: &Arc<Shared>, org: &str, id: u64) -> Result<(), SimError> {
    let mut w = shared.world();
    let key = org_key(org);
    w.org(org)?;
    let r = w
        .requests
        .get_mut(&id)
        .filter(|r| r.org == key)
        .ok_or(SimError::UnknownRequest(id))?;
    if r.finish_time.is_some() {
        return Err(SimError::AlreadyFinished(id));
    }
    r.cancel_requested = true;
    let (agent, received, job_id) = (r.agent, r.receive_time.is_some(), r.job_id.clone());
    match agent {
        None => {
            if r.queue_time.is_none() {
                // A delayed request canceled before it appeared still shows up, as canceled.
                r.queue_time = Some(Timestamp::now());
            }
            w.finish(id, "canceled");
        }
        Some(_) if !received => w.finish(id, "canceled"),
        Some(aid) => {
            let body = json!({ "jobId": job_id, "timeout": "00:05:00" }).to_string();
            w.push_message(aid, "JobCancellation", body, Some(id));
            let timeout = w.cancel_timeout;
            drop(w);
            let sh = shared.clone();
            shared.runtime.spawn(async move {
                tokio::time::sleep(timeout).await;
                sh.world().finish(id, "canceled");
            });
        }
    }
    Ok(())
}
