//! Simulated Entra: the workload-identity token exchange (client credentials with a federated
//! assertion), OpenID metadata and signing keys; and access-token minting/validation for ADO.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    ADO_RESOURCE_ID, EndpointClass, FEDERATED_AUDIENCE, FaultKind, JwksSource, Shared, SimError,
};
use crate::ca::CaError;

/// The simulator's RSA signing key for access tokens (one per process: key generation is slow).
pub(crate) struct SigningKeys {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub jwk: Jwk,
}

static KEYS: OnceLock<Arc<SigningKeys>> = OnceLock::new();

impl SigningKeys {
    pub(crate) fn shared() -> Result<Arc<SigningKeys>, SimError> {
        if let Some(k) = KEYS.get() {
            return Ok(k.clone());
        }
        let k = Arc::new(SigningKeys::generate("azp-sim")?);
        Ok(KEYS.get_or_init(|| k).clone())
    }

    /// A fresh RSA-2048 key with its JWK (`kid` given).
    pub(crate) fn generate(kid: &str) -> Result<SigningKeys, SimError> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
            .map_err(|e| SimError::Ca(CaError::KeyGen(e)))?;
        let pem = kp.serialize_pem();
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
            SimError::InvalidSpec(format!("generated RSA key not usable for signing: {e}"))
        })?;
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(|e| {
            SimError::InvalidSpec(format!("generated RSA key has no JWK form: {e}"))
        })?;
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| {
            SimError::InvalidSpec(format!("generated JWK not usable for verifying: {e}"))
        })?;
        Ok(SigningKeys {
            kid: kid.to_owned(),
            encoding,
            decoding,
            jwk,
        })
    }
}

/// Cached JWKS of URL-configured federated issuers.
#[derive(Default)]
pub(crate) struct JwksCache {
    by_issuer: Mutex<HashMap<String, JwkSet>>,
}

impl JwksCache {
    pub(crate) fn forget(&self, issuer: &str) {
        self.by_issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(issuer);
    }
    fn get(&self, issuer: &str) -> Option<JwkSet> {
        self.by_issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(issuer)
            .cloned()
    }
    fn put(&self, issuer: &str, set: JwkSet) {
        self.by_issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(issuer.to_owned(), set);
    }
}

/// Claims of the access tokens this Entra issues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AccessClaims {
    pub aud: String,
    pub iss: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub oid: String,
    pub tid: String,
    pub appid: String,
    pub azp: String,
    pub sub: String,
    pub ver: String,
    pub idtyp: String,
}

pub(crate) fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

pub(crate) fn mint_access_token(
    sh: &Shared,
    tenant: &str,
    client_id: &str,
    oid: &str,
    lifetime: Duration,
) -> String {
    let now = now_unix();
    let claims = AccessClaims {
        aud: ADO_RESOURCE_ID.into(),
        iss: format!("{}/{tenant}/v2.0", sh.entra_base),
        iat: now,
        nbf: now - 5,
        exp: now + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
        oid: oid.to_owned(),
        tid: tenant.to_owned(),
        appid: client_id.to_owned(),
        azp: client_id.to_owned(),
        sub: oid.to_owned(),
        ver: "2.0".into(),
        idtyp: "app".into(),
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(sh.keys.kid.clone());
    header.typ = Some("JWT".into());
    // Signing with a key we generated cannot fail short of a broken crypto backend.
    jsonwebtoken::encode(&header, &claims, &sh.keys.encoding).unwrap_or_default()
}

pub(crate) fn sign_claims(sh: &Shared, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(sh.keys.kid.clone());
    jsonwebtoken::encode(&header, claims, &sh.keys.encoding).unwrap_or_default()
}

/// Why an ADO bearer token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenRejection {
    Malformed,
    BadSignature,
    Expired,
    WrongAudience,
}

impl TokenRejection {
    pub(crate) fn message(&self) -> &'static str {
        match self {
            TokenRejection::Malformed => {
                "TF400813: The access token is malformed (not a JWT issued by this tenant)."
            }
            TokenRejection::BadSignature => "TF400813: The access token signature is not valid.",
            TokenRejection::Expired => "TF400813: The access token has expired; acquire a new one.",
            TokenRejection::WrongAudience => {
                "TF400813: The access token audience is not Azure DevOps (499b84ac-1321-427f-aa17-267ca6975798)."
            }
        }
    }
}

/// Validates an access token presented to ADO.
pub(crate) fn validate_access_token(
    sh: &Shared,
    token: &str,
) -> Result<AccessClaims, TokenRejection> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
    if header.alg != Algorithm::RS256 {
        return Err(TokenRejection::Malformed);
    }
    let mut v = Validation::new(Algorithm::RS256);
    v.validate_aud = false;
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    let data =
        jsonwebtoken::decode::<AccessClaims>(token, &sh.keys.decoding, &v).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenRejection::BadSignature,
            _ => TokenRejection::Malformed,
        })?;
    let c = data.claims;
    if c.aud != ADO_RESOURCE_ID && c.aud != format!("api://{ADO_RESOURCE_ID}") {
        return Err(TokenRejection::WrongAudience);
    }
    let now = now_unix();
    if c.exp <= now {
        return Err(TokenRejection::Expired);
    }
    Ok(c)
}

// ---- HTTP -----------------------------------------------------------------------------------------

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

struct EntraError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    description: String,
}

impl EntraError {
    fn new(
        status: StatusCode,
        error: &'static str,
        code: u32,
        description: impl Into<String>,
    ) -> Self {
        EntraError {
            status,
            error,
            code,
            description: description.into(),
        }
    }
    fn bad(error: &'static str, code: u32, d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, code, d)
    }
    fn client(code: u32, d: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", code, d)
    }
    fn into_response(self) -> Response {
        let trace = uuid::Uuid::new_v4().to_string();
        let body = json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {} Trace ID: {trace} Correlation ID: {trace} Timestamp: {}",
                self.code,
                self.description,
                jiff::Timestamp::now()
            ),
            "error_codes": [self.code],
            "timestamp": jiff::Timestamp::now().to_string(),
            "trace_id": trace,
            "correlation_id": trace,
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        });
        (
            self.status,
            [("content-type", "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response()
    }
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _ = headers;
    let path = uri.path().trim_matches('/').to_owned();
    let seg: Vec<&str> = path.split('/').collect();
    let base = sh.entra_base.clone();
    match (method.clone(), seg.as_slice()) {
        (Method::POST, [tenant, "oauth2", "v2.0", "token"]) => token(&sh, tenant, &body).await,
        (Method::GET, [tenant, "v2.0", ".well-known", "openid-configuration"])
        | (Method::GET, [tenant, ".well-known", "openid-configuration"]) => {
            let r = openid_configuration(&sh, &base, tenant);
            sh.world()
                .record_call("entra.openid", "anonymous", r.status().as_u16());
            r
        }
        (Method::GET, [_tenant, "discovery", "v2.0", "keys"])
        | (Method::GET, [_tenant, "discovery", "keys"]) => {
            sh.world().record_call("entra.jwks", "anonymous", 200);
            json_response(
                StatusCode::OK,
                &JwkSet {
                    keys: vec![sh.keys.jwk.clone()],
                },
            )
        }
        (Method::GET, ["common", "discovery", "instance"]) => {
            let host = base.split("://").nth(1).unwrap_or_default().to_owned();
            json_response(
                StatusCode::OK,
                &json!({
                    "tenant_discovery_endpoint": format!("{base}/common/v2.0/.well-known/openid-configuration"),
                    "api-version": "1.1",
                    "metadata": [{ "preferred_network": host, "preferred_cache": host, "aliases": [host] }],
                }),
            )
        }
        _ => EntraError::new(
            StatusCode::NOT_FOUND,
            "invalid_request",
            90002,
            format!("No route for {method} /{path}."),
        )
        .into_response(),
    }
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response {
    let body = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    (
        status,
        [("content-type", "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn openid_configuration(sh: &Shared, base: &str, tenant: &str) -> Response {
    let configured = sh.world().tenant_id.clone();
    if !tenant.eq_ignore_ascii_case(&configured) && tenant != "common" && tenant != "organizations"
    {
        return EntraError::bad(
            "invalid_tenant",
            90002,
            format!("Tenant '{tenant}' not found."),
        )
        .into_response();
    }
    let t = if tenant == "common" || tenant == "organizations" {
        configured.as_str()
    } else {
        tenant
    };
    json_response(
        StatusCode::OK,
        &json!({
            "token_endpoint": format!("{base}/{t}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/{t}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}/{t}/v2.0"),
            "request_uri_parameter_supported": false,
            "userinfo_endpoint": format!("{base}/oidc/userinfo"),
            "authorization_endpoint": format!("{base}/{t}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/{t}/oauth2/v2.0/devicecode"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "end_session_endpoint": format!("{base}/{t}/oauth2/v2.0/logout"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "oid", "tid", "azp", "ver"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }),
    )
}

/// Claims read from a federated assertion.
#[derive(Debug, Deserialize)]
struct FederatedClaims {
    iss: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Value>,
    exp: Option<i64>,
    nbf: Option<i64>,
}

async fn token(sh: &Arc<Shared>, tenant: &str, body: &Bytes) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    let ident = if client_id.is_empty() {
        "anonymous".to_owned()
    } else {
        format!("client:{client_id}")
    };
    // Faults first: an outage answers before anything is looked at.
    let fault = sh.world().take_fault(EndpointClass::Token, None, |k| {
        !matches!(k, FaultKind::ShortTokenLifetime { .. })
    });
    let mut malformed = false;
    match fault {
        Some(FaultKind::TokenOutage) => {
            sh.world().record_call("entra.token", &ident, 503);
            return EntraError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                50020,
                "The service is temporarily unavailable. Please try again later.",
            )
            .into_response();
        }
        Some(FaultKind::ServerError { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            sh.world()
                .record_call("entra.token", &ident, status.as_u16());
            return EntraError::new(
                status,
                "server_error",
                50000,
                "There was an error issuing a token.",
            )
            .into_response();
        }
        Some(FaultKind::RateLimited { retry_after_secs }) => {
            sh.world().record_call("entra.token", &ident, 429);
            let mut r = EntraError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                50196,
                "The server terminated an operation because it encountered a client request loop.",
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            return r;
        }
        Some(FaultKind::Slow { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await
        }
        Some(FaultKind::MalformedJson) => malformed = true,
        Some(FaultKind::ShortTokenLifetime { .. }) | None => {}
    }
    let result = exchange(sh, tenant, &form).await;
    let mut resp = match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    };
    if malformed && resp.status().is_success() {
        resp = (
            StatusCode::OK,
            [("content-type", "application/json; charset=utf-8")],
            "{\"token_type\":\"Bearer\",\"access_",
        )
            .into_response();
    }
    sh.world()
        .record_call("entra.token", &ident, resp.status().as_u16());
    resp
}

async fn exchange(
    sh: &Arc<Shared>,
    tenant: &str,
    form: &HashMap<String, String>,
) -> Result<Value, EntraError> {
    let configured = sh.world().tenant_id.clone();
    if !tenant.eq_ignore_ascii_case(&configured) {
        return Err(EntraError::bad(
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check AZURE_TENANT_ID (this Entra serves tenant '{configured}')."
            ),
        ));
    }
    let need = |k: &str| {
        form.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                EntraError::bad(
                    "invalid_request",
                    900144,
                    format!("The request body must contain the following parameter: '{k}'."),
                )
            })
    };
    let grant = need("grant_type")?;
    if grant != "client_credentials" {
        return Err(EntraError::bad(
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant}'."),
        ));
    }
    let client_id = need("client_id")?;
    let scope = need("scope")?;
    let resource = scope.strip_suffix("/.default").unwrap_or("");
    if resource.is_empty() {
        return Err(EntraError::bad(
            "invalid_scope",
            70011,
            format!(
                "The provided value for the input parameter 'scope' is not valid: '{scope}'. The scope must end with /.default for client credentials."
            ),
        ));
    }
    if resource != ADO_RESOURCE_ID && resource != format!("api://{ADO_RESOURCE_ID}") {
        return Err(EntraError::bad(
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}."
            ),
        ));
    }
    let assertion_type = need("client_assertion_type")?;
    if assertion_type != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return Err(EntraError::bad(
            "invalid_request",
            700025,
            format!(
                "client_assertion_type '{assertion_type}' is not supported; use urn:ietf:params:oauth:client-assertion-type:jwt-bearer."
            ),
        ));
    }
    let assertion = need("client_assertion")?;
    let (identity, issuers) = {
        let w = sh.world();
        (
            w.identities.get(&client_id.to_ascii_lowercase()).cloned(),
            w.issuers.clone(),
        )
    };
    let Some(identity) = identity else {
        return Err(EntraError::bad(
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. Check AZURE_CLIENT_ID."
            ),
        ));
    };
    let header = jsonwebtoken::decode_header(&assertion).map_err(|e| {
        EntraError::bad(
            "invalid_request",
            50027,
            format!("JWT token is invalid or malformed: {e}."),
        )
    })?;
    let unverified = jsonwebtoken::dangerous::insecure_decode::<FederatedClaims>(&assertion)
        .map_err(|e| {
            EntraError::bad(
                "invalid_request",
                50027,
                format!("JWT token is invalid or malformed: {e}."),
            )
        })?
        .claims;
    let iss = unverified.iss.clone().unwrap_or_default();
    let Some(issuer) = issuers.iter().find(|i| i.issuer == iss) else {
        return Err(EntraError::client(
            700211,
            format!(
                "No matching federated identity record found for presented assertion issuer '{iss}'."
            ),
        ));
    };
    if header.alg != Algorithm::RS256 {
        return Err(EntraError::client(
            700027,
            format!(
                "Client assertion algorithm {:?} is not supported (RS256 only).",
                header.alg
            ),
        ));
    }
    let keys = issuer_keys(sh, issuer, header.kid.as_deref()).await?;
    let mut v = Validation::new(Algorithm::RS256);
    v.validate_aud = false;
    v.validate_exp = false;
    v.validate_nbf = false;
    v.required_spec_claims.clear();
    let mut verified = false;
    for jwk in keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
    {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        if jsonwebtoken::decode::<FederatedClaims>(&assertion, &key, &v).is_ok() {
            verified = true;
            break;
        }
    }
    if !verified {
        return Err(EntraError::client(
            700027,
            "Client assertion failed signature validation.",
        ));
    }
    let c = unverified;
    let now = now_unix();
    let exp = c.exp.unwrap_or(0);
    if exp <= now || c.nbf.is_some_and(|nbf| nbf > now + 300) {
        return Err(EntraError::client(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, assertion valid from {}, expiry time of assertion {exp}.",
                c.nbf
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "(none)".into())
            ),
        ));
    }
    let auds: Vec<String> = match &c.aud {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    if !auds.iter().any(|a| a == FEDERATED_AUDIENCE) {
        return Err(EntraError::client(
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{}'. The audience must be {FEDERATED_AUDIENCE}.",
                auds.join(",")
            ),
        ));
    }
    let sub = c.sub.clone().unwrap_or_default();
    let matched = identity
        .federated
        .iter()
        .any(|f| f.issuer == iss && f.subject == sub && auds.contains(&f.audience));
    if !matched {
        return Err(EntraError::bad(
            "invalid_request",
            70021,
            format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{}'.",
                auds.join(",")
            ),
        ));
    }
    let lifetime = {
        let mut w = sh.world();
        let short = w.take_fault(EndpointClass::Token, None, |k| {
            matches!(k, FaultKind::ShortTokenLifetime { .. })
        });
        match short {
            Some(FaultKind::ShortTokenLifetime { secs }) => Duration::from_secs(secs),
            _ => w.token_lifetime,
        }
    };
    let token = mint_access_token(
        sh,
        &configured,
        &identity.client_id,
        &identity.object_id,
        lifetime,
    );
    let secs = lifetime.as_secs();
    Ok(
        json!({ "token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": token }),
    )
}

async fn issuer_keys(
    sh: &Arc<Shared>,
    issuer: &super::FederatedIssuer,
    kid: Option<&str>,
) -> Result<JwkSet, EntraError> {
    match &issuer.jwks {
        JwksSource::Static(set) => Ok(set.clone()),
        JwksSource::Url {
            url,
            ca_pem,
            bearer_token,
        } => {
            if let Some(set) = sh.jwks_cache.get(&issuer.issuer)
                && (kid.is_none() || set.keys.iter().any(|k| k.common.key_id.as_deref() == kid))
            {
                return Ok(set);
            }
            let set = fetch_jwks(url, ca_pem.as_deref(), bearer_token.as_deref())
                .await
                .map_err(|e| {
                    EntraError::client(
                        50166,
                        format!("Request to External OIDC endpoint failed: fetching {url}: {e}."),
                    )
                })?;
            sh.jwks_cache.put(&issuer.issuer, set.clone());
            Ok(set)
        }
    }
}

async fn fetch_jwks(
    url: &str,
    ca_pem: Option<&str>,
    bearer: Option<&str>,
) -> Result<JwkSet, String> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("bad CA PEM: {e}"))?;
        b = b.tls_certs_only(certs);
    }
    let client = b.build().map_err(|e| e.to_string())?;
    let mut req = client.get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    resp.json::<JwkSet>()
        .await
        .map_err(|e| format!("not a JWKS: {e}"))
}
