//! The simulated Entra: workload-identity token exchange with federated-token validation, the
//! OpenID metadata, faults, and an independent client (PyPI azure-identity) getting a token.

mod sim_support;

use std::time::Duration;

use azp_testbed::sim::testing::TestIssuer;
use azp_testbed::sim::{
    ADO_SCOPE, EndpointClass, Fault, FaultKind, FederatedIssuer, IdentitySpec, JwksSource,
    SimConfig,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sim_support::*;

async fn exchange(b: &Bed, client_id: &str, assertion: &str) -> (StatusCode, Value) {
    exchange_form(
        b,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("scope", ADO_SCOPE),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
    .await
}

async fn exchange_form(b: &Bed, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = b
        .http
        .post(b.sim.token_url())
        .form(form)
        .send()
        .await
        .expect("token call");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn aadsts(v: &Value) -> String {
    v["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn federated_token_exchange_issues_an_access_token_that_ado_accepts() {
    let b = bed().await;
    let sa = b
        .issuer
        .sa_token("agents", "azp-agent", Duration::from_secs(600));
    let (status, v) = exchange(&b, &b.client_id, &sa).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    let token = v["access_token"].as_str().unwrap();
    let claims: Value = {
        use base64::Engine as _;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["aud"], azp_testbed::sim::ADO_RESOURCE_ID);
    assert_eq!(claims["oid"], b.oid);
    assert_eq!(claims["tid"], b.sim.tenant_id());
    assert_eq!(claims["appid"], b.client_id);
    let r = b
        .call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {token}")),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn token_validation_failures_answer_in_entras_shape_with_aadsts_codes() {
    let b = bed().await;
    let now = jiff::Timestamp::now().as_second();
    let claims = |sub: &str, aud: &str, exp: i64| json!({ "iss": b.issuer.issuer, "sub": sub, "aud": [aud], "iat": now, "nbf": now - 1, "exp": exp });
    let good_sub = "system:serviceaccount:agents:azp-agent";

    // Subject without a federated credential.
    let t = b.issuer.sign(&claims(
        "system:serviceaccount:agents:other",
        "api://AzureADTokenExchange",
        now + 600,
    ));
    let (s, v) = exchange(&b, &b.client_id, &t).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(aadsts(&v).starts_with("AADSTS70021:"), "{v}");
    assert_eq!(v["error_codes"], json!([70021]));
    assert!(v["error"].is_string() && v["trace_id"].is_string());

    // Expired.
    let t = b
        .issuer
        .sign(&claims(good_sub, "api://AzureADTokenExchange", now - 10));
    let (s, v) = exchange(&b, &b.client_id, &t).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(aadsts(&v).starts_with("AADSTS700024:"), "{v}");

    // Wrong audience.
    let t = b.issuer.sign(&claims(
        good_sub,
        "https://kubernetes.default.svc",
        now + 600,
    ));
    let (_, v) = exchange(&b, &b.client_id, &t).await;
    assert!(aadsts(&v).starts_with("AADSTS700212:"), "{v}");

    // Right claims, wrong key.
    let impostor = TestIssuer::new(b.issuer.issuer.clone()).unwrap();
    let (s, v) = exchange(
        &b,
        &b.client_id,
        &impostor.sa_token("agents", "azp-agent", Duration::from_secs(600)),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(aadsts(&v).starts_with("AADSTS700027:"), "{v}");

    // Unknown issuer.
    let stranger = TestIssuer::new("https://elsewhere.example").unwrap();
    let (_, v) = exchange(
        &b,
        &b.client_id,
        &stranger.sa_token("agents", "azp-agent", Duration::from_secs(600)),
    )
    .await;
    assert!(aadsts(&v).starts_with("AADSTS700211:"), "{v}");

    // Unknown client id.
    let sa = b
        .issuer
        .sa_token("agents", "azp-agent", Duration::from_secs(600));
    let (s, v) = exchange(&b, "11111111-2222-3333-4444-555555555555", &sa).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(aadsts(&v).starts_with("AADSTS700016:"), "{v}");

    // Not a JWT.
    let (_, v) = exchange(&b, &b.client_id, "garbage").await;
    assert!(aadsts(&v).starts_with("AADSTS50027:"), "{v}");

    // Missing parameter, wrong grant, wrong scope, wrong tenant.
    let (_, v) = exchange_form(
        &b,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &b.client_id),
        ],
    )
    .await;
    assert!(aadsts(&v).starts_with("AADSTS900144:"), "{v}");
    let (_, v) = exchange_form(&b, &[("grant_type", "password")]).await;
    assert_eq!(v["error"], "unsupported_grant_type");
    let (_, v) = exchange_form(
        &b,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &b.client_id),
            ("scope", "https://graph.microsoft.com/.default"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &sa),
        ],
    )
    .await;
    assert!(aadsts(&v).starts_with("AADSTS500011:"), "{v}");
    let other_tenant = b
        .sim
        .token_url()
        .replace(&b.sim.tenant_id(), "00000000-0000-0000-0000-000000000000");
    let r = b
        .http
        .post(other_tenant)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("AADSTS90002"));
}

#[tokio::test]
async fn openid_configuration_and_keys_are_served() {
    let b = bed().await;
    let tenant = b.sim.tenant_id();
    let url = format!(
        "{}{tenant}/v2.0/.well-known/openid-configuration",
        b.sim.entra_url()
    );
    let v: Value = b.http.get(url).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["token_endpoint"], b.sim.token_url());
    assert_eq!(v["issuer"], format!("{}{tenant}/v2.0", b.sim.entra_url()));
    let keys: Value = b
        .http
        .get(v["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keys["keys"][0]["kty"], "RSA");
    assert!(keys["keys"][0]["kid"].is_string());
    assert!(b.sim.entra_url().ends_with('/'));
}

#[tokio::test]
async fn token_endpoint_outage_5xx_slow_malformed_and_short_lifetimes() {
    let b = bed().await;
    let sa = b
        .issuer
        .sa_token("agents", "azp-agent", Duration::from_secs(600));
    b.sim.inject_fault(Fault::times(
        EndpointClass::Token,
        FaultKind::TokenOutage,
        2,
    ));
    let (s, v) = exchange(&b, &b.client_id, &sa).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "temporarily_unavailable");
    assert_eq!(
        exchange(&b, &b.client_id, &sa).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(exchange(&b, &b.client_id, &sa).await.0, StatusCode::OK);
    // An outage of the token endpoint does not touch ADO.
    b.sim
        .inject_fault(Fault::always(EndpointClass::Token, FaultKind::TokenOutage));
    assert_eq!(b.get("pools").await.status, StatusCode::OK);
    b.sim.clear_faults();

    b.sim.inject_fault(Fault::once(
        EndpointClass::Token,
        FaultKind::ServerError { status: 500 },
    ));
    assert_eq!(
        exchange(&b, &b.client_id, &sa).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    b.sim
        .inject_fault(Fault::once(EndpointClass::Token, FaultKind::MalformedJson));
    let (s, v) = exchange(&b, &b.client_id, &sa).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.is_string(), "body must not be JSON: {v}");

    b.sim.inject_fault(Fault::once(
        EndpointClass::Token,
        FaultKind::Slow { delay_ms: 250 },
    ));
    let t0 = std::time::Instant::now();
    assert_eq!(exchange(&b, &b.client_id, &sa).await.0, StatusCode::OK);
    assert!(t0.elapsed() >= Duration::from_millis(250));

    b.sim.inject_fault(Fault::once(
        EndpointClass::Token,
        FaultKind::ShortTokenLifetime { secs: 1 },
    ));
    let (_, v) = exchange(&b, &b.client_id, &sa).await;
    assert_eq!(v["expires_in"], 1);
    let short = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        b.call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {short}")),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = b
        .call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {short}")),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the short-lived token has expired"
    );
    let (_, v) = exchange(&b, &b.client_id, &sa).await;
    assert_eq!(
        v["expires_in"], 3600,
        "one-shot: the next token has the configured lifetime"
    );

    b.sim.set_token_lifetime(Duration::from_secs(42));
    assert_eq!(exchange(&b, &b.client_id, &sa).await.1["expires_in"], 42);
}

#[tokio::test]
async fn jwks_fetched_from_a_url_with_ca_and_bearer_like_the_kube_apiserver() {
    // A second simulator's TLS listener stands in for the apiserver: serve the issuer's JWKS from a
    // tiny axum app behind its own test CA.
    let b = bed().await;
    let apiserver_issuer = TestIssuer::new("https://127.0.0.1:6443").unwrap();
    let jwks = serde_json::to_string(&apiserver_issuer.jwks()).unwrap();
    let ca = azp_testbed::ca::TestCa::new().unwrap();
    let leaf = ca.server_cert(&["127.0.0.1"]).unwrap();
    let app = axum::Router::new().route(
        "/openid/v1/jwks",
        axum::routing::get(move |h: axum::http::HeaderMap| {
            let jwks = jwks.clone();
            async move {
                if h.get("authorization").and_then(|v| v.to_str().ok())
                    == Some("Bearer reader-token")
                {
                    (axum::http::StatusCode::OK, jwks)
                } else {
                    (axum::http::StatusCode::UNAUTHORIZED, String::new())
                }
            }
        }),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let tls =
        axum_server::tls_rustls::RustlsConfig::from_config(leaf.rustls_server_config().unwrap());
    let server = axum_server::tls_rustls::from_tcp_rustls(listener, tls).unwrap();
    let task = tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });

    let client_id = "url-jwks-client";
    b.sim.add_identity(
        IdentitySpec::new(client_id)
            .object_id(b.oid.clone())
            .federated_sa(&apiserver_issuer.issuer, "ns", "sa"),
    );
    let source = |bearer: Option<&str>| FederatedIssuer {
        issuer: apiserver_issuer.issuer.clone(),
        jwks: JwksSource::Url {
            url: format!("https://{addr}/openid/v1/jwks"),
            ca_pem: Some(ca.cert_pem().to_owned()),
            bearer_token: bearer.map(str::to_owned),
        },
    };
    let sa = apiserver_issuer.sa_token("ns", "sa", Duration::from_secs(600));
    b.sim.add_federated_issuer(source(None));
    let (s, v) = exchange(&b, client_id, &sa).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the JWKS fetch is refused without credentials: {v}"
    );
    assert!(aadsts(&v).starts_with("AADSTS50166:"), "{v}");
    b.sim.add_federated_issuer(source(Some("reader-token")));
    let (s, v) = exchange(&b, client_id, &sa).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    task.abort();
}

/// PyPI azure-identity's WorkloadIdentityCredential — an independent client — gets a token.
#[tokio::test]
async fn azure_identity_python_workload_identity_credential_gets_a_token() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import azure.identity"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED azure_identity_python_workload_identity_credential_gets_a_token: python3 cannot import azure.identity (pip install azure-identity; .ci/run does)"
        );
        return;
    }
    let b = bed_with(SimConfig::default(), |o| o).await;
    let dir = std::env::temp_dir().join(format!("azp-sim-py-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(
        &token_file,
        b.issuer
            .sa_token("agents", "azp-agent", Duration::from_secs(600)),
    )
    .unwrap();
    let script = r#"
import os, sys
from azure.identity import WorkloadIdentityCredential
cred = WorkloadIdentityCredential(
    tenant_id=os.environ["T_TENANT"], client_id=os.environ["T_CLIENT"],
    token_file_path=os.environ["T_FILE"], authority=os.environ["T_AUTHORITY"],
    disable_instance_discovery=True)
tok = cred.get_token(os.environ["T_SCOPE"])
sys.stdout.write(tok.token)
"#;
    let ca = b.sim.ca_pem_path().unwrap().to_owned();
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("T_TENANT", b.sim.tenant_id())
        .env("T_CLIENT", &b.client_id)
        .env("T_FILE", &token_file)
        .env("T_AUTHORITY", b.sim.entra_url())
        .env("T_SCOPE", ADO_SCOPE)
        .env("SSL_CERT_FILE", &ca)
        .env("REQUESTS_CA_BUNDLE", &ca)
        .output()
        .await
        .expect("python3 runs");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "azure-identity failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let r = b
        .call(
            Method::GET,
            &b.url("pools"),
            Some(&format!("Bearer {token}")),
            None,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "ADO accepts the token azure-identity got: {}",
        r.text
    );
    assert!(
        b.sim
            .calls()
            .iter()
            .any(|c| c.endpoint == "entra.token" && c.status == 200)
    );
}
