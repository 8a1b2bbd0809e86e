//! The official agent's configuration files, written by the controller for `registration: controller`
//! (pure: no IO, except drawing a random key in [`AgentKey::generate`]).
//!
//! The Azure Pipelines agent starts `run` from three files in its folder and runs no `config.sh` when
//! they are there (`ConfigurationStore`, `RSAFileKeyManager`, `OAuthCredential` in
//! microsoft/azure-pipelines-agent):
//!
//! - `.agent`: `AgentSettings` as camelCase JSON, defaults omitted — `agentId`, `agentName`, `poolId`,
//!   `poolName`, `serverUrl`, `workFolder`;
//! - `.credentials`: `CredentialData` — `{"scheme": "OAuth", "data": {"clientId", "authorizationUrl",
//!   "oauthEndpointUrl"}}`, the first two from the registration's answer (`authorization`);
//! - `.credentials_rsaparams`: the private key as `RSAParametersSerializable` — `ContainerName` and the
//!   .NET `RSAParameters` fields `d`, `dp`, `dq`, `exponent`, `inverseQ`, `modulus`, `p`, `q` as base64
//!   big-endian byte arrays; the agent keeps it at mode 0600.
//!
//! With them the listener gets its own OAuth token (a JWT client assertion signed with the key, for the
//! `client_credentials` grant at `oauthEndpointUrl`): no identity of the pod is involved.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;

use crate::ado::models::TaskAgentPublicKey;
use crate::k8s::job::{LABEL_AGENTPOOL, MANAGED_BY};

/// `.agent`.
pub const AGENT_FILE: &str = ".agent";
/// `.credentials`.
pub const CREDENTIALS_FILE: &str = ".credentials";
/// `.credentials_rsaparams`.
pub const RSA_PARAMS_FILE: &str = ".credentials_rsaparams";
/// The three files, in the order the agent needs them.
pub const FILES: [&str; 3] = [AGENT_FILE, CREDENTIALS_FILE, RSA_PARAMS_FILE];
/// The work folder written into `.agent` (the entrypoint puts its own `AZP_WORK` there when it copies).
pub const DEFAULT_WORK_FOLDER: &str = "_work";

/// Why the files cannot be made; the message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentFilesError {
    #[error("cannot generate the agent's RSA key: {0}")]
    Key(String),
    #[error(
        "ADO registered agent {agent:?} but its answer has no authorization.{field}: the server does not support agent OAuth (Azure DevOps Server before 2019?); use spec.registration: agent"
    )]
    NoAuthorization { agent: String, field: &'static str },
    #[error("ADO answered with an authorization.authorizationUrl that is not a URL ({0:?})")]
    BadAuthorizationUrl(String),
}

impl AgentFilesError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentFilesError::Key(_) => "agent_key",
            AgentFilesError::NoAuthorization { .. } => "agent_no_authorization",
            AgentFilesError::BadAuthorizationUrl(_) => "agent_bad_authorization_url",
        }
    }
}

/// A 2048-bit RSA key with the private CRT parameters the agent's key file needs (big-endian, no
/// leading zeros). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey {
    pub modulus: Vec<u8>,
    pub exponent: Vec<u8>,
    pub d: Vec<u8>,
    pub p: Vec<u8>,
    pub q: Vec<u8>,
    pub dp: Vec<u8>,
    pub dq: Vec<u8>,
    pub inverse_q: Vec<u8>,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKey")
            .field("modulus_bits", &(self.modulus.len() * 8))
            .finish_non_exhaustive()
    }
}

impl AgentKey {
    /// A fresh 2048-bit key (aws-lc). It exports PKCS#8, whose PKCS#1 `RSAPrivateKey` holds every CRT
    /// parameter, so no second RSA crate is needed.
    pub fn generate() -> Result<AgentKey, AgentFilesError> {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| AgentFilesError::Key("RSA key generation failed".to_owned()))?;
        let der: Pkcs8V1Der<'_> = pair
            .as_der()
            .map_err(|_| AgentFilesError::Key("cannot export the RSA key".to_owned()))?;
        AgentKey::from_pkcs8(der.as_ref())
    }

    /// The parameters of a PKCS#8 `PrivateKeyInfo` holding an RSA key.
    pub fn from_pkcs8(der: &[u8]) -> Result<AgentKey, AgentFilesError> {
        let bad = |what: &str| AgentFilesError::Key(format!("malformed PKCS#8 RSA key ({what})"));
        let mut info = Der(der).take(0x30).ok_or_else(|| bad("PrivateKeyInfo"))?;
        info.take(0x02).ok_or_else(|| bad("version"))?;
        info.take(0x30).ok_or_else(|| bad("algorithm"))?;
        let mut key = info.take(0x04).ok_or_else(|| bad("privateKey"))?;
        let mut rsa = key.take(0x30).ok_or_else(|| bad("RSAPrivateKey"))?;
        rsa.take(0x02).ok_or_else(|| bad("RSAPrivateKey version"))?;
        let mut int = |name: &str| {
            rsa.take(0x02)
                .map(|d| unsigned(d.0).to_vec())
                .ok_or_else(|| bad(name))
        };
        Ok(AgentKey {
            modulus: int("modulus")?,
            exponent: int("publicExponent")?,
            d: int("privateExponent")?,
            p: int("prime1")?,
            q: int("prime2")?,
            dp: int("exponent1")?,
            dq: int("exponent2")?,
            inverse_q: int("coefficient")?,
        })
    }

    /// The public half, as the registration sends it.
    pub fn public_key(&self) -> TaskAgentPublicKey {
        TaskAgentPublicKey {
            exponent: self.exponent.clone(),
            modulus: self.modulus.clone(),
        }
    }
}

/// A DER cursor: just enough to walk PKCS#8 / PKCS#1 RSA keys.
#[derive(Clone)]
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The content of the next element if it has `tag`; the cursor moves past it.
    fn take(&mut self, tag: u8) -> Option<Der<'a>> {
        let (&t, rest) = self.0.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return None;
        }
        let (content, after) = rest.split_at(len);
        self.0 = after;
        Some(Der(content))
    }
}

fn unsigned(v: &[u8]) -> &[u8] {
    let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[first..]
}

/// What the agent files say besides the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity<'a> {
    pub agent_id: i32,
    pub agent_name: &'a str,
    pub pool_id: i32,
    pub pool_name: &'a str,
    /// The organization (collection) URL, as `config.sh --url` would get it.
    pub server_url: &'a str,
    /// From the registration's answer: `authorization.clientId`.
    pub client_id: Option<&'a str>,
    /// From the registration's answer: `authorization.authorizationUrl`.
    pub authorization_url: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentSettingsFile<'a> {
    agent_id: i32,
    agent_name: &'a str,
    pool_id: i32,
    pool_name: &'a str,
    server_url: &'a str,
    work_folder: &'a str,
}

#[derive(Serialize)]
struct CredentialFile<'a> {
    scheme: &'a str,
    data: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
struct RsaParamsFile {
    #[serde(rename = "ContainerName")]
    container_name: String,
    d: String,
    dp: String,
    dq: String,
    exponent: String,
    #[serde(rename = "inverseQ")]
    inverse_q: String,
    modulus: String,
    p: String,
    q: String,
}

/// The OAuth endpoint the agent asks for tokens (`ConfigurationManager`): the authorization URL itself
/// for Azure DevOps Services, or when it is on the server's scheme, host and port already; otherwise
/// (Azure DevOps Server reached under another name) the authorization URL's path on the server's scheme,
/// host and port.
pub fn oauth_endpoint_url(
    server_url: &str,
    authorization_url: &str,
) -> Result<String, AgentFilesError> {
    let auth = reqwest::Url::parse(authorization_url)
        .map_err(|_| AgentFilesError::BadAuthorizationUrl(authorization_url.to_owned()))?;
    let Ok(server) = reqwest::Url::parse(server_url) else {
        return Ok(auth.to_string());
    };
    let host = server.host_str().unwrap_or_default().to_ascii_lowercase();
    let hosted = host == "dev.azure.com" || host.ends_with(".visualstudio.com");
    let same = server.scheme() == auth.scheme()
        && server.host_str().map(str::to_ascii_lowercase)
            == auth.host_str().map(str::to_ascii_lowercase)
        && server.port_or_known_default() == auth.port_or_known_default();
    if hosted || same {
        return Ok(auth.to_string());
    }
    let mut moved = auth.clone();
    let rebuilt = moved.set_scheme(server.scheme()).is_ok()
        && moved.set_host(server.host_str()).is_ok()
        && moved.set_port(server.port()).is_ok();
    Ok(if rebuilt { moved } else { auth }.to_string())
}

/// The three files' contents (indented JSON, as the agent writes them), by file name.
pub fn agent_files(
    id: &AgentIdentity<'_>,
    key: &AgentKey,
) -> Result<BTreeMap<String, Vec<u8>>, AgentFilesError> {
    let client_id =
        id.client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| AgentFilesError::NoAuthorization {
                agent: id.agent_name.to_owned(),
                field: "clientId",
            })?;
    let authorization_url = id
        .authorization_url
        .filter(|u| !u.is_empty())
        .ok_or_else(|| AgentFilesError::NoAuthorization {
            agent: id.agent_name.to_owned(),
            field: "authorizationUrl",
        })?;
    let settings = AgentSettingsFile {
        agent_id: id.agent_id,
        agent_name: id.agent_name,
        pool_id: id.pool_id,
        pool_name: id.pool_name,
        server_url: id.server_url,
        work_folder: DEFAULT_WORK_FOLDER,
    };
    let credentials = CredentialFile {
        scheme: "OAuth",
        data: BTreeMap::from([
            ("clientId", client_id.to_owned()),
            ("authorizationUrl", authorization_url.to_owned()),
            (
                "oauthEndpointUrl",
                oauth_endpoint_url(id.server_url, authorization_url)?,
            ),
        ]),
    };
    let b64 = |v: &[u8]| STANDARD.encode(v);
    let rsa = RsaParamsFile {
        container_name: String::new(),
        d: b64(&key.d),
        dp: b64(&key.dp),
        dq: b64(&key.dq),
        exponent: b64(&key.exponent),
        inverse_q: b64(&key.inverse_q),
        modulus: b64(&key.modulus),
        p: b64(&key.p),
        q: b64(&key.q),
    };
    Ok(BTreeMap::from([
        (AGENT_FILE.to_owned(), pretty(&settings)),
        (CREDENTIALS_FILE.to_owned(), pretty(&credentials)),
        (RSA_PARAMS_FILE.to_owned(), pretty(&rsa)),
    ]))
}

/// Indented JSON and a newline, as the agent writes its files (strings and numbers only: cannot fail).
fn pretty<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The Secret holding an agent's files, owned by its agent Job (`job_uid`): Kubernetes deletes it with
/// the Job, so the key lives exactly as long as the Job.
pub fn agent_secret(
    name: &str,
    namespace: &str,
    agentpool: &str,
    job_name: &str,
    job_uid: &str,
    files: BTreeMap<String, Vec<u8>>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                (LABEL_AGENTPOOL.to_owned(), agentpool.to_owned()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".to_owned(),
                kind: "Job".to_owned(),
                name: job_name.to_owned(),
                uid: job_uid.to_owned(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        immutable: Some(true),
        data: Some(files.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity<'a>(client_id: Option<&'a str>, url: Option<&'a str>) -> AgentIdentity<'a> {
        AgentIdentity {
            agent_id: 17,
            agent_name: "linux-r42-a1-0a1b2c3d",
            pool_id: 3,
            pool_name: "linux",
            server_url: "https://dev.azure.com/contoso",
            client_id,
            authorization_url: url,
        }
    }

    const AUTH_URL: &str = "https://vstoken.dev.azure.com/0000/_apis/oauth2/token";

    #[test]
    fn generated_key_has_consistent_crt_parameters() {
        let key = AgentKey::generate().unwrap();
        assert_eq!(key.modulus.len(), 256, "2048 bits");
        assert_eq!(key.exponent, vec![1, 0, 1]);
        // The parameters form a valid key: aws-lc checks n = p·q, d, dP, dQ, qInv on import.
        let components = aws_lc_rs::rsa::KeyPairComponents {
            public_key: aws_lc_rs::rsa::PublicKeyComponents {
                n: key.modulus.as_slice(),
                e: key.exponent.as_slice(),
            },
            d: key.d.as_slice(),
            p: key.p.as_slice(),
            q: key.q.as_slice(),
            dP: key.dp.as_slice(),
            dQ: key.dq.as_slice(),
            qInv: key.inverse_q.as_slice(),
        };
        aws_lc_rs::rsa::KeyPair::from_components(&components).expect("a valid RSA key");
        assert_ne!(key, AgentKey::generate().unwrap(), "a fresh key each time");
        assert!(!format!("{key:?}").contains(&STANDARD.encode(&key.d)));
    }

    #[test]
    fn malformed_pkcs8_is_an_error_not_a_panic() {
        for der in [&[][..], &[0x30, 0x82, 0xff][..], &[0x02, 0x01, 0x00][..]] {
            assert!(matches!(
                AgentKey::from_pkcs8(der),
                Err(AgentFilesError::Key(_))
            ));
        }
    }

    #[test]
    fn files_have_the_official_names_and_fields() {
        let key = AgentKey::generate().unwrap();
        let files = agent_files(&identity(Some("cid-1"), Some(AUTH_URL)), &key).unwrap();
        assert_eq!(
            files.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![AGENT_FILE, CREDENTIALS_FILE, RSA_PARAMS_FILE]
        );
        let parse = |name: &str| -> serde_json::Value {
            serde_json::from_slice(&files[name]).expect("JSON")
        };
        assert_eq!(
            parse(AGENT_FILE),
            serde_json::json!({"agentId": 17, "agentName": "linux-r42-a1-0a1b2c3d", "poolId": 3,
                "poolName": "linux", "serverUrl": "https://dev.azure.com/contoso", "workFolder": "_work"})
        );
        assert_eq!(
            parse(CREDENTIALS_FILE),
            serde_json::json!({"scheme": "OAuth", "data": {"clientId": "cid-1",
                "authorizationUrl": AUTH_URL, "oauthEndpointUrl": AUTH_URL}})
        );
        let rsa = parse(RSA_PARAMS_FILE);
        let fields: Vec<&str> = rsa
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = vec![
            "ContainerName",
            "d",
            "dp",
            "dq",
            "exponent",
            "inverseQ",
            "modulus",
            "p",
            "q",
        ];
        want.sort_unstable();
        let mut got = fields.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(rsa["exponent"], "AQAB");
        assert_eq!(rsa["modulus"], STANDARD.encode(&key.modulus));
        assert_eq!(rsa["inverseQ"], STANDARD.encode(&key.inverse_q));
    }

    #[test]
    fn a_registration_answer_without_oauth_data_names_the_field_and_the_fix() {
        let key = AgentKey::generate().unwrap();
        for (cid, url, field) in [
            (None, Some(AUTH_URL), "clientId"),
            (Some(""), Some(AUTH_URL), "clientId"),
            (Some("cid"), None, "authorizationUrl"),
        ] {
            let err = agent_files(&identity(cid, url), &key).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert!(
                err.to_string().contains("spec.registration: agent"),
                "{err}"
            );
        }
    }

    #[test]
    fn oauth_endpoint_follows_the_agents_rule() {
        let cases = [
            // Azure DevOps Services: the authorization URL as it is.
            ("https://dev.azure.com/contoso", AUTH_URL, AUTH_URL),
            (
                "https://contoso.visualstudio.com",
                "https://vssps.dev.azure.com/x/_apis/oauth2/token",
                "https://vssps.dev.azure.com/x/_apis/oauth2/token",
            ),
            // Server on the same scheme/host/port: unchanged.
            (
                "https://tfs.corp:8443/tfs/DefaultCollection",
                "https://tfs.corp:8443/tfs/_apis/oauth2/token",
                "https://tfs.corp:8443/tfs/_apis/oauth2/token",
            ),
            // Server reached under another name than it reports: the path on the configured server.
            (
                "https://tfs.example.com/tfs/DefaultCollection",
                "http://tfs-internal:8080/tfs/_apis/oauth2/token",
                "https://tfs.example.com/tfs/_apis/oauth2/token",
            ),
        ];
        for (server, auth, want) in cases {
            assert_eq!(oauth_endpoint_url(server, auth).unwrap(), want, "{server}");
        }
        assert!(matches!(
            oauth_endpoint_url("https://dev.azure.com/x", "not a url"),
            Err(AgentFilesError::BadAuthorizationUrl(_))
        ));
    }

    #[test]
    fn the_secret_is_owned_by_its_job_and_labelled_ours() {
        let s = agent_secret(
            "linux-r42-a1-agent",
            "ci",
            "linux",
            "linux-r42-a1",
            "uid-9",
            BTreeMap::from([(AGENT_FILE.to_owned(), b"{}".to_vec())]),
        );
        let owners = s.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (
                owners[0].kind.as_str(),
                owners[0].name.as_str(),
                owners[0].uid.as_str()
            ),
            ("Job", "linux-r42-a1", "uid-9")
        );
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels.get(MANAGED_BY.0).map(String::as_str),
            Some(MANAGED_BY.1)
        );
        assert_eq!(
            labels.get(LABEL_AGENTPOOL).map(String::as_str),
            Some("linux")
        );
        assert_eq!(s.immutable, Some(true));
        assert!(s.data.unwrap().contains_key(AGENT_FILE));
    }
}
