//! `registration: controller`: the controller registers each agent and hands the pod only the agent's
//! own files (thin IO shell around [`crate::agent_files`]).
//!
//! Per agent Job: generate a 2048-bit key, register the agent by REST (its name, public key,
//! capabilities with the owner mark, agent version, `maxParallelism` 1), then store `.agent`,
//! `.credentials` and `.credentials_rsaparams` in a Secret owned by the Job. The Job is created first
//! (its pod waits for the Secret volume), so every agent registered here has a Job from the start: if
//! the Job goes, cleanup removes the agent like any left-behind one; the Secret goes with the Job by
//! its ownerReference. A step that fails is retried from the next poll ([`ensure`]): a name already
//! registered is taken over with the new key (`PUT`), as `config.sh --replace` does.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;

use crate::ado::models::{TaskAgent, TaskAgentAuthorization};
use crate::ado::{AdoClient, AdoError, AgentQuery};
use crate::agent_files::{self, AgentFilesError, AgentIdentity, AgentKey};
use crate::k8s::crd::AgentPool;
use crate::k8s::job::{self, OWNER_CAPABILITY, owner_tag};

/// Why an agent could not be registered for its Job; retried next poll.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("registering agent {agent} in ADO failed: {source}")]
    Ado {
        agent: String,
        #[source]
        source: AdoError,
    },
    #[error(transparent)]
    Files(#[from] AgentFilesError),
    #[error(
        "cannot create Secret {namespace}/{name} with the agent's files: {source} (the controller needs `create` on secrets in the AgentPool's namespace)"
    )]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("agent Job {0} has no namespace, name or uid (is it a stored object?)")]
    NoJobIdentity(String),
}

impl RegistrationError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RegistrationError::Ado { .. } => "agent_register",
            RegistrationError::Files(e) => e.metric_label(),
            RegistrationError::Secret { .. } => "agent_secret_create",
            RegistrationError::NoJobIdentity(_) => "agent_job_identity",
        }
    }
}

/// The capabilities a controller-registered agent is registered with: the AgentPool's, the agent
/// version and OS of the image, and the owner mark cleanup recognises it by. (The listener reports its
/// environment again when it connects; the entrypoint exports the same capabilities into it.)
pub fn agent_capabilities(
    capabilities: &BTreeMap<String, String>,
    agent_version: &str,
    cluster_id: &str,
    namespace: &str,
    agentpool: &str,
) -> BTreeMap<String, String> {
    let mut caps = capabilities.clone();
    caps.insert("Agent.Version".to_owned(), agent_version.to_owned());
    caps.insert("Agent.OS".to_owned(), "Linux".to_owned());
    caps.insert(
        OWNER_CAPABILITY.to_owned(),
        owner_tag(cluster_id, namespace, agentpool),
    );
    caps
}

/// Whether `job` is an unfinished `registration: controller` agent Job of one of `pools` (namespace,
/// AgentPool name): then its agent must be registered and its Secret written. Returns its key
/// (`namespace/name`) and its AgentPool's.
pub fn wants_agent_files(
    job: &Job,
    pools: &HashSet<(String, String)>,
) -> Option<(String, (String, String))> {
    let meta = &job.metadata;
    let (namespace, name) = (meta.namespace.as_ref()?, meta.name.as_ref()?);
    meta.annotations
        .as_ref()?
        .get(job::ANNOTATION_AGENT_SECRET)?;
    let agentpool = meta.labels.as_ref()?.get(job::LABEL_AGENTPOOL)?;
    let pool = (namespace.clone(), agentpool.clone());
    if !pools.contains(&pool) || super::snapshot::job_finished(job) {
        return None;
    }
    Some((format!("{namespace}/{name}"), pool))
}

/// Registers the agent of `job` and stores its files in the Job's Secret.
pub(crate) async fn register(
    client: &kube::Client,
    cluster_id: &str,
    ado: &AdoClient,
    pool_id: i32,
    pool: &AgentPool,
    job: &Job,
) -> Result<(), RegistrationError> {
    let meta = &job.metadata;
    let (Some(namespace), Some(job_name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid)
    else {
        return Err(RegistrationError::NoJobIdentity(
            meta.name.clone().unwrap_or_default(),
        ));
    };
    let agentpool = pool.metadata.name.clone().unwrap_or_default();
    let agent_name = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(job::ANNOTATION_AGENT_NAME))
        .cloned()
        .unwrap_or_default();
    let key = tokio::task::spawn_blocking(AgentKey::generate)
        .await
        .map_err(|e| AgentFilesError::Key(e.to_string()))??;
    let body = TaskAgent {
        name: agent_name.clone(),
        version: Some(pool.spec.agent_version.clone()),
        os_description: Some("Linux (azp-autoscaler, registered by the controller)".to_owned()),
        max_parallelism: Some(1),
        enabled: Some(true),
        system_capabilities: agent_capabilities(
            &pool.spec.capabilities,
            &pool.spec.agent_version,
            cluster_id,
            namespace,
            &agentpool,
        ),
        authorization: Some(TaskAgentAuthorization {
            public_key: Some(key.public_key()),
            ..TaskAgentAuthorization::default()
        }),
        ..TaskAgent::default()
    };
    let ado_err = |source: AdoError| RegistrationError::Ado {
        agent: agent_name.clone(),
        source,
    };
    let registered = match ado.add_agent(pool_id, &body).await {
        Ok(agent) => agent,
        // Registered by an earlier attempt whose Secret never got written: take it over with this key.
        Err(e) if e.status() == Some(409) => {
            let existing = ado
                .agents(pool_id, &AgentQuery::named(&agent_name))
                .await
                .map_err(ado_err)?
                .into_iter()
                .find(|a| a.name.eq_ignore_ascii_case(&agent_name))
                .ok_or_else(|| ado_err(e))?;
            ado.replace_agent(pool_id, existing.id, &body)
                .await
                .map_err(ado_err)?
        }
        Err(e) => return Err(ado_err(e)),
    };
    let authorization = registered.authorization.as_ref();
    let files = agent_files::agent_files(
        &AgentIdentity {
            agent_id: registered.id,
            agent_name: &agent_name,
            pool_id,
            pool_name: &pool.spec.pool,
            server_url: &pool.spec.organization,
            client_id: authorization.and_then(|a| a.client_id.as_deref()),
            authorization_url: authorization.and_then(|a| a.authorization_url.as_deref()),
        },
        &key,
    )?;
    let secret_name = job::agent_secret_name(job_name);
    let secret =
        agent_files::agent_secret(&secret_name, namespace, &agentpool, job_name, uid, files);
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|source| RegistrationError::Secret {
            namespace: namespace.clone(),
            name: secret_name.clone(),
            source,
        })?;
    tracing::info!(agentpool = %format!("{namespace}/{agentpool}"), job = %job_name, agent = %agent_name, agent_id = registered.id, "agent registered by the controller; its files are in its Job's Secret");
    Ok(())
}

/// Whether the Secret of a controller-registered agent Job exists (`get`: no Secret is listed or
/// watched, so the controller needs no read access to other Secrets).
pub(crate) async fn secret_exists(
    client: &kube::Client,
    namespace: &str,
    job_name: &str,
) -> Result<bool, kube::Error> {
    match Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&job::agent_secret_name(job_name))
        .await
    {
        Ok(found) => Ok(found.is_some()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn which_jobs_need_their_agent_registered() {
        let job = |pool: &str, files: bool, finished: Option<&str>, deleting: bool| Job {
            metadata: ObjectMeta {
                name: Some("linux-r1-a1".into()),
                namespace: Some("ci".into()),
                labels: Some(BTreeMap::from([(
                    job::LABEL_AGENTPOOL.to_owned(),
                    pool.to_owned(),
                )])),
                annotations: Some(if files {
                    BTreeMap::from([(
                        job::ANNOTATION_AGENT_SECRET.to_owned(),
                        "linux-r1-a1-agent".to_owned(),
                    )])
                } else {
                    BTreeMap::new()
                }),
                deletion_timestamp: deleting.then_some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ),
                ),
                ..ObjectMeta::default()
            },
            status: finished.map(|kind| JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: kind.into(),
                    status: "True".into(),
                    ..JobCondition::default()
                }]),
                ..JobStatus::default()
            }),
            ..Job::default()
        };
        let pools = HashSet::from([("ci".to_owned(), "linux".to_owned())]);
        let cases = [
            (
                "unfinished, controller-registered",
                job("linux", true, None, false),
                true,
            ),
            (
                "registered by its pod (no agent files)",
                job("linux", false, None, false),
                false,
            ),
            (
                "another AgentPool's",
                job("windows", true, None, false),
                false,
            ),
            (
                "finished",
                job("linux", true, Some("Complete"), false),
                false,
            ),
            ("failed", job("linux", true, Some("Failed"), false), false),
            ("being deleted", job("linux", true, None, true), false),
        ];
        for (what, j, want) in cases {
            let got = wants_agent_files(&j, &pools);
            assert_eq!(got.is_some(), want, "{what}");
            if let Some((key, pool)) = got {
                assert_eq!(key, "ci/linux-r1-a1");
                assert_eq!(pool, ("ci".to_owned(), "linux".to_owned()));
            }
        }
    }

    #[test]
    fn registered_capabilities_carry_the_owner_mark_and_the_agent_version() {
        let caps = agent_capabilities(
            &BTreeMap::from([("docker".into(), "true".into())]),
            "4.261.0",
            "c1",
            "ci",
            "linux",
        );
        assert_eq!(caps.get("docker").map(String::as_str), Some("true"));
        assert_eq!(
            caps.get(OWNER_CAPABILITY).map(String::as_str),
            Some("c1/ci/linux")
        );
        assert_eq!(
            caps.get("Agent.Version").map(String::as_str),
            Some("4.261.0")
        );
        assert!(
            !caps.contains_key(super::super::placeholder::PLACEHOLDER_CAPABILITY),
            "a registered agent is no placeholder: cleanup may remove it"
        );
    }
}
