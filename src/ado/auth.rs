//! Tokens for Azure DevOps: workload identity (the default), a PAT file (Azure DevOps Server opt-in),
//! the Azure CLI login (for `plan` outside a cluster), or a fixed token (tests, tools).
//!
//! [`TokenSource::token`] serves a cached token until shortly before it expires;
//! [`TokenSource::fresh_token`] always performs a new exchange (the agent entrypoint uses it at
//! deregistration, after a job that may have outlived the first token).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;
use reqwest::header::HeaderValue;

use super::observer::{AdoObserver, NoopObserver, TokenEvent};
use crate::tls::{self, TlsError};

/// The Entra scope of Azure DevOps.
pub const ADO_SCOPE: &str = "499b84ac-1321-427f-aa17-267ca6975798/.default";

/// Entra's public-cloud authority, used when `AZURE_AUTHORITY_HOST` is unset.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

const POD_HINT: &str = "the pod is not labelled `azure.workload.identity/use: \"true\"` or its \
ServiceAccount lacks `azure.workload.identity/client-id` (outside Kubernetes, set AZURE_CLIENT_ID, \
AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE)";

/// Why no token could be obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Workload-identity environment missing.
    #[error("workload identity is not configured: {} not set; {POD_HINT}", vars.join(", "))]
    MissingEnv {
        /// The missing variables.
        vars: Vec<&'static str>,
    },

    /// The federated (service-account) token file cannot be read.
    #[error(
        "cannot read the federated token file {path} (AZURE_FEDERATED_TOKEN_FILE): {source}; the \
         workload-identity webhook mounts it in labelled pods; check the volume and that the file is \
         readable by this user"
    )]
    TokenFileUnreadable {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },

    /// The federated token file is empty.
    #[error(
        "the federated token file {path} (AZURE_FEDERATED_TOKEN_FILE) is empty; the projected service-account token was not written"
    )]
    TokenFileEmpty {
        /// The file.
        path: PathBuf,
    },

    /// Entra answered with an error.
    #[error("Entra refused the token exchange for client {client_id}{}: {description}{}",
        aadsts.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
        hint.map(|h| format!("; {h}")).unwrap_or_default())]
    Entra {
        /// The client id.
        client_id: String,
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// `AADSTS…` code(s), when given.
        aadsts: Option<String>,
        /// Entra's description.
        description: String,
        /// What usually fixes this code.
        hint: Option<&'static str>,
    },

    /// The Entra token endpoint could not be reached or failed (network, 5xx, timeout).
    #[error(
        "cannot obtain a token from Entra at {authority}: {detail}; this is transient, retrying later"
    )]
    EntraUnavailable {
        /// The authority host.
        authority: String,
        /// What happened.
        detail: String,
    },

    /// The PAT file cannot be read.
    #[error("cannot read the PAT file {path}: {source}; mount the Secret holding the PAT there")]
    PatFileUnreadable {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },

    /// The PAT file is empty.
    #[error("the PAT file {path} is empty; the Secret must hold the personal access token")]
    PatFileEmpty {
        /// The file.
        path: PathBuf,
    },

    /// The Azure CLI login failed.
    #[error(
        "cannot get a token from the Azure CLI login: {detail}; run `az login` (and `az account set`) first"
    )]
    AzureCli {
        /// What the CLI said.
        detail: String,
    },

    /// A setting is wrong.
    #[error("invalid token configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// The HTTPS client could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl AuthError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::MissingEnv { .. } => "auth_missing_env",
            AuthError::TokenFileUnreadable { .. } => "auth_token_file_unreadable",
            AuthError::TokenFileEmpty { .. } => "auth_token_file_empty",
            AuthError::Entra { .. } => "auth_entra_rejected",
            AuthError::EntraUnavailable { .. } => "auth_entra_unavailable",
            AuthError::PatFileUnreadable { .. } => "auth_pat_file_unreadable",
            AuthError::PatFileEmpty { .. } => "auth_pat_file_empty",
            AuthError::AzureCli { .. } => "auth_azure_cli",
            AuthError::Config { .. } => "auth_config",
            AuthError::Tls(e) => e.metric_label(),
        }
    }

    /// Whether trying again later may succeed on its own (Entra down, throttled or slow).
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::EntraUnavailable { .. } => true,
            AuthError::Entra { status, .. } => matches!(status, Some(s) if *s == 429 || *s >= 500),
            _ => false,
        }
    }

    /// The `AADSTS…` code of an Entra refusal.
    pub fn aadsts(&self) -> Option<&str> {
        match self {
            AuthError::Entra { aadsts, .. } => aadsts.as_deref(),
            _ => None,
        }
    }
}

/// How the token goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    /// `Authorization: Bearer <token>` (Entra access tokens).
    Bearer,
    /// `Authorization: Basic base64(":<pat>")` (personal access tokens).
    Basic,
}

/// A token for Azure DevOps. Its `Debug` and `Display` never show the secret.
#[derive(Clone)]
pub struct AccessToken {
    secret: String,
    scheme: AuthScheme,
    expires_at: Option<Timestamp>,
    /// When the cache should obtain a new one.
    refresh_at: Option<Instant>,
}

impl AccessToken {
    /// A token with the given scheme and lifetime (`None`: does not expire).
    pub fn new(secret: impl Into<String>, scheme: AuthScheme, lifetime: Option<Duration>) -> Self {
        let now = Instant::now();
        let expires_at = lifetime.and_then(|l| {
            jiff::SignedDuration::try_from(l)
                .ok()
                .and_then(|d| Timestamp::now().checked_add(d).ok())
        });
        Self {
            secret: secret.into(),
            scheme,
            expires_at,
            refresh_at: lifetime.map(|l| now + l.saturating_sub(refresh_margin(l))),
        }
    }

    /// The secret itself: pass it only where it must go (an `Authorization` header, the agent's
    /// `VSTS_AGENT_INPUT_TOKEN`), never to argv or logs.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// Bearer or Basic.
    pub fn scheme(&self) -> AuthScheme {
        self.scheme
    }

    /// When it expires, if known.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.expires_at
    }

    /// The `Authorization` header value, marked sensitive (never logged by the HTTP stack).
    pub fn authorization_header(&self) -> Result<HeaderValue, AuthError> {
        let text = match self.scheme {
            AuthScheme::Bearer => format!("Bearer {}", self.secret),
            AuthScheme::Basic => format!("Basic {}", STANDARD.encode(format!(":{}", self.secret))),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| AuthError::Config {
            field: "token",
            reason: "the token holds characters not allowed in an HTTP header (a stray newline or \
                     control character in the file?)"
                .into(),
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn needs_refresh(&self) -> bool {
        self.refresh_at.is_some_and(|at| Instant::now() >= at)
    }
}

/// Refresh a token when less than a fifth of its lifetime (at most 5 minutes) is left.
fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(300))
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("scheme", &self.scheme)
            .field("expires_at", &self.expires_at)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.expires_at {
            Some(t) => write!(f, "{:?} token (redacted, expires {t})", self.scheme),
            None => write!(f, "{:?} token (redacted)", self.scheme),
        }
    }
}

/// Settings of the workload-identity exchange.
#[derive(Debug, Clone)]
pub struct WorkloadIdentityConfig {
    /// The Entra application / managed identity client id (`AZURE_CLIENT_ID`, or an override).
    pub client_id: String,
    /// The tenant (`AZURE_TENANT_ID`).
    pub tenant_id: String,
    /// The projected service-account token (`AZURE_FEDERATED_TOKEN_FILE`), re-read at every exchange.
    pub token_file: PathBuf,
    /// The authority (`AZURE_AUTHORITY_HOST`, default [`DEFAULT_AUTHORITY_HOST`]); must be HTTPS.
    pub authority_host: String,
    /// The scope (default [`ADO_SCOPE`]).
    pub scope: String,
    /// Retries of a failed exchange inside one call (5xx, 429, network), instead of the SDK's ~80 s.
    pub max_retries: u32,
    /// Upper bound of one exchange, retries included.
    pub timeout: Duration,
}

impl WorkloadIdentityConfig {
    /// The key of this identity for sharing one client per (organization, identity); equal to
    /// [`TokenSource::identity_key`] of a source built from this configuration.
    pub fn identity_key(&self) -> String {
        format!("wi:{}:{}", self.tenant_id, self.client_id)
    }

    /// From the process environment; `client_id` overrides `AZURE_CLIENT_ID` when given.
    pub fn from_env(client_id: Option<&str>) -> Result<Self, AuthError> {
        Self::from_lookup(client_id, |k| std::env::var(k).ok())
    }

    /// From any variable lookup (tests, or settings read elsewhere).
    pub fn from_lookup(
        client_id: Option<&str>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let client = client_id
            .map(str::to_owned)
            .filter(|c| !c.trim().is_empty())
            .or_else(|| get("AZURE_CLIENT_ID"));
        let tenant = get("AZURE_TENANT_ID");
        let file = get("AZURE_FEDERATED_TOKEN_FILE");
        let mut missing = Vec::new();
        if client.is_none() {
            missing.push("AZURE_CLIENT_ID");
        }
        if tenant.is_none() {
            missing.push("AZURE_TENANT_ID");
        }
        if file.is_none() {
            missing.push("AZURE_FEDERATED_TOKEN_FILE");
        }
        match (client, tenant, file) {
            (Some(client_id), Some(tenant_id), Some(file)) => Ok(Self {
                client_id: client_id.trim().to_owned(),
                tenant_id: tenant_id.trim().to_owned(),
                token_file: PathBuf::from(file),
                authority_host: get("AZURE_AUTHORITY_HOST")
                    .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned()),
                scope: ADO_SCOPE.to_owned(),
                max_retries: 2,
                timeout: Duration::from_secs(20),
            }),
            _ => Err(AuthError::MissingEnv { vars: missing }),
        }
    }
}

/// Where tokens come from. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    cache: tokio::sync::Mutex<Option<AccessToken>>,
    observer: RwLock<Arc<dyn AdoObserver>>,
}

enum Kind {
    WorkloadIdentity {
        config: WorkloadIdentityConfig,
        transport: azure_core::http::Transport,
    },
    PatFile {
        path: PathBuf,
    },
    AzureCli {
        credential: Arc<azure_identity::AzureCliCredential>,
    },
    Fixed {
        token: AccessToken,
        name: Option<String>,
    },
}

/// How long a PAT read from its file is reused before the file is read again (Secret rotation).
const PAT_REREAD: Duration = Duration::from_secs(60);

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Workload identity: exchanges the federated token file for an Entra token. The file is read at
    /// every exchange; the exchange's HTTPS client trusts what [`tls::http_client_builder`] trusts.
    pub fn workload_identity(config: WorkloadIdentityConfig) -> Result<Self, AuthError> {
        if config.client_id.is_empty() {
            return Err(AuthError::MissingEnv {
                vars: vec!["AZURE_CLIENT_ID"],
            });
        }
        let authority =
            reqwest::Url::parse(&config.authority_host).map_err(|e| AuthError::Config {
                field: "AZURE_AUTHORITY_HOST",
                reason: format!("`{}` is not a URL: {e}", config.authority_host),
            })?;
        if authority.scheme() != "https" {
            return Err(AuthError::Config {
                field: "AZURE_AUTHORITY_HOST",
                reason: format!("`{}` must be an https:// URL", config.authority_host),
            });
        }
        let client = tls::http_client_builder()?
            .timeout(config.timeout)
            .build()
            .map_err(|e| TlsError::Client(error_chain(&e)))?;
        let transport = azure_core::http::Transport::new(Arc::new(client));
        Ok(Self::from_kind(Kind::WorkloadIdentity {
            config,
            transport,
        }))
    }

    /// Workload identity from the process environment (`client_id` overrides `AZURE_CLIENT_ID`).
    pub fn workload_identity_from_env(client_id: Option<&str>) -> Result<Self, AuthError> {
        Self::workload_identity(WorkloadIdentityConfig::from_env(client_id)?)
    }

    /// A personal access token read from a file (a mounted Secret), sent as Basic. For Azure DevOps
    /// Server only, as an explicit opt-in. A trailing newline is trimmed.
    pub fn pat_file(path: impl Into<PathBuf>) -> Self {
        Self::from_kind(Kind::PatFile { path: path.into() })
    }

    /// The user's Azure CLI login (`az account get-access-token`), for `plan` outside a cluster.
    pub fn azure_cli() -> Result<Self, AuthError> {
        Self::azure_cli_with(azure_identity::AzureCliCredentialOptions::default())
    }

    /// The Azure CLI login with options: a tenant or subscription other than the CLI's default, or
    /// another [`azure_identity::Executor`] to run `az` with.
    pub fn azure_cli_with(
        options: azure_identity::AzureCliCredentialOptions,
    ) -> Result<Self, AuthError> {
        let credential = azure_identity::AzureCliCredential::new(Some(options)).map_err(|e| {
            AuthError::AzureCli {
                detail: error_chain(&e),
            }
        })?;
        Ok(Self::from_kind(Kind::AzureCli { credential }))
    }

    /// A fixed token (tests and tools that already hold one).
    pub fn fixed(token: AccessToken) -> Self {
        Self::from_kind(Kind::Fixed { token, name: None })
    }

    /// A fixed token, with what error messages should call its identity (e.g. `the PAT in Secret
    /// ns/name`).
    pub fn fixed_named(token: AccessToken, identity: impl Into<String>) -> Self {
        Self::from_kind(Kind::Fixed {
            token,
            name: Some(identity.into()),
        })
    }

    fn from_kind(kind: Kind) -> Self {
        Self {
            inner: Arc::new(Inner {
                kind,
                cache: tokio::sync::Mutex::new(None),
                observer: RwLock::new(Arc::new(NoopObserver)),
            }),
        }
    }

    /// Report token refreshes and failures to `observer` (shared by every clone).
    pub fn set_observer(&self, observer: Arc<dyn AdoObserver>) {
        if let Ok(mut slot) = self.inner.observer.write() {
            *slot = observer;
        }
    }

    /// Builder form of [`TokenSource::set_observer`].
    pub fn with_observer(self, observer: Arc<dyn AdoObserver>) -> Self {
        self.set_observer(observer);
        self
    }

    /// Who the tokens are for, for messages: e.g. `workload identity 0000-…`.
    pub fn identity(&self) -> String {
        match &self.inner.kind {
            Kind::WorkloadIdentity { config, .. } => {
                format!("workload identity {}", config.client_id)
            }
            Kind::PatFile { path } => format!("the PAT in {}", path.display()),
            Kind::AzureCli { .. } => "the Azure CLI login".to_owned(),
            Kind::Fixed { name, .. } => name
                .clone()
                .unwrap_or_else(|| "the identity of the given token".to_owned()),
        }
    }

    /// A stable key of the identity, for sharing rate-limit state per (organization, identity).
    pub fn identity_key(&self) -> String {
        match &self.inner.kind {
            Kind::WorkloadIdentity { config, .. } => config.identity_key(),
            Kind::PatFile { path } => format!("pat:{}", path.display()),
            Kind::AzureCli { .. } => "azure-cli".to_owned(),
            // Two sources holding the same token are the same identity; the key holds a hash only.
            Kind::Fixed { token, .. } => {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                token.secret.hash(&mut h);
                format!("fixed:{:?}:{:016x}", token.scheme, h.finish())
            }
        }
    }

    /// A stable label of the kind of source.
    pub fn source_label(&self) -> &'static str {
        match &self.inner.kind {
            Kind::WorkloadIdentity { .. } => "workload_identity",
            Kind::PatFile { .. } => "pat",
            Kind::AzureCli { .. } => "azure_cli",
            Kind::Fixed { .. } => "static",
        }
    }

    /// A token, from the cache while it has more than a fifth of its lifetime (at most 5 min) left.
    pub async fn token(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.inner.cache.lock().await;
        if let Some(token) = cache.as_ref().filter(|t| !t.needs_refresh()) {
            return Ok(token.clone());
        }
        let token = self.acquire().await?;
        *cache = Some(token.clone());
        Ok(token)
    }

    /// A new token from a new exchange (never the cache); it also replaces the cached one.
    pub async fn fresh_token(&self) -> Result<AccessToken, AuthError> {
        let mut cache = self.inner.cache.lock().await;
        let token = self.acquire().await?;
        *cache = Some(token.clone());
        Ok(token)
    }

    /// Forget the cached token (after ADO answered 401 to it).
    pub async fn invalidate(&self) {
        *self.inner.cache.lock().await = None;
    }

    async fn acquire(&self) -> Result<AccessToken, AuthError> {
        let started = Instant::now();
        let result = match &self.inner.kind {
            Kind::WorkloadIdentity { config, transport } => {
                exchange_workload_identity(config, transport).await
            }
            Kind::PatFile { path } => read_pat(path).await,
            Kind::AzureCli { credential } => azure_cli_token(credential).await,
            Kind::Fixed { token, .. } => Ok(token.clone()),
        };
        let observer = self
            .inner
            .observer
            .read()
            .map(|o| Arc::clone(&o))
            .unwrap_or_else(|_| Arc::new(NoopObserver));
        match &result {
            Ok(_) => observer.on_token(&TokenEvent::Refreshed {
                source: self.source_label(),
                latency: started.elapsed(),
            }),
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(source = self.source_label(), error = %message, "token acquisition failed");
                observer.on_token(&TokenEvent::Failed {
                    source: self.source_label(),
                    label: e.metric_label(),
                    message: &message,
                });
            }
        }
        result
    }
}

/// The federated token as a client assertion. Read fresh before every exchange.
struct FederatedAssertion(String);

impl fmt::Debug for FederatedAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FederatedAssertion(<redacted>)")
    }
}

#[async_trait::async_trait]
impl azure_identity::ClientAssertion for FederatedAssertion {
    async fn secret(
        &self,
        _: Option<azure_core::http::ClientMethodOptions<'_>>,
    ) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

async fn read_trimmed(path: &Path) -> std::io::Result<String> {
    let text = tokio::fs::read_to_string(path).await?;
    Ok(text.trim().to_owned())
}

async fn exchange_workload_identity(
    config: &WorkloadIdentityConfig,
    transport: &azure_core::http::Transport,
) -> Result<AccessToken, AuthError> {
    // Read the projected token at every exchange: kubelet rotates it, and the SDK's own credential
    // would keep a copy for ten minutes.
    let assertion = read_trimmed(&config.token_file).await.map_err(|source| {
        AuthError::TokenFileUnreadable {
            path: config.token_file.clone(),
            source,
        }
    })?;
    if assertion.is_empty() {
        return Err(AuthError::TokenFileEmpty {
            path: config.token_file.clone(),
        });
    }

    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = config.authority_host.clone();
    let mut client_options = azure_core::http::ClientOptions {
        transport: Some(transport.clone()),
        cloud: Some(Arc::new(cloud.into())),
        ..Default::default()
    };
    client_options.retry = if config.max_retries == 0 {
        azure_core::http::RetryOptions::none()
    } else {
        azure_core::http::RetryOptions::exponential(azure_core::http::ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: config.max_retries,
            max_total_elapsed: azure_core::time::Duration::try_from(config.timeout)
                .unwrap_or(azure_core::time::Duration::seconds(20)),
            max_delay: azure_core::time::Duration::seconds(2),
        })
    };
    let options = azure_identity::ClientAssertionCredentialOptions { client_options };
    // A new credential per exchange: the SDK's credential caches tokens with no way to bypass it,
    // and `fresh_token` must really exchange. It is cheap (the transport is shared).
    let credential = azure_identity::ClientAssertionCredential::new(
        config.tenant_id.clone(),
        config.client_id.clone(),
        FederatedAssertion(assertion),
        Some(options),
    )
    .map_err(|e| AuthError::Config {
        field: "AZURE_TENANT_ID / AZURE_CLIENT_ID",
        reason: error_chain(&e),
    })?;

    let result = tokio::time::timeout(
        config.timeout,
        credential.get_token(&[config.scope.as_str()], None),
    )
    .await;
    let token = match result {
        Err(_) => {
            return Err(AuthError::EntraUnavailable {
                authority: config.authority_host.clone(),
                detail: format!("no answer within {}s", config.timeout.as_secs_f64()),
            });
        }
        Ok(Err(e)) => return Err(map_entra_error(config, &e)),
        Ok(Ok(token)) => token,
    };
    let now = azure_core::time::OffsetDateTime::now_utc();
    let lifetime = (token.expires_on - now).max(azure_core::time::Duration::ZERO);
    let lifetime = Duration::try_from(lifetime).unwrap_or_default();
    Ok(AccessToken::new(
        token.token.secret(),
        AuthScheme::Bearer,
        Some(lifetime),
    ))
}

/// Finds the HTTP answer in an azure_core error chain and turns it into an explained error.
fn map_entra_error(config: &WorkloadIdentityConfig, err: &azure_core::Error) -> AuthError {
    use azure_core::error::ErrorKind;
    let mut current = err;
    loop {
        match current.kind() {
            ErrorKind::HttpResponse {
                status, error_code, ..
            } => {
                let status = u16::from(*status);
                let description = current.to_string();
                let aadsts = aadsts_code(error_code.as_deref(), &description);
                if status == 429 || status >= 500 {
                    return AuthError::EntraUnavailable {
                        authority: config.authority_host.clone(),
                        detail: format!("HTTP {status}: {}", excerpt(&description, 300)),
                    };
                }
                return AuthError::Entra {
                    client_id: config.client_id.clone(),
                    status: Some(status),
                    hint: aadsts.as_deref().and_then(aadsts_hint),
                    aadsts,
                    description: excerpt(&description, 600),
                };
            }
            ErrorKind::Connection | ErrorKind::Io => {
                return AuthError::EntraUnavailable {
                    authority: config.authority_host.clone(),
                    detail: error_chain(err),
                };
            }
            _ => {}
        }
        match current.downcast_ref::<azure_core::Error>() {
            Some(inner) => current = inner,
            None => break,
        }
    }
    // No HTTP status found: an unparseable answer, or a failure before sending.
    let detail = error_chain(err);
    let aadsts = aadsts_code(None, &detail);
    if aadsts.is_some() {
        return AuthError::Entra {
            client_id: config.client_id.clone(),
            status: None,
            hint: aadsts.as_deref().and_then(aadsts_hint),
            aadsts,
            description: excerpt(&detail, 600),
        };
    }
    AuthError::EntraUnavailable {
        authority: config.authority_host.clone(),
        detail,
    }
}

/// `AADSTS<digits>` from Entra's `error_codes` (joined by the SDK) or from the description.
fn aadsts_code(error_code: Option<&str>, description: &str) -> Option<String> {
    if let Some(start) = description.find("AADSTS") {
        let digits: String = description[start + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if !digits.is_empty() {
            return Some(format!("AADSTS{digits}"));
        }
    }
    let codes = error_code?
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
        .map(|c| format!("AADSTS{c}"))
        .collect::<Vec<_>>();
    (!codes.is_empty()).then(|| codes.join(","))
}

/// What usually fixes a given Entra error.
fn aadsts_hint(code: &str) -> Option<&'static str> {
    let first = code.split(',').next().unwrap_or(code);
    Some(match first {
        "AADSTS70021" | "AADSTS700211" | "AADSTS700212" | "AADSTS700213" | "AADSTS700222" => {
            "no federated identity credential matches this token: on the managed identity or app \
             registration add one with the cluster's OIDC issuer URL, subject \
             `system:serviceaccount:<namespace>:<serviceaccount>` and audience `api://AzureADTokenExchange`"
        }
        "AADSTS700016" | "AADSTS700038" | "AADSTS7000215" => {
            "the client id is not an application or managed identity of this tenant: check \
             AZURE_CLIENT_ID (the ServiceAccount's `azure.workload.identity/client-id` annotation) and \
             AZURE_TENANT_ID"
        }
        "AADSTS90002" | "AADSTS900023" => "the tenant does not exist: check AZURE_TENANT_ID",
        "AADSTS700024" | "AADSTS700027" | "AADSTS50027" => {
            "the federated token is expired or invalid: the projected service-account token must be \
             fresh (kubelet rotates it) and signed by the cluster's issuer"
        }
        "AADSTS70011" | "AADSTS1002012" => {
            "invalid scope: Azure DevOps needs `499b84ac-1321-427f-aa17-267ca6975798/.default`"
        }
        _ => return None,
    })
}

async fn read_pat(path: &Path) -> Result<AccessToken, AuthError> {
    let pat = read_trimmed(path)
        .await
        .map_err(|source| AuthError::PatFileUnreadable {
            path: path.to_owned(),
            source,
        })?;
    if pat.is_empty() {
        return Err(AuthError::PatFileEmpty {
            path: path.to_owned(),
        });
    }
    let mut token = AccessToken::new(pat, AuthScheme::Basic, None);
    token.refresh_at = Some(Instant::now() + PAT_REREAD);
    Ok(token)
}

async fn azure_cli_token(
    credential: &azure_identity::AzureCliCredential,
) -> Result<AccessToken, AuthError> {
    let token = credential
        .get_token(&[ADO_SCOPE], None)
        .await
        .map_err(|e| AuthError::AzureCli {
            detail: error_chain(&e),
        })?;
    let now = azure_core::time::OffsetDateTime::now_utc();
    let lifetime = (token.expires_on - now).max(azure_core::time::Duration::ZERO);
    Ok(AccessToken::new(
        token.token.secret(),
        AuthScheme::Bearer,
        Some(Duration::try_from(lifetime).unwrap_or_default()),
    ))
}

/// An error with its causes, on one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// At most `max` characters of `text`, on char boundaries.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_env_names_every_variable_and_the_pod_label() {
        let err = WorkloadIdentityConfig::from_lookup(None, |_| None).unwrap_err();
        let msg = err.to_string();
        for var in [
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
        ] {
            assert!(msg.contains(var), "{msg}");
        }
        assert!(
            msg.contains("azure.workload.identity/use: \"true\""),
            "{msg}"
        );
        assert!(msg.contains("azure.workload.identity/client-id"), "{msg}");
        assert_eq!(err.metric_label(), "auth_missing_env");
    }

    #[test]
    fn client_id_override_wins_and_authority_defaults() {
        let env = |k: &str| match k {
            "AZURE_CLIENT_ID" => Some("from-env".to_owned()),
            "AZURE_TENANT_ID" => Some("t".to_owned()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some("/f".to_owned()),
            _ => None,
        };
        let cfg = WorkloadIdentityConfig::from_lookup(Some("override"), env).unwrap();
        assert_eq!(cfg.client_id, "override");
        assert_eq!(cfg.authority_host, DEFAULT_AUTHORITY_HOST);
        assert_eq!(cfg.scope, ADO_SCOPE);
        let cfg = WorkloadIdentityConfig::from_lookup(None, env).unwrap();
        assert_eq!(cfg.client_id, "from-env");
    }

    #[test]
    fn token_debug_and_display_hide_the_secret() {
        let t = AccessToken::new(
            "s3cr3t-value",
            AuthScheme::Bearer,
            Some(Duration::from_secs(3600)),
        );
        assert!(!format!("{t:?}").contains("s3cr3t"));
        assert!(!format!("{t}").contains("s3cr3t"));
        assert_eq!(t.expose_secret(), "s3cr3t-value");
        let header = t.authorization_header().unwrap();
        assert!(header.is_sensitive());
        assert_eq!(header.to_str().unwrap(), "Bearer s3cr3t-value");
    }

    #[test]
    fn basic_header_is_colon_pat() {
        let t = AccessToken::new("pat", AuthScheme::Basic, None);
        let expected = format!("Basic {}", STANDARD.encode(":pat"));
        assert_eq!(
            t.authorization_header().unwrap().to_str().unwrap(),
            expected
        );
    }

    #[test]
    fn refresh_margin_is_a_fifth_up_to_five_minutes() {
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(12)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        let expired = AccessToken::new("x", AuthScheme::Bearer, Some(Duration::ZERO));
        assert!(expired.needs_refresh());
        let long = AccessToken::new("x", AuthScheme::Bearer, Some(Duration::from_secs(3600)));
        assert!(!long.needs_refresh());
    }

    #[test]
    fn aadsts_codes_from_description_or_error_codes() {
        assert_eq!(
            aadsts_code(
                None,
                "AADSTS700213: No matching federated identity record found"
            )
            .as_deref(),
            Some("AADSTS700213")
        );
        assert_eq!(
            aadsts_code(Some("700016"), "text").as_deref(),
            Some("AADSTS700016")
        );
        assert_eq!(aadsts_code(Some("abc"), "text"), None);
        assert!(
            aadsts_hint("AADSTS700213")
                .unwrap()
                .contains("federated identity credential")
        );
        assert!(aadsts_hint("AADSTS12345").is_none());
    }

    #[tokio::test]
    async fn pat_file_is_trimmed_and_missing_file_is_explained() {
        let dir = std::env::temp_dir().join(format!("azp-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pat");
        std::fs::write(&path, "abc123\n").unwrap();
        let source = TokenSource::pat_file(&path);
        let token = source.token().await.unwrap();
        assert_eq!(token.expose_secret(), "abc123");
        assert_eq!(token.scheme(), AuthScheme::Basic);

        let missing = TokenSource::pat_file(dir.join("nope"));
        let err = missing.token().await.unwrap_err();
        assert_eq!(err.metric_label(), "auth_pat_file_unreadable");
        assert!(err.to_string().contains("nope"));

        std::fs::write(&path, "\n").unwrap();
        let err = TokenSource::pat_file(&path).token().await.unwrap_err();
        assert_eq!(err.metric_label(), "auth_pat_file_empty");
    }

    #[test]
    fn authority_must_be_https() {
        let cfg = WorkloadIdentityConfig {
            client_id: "c".into(),
            tenant_id: "t".into(),
            token_file: "/f".into(),
            authority_host: "http://login.example".into(),
            scope: ADO_SCOPE.into(),
            max_retries: 0,
            timeout: Duration::from_secs(1),
        };
        let err = TokenSource::workload_identity(cfg).unwrap_err();
        assert!(err.to_string().contains("AZURE_AUTHORITY_HOST"), "{err}");
    }
}
