//! The ADO service-hook endpoint: `POST /hooks/ado` receives `ms.vss-pipelines.job-state-changed-event`
//! ("Run job state changed") and wakes an immediate poll of every ADO pool.
//!
//! The payload names a project, a pipeline and a run, but no agent pool, no request and no demands, so a
//! hook is only a hint that "something changed": it never creates an agent by itself. Every decision still
//! comes from the next poll of `jobrequests`, and polling goes on as the safety net when hooks are lost.
//!
//! In front of that hint, in this order (each step cheap before the next, dearer one):
//! 1. **Rate limit** (a governor quota for the whole endpoint): `429` with `Retry-After`.
//! 2. **Authentication**: HTTP Basic and/or a shared-secret header, as ADO's Web Hooks consumer can send
//!    them (it signs nothing). Every configured method must pass. Secrets are kept only as SHA-256 digests
//!    and compared in constant time; `401` otherwise.
//! 3. **Body**: JSON only (`415`), at most `max_body_bytes` (`413`), within `body_timeout` (`408`), read
//!    only after authentication.
//! 4. **Payload**: a JSON object with `eventType` `ms.vss-pipelines.job-state-changed-event` (and
//!    `publisherId` `pipelines` when present). Malformed JSON or wrong field types: `400`; another event
//!    type or publisher: `422`. Each with a one-line reason.
//! 5. **Wake**, coalesced: any number of accepted hooks within `min_wake_interval` wake the poll tasks once
//!    (`202 Accepted`).
//!
//! The endpoint listens on its own address (`--hooks-addr`), apart from `/metrics`: only it is meant to be
//! exposed (through an Ingress with TLS, since ADO must reach it over public HTTPS).

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::metrics::{HookLabels, Metrics};

/// The route of the endpoint.
pub const PATH: &str = "/hooks/ado";
/// The only event type accepted.
pub const EVENT_TYPE: &str = "ms.vss-pipelines.job-state-changed-event";
/// The publisher of [`EVENT_TYPE`].
pub const PUBLISHER_ID: &str = "pipelines";
/// The default name of the shared-secret header (set it in the subscription's `httpHeaders`).
pub const DEFAULT_TOKEN_HEADER: &str = "x-azp-hook-token";

/// Configuration errors of the endpoint (the controller refuses to start with them).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the service-hook endpoint needs credentials: give a header token (--hooks-token-file or AZP_HOOKS_TOKEN) and/or basic auth (--hooks-username-file/--hooks-password-file or AZP_HOOKS_USERNAME/AZP_HOOKS_PASSWORD)"
    )]
    NoCredentials,
    #[error("the service-hook {what} is empty; put a non-empty value in the Secret")]
    EmptySecret { what: &'static str },
    #[error("cannot read the service-hook {what} from {path}: {source}")]
    ReadSecret {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("basic auth needs both a username and a password for the service-hook endpoint")]
    IncompleteBasicAuth,
    #[error(
        "the service-hook username must not contain ':' (HTTP Basic auth splits at the first ':')"
    )]
    ColonInUsername,
    #[error("`{0}` is not a valid HTTP header name for the service-hook token")]
    HeaderName(String),
}

impl Error {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NoCredentials => "no_credentials",
            Error::EmptySecret { .. } => "empty_secret",
            Error::ReadSecret { .. } => "read_secret",
            Error::IncompleteBasicAuth => "incomplete_basic_auth",
            Error::ColonInUsername => "colon_in_username",
            Error::HeaderName(_) => "header_name",
        }
    }
}

/// A secret kept only as its SHA-256 digest: comparing digests in constant time leaks neither the value
/// nor its length, and nothing printable is left in memory dumps or `Debug`.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    /// A secret from its value. Trailing CR/LF (as `echo` leaves in a Secret) is dropped.
    pub fn new(value: &[u8], what: &'static str) -> Result<Self, Error> {
        let trimmed = trim_newlines(value);
        if trimmed.is_empty() {
            return Err(Error::EmptySecret { what });
        }
        Ok(Secret(sha256(trimmed)))
    }

    /// A secret read from a file (a mounted Kubernetes Secret key).
    pub fn from_file(path: &Path, what: &'static str) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::ReadSecret {
            what,
            path: path.to_owned(),
            source,
        })?;
        Secret::new(&bytes, what)
    }

    /// Whether `candidate` is this secret, in constant time.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        verify_slices_are_equal(&self.0, &sha256(candidate)).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

fn trim_newlines(mut value: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = value {
        value = rest;
    }
    value
}

/// Who may call the endpoint. Every configured method must pass.
#[derive(Debug, Clone)]
pub struct Credentials {
    basic: Option<(Secret, Secret)>,
    token: Option<(HeaderName, Secret)>,
}

impl Credentials {
    /// At least one of basic auth (username, password) and a header token is required.
    pub fn new(
        basic: Option<(Secret, Secret)>,
        token: Option<(HeaderName, Secret)>,
    ) -> Result<Self, Error> {
        if basic.is_none() && token.is_none() {
            return Err(Error::NoCredentials);
        }
        Ok(Credentials { basic, token })
    }

    /// Reads the credentials from files or values (files win), as the controller's flags give them.
    pub fn load(sources: &CredentialSources) -> Result<Self, Error> {
        fn one(
            file: &Option<PathBuf>,
            value: &Option<String>,
            what: &'static str,
        ) -> Result<Option<Secret>, Error> {
            match (file, value) {
                (Some(path), _) => Secret::from_file(path, what).map(Some),
                (None, Some(v)) => Secret::new(v.as_bytes(), what).map(Some),
                (None, None) => Ok(None),
            }
        }
        let username_raw = match (&sources.username_file, &sources.username) {
            (Some(path), _) => Some(std::fs::read(path).map_err(|source| Error::ReadSecret {
                what: "username",
                path: path.clone(),
                source,
            })?),
            (None, Some(v)) => Some(v.as_bytes().to_vec()),
            (None, None) => None,
        };
        if username_raw
            .as_deref()
            .is_some_and(|u| trim_newlines(u).contains(&b':'))
        {
            return Err(Error::ColonInUsername);
        }
        let username = username_raw
            .map(|u| Secret::new(&u, "username"))
            .transpose()?;
        let password = one(&sources.password_file, &sources.password, "password")?;
        let basic = match (username, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err(Error::IncompleteBasicAuth),
        };
        let token = one(&sources.token_file, &sources.token, "token")?;
        let token = match token {
            Some(secret) => {
                let name = HeaderName::from_bytes(sources.token_header.trim().as_bytes())
                    .map_err(|_| Error::HeaderName(sources.token_header.clone()))?;
                Some((name, secret))
            }
            None => None,
        };
        Credentials::new(basic, token)
    }

    /// Whether the request's headers carry every configured credential. Both checks always run.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let basic_ok = match &self.basic {
            None => true,
            Some((user, password)) => match basic_credentials(headers) {
                Some((u, p)) => user.matches(&u) & password.matches(&p),
                None => {
                    // Same work as a wrong password, so timing does not tell which part was missing.
                    let _ = user.matches(b"") & password.matches(b"");
                    false
                }
            },
        };
        let token_ok = match &self.token {
            None => true,
            Some((name, secret)) => {
                let mut values = headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (Some(v), None) => secret.matches(v.as_bytes()),
                    _ => {
                        let _ = secret.matches(b"");
                        false
                    }
                }
            }
        };
        basic_ok & token_ok
    }
}

/// Where the credentials come from (the controller's flags and environment).
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    pub username_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// The header carrying the token ([`DEFAULT_TOKEN_HEADER`] unless set).
    pub token_header: String,
}

/// `Authorization: Basic base64(user:password)`, split at the first `:`.
fn basic_credentials(headers: &HeaderMap) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// Settings of the endpoint.
#[derive(Debug, Clone)]
pub struct Settings {
    pub credentials: Credentials,
    /// Largest body accepted (ADO's payload with all resource details is a few KiB).
    pub max_body_bytes: usize,
    /// Requests per second admitted (all callers together), and the burst above it.
    pub rate_per_second: NonZeroU32,
    pub burst: NonZeroU32,
    /// Accepted hooks within this interval wake the polls once.
    pub min_wake_interval: Duration,
    /// Longest time to receive a body (a slow sender holds no connection for long): `408` after it.
    pub body_timeout: Duration,
}

impl Settings {
    /// Defaults around the given credentials.
    pub fn new(credentials: Credentials) -> Self {
        Settings {
            credentials,
            max_body_bytes: 256 * 1024,
            rate_per_second: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            min_wake_interval: Duration::from_secs(1),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// What an accepted hook said (for the log only: it decides nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobStateChanged {
    /// The notification's GUID (`id`).
    pub id: Option<String>,
    pub notification_id: Option<i64>,
    /// `waiting`, `running`, `completed`, … (any value is accepted: something changed).
    pub job_state: Option<String>,
    pub job_name: Option<String>,
    pub run_id: Option<i64>,
    pub project_id: Option<String>,
    /// `resourceContainers.account.baseUrl`, when ADO sends it.
    pub organization: Option<String>,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the body is not a service-hook JSON object: {0}")]
    Malformed(String),
    #[error("the payload has no eventType; subscribe the Web Hooks consumer to `{EVENT_TYPE}`")]
    MissingEventType,
    #[error("event type `{0}` is not handled; subscribe to `{EVENT_TYPE}` (Run job state changed)")]
    UnknownEvent(String),
    #[error("publisher `{0}` is not handled; the event comes from publisher `{PUBLISHER_ID}`")]
    UnknownPublisher(String),
}

impl Rejection {
    /// The HTTP status answered.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Malformed(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
    fn outcome(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::MissingEventType | Rejection::UnknownEvent(_) => "unknown_event",
            Rejection::UnknownPublisher(_) => "unknown_publisher",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    id: Option<String>,
    notification_id: Option<i64>,
    event_type: Option<String>,
    publisher_id: Option<String>,
    resource: Option<Resource>,
    resource_containers: Option<Containers>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    project_id: Option<String>,
    job: Option<JobPart>,
    run: Option<RunPart>,
}

#[derive(Deserialize)]
struct JobPart {
    name: Option<String>,
    state: Option<String>,
}

#[derive(Deserialize)]
struct RunPart {
    id: Option<i64>,
}

#[derive(Deserialize)]
struct Containers {
    account: Option<Container>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    base_url: Option<String>,
}

/// Longest text kept from a payload field (they only go to the log).
const FIELD_MAX: usize = 128;

fn clip(value: Option<String>) -> Option<String> {
    value.map(|mut s| {
        if s.len() > FIELD_MAX {
            let mut end = FIELD_MAX;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    })
}

/// Parses a service-hook body. Total: any input gives `Ok` or a [`Rejection`], never a panic.
pub fn parse(body: &[u8]) -> Result<JobStateChanged, Rejection> {
    // Two passes: the whole body must be valid JSON (skipped members are otherwise walked leniently: a bad
    // escape in an ignored string would pass), nested at most 128 deep; then the fields we read, whose
    // errors name the line and column. serde_json's messages never echo the input.
    serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let event_type = envelope.event_type.ok_or(Rejection::MissingEventType)?;
    if event_type != EVENT_TYPE {
        return Err(Rejection::UnknownEvent(
            clip(Some(event_type)).unwrap_or_default(),
        ));
    }
    if let Some(publisher) = envelope.publisher_id
        && publisher != PUBLISHER_ID
    {
        return Err(Rejection::UnknownPublisher(
            clip(Some(publisher)).unwrap_or_default(),
        ));
    }
    let (project_id, job, run_id) = match envelope.resource {
        Some(r) => (r.project_id, r.job, r.run.and_then(|run| run.id)),
        None => (None, None, None),
    };
    let (job_name, job_state) = match job {
        Some(j) => (j.name, j.state),
        None => (None, None),
    };
    Ok(JobStateChanged {
        id: clip(envelope.id),
        notification_id: envelope.notification_id,
        job_state: clip(job_state),
        job_name: clip(job_name),
        run_id,
        project_id: clip(project_id),
        organization: clip(
            envelope
                .resource_containers
                .and_then(|c| c.account)
                .and_then(|a| a.base_url),
        ),
    })
}

/// The endpoint's shared state.
struct Inner {
    settings: Settings,
    limiter: DefaultDirectRateLimiter,
    /// Set by accepted hooks; the coalescing task turns it into one wake-up.
    requested: Arc<Notify>,
    metrics: Metrics,
    coalescer: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.coalescer.abort();
    }
}

/// The router of the endpoint. `wake` is the controller's (`Config::wake`). Spawns the coalescing task,
/// so it must be called inside a Tokio runtime; the task ends when the router is dropped.
pub fn router(settings: Settings, wake: Arc<Notify>, metrics: Metrics) -> Router {
    let requested = Arc::new(Notify::new());
    let coalescer = tokio::spawn(coalesce(
        requested.clone(),
        wake,
        settings.min_wake_interval,
        metrics.clone(),
    ))
    .abort_handle();
    let limiter = RateLimiter::direct(
        Quota::per_second(settings.rate_per_second).allow_burst(settings.burst),
    );
    let inner = Arc::new(Inner {
        settings,
        limiter,
        requested,
        metrics,
        coalescer,
    });
    Router::new()
        .route(PATH, post(handle))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(inner)
}

/// Turns any number of requests into at most one wake-up per `interval`.
async fn coalesce(requested: Arc<Notify>, wake: Arc<Notify>, interval: Duration, metrics: Metrics) {
    loop {
        // `notify_one` stores one permit: hooks arriving while we sleep below become one wake-up.
        requested.notified().await;
        wake.notify_waiters();
        metrics.hook_wakes.inc();
        tokio::time::sleep(interval).await;
    }
}

fn reply(
    inner: &Inner,
    outcome: &'static str,
    status: StatusCode,
    message: impl Into<String>,
) -> Response {
    inner
        .metrics
        .hook_requests
        .get_or_create(&HookLabels { outcome })
        .inc();
    let mut message = message.into();
    message.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    if inner.limiter.check().is_err() {
        tracing::debug!("service hook rate-limited");
        let mut response = reply(
            &inner,
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            "too many service-hook requests; retry later",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let (parts, body) = request.into_parts();
    if !inner.settings.credentials.admits(&parts.headers) {
        tracing::info!("service hook refused: missing or wrong credentials");
        let mut response = reply(
            &inner,
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            "missing or wrong service-hook credentials",
        );
        if inner.settings.credentials.basic.is_some() {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"azp-autoscaler\""),
            );
        }
        return response;
    }
    if !is_json(&parts.headers) {
        return reply(
            &inner,
            "unsupported_media_type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the service-hook body must be application/json (one Content-Type header)",
        );
    }
    let limit = inner.settings.max_body_bytes;
    let too_large = || {
        reply(
            &inner,
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the service-hook body exceeds {limit} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let read = tokio::time::timeout(inner.settings.body_timeout, read_body(body, limit));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyError::TooLarge)) => return too_large(),
        Err(_) => {
            return reply(
                &inner,
                "timeout",
                StatusCode::REQUEST_TIMEOUT,
                "the service-hook body did not arrive in time",
            );
        }
        Ok(Err(BodyError::Read)) => {
            return reply(
                &inner,
                "malformed",
                StatusCode::BAD_REQUEST,
                "the service-hook body could not be read",
            );
        }
    };
    match parse(&bytes) {
        Ok(event) => {
            tracing::info!(
                notification = ?event.notification_id,
                id = ?event.id,
                job_state = ?event.job_state,
                job = ?event.job_name,
                run = ?event.run_id,
                project = ?event.project_id,
                organization = ?event.organization,
                "service hook: job state changed; waking the polls"
            );
            inner.requested.notify_one();
            reply(
                &inner,
                "accepted",
                StatusCode::ACCEPTED,
                "accepted: the polls of every ADO pool are woken",
            )
        }
        Err(rejection) => {
            tracing::info!(reason = %rejection, "service hook refused");
            reply(
                &inner,
                rejection.outcome(),
                rejection.status(),
                rejection.to_string(),
            )
        }
    }
}

/// No Content-Type (taken as JSON) or exactly one, `application/json` with any parameters.
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => value
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json")),
        (Some(_), Some(_)) => false,
    }
}

enum BodyError {
    TooLarge,
    Read,
}

async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    use futures::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Read)?;
        if bytes.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Serves the endpoint on a bound listener until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: Settings,
    wake: Arc<Notify>,
    metrics: Metrics,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, path = PATH, "service-hook endpoint listening");
    }
    axum::serve(listener, router(settings, wake, metrics)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"subscriptionId":"s","notificationId":7,"id":"n-1","eventType":"ms.vss-pipelines.job-state-changed-event","publisherId":"pipelines","resource":{"projectId":"p","job":{"id":"j","name":"Compile","attempt":1,"state":"waiting","startTime":null,"finishTime":null},"run":{"id":1234,"name":"20261126.3"}},"resourceVersion":"5.1-preview.1","resourceContainers":{"account":{"id":"a","baseUrl":"https://dev.azure.com/example-org/"}}}"#;

    #[test]
    fn parses_the_sample_event() {
        let event = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(
            event,
            JobStateChanged {
                id: Some("n-1".into()),
                notification_id: Some(7),
                job_state: Some("waiting".into()),
                job_name: Some("Compile".into()),
                run_id: Some(1234),
                project_id: Some("p".into()),
                organization: Some("https://dev.azure.com/example-org/".into()),
            }
        );
    }

    #[test]
    fn minimal_and_unknown_states_are_accepted() {
        let minimal = format!(r#"{{"eventType":"{EVENT_TYPE}"}}"#);
        assert_eq!(
            parse(minimal.as_bytes()).unwrap(),
            JobStateChanged::default()
        );
        let odd = format!(
            r#"{{"eventType":"{EVENT_TYPE}","resource":{{"job":{{"state":"inProgress"}}}},"extra":[1,{{"x":null}}]}}"#
        );
        assert_eq!(
            parse(odd.as_bytes()).unwrap().job_state.as_deref(),
            Some("inProgress")
        );
    }

    #[test]
    fn rejections_say_why() {
        let cases: &[(&str, StatusCode, &str)] = &[
            (
                "",
                StatusCode::BAD_REQUEST,
                "not a service-hook JSON object",
            ),
            (
                "[]",
                StatusCode::BAD_REQUEST,
                "not a service-hook JSON object",
            ),
            ("{", StatusCode::BAD_REQUEST, "line 1"),
            ("{}", StatusCode::UNPROCESSABLE_ENTITY, "no eventType"),
            (
                r#"{"eventType":"git.push"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "`git.push` is not handled",
            ),
            (
                r#"{"eventType":"ms.vss-pipelines.job-state-changed-event","publisherId":"tfs"}"#,
                StatusCode::UNPROCESSABLE_ENTITY,
                "publisher `tfs`",
            ),
            (
                r#"{"eventType":"ms.vss-pipelines.job-state-changed-event","notificationId":"seven"}"#,
                StatusCode::BAD_REQUEST,
                "invalid type",
            ),
            (
                r#"{"eventType":"ms.vss-pipelines.job-state-changed-event","resource":{"job":{"state":3}}}"#,
                StatusCode::BAD_REQUEST,
                "invalid type",
            ),
        ];
        for (body, status, needle) in cases {
            let rejection = parse(body.as_bytes()).unwrap_err();
            assert_eq!(rejection.status(), *status, "{body}");
            assert!(
                rejection.to_string().contains(needle),
                "{body}: {rejection}"
            );
        }
    }

    #[test]
    fn deep_nesting_and_bad_escapes_anywhere_are_malformed() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for body in [
            format!(r#"{{"eventType":"{EVENT_TYPE}","x":{deep}}}"#),
            format!(r#"{{"eventType":"{EVENT_TYPE}","resource":{{"job":{deep}}}}}"#),
            "[".repeat(100_000),
            format!(r#"{{"eventType":"{EVENT_TYPE}","x":"\ud800"}}"#),
        ] {
            assert!(
                matches!(parse(body.as_bytes()), Err(Rejection::Malformed(_))),
                "{}",
                &body[..body.len().min(80)]
            );
        }
    }

    #[test]
    fn long_fields_are_clipped_on_char_boundaries() {
        let name = "é".repeat(200);
        let body =
            format!(r#"{{"eventType":"{EVENT_TYPE}","resource":{{"job":{{"name":"{name}"}}}}}}"#);
        let event = parse(body.as_bytes()).unwrap();
        let clipped = event.job_name.unwrap();
        assert!(clipped.len() <= FIELD_MAX && clipped.chars().all(|c| c == 'é'));
        let rejected = parse(format!(r#"{{"eventType":"{}"}}"#, "x".repeat(10_000)).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(rejected.len() < 400, "{rejected}");
    }

    #[test]
    fn secrets_compare_by_digest_and_trim_newlines() {
        let s = Secret::new(b"hunter2\n", "token").unwrap();
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter2\n"));
        assert!(!s.matches(b"hunter"));
        assert!(!s.matches(b""));
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert!(matches!(
            Secret::new(b"\r\n", "token"),
            Err(Error::EmptySecret { what: "token" })
        ));
    }

    #[test]
    fn credentials_need_one_complete_method() {
        let header = || DEFAULT_TOKEN_HEADER.to_owned();
        let err = |s: CredentialSources| Credentials::load(&s).unwrap_err();
        assert!(matches!(
            err(CredentialSources {
                token_header: header(),
                ..Default::default()
            }),
            Error::NoCredentials
        ));
        assert!(matches!(
            err(CredentialSources {
                username: Some("ado".into()),
                token_header: header(),
                ..Default::default()
            }),
            Error::IncompleteBasicAuth
        ));
        assert!(matches!(
            err(CredentialSources {
                username: Some("a:b".into()),
                password: Some("p".into()),
                token_header: header(),
                ..Default::default()
            }),
            Error::ColonInUsername
        ));
        assert!(matches!(
            err(CredentialSources {
                token: Some("t".into()),
                token_header: "bad header".into(),
                ..Default::default()
            }),
            Error::HeaderName(_)
        ));
        assert!(matches!(
            err(CredentialSources {
                token_file: Some("/nonexistent/azp-hook-token".into()),
                token_header: header(),
                ..Default::default()
            }),
            Error::ReadSecret { what: "token", .. }
        ));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn every_configured_method_must_pass() {
        let both = Credentials::load(&CredentialSources {
            username: Some("ado".into()),
            password: Some("p:w".into()),
            token: Some("tok".into()),
            token_header: "X-Hook-Token".into(),
            ..Default::default()
        })
        .unwrap();
        let auth = basic("ado", "p:w");
        assert!(both.admits(&headers(&[
            ("authorization", &auth),
            ("x-hook-token", "tok")
        ])));
        assert!(both.admits(&headers(&[
            ("authorization", &auth.replacen("Basic", "bAsIc", 1)),
            ("x-hook-token", "tok")
        ])));
        assert!(!both.admits(&headers(&[("authorization", &auth)])));
        assert!(!both.admits(&headers(&[("x-hook-token", "tok")])));
        assert!(!both.admits(&headers(&[
            ("authorization", &basic("ado", "p")),
            ("x-hook-token", "tok")
        ])));
        assert!(!both.admits(&headers(&[
            ("authorization", &auth),
            ("x-hook-token", "tok"),
            ("x-hook-token", "tok")
        ])));
        assert!(!both.admits(&headers(&[
            ("authorization", "Bearer tok"),
            ("x-hook-token", "tok")
        ])));
        assert!(!both.admits(&headers(&[
            ("authorization", "Basic !!!"),
            ("x-hook-token", "tok")
        ])));
        assert!(!both.admits(&headers(&[
            ("authorization", "Basic"),
            ("x-hook-token", "tok")
        ])));
    }
}
