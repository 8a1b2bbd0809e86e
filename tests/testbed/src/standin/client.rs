//! HTTP to the (simulated) ADO service, as the agent's `TaskAgentHttpClient` does it: `api-version` on every
//! call, PAT as Basic `VstsAgent:<token>` during configuration, the agent's own OAuth token (Bearer) when
//! listening; ADO error bodies (`typeKey`, `message`) surfaced; transient failures retried like the VSS HTTP
//! retry handler (`VssHttpRetryOptions`: 502/503/504 and connection failures, `VSTS_HTTP_RETRY` retries clamped
//! to 3..=10 as the agent's `VssUtil` does, a 10 s minimum backoff; `VSTS_HTTP_TIMEOUT` clamped to
//! 100..=1200 s). Trusts the system roots plus `SSL_CERT_FILE`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, StatusCode};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use super::{Context, StandinError};

/// api-version for the public, versioned resources (pools, agents).
pub const API_VERSION: &str = "7.1";
/// api-version for the agent-internal resources (sessions, messages, job requests).
pub const API_VERSION_PREVIEW: &str = "7.1-preview.1";

/// How calls authenticate.
#[derive(Clone)]
pub enum Auth {
    /// `--auth pat`: `Basic base64("VstsAgent:<token>")` (`VssBasicCredential("VstsAgent", token)`).
    Pat(String),
    /// The agent's OAuth access token.
    Bearer(String),
    None,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Pat(_) => "Pat(***)",
            Auth::Bearer(_) => "Bearer(***)",
            Auth::None => "None",
        })
    }
}

/// A client for one organization URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The organization URL without a trailing slash.
    pub org: String,
    retries: u32,
    retry_backoff: Duration,
}

/// One response: status and JSON body (`Value::Null` when empty).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Value,
}

impl Client {
    pub fn new(ctx: &Context, org: &str) -> Result<Self, StandinError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!(
                "VSServices/stand-in azp-testbed/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(Duration::from_secs(10))
            // The VSS client's default HTTP timeout is 100 s (VSTS_HTTP_TIMEOUT); long polls stay below it.
            .timeout(Duration::from_secs(
                ctx.var("VSTS_HTTP_TIMEOUT")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100u64)
                    .clamp(100, 1200),
            ));
        if let Some(file) = ctx.var("SSL_CERT_FILE") {
            let bytes = std::fs::read(file)
                .map_err(|e| StandinError::Tls(format!("cannot read SSL_CERT_FILE {file}: {e}")))?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .filter_map(Result::ok)
                .map(|der| reqwest::Certificate::from_der(der.as_ref()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StandinError::Tls(e.to_string()))?;
            if certs.is_empty() {
                return Err(StandinError::Tls(format!(
                    "SSL_CERT_FILE {file} holds no PEM certificate"
                )));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| StandinError::Tls(e.to_string()))?;
        let retries = ctx
            .var("VSTS_HTTP_RETRY")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3u32)
            .clamp(3, 10);
        Ok(Self {
            http,
            org: org.trim_end_matches('/').to_string(),
            retries,
            retry_backoff: ctx.knob_ms(super::ENV_HTTP_RETRY_BACKOFF_MS, 10_000),
        })
    }

    /// A call relative to the organization URL (`path` starts with `/`), with `api-version` added.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        name: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        api_version: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<Response, StandinError> {
        let url = format!("{}{}", self.org, path);
        let mut query: Vec<(&str, String)> = query.to_vec();
        query.push(("api-version", api_version.to_string()));
        self.send(name, method, &url, &query, auth, Body::Json(body), None)
            .await
    }

    /// A form POST to an absolute URL (the OAuth token endpoint).
    pub async fn post_form(
        &self,
        name: &'static str,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<Response, StandinError> {
        self.send(
            name,
            Method::POST,
            url,
            &[],
            &Auth::None,
            Body::Form(form),
            None,
        )
        .await
    }

    /// A call with its own timeout (long polls).
    #[allow(clippy::too_many_arguments)]
    pub async fn call_with_timeout(
        &self,
        name: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        api_version: &str,
        auth: &Auth,
        timeout: Duration,
    ) -> Result<Response, StandinError> {
        let url = format!("{}{}", self.org, path);
        let mut query: Vec<(&str, String)> = query.to_vec();
        query.push(("api-version", api_version.to_string()));
        self.send(
            name,
            method,
            &url,
            &query,
            auth,
            Body::Json(None),
            Some(timeout),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        name: &'static str,
        method: Method,
        url: &str,
        query: &[(&str, String)],
        auth: &Auth,
        body: Body<'_>,
        timeout: Option<Duration>,
    ) -> Result<Response, StandinError> {
        let mut attempt = 0;
        loop {
            let result = self
                .send_once(name, method.clone(), url, query, auth, &body, timeout)
                .await;
            match result {
                Err(e) if retryable_by_http_client(&e) && attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(self.retry_backoff * attempt).await;
                }
                other => return other,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        name: &'static str,
        method: Method,
        url: &str,
        query: &[(&str, String)],
        auth: &Auth,
        body: &Body<'_>,
        timeout: Option<Duration>,
    ) -> Result<Response, StandinError> {
        let mut req = self.http.request(method, url).query(query);
        req = match auth {
            Auth::Pat(token) => req.header(
                reqwest::header::AUTHORIZATION,
                format!("Basic {}", STANDARD.encode(format!("VstsAgent:{token}"))),
            ),
            Auth::Bearer(token) => req.bearer_auth(token),
            Auth::None => req,
        };
        req = match body {
            Body::Json(Some(v)) => req.json(v),
            Body::Json(None) => req,
            Body::Form(f) => req.form(f),
        };
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| StandinError::Connect {
            call: name,
            url: url.to_string(),
            message: error_chain(&e),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| StandinError::Connect {
            call: name,
            url: url.to_string(),
            message: error_chain(&e),
        })?;
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) if status.is_success() => {
                    return Err(StandinError::Protocol {
                        call: name,
                        message: format!("malformed JSON ({e})"),
                    });
                }
                Err(_) => Value::String(text.chars().take(500).collect()),
            }
        };
        if status.is_success() {
            return Ok(Response { status, body });
        }
        let type_key = body
            .get("typeKey")
            .and_then(Value::as_str)
            .map(str::to_string);
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                body.get("error_description")
                    .or_else(|| body.get("error"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .or_else(|| body.as_str().map(str::to_string))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
        Err(StandinError::Http {
            call: name,
            status: status.as_u16(),
            type_key,
            message,
        })
    }
}

enum Body<'a> {
    Json(Option<&'a Value>),
    Form(&'a [(&'a str, &'a str)]),
}

/// What `VssHttpRetryMessageHandler` retries: connection failures and 502/503/504.
fn retryable_by_http_client(e: &StandinError) -> bool {
    match e {
        StandinError::Connect { .. } => true,
        StandinError::Http { status, .. } => matches!(status, 502..=504),
        _ => false,
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
