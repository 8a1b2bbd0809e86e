//! The offline placeholder agent of an AgentPool.
//!
//! ADO fails a request at once ("No agent found in pool … which satisfies the specified demands") when no
//! agent of the pool — even an offline one — could serve it. With scale to zero there is often no agent at
//! all, so every AgentPool registers one offline agent through the REST API that carries the AgentPool's
//! capabilities and agent version. It never runs: its RSA key is thrown away at once.

use std::collections::BTreeMap;

use aws_lc_rs::signature::KeyPair;

use crate::ado::models::{TaskAgent, TaskAgentAuthorization, TaskAgentPublicKey};
use crate::ado::{AdoClient, AdoError, AgentQuery};
use crate::k8s::job::{OWNER_CAPABILITY, owner_tag};

/// Capability marking a placeholder (cleanup never touches one).
pub const PLACEHOLDER_CAPABILITY: &str = "azp-autoscaler.placeholder";

/// The placeholder's name: derived from the cluster, namespace and AgentPool, with a prefix no agent Job
/// name can have (Job-derived agent names start with the AgentPool name and end with an 8-hex digest).
pub fn name(cluster_id: &str, namespace: &str, agentpool: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("placeholder\n{cluster_id}\n{namespace}\n{agentpool}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut base = format!("azp-placeholder-{namespace}-{agentpool}");
    base.truncate(50);
    format!("{base}-{hex}")
}

/// What the placeholder must advertise: the AgentPool's capabilities, the agent version of the image (never
/// higher: a request demanding a newer agent must not be queued onto it), and the ownership marks.
pub fn desired_capabilities(
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
    caps.insert(PLACEHOLDER_CAPABILITY.to_owned(), "true".to_owned());
    caps
}

/// Whether a registered placeholder already advertises what it should.
pub fn up_to_date(agent: &TaskAgent, want: &BTreeMap<String, String>, agent_version: &str) -> bool {
    let mut have = agent.system_capabilities.clone();
    have.extend(agent.user_capabilities.clone());
    agent.version.as_deref() == Some(agent_version)
        && want.iter().all(|(k, v)| {
            have.iter()
                .any(|(hk, hv)| hk.eq_ignore_ascii_case(k) && hv == v)
        })
}

/// A throwaway RSA public key (the private half is dropped at once: the placeholder can never connect).
fn throwaway_public_key() -> Result<TaskAgentPublicKey, AdoError> {
    let key =
        aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| {
            AdoError::Config {
                field: "placeholder key",
                reason: "cannot generate an RSA key for the placeholder agent".to_owned(),
            }
        })?;
    let public = key.public_key();
    Ok(TaskAgentPublicKey {
        exponent: public.exponent().big_endian_without_leading_zero().to_vec(),
        modulus: public.modulus().big_endian_without_leading_zero().to_vec(),
    })
}

/// Makes sure the placeholder exists and is current; returns its agent id.
pub async fn ensure(
    ado: &AdoClient,
    pool_id: i32,
    name: &str,
    want: &BTreeMap<String, String>,
    agent_version: &str,
) -> Result<i32, AdoError> {
    let existing = ado
        .agents(pool_id, &AgentQuery::named(name).with_capabilities())
        .await?
        .into_iter()
        .find(|a| a.name.eq_ignore_ascii_case(name));
    if let Some(agent) = &existing
        && up_to_date(agent, want, agent_version)
    {
        return Ok(agent.id);
    }
    let body = TaskAgent {
        name: name.to_owned(),
        version: Some(agent_version.to_owned()),
        os_description: Some("azp-autoscaler placeholder (never runs jobs)".to_owned()),
        max_parallelism: Some(1),
        enabled: Some(true),
        system_capabilities: want.clone(),
        authorization: Some(TaskAgentAuthorization {
            public_key: Some(throwaway_public_key()?),
            ..TaskAgentAuthorization::default()
        }),
        ..TaskAgent::default()
    };
    let agent = match existing {
        Some(old) => ado.replace_agent(pool_id, old.id, &body).await?,
        None => ado.add_agent(pool_id, &body).await?,
    };
    tracing::info!(
        placeholder = name,
        agent_id = agent.id,
        "placeholder agent registered"
    );
    Ok(agent.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_per_cluster_and_pool_and_bounded() {
        let a = name("c1", "ci", "linux");
        assert!(a.starts_with("azp-placeholder-ci-linux-"));
        assert_ne!(a, name("c2", "ci", "linux"));
        assert_ne!(a, name("c1", "ci", "windows"));
        let long = name("c1", &"n".repeat(63), &"p".repeat(63));
        assert!(long.len() <= 61, "{}", long.len());
    }

    #[test]
    fn up_to_date_compares_names_case_insensitively_and_the_version() {
        let want = desired_capabilities(
            &BTreeMap::from([("docker".into(), "true".into())]),
            "4.261.0",
            "c1",
            "ci",
            "linux",
        );
        let mut agent = TaskAgent {
            version: Some("4.261.0".into()),
            system_capabilities: want
                .iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), v.clone()))
                .collect(),
            ..TaskAgent::default()
        };
        assert!(up_to_date(&agent, &want, "4.261.0"));
        agent.version = Some("4.262.0".into());
        assert!(
            !up_to_date(&agent, &want, "4.261.0"),
            "a version change re-registers"
        );
        agent.version = Some("4.261.0".into());
        agent.system_capabilities.remove("DOCKER");
        assert!(
            !up_to_date(&agent, &want, "4.261.0"),
            "a capability change re-registers"
        );
    }

    #[test]
    fn throwaway_key_is_a_2048_bit_rsa_public_key() {
        let key = throwaway_public_key().unwrap();
        assert_eq!(key.modulus.len(), 256);
        assert_eq!(key.exponent, vec![1, 0, 1]);
    }
}
