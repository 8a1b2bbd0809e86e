//! The AKS workload-identity webhook, played by the node, and service-account token files.
//!
//! For a pod labelled `azure.workload.identity/use: "true"` the node adds, to the main container's env,
//! unless the container defines them itself (as the webhook does):
//! `AZURE_CLIENT_ID` (ServiceAccount annotation `azure.workload.identity/client-id`), `AZURE_TENANT_ID`
//! (annotation `azure.workload.identity/tenant-id`, else the configured default), `AZURE_AUTHORITY_HOST`
//! (configured: the simulator's Entra URL) and `AZURE_FEDERATED_TOKEN_FILE` — a local file (the webhook's
//! `/var/run/secrets/azure/tokens/azure-identity-token`, mapped under the pod folder) holding a real
//! service-account token from the TokenRequest API: audience `api://AzureADTokenExchange`, bound to the
//! pod, `expirationSeconds` from the pod annotation `azure.workload.identity/service-account-token-expiration`
//! or the configuration. Like every projected token, it is rewritten (a new file, atomically) at 80 % of
//! its lifetime or every `token_refresh_interval`: consumers must re-read it.

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::NodeError;
use super::config::WorkloadIdentityConfig;
use super::volumes::{PodLayout, TokenFile, write_atomic};

/// Pod label that asks for the injection.
pub const USE_LABEL: &str = "azure.workload.identity/use";
/// ServiceAccount annotation with the Entra application (client) id.
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
/// ServiceAccount annotation with the tenant id.
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
/// Pod annotation overriding the token lifetime (seconds).
pub const TOKEN_EXPIRATION_ANNOTATION: &str =
    "azure.workload.identity/service-account-token-expiration";
/// Audience of the federated token.
pub const AUDIENCE: &str = "api://AzureADTokenExchange";
/// Where the webhook mounts the token in the container.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/azure/tokens";
/// The token's file name.
pub const TOKEN_FILE_NAME: &str = "azure-identity-token";
/// Name of the volume folder the token lives in.
pub const TOKEN_VOLUME: &str = "azure-identity-token";

/// Whether the pod asks for workload identity.
pub fn wants(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(USE_LABEL))
        .is_some_and(|v| v == "true")
}

/// What the webhook adds to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// Variables to add (only those the container does not define).
    pub env: Vec<(String, String)>,
    /// The federated token file to keep fresh.
    pub token: TokenFile,
}

/// The injection for `pod` running as `service_account`.
pub fn injection(
    pod: &Pod,
    service_account: &ServiceAccount,
    config: &WorkloadIdentityConfig,
    layout: &PodLayout,
) -> Injection {
    let annotation = |key: &str| {
        service_account
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let expiration = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TOKEN_EXPIRATION_ANNOTATION))
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(config.token_expiration_seconds);
    let path = layout.volume(TOKEN_VOLUME).join(TOKEN_FILE_NAME);
    let mut env = Vec::new();
    if let Some(id) = annotation(CLIENT_ID_ANNOTATION) {
        env.push(("AZURE_CLIENT_ID".to_owned(), id));
    }
    if let Some(tenant) =
        annotation(TENANT_ID_ANNOTATION).or_else(|| config.default_tenant_id.clone())
    {
        env.push(("AZURE_TENANT_ID".to_owned(), tenant));
    }
    env.push((
        "AZURE_FEDERATED_TOKEN_FILE".to_owned(),
        path.to_string_lossy().into_owned(),
    ));
    env.push((
        "AZURE_AUTHORITY_HOST".to_owned(),
        config.authority_host.clone(),
    ));
    Injection {
        env,
        token: TokenFile {
            service_account: service_account.metadata.name.clone().unwrap_or_default(),
            audiences: vec![AUDIENCE.to_owned()],
            expiration_seconds: expiration,
            path,
            mode: 0o644,
        },
    }
}

/// Requests a token for `token.service_account` bound to the pod and writes it to `token.path`; returns
/// when it expires.
pub async fn write_token(
    client: &Client,
    pod: &Pod,
    token: &TokenFile,
) -> Result<Timestamp, NodeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": token.audiences,
            "expirationSeconds": token.expiration_seconds,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.metadata.name,
                "uid": pod.metadata.uid,
            },
        },
    }))
    .map_err(|e| NodeError::ContainerConfig {
        pod: super::env::pod_key(pod),
        message: format!("token request cannot be built: {e}"),
    })?;
    let answer: TokenRequest = api
        .create_subresource(
            "token",
            &token.service_account,
            &PostParams::default(),
            &request,
        )
        .await
        .map_err(NodeError::api(format!(
            "request a token for serviceaccount {ns}/{} (audiences {:?})",
            token.service_account, token.audiences
        )))?;
    let status = answer.status.ok_or_else(|| NodeError::ContainerConfig {
        pod: super::env::pod_key(pod),
        message: "the TokenRequest answer has no status".into(),
    })?;
    write_atomic(&token.path, status.token.as_bytes(), token.mode)?;
    Ok(status.expiration_timestamp.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use std::path::Path;

    fn sa(annotations: &[(&str, &str)]) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_pods_labelled_true_want_identity() {
        assert!(wants(&pod(&[(USE_LABEL, "true")])));
        assert!(!wants(&pod(&[(USE_LABEL, "false")])));
        assert!(!wants(&pod(&[])));
    }

    #[test]
    fn injection_reads_service_account_annotations_and_config() {
        let layout = PodLayout::new(Path::new("/w"), "ns", "p", "uid");
        let config = WorkloadIdentityConfig {
            authority_host: "https://entra.test/".into(),
            default_tenant_id: Some("default-tenant".into()),
            token_expiration_seconds: 3600,
        };
        let inj = injection(
            &pod(&[(USE_LABEL, "true")]),
            &sa(&[(CLIENT_ID_ANNOTATION, "cid")]),
            &config,
            &layout,
        );
        let get = |k: &str| inj.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("AZURE_CLIENT_ID").as_deref(), Some("cid"));
        assert_eq!(get("AZURE_TENANT_ID").as_deref(), Some("default-tenant"));
        assert_eq!(
            get("AZURE_AUTHORITY_HOST").as_deref(),
            Some("https://entra.test/")
        );
        assert_eq!(
            get("AZURE_FEDERATED_TOKEN_FILE").map(std::path::PathBuf::from),
            Some(layout.volume(TOKEN_VOLUME).join(TOKEN_FILE_NAME))
        );
        assert_eq!(inj.token.audiences, vec![AUDIENCE.to_owned()]);
        assert_eq!(inj.token.service_account, "agent");

        let inj = injection(
            &pod(&[(USE_LABEL, "true")]),
            &sa(&[
                (CLIENT_ID_ANNOTATION, "cid"),
                (TENANT_ID_ANNOTATION, "sa-tenant"),
            ]),
            &config,
            &layout,
        );
        assert!(
            inj.env
                .contains(&("AZURE_TENANT_ID".to_owned(), "sa-tenant".to_owned()))
        );
    }
}
