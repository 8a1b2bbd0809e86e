//! Wire types of the Azure DevOps `distributedtask` REST area, after `taskAgent-7.1.json`.
//!
//! Every type is tolerant: unknown fields are ignored, optional fields may be missing or `null`, and
//! lists or maps that are `null` read as empty. Dates accept RFC 3339 with an offset, and .NET's
//! offset-less form (read as UTC); .NET's `DateTime.MinValue` (`0001-01-01T00:00:00`) reads as unset.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize};

/// The list envelope ADO wraps collections in: `{"count": n, "value": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse<T> {
    /// Number of items as reported by the server (may be absent).
    #[serde(default)]
    pub count: Option<u32>,
    /// The items.
    #[serde(
        default = "Vec::new",
        deserialize_with = "null_as_default",
        bound(deserialize = "T: Deserialize<'de>")
    )]
    pub value: Vec<T>,
}

/// An agent pool (organization level): `TaskAgentPool` (with its `TaskAgentPoolReference` fields).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgentPool {
    /// Pool id.
    #[serde(default)]
    pub id: i32,
    /// Pool name.
    #[serde(default)]
    pub name: String,
    /// Whether the pool is Microsoft-hosted.
    #[serde(default, deserialize_with = "null_as_default")]
    pub is_hosted: bool,
    /// Legacy pool flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_legacy: Option<bool>,
    /// `automation` or `deployment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_type: Option<String>,
    /// Pool options (`none`, `elasticPool`, `singleUseAgents`, …; may be a comma-separated flag list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// Number of agents in the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i32>,
    /// Scope (host) id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Whether new projects get a queue for this pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_provision: Option<bool>,
    /// Whether the pool auto-sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_size: Option<bool>,
    /// Whether agents of the pool update themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_update: Option<bool>,
    /// Target size of an elastic pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<i32>,
    /// Agent cloud of an elastic pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cloud_id: Option<i32>,
    /// Creation time.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub created_on: Option<Timestamp>,
}

/// Connection state of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentStatus {
    /// No session: the agent is not listening (placeholders are always offline).
    Offline,
    /// The agent holds a session and can take work.
    Online,
    /// A value this client does not know.
    #[serde(other)]
    Unknown,
}

/// `TaskAgentReference`: what a job request says about its agent, and the common part of [`TaskAgent`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgentReference {
    /// Agent id (unique within the pool).
    #[serde(default)]
    pub id: i32,
    /// Agent name.
    #[serde(default)]
    pub name: String,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether ADO may assign work to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Online or offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    /// Operating system description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_description: Option<String>,
    /// Provisioning state (elastic pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_state: Option<String>,
    /// Access point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_point: Option<String>,
}

/// An agent: `TaskAgent`. Also the body of add (`POST`) and replace (`PUT`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgent {
    /// Agent id (unique within the pool; 0 in an add request).
    #[serde(default)]
    pub id: i32,
    /// Agent name.
    #[serde(default)]
    pub name: String,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether ADO may assign work to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Online or offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AgentStatus>,
    /// Operating system description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_description: Option<String>,
    /// Provisioning state (elastic pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_state: Option<String>,
    /// Access point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_point: Option<String>,
    /// Maximum parallelism (1 for every agent we register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<i32>,
    /// Registration time.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub created_on: Option<Timestamp>,
    /// Time of the last status change.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub status_changed_on: Option<Timestamp>,
    /// Capabilities the agent reports itself (its environment). Only present with `includeCapabilities`.
    #[serde(default, deserialize_with = "string_map")]
    pub system_capabilities: BTreeMap<String, String>,
    /// Capabilities added by users. Only present with `includeCapabilities`.
    #[serde(default, deserialize_with = "string_map")]
    pub user_capabilities: BTreeMap<String, String>,
    /// The agent's credentials: its public key, and (in responses) where it gets its own tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<TaskAgentAuthorization>,
    /// The request the agent holds right now. Only present with `includeAssignedRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_request: Option<Box<TaskAgentJobRequest>>,
    /// The request it last finished. Only present with `includeLastCompletedRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_completed_request: Option<Box<TaskAgentJobRequest>>,
}

impl TaskAgent {
    /// The reference form of this agent (as a job request's `reservedAgent` would name it).
    pub fn reference(&self) -> TaskAgentReference {
        TaskAgentReference {
            id: self.id,
            name: self.name.clone(),
            version: self.version.clone(),
            enabled: self.enabled,
            status: self.status,
            os_description: self.os_description.clone(),
            provisioning_state: self.provisioning_state.clone(),
            access_point: self.access_point.clone(),
        }
    }

    /// A capability by name, user capabilities first, compared case-insensitively (as ADO does).
    pub fn capability(&self, name: &str) -> Option<&str> {
        self.user_capabilities
            .iter()
            .chain(self.system_capabilities.iter())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the agent is enabled (an absent flag counts as enabled, ADO's default).
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
}

/// `TaskAgentAuthorization`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgentAuthorization {
    /// The token endpoint where the agent authenticates with its key (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,
    /// The agent's client id there (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The agent's RSA public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<TaskAgentPublicKey>,
}

/// `TaskAgentPublicKey`: an RSA public key as big-endian bytes (base64 on the wire, .NET `byte[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgentPublicKey {
    /// Public exponent, big-endian.
    #[serde(default, with = "bytes_b64")]
    pub exponent: Vec<u8>,
    /// Modulus, big-endian.
    #[serde(default, with = "bytes_b64")]
    pub modulus: Vec<u8>,
}

/// Final result of a job request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskResult {
    /// Succeeded.
    Succeeded,
    /// Succeeded with warnings.
    SucceededWithIssues,
    /// Failed.
    Failed,
    /// Canceled.
    Canceled,
    /// Skipped.
    Skipped,
    /// Abandoned (the agent went away).
    Abandoned,
    /// A value this client does not know.
    #[serde(other)]
    Unknown,
}

/// One demand of a job request, in ADO's string form: `name`, `name -equals value`,
/// `Agent.Version -gtVersion 2.200.0`.
///
/// ADO serializes demands as strings; the spec also describes an object `{name, value}`, which reads
/// here as `name -equals value` (or `name` when it has no value). Parsing the operator is the
/// planner's business.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Demand(pub String);

impl Demand {
    /// The demand as ADO writes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Demand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Demand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Object {
                name: String,
                #[serde(default)]
                value: Option<String>,
            },
        }
        Ok(match Wire::deserialize(deserializer)? {
            Wire::Text(s) => Demand(s),
            Wire::Object { name, value: None } => Demand(name),
            Wire::Object {
                name,
                value: Some(v),
            } if v.is_empty() => Demand(name),
            Wire::Object {
                name,
                value: Some(v),
            } => Demand(format!("{name} -equals {v}")),
        })
    }
}

/// `TaskOrchestrationOwner`: the pipeline definition or run behind a request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskOrchestrationOwner {
    /// Definition id or build id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i32>,
    /// Definition name or build number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Links (`web`, `self`).
    #[serde(rename = "_links", default, skip_serializing_if = "Option::is_none")]
    pub links: Option<serde_json::Value>,
}

/// A job request of a pool: `TaskAgentJobRequest`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskAgentJobRequest {
    /// Request id (unique in the organization).
    #[serde(default)]
    pub request_id: i64,
    /// When the request was queued.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub queue_time: Option<Timestamp>,
    /// When an agent was assigned.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub assign_time: Option<Timestamp>,
    /// When the agent received the job.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub receive_time: Option<Timestamp>,
    /// When it finished.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Timestamp>,
    /// Until when the agent's lock holds.
    #[serde(default, with = "opt_time", skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<Timestamp>,
    /// Result, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// Demands an agent must satisfy.
    #[serde(default, deserialize_with = "null_as_default")]
    pub demands: Vec<Demand>,
    /// The agent that holds the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_agent: Option<TaskAgentReference>,
    /// Agents the server found matching (not always returned).
    #[serde(default, deserialize_with = "null_as_default")]
    pub matched_agents: Vec<TaskAgentReference>,
    /// Whether every agent of the pool matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches_all_agents_in_pool: Option<bool>,
    /// Extra data, e.g. `ParallelismTag` (`Private`/`Public`) and `IsScheduled`.
    #[serde(default, deserialize_with = "string_map")]
    pub data: BTreeMap<String, String>,
    /// The pipeline definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<TaskOrchestrationOwner>,
    /// The run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<TaskOrchestrationOwner>,
    /// A server message (e.g. why it waits); undocumented, a hint only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// Pool id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<i32>,
    /// Queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<i32>,
    /// Job instance id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Job name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Plan id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// Plan type (`Build`, `Release`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_type: Option<String>,
    /// Plan group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_group: Option<String>,
    /// Orchestration id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orchestration_id: Option<String>,
    /// Host id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Scope (project) id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_id: Option<String>,
    /// Owning service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_owner: Option<String>,
    /// Priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Whether a user delayed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_delayed: Option<bool>,
    /// Agent specification (elastic / hosted pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_specification: Option<serde_json::Value>,
}

impl TaskAgentJobRequest {
    /// The parallel-job bucket the request counts against (`data.ParallelismTag`), if given.
    pub fn parallelism_tag(&self) -> Option<&str> {
        self.data
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("ParallelismTag"))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the request has finished (has a result or a finish time).
    pub fn is_finished(&self) -> bool {
        self.result.is_some() || self.finish_time.is_some()
    }
}

/// Parallel-job usage of one bucket (`distributedtask/resourceusage`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// The limit of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_limit: Option<ResourceLimit>,
    /// Requests holding a slot (at most 50; only with `includeRunningRequests=true`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub running_requests: Vec<TaskAgentJobRequest>,
    /// Slots in use.
    #[serde(default, deserialize_with = "null_as_default")]
    pub used_count: i32,
    /// Minutes used (hosted free tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_minutes: Option<i32>,
}

/// `ResourceLimit`: the parallel-job limit of one bucket.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLimit {
    /// Whether some provider could not be reached (the numbers may be low).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_to_reach_all_providers: Option<bool>,
    /// Host id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Microsoft-hosted bucket.
    #[serde(default, deserialize_with = "null_as_default")]
    pub is_hosted: bool,
    /// Premium bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_premium: Option<bool>,
    /// `Private` or `Public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism_tag: Option<String>,
    /// Extra data (keys undocumented).
    #[serde(default, deserialize_with = "string_map")]
    pub resource_limits_data: BTreeMap<String, String>,
    /// Number of parallel jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_count: Option<i32>,
    /// Minutes quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_minutes: Option<i32>,
}

/// `null` reads as the type's default.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A string map tolerant of a `null` map, `null` values (read as empty) and scalar values (as text).
fn string_map<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    let raw = Option::<BTreeMap<String, serde_json::Value>>::deserialize(deserializer)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// Optional timestamps in ADO's formats.
mod opt_time {
    use jiff::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(t) => s.serialize_str(&t.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        super::parse_time(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses an ADO date: RFC 3339 with offset, or without one (UTC). `0001-01-01…` and `""` are unset.
pub(crate) fn parse_time(text: &str) -> Result<Option<Timestamp>, String> {
    let text = text.trim();
    if text.is_empty() || text.starts_with("0001-01-01") {
        return Ok(None);
    }
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(Some(ts));
    }
    match text.parse::<jiff::civil::DateTime>() {
        Ok(dt) => dt
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| Some(z.timestamp()))
            .map_err(|e| format!("date `{text}` is out of range: {e}")),
        Err(e) => Err(format!("`{text}` is not an ISO 8601 date: {e}")),
    }
}

/// `byte[]` as .NET writes it (base64), also accepting a JSON array of byte values.
mod bytes_b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Bytes(Vec<u8>),
        }
        match Option::<Wire>::deserialize(d)? {
            None => Ok(Vec::new()),
            Some(Wire::Bytes(b)) => Ok(b),
            Some(Wire::Text(t)) => STANDARD
                .decode(t.trim())
                .map_err(|e| serde::de::Error::custom(format!("not base64: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_request_reads_ado_shape_with_unknown_fields_and_nulls() {
        let json = r#"{
            "requestId": 4711,
            "queueTime": "2024-05-01T10:00:00.1234567Z",
            "assignTime": null,
            "demands": ["java", "Agent.Version -gtVersion 3.220.0", {"name":"os","value":"linux"}],
            "reservedAgent": {"id": 3, "name": "a-1", "status": "online", "enabled": true, "_links": {}},
            "data": {"ParallelismTag": "Private", "IsScheduled": "False", "x": null},
            "definition": {"id": 7, "name": "ci", "_links": {"web": {"href": "https://x"}}},
            "owner": {"id": 99, "name": "20240501.1"},
            "matchesAllAgentsInPool": false,
            "statusMessage": "",
            "someNewField": {"nested": [1, 2, 3]},
            "result": "succeededWithIssues",
            "finishTime": "2024-05-01T10:05:00"
        }"#;
        let r: TaskAgentJobRequest = serde_json::from_str(json).unwrap();
        assert_eq!(r.request_id, 4711);
        assert_eq!(
            r.queue_time.unwrap().to_string(),
            "2024-05-01T10:00:00.1234567Z"
        );
        assert_eq!(r.assign_time, None);
        assert_eq!(
            r.demands.iter().map(Demand::as_str).collect::<Vec<_>>(),
            [
                "java",
                "Agent.Version -gtVersion 3.220.0",
                "os -equals linux"
            ]
        );
        let agent = r.reserved_agent.as_ref().unwrap();
        assert_eq!((agent.id, agent.name.as_str()), (3, "a-1"));
        assert_eq!(agent.status, Some(AgentStatus::Online));
        assert_eq!(r.parallelism_tag(), Some("Private"));
        assert_eq!(r.data.get("x").map(String::as_str), Some(""));
        assert_eq!(r.definition.as_ref().unwrap().id, Some(7));
        assert_eq!(r.result, Some(TaskResult::SucceededWithIssues));
        assert_eq!(
            r.finish_time.unwrap().to_string(),
            "2024-05-01T10:05:00Z",
            "offset-less .NET dates are UTC"
        );
        assert!(r.is_finished());
    }

    #[test]
    fn minimal_and_null_everything_reads() {
        let r: TaskAgentJobRequest = serde_json::from_str(
            r#"{"requestId":1,"demands":null,"data":null,"queueTime":"0001-01-01T00:00:00"}"#,
        )
        .unwrap();
        assert!(r.demands.is_empty() && r.data.is_empty() && r.queue_time.is_none());
        assert!(!r.is_finished());
        let a: TaskAgent =
            serde_json::from_str(r#"{"id":1,"name":"x","systemCapabilities":null}"#).unwrap();
        assert!(a.system_capabilities.is_empty());
        assert!(a.is_enabled());
    }

    #[test]
    fn unknown_enum_values_do_not_fail_the_list() {
        let list: ListResponse<TaskAgent> = serde_json::from_str(
            r#"{"count":2,"value":[{"id":1,"name":"a","status":"sleeping"},{"id":2,"name":"b","status":"offline"}]}"#,
        )
        .unwrap();
        assert_eq!(list.value[0].status, Some(AgentStatus::Unknown));
        assert_eq!(list.value[1].status, Some(AgentStatus::Offline));
        let r: TaskAgentJobRequest =
            serde_json::from_str(r#"{"requestId":1,"result":"exploded"}"#).unwrap();
        assert_eq!(r.result, Some(TaskResult::Unknown));
    }

    #[test]
    fn agent_capabilities_and_key_round_trip() {
        let json = r#"{"id":5,"name":"n","version":"4.260.0","enabled":false,
            "systemCapabilities":{"Agent.Version":"4.260.0","JAVA_HOME":"/opt/java"},
            "userCapabilities":{"gpu":"true","n":7},
            "authorization":{"authorizationUrl":"https://vstoken/x","clientId":"c1",
                "publicKey":{"exponent":"AQAB","modulus":[1,2,255]}},
            "assignedRequest":{"requestId":9}}"#;
        let a: TaskAgent = serde_json::from_str(json).unwrap();
        assert!(!a.is_enabled());
        assert_eq!(a.capability("java_home"), Some("/opt/java"));
        assert_eq!(a.capability("N"), Some("7"), "numbers read as text");
        let key = a
            .authorization
            .as_ref()
            .unwrap()
            .public_key
            .as_ref()
            .unwrap();
        assert_eq!(key.exponent, vec![1, 0, 1]);
        assert_eq!(key.modulus, vec![1, 2, 255]);
        assert_eq!(a.assigned_request.as_ref().unwrap().request_id, 9);
        let back = serde_json::to_value(&a).unwrap();
        assert_eq!(back["authorization"]["publicKey"]["modulus"], "AQL/");
        let again: TaskAgent = serde_json::from_value(back).unwrap();
        assert_eq!(again, a);
        assert_eq!(a.reference().name, "n");
    }

    #[test]
    fn new_agent_body_omits_unset_fields() {
        let body = serde_json::to_value(TaskAgent {
            name: "n".into(),
            max_parallelism: Some(1),
            ..Default::default()
        })
        .unwrap();
        let obj = body.as_object().unwrap();
        assert!(!obj.contains_key("status") && !obj.contains_key("authorization"));
        assert_eq!(obj["maxParallelism"], 1);
    }

    #[test]
    fn resource_usage_reads() {
        let u: ResourceUsage = serde_json::from_str(
            r#"{"resourceLimit":{"parallelismTag":"Private","isHosted":false,"totalCount":3,
                "resourceLimitsData":{"k":"v"}},"runningRequests":[{"requestId":1}],"usedCount":2}"#,
        )
        .unwrap();
        assert_eq!(u.used_count, 2);
        let limit = u.resource_limit.unwrap();
        assert_eq!(limit.total_count, Some(3));
        assert_eq!(limit.parallelism_tag.as_deref(), Some("Private"));
        assert_eq!(u.running_requests.len(), 1);
    }

    #[test]
    fn bad_dates_are_errors_naming_the_text() {
        let err = serde_json::from_str::<TaskAgentJobRequest>(
            r#"{"requestId":1,"queueTime":"yesterday"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("yesterday"), "{err}");
    }
}
