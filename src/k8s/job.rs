//! Building one agent Job from an AgentPool's template (pure: no IO).
//!
//! Every agent Job: `restartPolicy: Never`, `backoffLimit: 0` (a run-once agent is never restarted in place:
//! the planner decides on a replacement), the AgentPool's TTL, labels to find it, annotations recording the
//! request it was created for, `terminationGracePeriodSeconds` ≥ 90 unless the template sets one (the agent
//! needs up to 30 s to cancel its job, then a token exchange and deregistration), and the settings the
//! entrypoint reads (`AZP_*`), including the AgentPool's capabilities so the live agent advertises exactly
//! what routing assumed.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    EnvVar, PodTemplateSpec, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::{AgentPool, Registration};

/// Label on every object we create: who manages it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "azp-autoscaler");
/// Label naming the AgentPool an agent Job belongs to.
pub const LABEL_AGENTPOOL: &str = "azp-autoscaler.dev/agentpool";
/// Annotation: the ADO request id this agent Job was created for (absent for standby agents).
pub const ANNOTATION_REQUEST: &str = "azp-autoscaler.dev/request-id";
/// Annotation: the attempt number for that request.
pub const ANNOTATION_ATTEMPT: &str = "azp-autoscaler.dev/attempt";
/// Annotation: the agent's name in ADO.
pub const ANNOTATION_AGENT_NAME: &str = "azp-autoscaler.dev/agent-name";
/// Annotation: the ADO pool.
pub const ANNOTATION_ADO_POOL: &str = "azp-autoscaler.dev/ado-pool";
/// Annotation on agent Jobs of `registration: controller`: the Secret holding the agent's files.
pub const ANNOTATION_AGENT_SECRET: &str = "azp-autoscaler.dev/agent-secret";
/// Where the agent's files (`.agent`, `.credentials`, `.credentials_rsaparams`) are mounted in
/// `registration: controller` pods.
pub const AGENT_FILES_MOUNT: &str = "/var/run/azp-autoscaler/agent";
/// Name of that volume.
pub const AGENT_FILES_VOLUME: &str = "azp-agent-files";
/// The pod label that asks the workload-identity webhook for a token file.
pub const WORKLOAD_IDENTITY_LABEL: &str = "azure.workload.identity/use";
/// Pod label the controller sets while the pod's agent holds a request: the AgentPool's
/// PodDisruptionBudget selects exactly these pods and allows no eviction of them.
pub const LABEL_BUSY: &str = "azp-autoscaler.dev/busy";
/// Default grace period when the template sets none.
pub const DEFAULT_GRACE_SECONDS: i64 = 90;

/// Env var names the entrypoint reads (set by the controller on the agent container).
pub mod env {
    pub const URL: &str = "AZP_URL";
    pub const POOL: &str = "AZP_POOL";
    pub const AGENT_NAME: &str = "AZP_AGENT_NAME";
    /// JSON object of capability name → value; the entrypoint exports each to the agent's environment,
    /// which the agent reports as capabilities.
    pub const CAPABILITIES: &str = "AZP_CAPABILITIES";
    /// Client id override for workload identity.
    pub const CLIENT_ID: &str = "AZURE_CLIENT_ID";
    /// Folder holding the agent's files written by the controller (`registration: controller`): the
    /// entrypoint starts the listener from them and neither registers nor deregisters.
    pub const AGENT_FILES: &str = "AZP_AGENT_FILES";
}

/// The Secret holding the agent files of the agent Job `job_name` (`registration: controller`).
pub fn agent_secret_name(job_name: &str) -> String {
    format!("{job_name}-agent")
}

/// The capability that marks an agent as ours: `<cluster id>/<namespace>/<agentpool>`.
pub const OWNER_CAPABILITY: &str = "azp-autoscaler.owner";

/// What is needed to build one agent Job, besides the AgentPool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentJob<'a> {
    /// Deterministic Job name (from the planner).
    pub job_name: &'a str,
    /// Agent name in ADO, unique across clusters and namespaces.
    pub agent_name: &'a str,
    /// The request it is created for (None: standby).
    pub request_id: Option<i64>,
    /// Attempt number for that request (1 for the first).
    pub attempt: u32,
    /// This controller's cluster identity (for the owner capability).
    pub cluster_id: &'a str,
}

/// A template the controller cannot turn into a Job; the message names the field and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error(
        "spec.template.spec.containers has no container named {0:?} (spec.agentContainer): name the agent container {0:?} or set spec.agentContainer"
    )]
    NoAgentContainer(String),
    #[error("spec.template.spec is missing: give the Pod template a spec with the agent container")]
    NoPodSpec,
    #[error("the AgentPool has no namespace or name (is it a stored object?)")]
    NoIdentity,
}

impl BuildError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BuildError::NoAgentContainer(_) => "template_no_agent_container",
            BuildError::NoPodSpec => "template_no_pod_spec",
            BuildError::NoIdentity => "agentpool_no_identity",
        }
    }
}

/// The owner capability value of an AgentPool's agents.
pub fn owner_tag(cluster_id: &str, namespace: &str, agentpool: &str) -> String {
    format!("{cluster_id}/{namespace}/{agentpool}")
}

/// Checks that a Job can be built from the AgentPool's template (used for status before any creation).
pub fn validate_template(pool: &AgentPool) -> Result<(), BuildError> {
    let spec = pool
        .spec
        .template
        .spec
        .as_ref()
        .ok_or(BuildError::NoPodSpec)?;
    if spec
        .containers
        .iter()
        .any(|c| c.name == pool.spec.agent_container)
    {
        Ok(())
    } else {
        Err(BuildError::NoAgentContainer(
            pool.spec.agent_container.clone(),
        ))
    }
}

/// Builds the agent Job.
pub fn build(pool: &AgentPool, job: &AgentJob<'_>) -> Result<Job, BuildError> {
    validate_template(pool)?;
    let namespace = pool
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::NoIdentity)?;
    let pool_name = pool.metadata.name.clone().ok_or(BuildError::NoIdentity)?;
    let spec = &pool.spec;

    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (LABEL_AGENTPOOL.to_owned(), pool_name.clone()),
        ("app.kubernetes.io/name".to_owned(), "azp-agent".to_owned()),
    ]);
    let mut annotations = BTreeMap::from([
        (ANNOTATION_AGENT_NAME.to_owned(), job.agent_name.to_owned()),
        (ANNOTATION_ATTEMPT.to_owned(), job.attempt.to_string()),
        (ANNOTATION_ADO_POOL.to_owned(), spec.pool.clone()),
    ]);
    if let Some(id) = job.request_id {
        annotations.insert(ANNOTATION_REQUEST.to_owned(), id.to_string());
    }
    let secret_name = agent_secret_name(job.job_name);
    if spec.registration == Registration::Controller {
        annotations.insert(ANNOTATION_AGENT_SECRET.to_owned(), secret_name.clone());
    }

    let mut template: PodTemplateSpec = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let pod_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    pod_labels.extend(labels.clone());
    let controller_registers = spec.registration == Registration::Controller;
    if controller_registers {
        // No identity in the pod: the webhook must not project a token file, whatever the template says.
        pod_labels.remove(WORKLOAD_IDENTITY_LABEL);
    } else if spec.auth.workload_identity.is_some() {
        pod_labels.insert(WORKLOAD_IDENTITY_LABEL.to_owned(), "true".to_owned());
    }
    let pod_annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    pod_annotations.extend(annotations.clone());
    // A pod running a pipeline job must not be moved by the cluster autoscaler: the job would be lost.
    pod_annotations.insert(
        "cluster-autoscaler.kubernetes.io/safe-to-evict".to_owned(),
        "false".to_owned(),
    );

    let pod = template.spec.as_mut().ok_or(BuildError::NoPodSpec)?;
    pod.restart_policy = Some("Never".to_owned());
    if pod.termination_grace_period_seconds.is_none() {
        pod.termination_grace_period_seconds = Some(DEFAULT_GRACE_SECONDS);
    }
    let container = pod
        .containers
        .iter_mut()
        .find(|c| c.name == spec.agent_container)
        .ok_or_else(|| BuildError::NoAgentContainer(spec.agent_container.clone()))?;
    let mut capabilities = spec.capabilities.clone();
    capabilities.insert(
        OWNER_CAPABILITY.to_owned(),
        owner_tag(job.cluster_id, &namespace, &pool_name),
    );
    let ours = [
        (env::URL, spec.organization.clone()),
        (env::POOL, spec.pool.clone()),
        (env::AGENT_NAME, job.agent_name.to_owned()),
        (
            env::CAPABILITIES,
            serde_json::to_string(&capabilities).unwrap_or_else(|_| "{}".to_owned()),
        ),
    ];
    let envs = container.env.get_or_insert_with(Vec::new);
    envs.retain(|e| !ours.iter().any(|(name, _)| e.name == *name));
    envs.extend(ours.into_iter().map(|(name, value)| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }));
    if controller_registers {
        // No identity at all: no Azure identity settings, the agent's own files instead.
        envs.retain(|e| !e.name.starts_with("AZURE_") && e.name != env::AGENT_FILES);
        envs.push(EnvVar {
            name: env::AGENT_FILES.to_owned(),
            value: Some(AGENT_FILES_MOUNT.to_owned()),
            value_from: None,
        });
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != AGENT_FILES_VOLUME && m.mount_path != AGENT_FILES_MOUNT);
        mounts.push(VolumeMount {
            name: AGENT_FILES_VOLUME.to_owned(),
            mount_path: AGENT_FILES_MOUNT.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        // Every container of the pod, init containers included: none gets an API token or Azure env.
        for c in pod
            .containers
            .iter_mut()
            .chain(pod.init_containers.iter_mut().flatten())
        {
            if let Some(envs) = c.env.as_mut() {
                envs.retain(|e| !e.name.starts_with("AZURE_"));
            }
        }
        pod.automount_service_account_token = Some(false);
        let volumes = pod.volumes.get_or_insert_with(Vec::new);
        volumes.retain(|v| v.name != AGENT_FILES_VOLUME);
        volumes.push(Volume {
            name: AGENT_FILES_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name),
                // Owner read/write only, as the agent keeps its key file.
                default_mode: Some(0o600),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    } else if let Some(client_id) = spec
        .auth
        .workload_identity
        .as_ref()
        .and_then(|w| w.client_id.clone())
    {
        envs.retain(|e| e.name != env::CLIENT_ID);
        envs.push(EnvVar {
            name: env::CLIENT_ID.to_owned(),
            value: Some(client_id),
            value_from: None,
        });
    }

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job.job_name.to_owned()),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(annotations),
            // No ownerReference on purpose: a foreground cascade delete of the AgentPool would make the
            // garbage collector kill busy agent pods at once. The AgentPool's finalizer drains its Jobs
            // (busy ones finish first); finished ones go by their TTL.
            owner_references: None,
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(
                i32::try_from(spec.ttl_seconds_after_finished).unwrap_or(i32::MAX),
            ),
            template,
            ..JobSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{AgentPoolAuth, AgentPoolSpec, WorkloadIdentityAuth};
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pool(container: &str) -> AgentPool {
        let mut p = AgentPool::new(
            "linux",
            AgentPoolSpec {
                organization: "https://dev.azure.com/contoso".into(),
                pool: "Default".into(),
                auth: AgentPoolAuth {
                    workload_identity: Some(WorkloadIdentityAuth {
                        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
                    }),
                    pat: None,
                },
                registration: Registration::Agent,
                capabilities: BTreeMap::from([("docker".into(), "true".into())]),
                agent_version: "4.261.0".into(),
                min_idle: 0,
                max_agents: 5,
                priority: 0,
                paused: false,
                poll_interval_seconds: 5,
                startup_timeout_seconds: 600,
                ttl_seconds_after_finished: 300,
                agent_container: "agent".into(),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: container.into(),
                            image: Some("example.azurecr.io/azp-agent:4.261.0".into()),
                            env: Some(vec![EnvVar {
                                name: "AZP_POOL".into(),
                                value: Some("user-set-is-overridden".into()),
                                value_from: None,
                            }]),
                            ..Container::default()
                        }],
                        restart_policy: Some("Always".into()),
                        ..PodSpec::default()
                    }),
                },
            },
        );
        p.metadata.namespace = Some("ci".into());
        p.metadata.uid = Some("uid-1".into());
        p
    }

    fn job() -> AgentJob<'static> {
        AgentJob {
            job_name: "linux-r42-a1",
            agent_name: "linux-r42-a1-0a1b2c3d",
            request_id: Some(42),
            attempt: 1,
            cluster_id: "cluster-a",
        }
    }

    fn env_of(j: &Job, name: &str) -> Option<String> {
        let pod = j.spec.as_ref()?.template.spec.as_ref()?;
        pod.containers[0]
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn builds_a_run_once_job_with_the_controller_settings() {
        let j = build(&pool("agent"), &job()).unwrap();
        let spec = j.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.ttl_seconds_after_finished, Some(300));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.termination_grace_period_seconds, Some(90));
        assert_eq!(env_of(&j, "AZP_POOL").as_deref(), Some("Default"));
        assert_eq!(
            env_of(&j, "AZP_URL").as_deref(),
            Some("https://dev.azure.com/contoso")
        );
        assert_eq!(
            env_of(&j, "AZP_AGENT_NAME").as_deref(),
            Some("linux-r42-a1-0a1b2c3d")
        );
        assert_eq!(
            env_of(&j, "AZURE_CLIENT_ID").as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        let caps: BTreeMap<String, String> =
            serde_json::from_str(&env_of(&j, "AZP_CAPABILITIES").unwrap()).unwrap();
        assert_eq!(caps.get("docker").map(String::as_str), Some("true"));
        assert_eq!(
            caps.get(OWNER_CAPABILITY).map(String::as_str),
            Some("cluster-a/ci/linux")
        );
        let ann = j.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann.get(ANNOTATION_REQUEST).map(String::as_str), Some("42"));
        let pod_meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(
            pod_meta
                .labels
                .as_ref()
                .unwrap()
                .get("azure.workload.identity/use")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            pod_meta
                .annotations
                .as_ref()
                .unwrap()
                .get("cluster-autoscaler.kubernetes.io/safe-to-evict")
                .map(String::as_str),
            Some("false")
        );
        assert!(
            j.metadata.owner_references.is_none(),
            "no cascade from the AgentPool may reach a busy agent pod"
        );
    }

    #[test]
    fn controller_registration_gives_the_pod_no_identity_and_the_agent_files() {
        let mut p = pool("agent");
        p.spec.registration = Registration::Controller;
        // A template that asks for an identity anyway: every trace of it is taken out.
        let tpl = &mut p.spec.template;
        tpl.metadata = Some(ObjectMeta {
            labels: Some(BTreeMap::from([(
                WORKLOAD_IDENTITY_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        });
        let pod_spec = tpl.spec.as_mut().unwrap();
        pod_spec.automount_service_account_token = Some(true);
        pod_spec.containers[0].env.as_mut().unwrap().extend([
            EnvVar {
                name: "AZURE_FEDERATED_TOKEN_FILE".into(),
                value: Some("/var/run/secrets/azure/tokens/azure-identity-token".into()),
                value_from: None,
            },
            EnvVar {
                name: "KEEP_ME".into(),
                value: Some("1".into()),
                value_from: None,
            },
        ]);
        pod_spec.containers.push(Container {
            name: "sidecar".into(),
            env: Some(vec![EnvVar {
                name: "AZURE_CLIENT_ID".into(),
                value: Some("x".into()),
                value_from: None,
            }]),
            ..Container::default()
        });

        let j = build(&p, &job()).unwrap();
        let spec = j.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(!labels.contains_key(WORKLOAD_IDENTITY_LABEL), "{labels:?}");
        for c in &pod.containers {
            for e in c.env.iter().flatten() {
                assert!(!e.name.starts_with("AZURE_"), "{}: {}", c.name, e.name);
            }
        }
        assert_eq!(env_of(&j, "KEEP_ME").as_deref(), Some("1"));
        assert_eq!(
            env_of(&j, env::AGENT_FILES).as_deref(),
            Some(AGENT_FILES_MOUNT)
        );
        // The settings the entrypoint checks are still there (the capabilities go to the listener).
        assert_eq!(env_of(&j, "AZP_POOL").as_deref(), Some("Default"));

        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == AGENT_FILES_VOLUME)
            .expect("agent files volume");
        let secret = volume.secret.as_ref().expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("linux-r42-a1-agent"));
        assert_eq!(secret.default_mode, Some(0o600));
        assert_eq!(secret.optional, Some(false));
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == AGENT_FILES_VOLUME)
            .expect("mounted in the agent container");
        assert_eq!(mount.mount_path, AGENT_FILES_MOUNT);
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(
            j.metadata
                .annotations
                .as_ref()
                .unwrap()
                .get(ANNOTATION_AGENT_SECRET)
                .map(String::as_str),
            Some("linux-r42-a1-agent")
        );
    }

    #[test]
    fn agent_registration_mounts_no_agent_files() {
        let j = build(&pool("agent"), &job()).unwrap();
        let pod = j.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(
            pod.volumes
                .iter()
                .flatten()
                .all(|v| v.name != AGENT_FILES_VOLUME)
        );
        assert_eq!(env_of(&j, env::AGENT_FILES), None);
        assert!(
            !j.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(ANNOTATION_AGENT_SECRET)
        );
    }

    #[test]
    fn standby_job_records_no_request() {
        let mut standby = job();
        standby.request_id = None;
        let j = build(&pool("agent"), &standby).unwrap();
        assert!(
            !j.metadata
                .annotations
                .unwrap()
                .contains_key(ANNOTATION_REQUEST)
        );
    }

    #[test]
    fn missing_agent_container_names_the_field() {
        let err = build(&pool("sidecar"), &job()).unwrap_err();
        assert_eq!(err, BuildError::NoAgentContainer("agent".into()));
        assert!(err.to_string().contains("spec.agentContainer"));
    }

    #[test]
    fn template_grace_period_is_kept() {
        let mut p = pool("agent");
        p.spec
            .template
            .spec
            .as_mut()
            .unwrap()
            .termination_grace_period_seconds = Some(300);
        let j = build(&p, &job()).unwrap();
        assert_eq!(
            j.spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .termination_grace_period_seconds,
            Some(300)
        );
    }
}
