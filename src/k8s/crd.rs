//! The `AgentPool` custom resource: per-ADO-pool scaling configuration of one agent template.
//!
//! The CRD is generated from these types (`azp-autoscaler crd`) and shipped in the Helm chart; a test fails
//! when the chart's copy drifts. What the schema can check (types, ranges, CEL rules) the API server rejects
//! at apply time with a message naming the field; what it cannot goes to `status.conditions`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of our resources: a domain the project owns.
pub const GROUP: &str = "azp-autoscaler.dev";

/// Desired state of one AgentPool: which ADO pool it serves, how its agents look, how many it may run.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "azp-autoscaler.dev",
    version = "v1alpha1",
    kind = "AgentPool",
    plural = "agentpools",
    singular = "agentpool",
    shortname = "ap",
    category = "azp",
    namespaced,
    status = "AgentPoolStatus",
    doc = "Scaling configuration for run-once Azure DevOps agents of one template in one ADO agent pool",
    printcolumn(name = "ADO Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Pending", type_ = "integer", json_path = ".status.pending"),
    printcolumn(name = "Capped", type_ = "integer", json_path = ".status.capped"),
    printcolumn(name = "Unservable", type_ = "integer", json_path = ".status.unservable"),
    printcolumn(name = "Starting", type_ = "integer", json_path = ".status.agents.starting"),
    printcolumn(name = "Idle", type_ = "integer", json_path = ".status.agents.idle"),
    printcolumn(name = "Busy", type_ = "integer", json_path = ".status.agents.busy"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxAgents"),
    printcolumn(name = "Reason", type_ = "string", priority = 1, json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Last Poll", type_ = "date", priority = 1, json_path = ".status.lastPollTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.minIdle <= self.spec.maxAgents").message("spec.minIdle must not exceed spec.maxAgents: lower minIdle or raise maxAgents").field_path(".spec.minIdle"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolSpec {
    /// Azure DevOps organization URL, e.g. `https://dev.azure.com/contoso` (or an Azure DevOps Server
    /// collection URL). HTTPS only.
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("spec.organization must be an https:// URL such as https://dev.azure.com/contoso"))]
    #[x_kube(validation = Rule::new("!self.endsWith('/')").message("spec.organization must not end with '/': write https://dev.azure.com/contoso"))]
    #[schemars(length(min = 9, max = 2048))]
    pub organization: String,

    /// Name of the ADO agent pool (as shown in Organization settings → Agent pools).
    #[schemars(length(min = 1, max = 256))]
    pub pool: String,

    /// How the controller and the agents authenticate to ADO. Default: workload identity.
    #[serde(default)]
    pub auth: AgentPoolAuth,

    /// Who registers each agent in ADO. `agent` (default): the agent pod, with its own workload identity (or
    /// PAT), registers and deregisters itself. `controller`: the controller registers each agent through
    /// the REST API and hands the pod only the agent's own key and settings in a Secret owned by the agent
    /// Job; the pod gets no identity at all (no workload-identity label, no service-account token, no
    /// `AZURE_*` env), and the controller deletes the agent when its Job ends.
    #[serde(default)]
    pub registration: Registration,

    /// Capabilities every agent of this template offers (user capabilities, matched against the demands of
    /// waiting requests; names and values compare case-insensitively, as ADO does). They are injected into
    /// the agent container so the live agent advertises exactly what routing assumed.
    #[serde(default)]
    pub capabilities: BTreeMap<String, String>,

    /// Version of the Azure Pipelines agent baked into the agent image (e.g. `4.261.0`). Requests demanding
    /// `Agent.Version -gtVersion x` are matched against it, and the placeholder agent reports it.
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+\\\\.[0-9]+\\\\.[0-9]+$')").message("spec.agentVersion must be MAJOR.MINOR.PATCH, the version of the agent in the image, e.g. 4.261.0"))]
    pub agent_version: String,

    /// Agents kept idle and registered as warm standby. Default 0: scale to zero.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_idle: u32,

    /// Upper bound of this AgentPool's agents that can still take work: unfinished agent Jobs, not
    /// counting those whose agent already completed its one job and is only deregistering.
    #[schemars(range(min = 1, max = 10000))]
    pub max_agents: u32,

    /// Among AgentPools serving the same ADO pool, a request that several can serve goes to the one with the
    /// HIGHEST priority first (ties broken by namespace/name, ascending), spilling to the next when that one is
    /// at maxAgents or paused. Default 0.
    #[serde(default)]
    pub priority: i32,

    /// Stop creating agents (running agents finish their jobs; waiting requests are reported as capped).
    #[serde(default)]
    pub paused: bool,

    /// Seconds between two polls of the ADO pool. The shortest interval among the AgentPools of an ADO pool
    /// applies to it. Default 5.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: u32,

    /// Seconds an agent may take from Job creation to registering in ADO before it is replaced.
    #[serde(default = "default_startup_timeout")]
    #[schemars(range(min = 30, max = 86400))]
    pub startup_timeout_seconds: u32,

    /// Seconds a finished agent Job (and its pod and logs) is kept before Kubernetes deletes it.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 0, max = 604800))]
    pub ttl_seconds_after_finished: u32,

    /// Name of the agent container in `template` (its image must contain the agent and use
    /// `azp-autoscaler agent` as entrypoint). Default `agent`.
    #[serde(default = "default_container")]
    #[schemars(length(min = 1, max = 63))]
    pub agent_container: String,

    /// Pod template of the agent Jobs. `restartPolicy` is forced to `Never`.
    #[x_kube(validation = Rule::new("self.spec.containers.size() >= 1").message("spec.template.spec.containers needs the agent container"))]
    pub template: PodTemplateSpec,
}

/// Who registers the agents of an AgentPool in ADO.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "camelCase")]
pub enum Registration {
    /// The agent pod registers and deregisters itself with its own identity (the default).
    #[default]
    Agent,
    /// The controller registers each agent and the pod holds no identity (credential-free agent pods).
    Controller,
}

/// Authentication to Azure DevOps: exactly one of the two modes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.workloadIdentity) != has(self.pat)").message("spec.auth takes exactly one of workloadIdentity or pat"))]
pub struct AgentPoolAuth {
    /// Entra workload identity (the default and the point of the product: no long-lived secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentityAuth>,
    /// A personal access token from a Secret: explicit opt-in for Azure DevOps Server, which has no Entra.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pat: Option<PatAuth>,
}

impl Default for AgentPoolAuth {
    fn default() -> Self {
        AgentPoolAuth {
            workload_identity: Some(WorkloadIdentityAuth::default()),
            pat: None,
        }
    }
}

/// Workload identity settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityAuth {
    /// Client id of the managed identity, when it differs from the ServiceAccount's
    /// `azure.workload.identity/client-id` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A PAT read from a Secret in the AgentPool's namespace (Azure DevOps Server only).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PatAuth {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key in the Secret holding the PAT. Default `pat`.
    #[serde(default = "default_pat_key")]
    pub key: String,
}

/// Observed state of an AgentPool.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (polling works and the placeholder exists) and `Degraded` (with the reason).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Requests waiting in ADO that this AgentPool's agents can serve.
    #[serde(default)]
    pub pending: u32,
    /// Waiting requests matched to an existing (starting or idle) agent.
    #[serde(default)]
    pub matched: u32,
    /// Waiting requests held back by maxAgents, paused, or the organization's parallel-job limit.
    #[serde(default)]
    pub capped: u32,
    /// Waiting requests in the ADO pool that no AgentPool's capabilities can serve.
    #[serde(default)]
    pub unservable: u32,
    /// Agents of this AgentPool by state.
    #[serde(default)]
    pub agents: AgentCounts,
    /// ADO id of the pool named in spec.pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ado_pool_id: Option<i64>,
    /// Time of the last successful poll of the ADO pool (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<String>,
}

/// Agents by state.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentCounts {
    /// Agent Jobs created whose agent has not yet taken a request nor registered.
    #[serde(default)]
    pub starting: u32,
    /// Registered agents without a request.
    #[serde(default)]
    pub idle: u32,
    /// Agents running a request.
    #[serde(default)]
    pub busy: u32,
}

fn default_poll_interval() -> u32 {
    5
}
fn default_startup_timeout() -> u32 {
    600
}
fn default_ttl() -> u32 {
    300
}
fn default_container() -> String {
    "agent".to_owned()
}
fn default_pat_key() -> String {
    "pat".to_owned()
}

/// The CRD with the Pod template's schema kept whole for validation but without its descriptions: they
/// would make the CRD ~0.6 MB, above what `kubectl apply` (client side) can store in its annotation.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = AgentPool::crd();
    for version in &mut crd.spec.versions {
        let template = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("spec"))
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("template"));
        if let Some(template) = template {
            let keep = template.description.take();
            strip_descriptions(template);
            template.description = keep;
        }
    }
    crd
}

fn strip_descriptions(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray;
    schema.description = None;
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_descriptions(child);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(item)) => strip_descriptions(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => {
            items.iter_mut().for_each(strip_descriptions)
        }
        None => {}
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(s)) =
        schema.additional_properties.as_mut()
    {
        strip_descriptions(s);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(strip_descriptions);
    }
}

/// The CRD as YAML, exactly as `azp-autoscaler crd` prints it and the Helm chart ships it.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!(
        "# Generated by `azp-autoscaler crd` from src/k8s/crd.rs: do not edit.\n{}",
        serde_saphyr::to_string(&crd())?
    ))
}
