//! Node harness on the real API server: the workload-identity webhook part injects the `AZURE_*` env and
//! a real service-account token (TokenRequest, audience `api://AzureADTokenExchange`, bound to the pod)
//! that is refreshed in place. Needs the local control plane (`tests/cluster/up.sh`).

use std::collections::BTreeMap;
use std::time::Duration;

use azp_testbed::node::identity::{
    AUDIENCE, CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION, USE_LABEL,
};
use azp_testbed::node::testing::{TestNamespace, init_tracing, jwt_claims, wait_pod_phase};
use azp_testbed::node::{self, NodeConfig, NodeHarness};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Saves the env and the token, waits (bounded) until the token file is rewritten, saves the new token.
/// Consumers must re-read the file: this is what the script shows.
const SCRIPT: &str = r#"env > "$TESTBED_POD_DIR/env.txt"
cp "$AZURE_FEDERATED_TOKEN_FILE" "$TESTBED_POD_DIR/token-1"
i=0
while cmp -s "$AZURE_FEDERATED_TOKEN_FILE" "$TESTBED_POD_DIR/token-1"; do
  i=$((i + 1)); [ "$i" -lt 600 ] || exit 7
  sleep 0.1
done
cp "$AZURE_FEDERATED_TOKEN_FILE" "$TESTBED_POD_DIR/token-2""#;

#[tokio::test]
async fn labelled_pods_get_azure_env_and_a_refreshed_federated_token() {
    init_tracing();
    let client = node::client().await;
    let ns = TestNamespace::create(&client, "node-wi").await;
    let mut config = NodeConfig::for_namespace(ns.name());
    config.workload_identity.authority_host = "https://entra.testbed.local/".into();
    config.workload_identity.token_expiration_seconds = 3600;
    config.token_refresh_interval = Some(Duration::from_secs(2));
    let harness = NodeHarness::start(client.clone(), config)
        .await
        .expect("node harness starts");

    let sas: Api<ServiceAccount> = ns.api();
    let sa: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "agent", "annotations": {
            CLIENT_ID_ANNOTATION: "11111111-2222-3333-4444-555555555555",
            TENANT_ID_ANNOTATION: "66666666-7777-8888-9999-000000000000",
        }},
    }))
    .expect("service account");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create service account");

    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "wi", "labels": {USE_LABEL: "true"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "agent",
            "containers": [{"name": "main", "image": "testbed/shell", "command": ["sh", "-c", SCRIPT]}],
        },
    }))
    .expect("pod");
    let pods: Api<Pod> = ns.api();
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_pod_phase(&pods, "wi", "Succeeded", TIMEOUT).await;

    let layout = harness.pod_layout(ns.name(), "wi").expect("known pod");
    let read = |f: &str| {
        std::fs::read_to_string(layout.dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let env: BTreeMap<String, String> = read("env.txt")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(
        get("AZURE_CLIENT_ID"),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(
        get("AZURE_TENANT_ID"),
        Some("66666666-7777-8888-9999-000000000000")
    );
    assert_eq!(
        get("AZURE_AUTHORITY_HOST"),
        Some("https://entra.testbed.local/")
    );
    let token_file = get("AZURE_FEDERATED_TOKEN_FILE").expect("AZURE_FEDERATED_TOKEN_FILE");
    assert!(
        std::path::Path::new(token_file).starts_with(&layout.dir),
        "the token file lives in the pod folder: {token_file}"
    );

    let uid = created.metadata.uid.clone().expect("uid");
    let sub = format!("system:serviceaccount:{}:agent", ns.name());
    let mut jtis = Vec::new();
    for f in ["token-1", "token-2"] {
        let claims = jwt_claims(&read(f)).expect("a JWT");
        assert_eq!(claims["sub"], sub.as_str(), "{f} subject");
        assert_eq!(claims["aud"], json!([AUDIENCE]), "{f} audience");
        assert!(
            claims["iss"]
                .as_str()
                .is_some_and(|i| i.starts_with("https://")),
            "{f} issuer: {}",
            claims["iss"]
        );
        assert_eq!(
            claims["kubernetes.io"]["pod"]["uid"],
            uid.as_str(),
            "{f} is bound to the pod"
        );
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "agent");
        let lifetime = claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
        assert_eq!(
            lifetime, 3600,
            "{f} lifetime is the configured expirationSeconds"
        );
        jtis.push(claims["jti"].clone());
    }
    assert_ne!(jtis[0], jtis[1], "the refreshed token is a new token");

    harness.shutdown().await.expect("shutdown");
}
