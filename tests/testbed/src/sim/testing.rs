//! Helpers for tests that talk to the simulator: a federated-token issuer with a static JWKS (stands
//! in for the kube-apiserver's service-account issuer), and an agent RSA key that signs the agent's
//! OAuth client assertion the way the official agent does. Keys are generated at run time.

use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::entra::{SigningKeys, now_unix};
use super::{FEDERATED_AUDIENCE, FederatedIssuer, JwksSource, SimError};

/// Signs Kubernetes-style service-account tokens with its own RSA key.
pub struct TestIssuer {
    pub issuer: String,
    keys: SigningKeys,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// A new issuer with a fresh RSA-2048 key.
    pub fn new(issuer: impl Into<String>) -> Result<Self, SimError> {
        let issuer = issuer.into();
        let kid = format!("kid-{}", uuid::Uuid::new_v4().simple());
        Ok(TestIssuer {
            issuer,
            keys: SigningKeys::generate(&kid)?,
        })
    }

    /// The public keys, as the kube-apiserver serves them at `/openid/v1/jwks`.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.keys.jwk.clone()],
        }
    }

    /// This issuer as Entra trusts it (static JWKS).
    pub fn federated_issuer(&self) -> FederatedIssuer {
        FederatedIssuer {
            issuer: self.issuer.clone(),
            jwks: JwksSource::Static(self.jwks()),
        }
    }

    /// A service-account token for `system:serviceaccount:<namespace>:<sa>` with audience
    /// `api://AzureADTokenExchange`, valid for `lifetime`.
    pub fn sa_token(&self, namespace: &str, sa: &str, lifetime: Duration) -> String {
        let now = now_unix();
        self.sign(&json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "aud": [FEDERATED_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
            "kubernetes.io": { "namespace": namespace, "serviceaccount": { "name": sa, "uid": uuid::Uuid::new_v4().to_string() } },
        }))
    }

    /// Signs arbitrary claims (for tests of wrong audience, expiry, issuer …).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(self.keys.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.keys.encoding).unwrap_or_default()
    }
}

/// An agent's RSA key pair: the public half goes into the registration, the private half signs
/// the client assertion for the agent's OAuth token.
pub struct AgentKey {
    encoding: EncodingKey,
    modulus: Vec<u8>,
    exponent: Vec<u8>,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKey").finish_non_exhaustive()
    }
}

impl AgentKey {
    /// A fresh RSA-2048 key.
    pub fn new() -> Result<Self, SimError> {
        let k = SigningKeys::generate("agent")?;
        let AlgorithmParameters::RSA(rsa) = &k.jwk.algorithm else {
            return Err(SimError::InvalidSpec(
                "generated agent key is not RSA".into(),
            ));
        };
        let d = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap_or_default()
        };
        Ok(AgentKey {
            modulus: d(&rsa.n),
            exponent: d(&rsa.e),
            encoding: k.encoding,
        })
    }

    /// `{"exponent": b64, "modulus": b64}` as `authorization.publicKey` of a registration.
    pub fn public_key_json(&self) -> Value {
        let b = base64::engine::general_purpose::STANDARD;
        json!({ "exponent": b.encode(&self.exponent), "modulus": b.encode(&self.modulus) })
    }

    /// The client assertion for the agent's OAuth token (iss = sub = client id, aud = the
    /// authorization URL), valid for five minutes.
    pub fn client_assertion(&self, client_id: &str, authorization_url: &str) -> String {
        let now = now_unix();
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": authorization_url,
            "nbf": now - 30,
            "iat": now,
            "exp": now + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}
