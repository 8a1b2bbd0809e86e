//! `Agent.Listener run [--once]`: the listener (`Agent.RunAsync`, `MessageListener`, `JobDispatcher`).
//!
//! OAuth token from the agent key → session → long-poll messages → a job: ack, renew the lock, "run" it for
//! `workload.durationMs` (optionally running a probe step), finish it with `workload.result` → with `--once`
//! exit 0, else keep listening. SIGTERM/SIGINT: cancel a running job (finished `canceled` after the cancel
//! delay), delete the session, exit 0. A revoked token (agent deleted) exits 0; session creation refused
//! exits 1; other fatal errors exit 2 (see `mod.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use super::client::{API_VERSION_PREVIEW, Auth, Client};
use super::configure::access_token;
use super::files::{self, AgentSettings, CredentialData, ListenerLock};
use super::key::RsaParams;
use super::{
    AGENT_VERSION, CommandLine, Context, ENV_CANCEL_DELAY_MS, ENV_EMPTY_POLL_DELAY_MS,
    ENV_RENEW_INTERVAL_MS, ENV_RETRY_INTERVAL_MS, StandinError, diag, return_code,
};

/// Long-poll timeout the client allows (the server answers within 50 s).
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long session creation keeps retrying a 409 conflict (`_sessionConflictRetryLimit`).
const SESSION_CONFLICT_LIMIT: Duration = Duration::from_secs(4 * 60);

/// What a probe step saw, posted to `POST {org}/_testbed/requests/{id}/report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The job step's environment.
    pub env: BTreeMap<String, String>,
    /// The listener's argv (program name first).
    pub argv: Vec<String>,
    /// For `AZURE_FEDERATED_TOKEN_FILE`, every `*TOKEN*FILE*` variable, and every file named `*token*`
    /// under the pod's secret mounts (`/var/run/secrets`; in the node harness the whole pod folder, where
    /// the projected and workload-identity tokens live): whether the step could read it.
    pub readable: BTreeMap<String, bool>,
}

/// The hidden `standin-step` mode: a "job step" that prints its environment and which token files it
/// can read, as JSON `{"env":{…},"readable":{path: bool}}` on stdout. Returns the exit code.
pub fn probe_step_main() -> i32 {
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut readable = BTreeMap::new();
    for (name, value) in &env {
        let upper = name.to_ascii_uppercase();
        let token_file = upper == "AZURE_FEDERATED_TOKEN_FILE"
            || upper
                .find("TOKEN")
                .is_some_and(|i| upper[i + 5..].contains("FILE"));
        if token_file && !value.is_empty() {
            readable.insert(value.clone(), std::fs::read(value).is_ok());
        }
    }
    // Hiding variables does not hide a mounted file: look where tokens are mounted, as a step could.
    let search = match env.get(crate::node::POD_DIR_ENV) {
        Some(pod_dir) => std::path::PathBuf::from(pod_dir),
        None => std::path::PathBuf::from("/var/run/secrets"),
    };
    find_token_files(&search, 0, &mut readable);
    match serde_json::to_string(&json!({"env": env, "readable": readable})) {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("cannot serialize the step report: {e}");
            1
        }
    }
}

/// Every file named like a token (`token`, `azure-identity-token`, …) below `dir`, with whether it can be
/// read. Symlinked folders are not followed (the kubelet's `..data` links point inside the same volume).
fn find_token_files(dir: &std::path::Path, depth: u32, out: &mut BTreeMap<String, bool>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if depth < 12 {
                find_token_files(&path, depth + 1, out);
            }
        } else if entry
            .file_name()
            .to_string_lossy()
            .to_ascii_lowercase()
            .contains("token")
            && !path.is_dir()
        {
            out.insert(
                path.to_string_lossy().into_owned(),
                std::fs::read(&path).is_ok(),
            );
        }
    }
}

/// Tunables, from the listener's environment (see the knobs in `mod.rs`).
#[derive(Debug, Clone, Copy)]
struct Timing {
    cancel_delay: Duration,
    empty_poll_delay: Duration,
    retry_interval: Duration,
    renew_interval: Duration,
}

/// The agent's access token, refreshed before it expires.
struct TokenSource {
    client: Client,
    credentials: CredentialData,
    key: RsaParams,
    current: Mutex<Option<(String, Instant)>>,
}

/// Why the token could not be had.
enum TokenError {
    /// The token endpoint refused the agent's credentials: the agent was deleted or its key replaced.
    Revoked(StandinError),
    Other(StandinError),
}

impl TokenSource {
    async fn get(&self) -> Result<Auth, TokenError> {
        let mut current = self.current.lock().await;
        if let Some((token, expires)) = current.as_ref()
            && Instant::now() < *expires
        {
            return Ok(Auth::Bearer(token.clone()));
        }
        match access_token(&self.client, &self.credentials, &self.key).await {
            Ok((token, lifetime)) => {
                // Refresh 30 s early (or at half-life for short-lived tokens).
                let margin = Duration::from_secs(30).min(lifetime / 2);
                *current = Some((token.clone(), Instant::now() + lifetime - margin));
                Ok(Auth::Bearer(token))
            }
            Err(
                e @ StandinError::Http {
                    status: 400 | 401, ..
                },
            ) => Err(TokenError::Revoked(e)),
            Err(e) => Err(TokenError::Other(e)),
        }
    }

    async fn invalidate(&self) {
        *self.current.lock().await = None;
    }
}

/// The listener state shared by the loop and the job task.
struct Listener {
    ctx: Context,
    settings: AgentSettings,
    client: Client,
    tokens: TokenSource,
    timing: Timing,
}

/// How a call on the agent's behalf failed.
enum CallError {
    Revoked(StandinError),
    Failed(StandinError),
}

impl Listener {
    fn event(&self, name: &str, data: Value) {
        diag::event(&self.ctx.root, name, data);
    }

    /// A call authenticated as the agent; a 401 refreshes the token once.
    async fn call(
        &self,
        name: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<super::client::Response, CallError> {
        let mut refreshed = false;
        loop {
            let auth = self.tokens.get().await.map_err(|e| match e {
                TokenError::Revoked(e) => CallError::Revoked(e),
                TokenError::Other(e) => CallError::Failed(e),
            })?;
            let result = match timeout {
                Some(t) => {
                    self.client
                        .call_with_timeout(
                            name,
                            method.clone(),
                            path,
                            query,
                            API_VERSION_PREVIEW,
                            &auth,
                            t,
                        )
                        .await
                }
                None => {
                    self.client
                        .call(
                            name,
                            method.clone(),
                            path,
                            query,
                            API_VERSION_PREVIEW,
                            &auth,
                            body,
                        )
                        .await
                }
            };
            match result {
                Err(StandinError::Http {
                    status: 401,
                    type_key: Some(t),
                    message,
                    ..
                }) if t == "TaskAgentAccessTokenExpiredException" => {
                    return Err(CallError::Revoked(StandinError::Http {
                        call: name,
                        status: 401,
                        type_key: Some(t),
                        message,
                    }));
                }
                Err(StandinError::Http { status: 401, .. }) if !refreshed => {
                    refreshed = true;
                    self.tokens.invalidate().await;
                }
                Err(e) => return Err(CallError::Failed(e)),
                Ok(r) => return Ok(r),
            }
        }
    }

    fn pool_path(&self) -> String {
        format!("/_apis/distributedtask/pools/{}", self.settings.pool_id)
    }
}

/// A job request message's body (the fields the stand-in uses).
#[derive(Debug, Clone)]
struct JobMessage {
    request_id: u64,
    job_id: String,
    display_name: String,
    lock_token: String,
    duration: Duration,
    result: String,
    probe: bool,
    cancel_delay: Option<Duration>,
}

impl JobMessage {
    fn parse(body: &str) -> Result<Self, StandinError> {
        let bad = |m: &str| StandinError::Protocol {
            call: "job message",
            message: m.to_string(),
        };
        let v: Value =
            serde_json::from_str(body).map_err(|e| bad(&format!("body is not JSON: {e}")))?;
        let request_id = v
            .get("requestId")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no numeric requestId"))?;
        let text = |k: &str| {
            v.get(k)
                .filter(|x| !x.is_null())
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .unwrap_or_default()
        };
        let workload = v.get("workload").cloned().unwrap_or(Value::Null);
        Ok(Self {
            request_id,
            job_id: text("jobId"),
            display_name: text("jobDisplayName"),
            lock_token: text("lockToken"),
            duration: Duration::from_millis(
                workload
                    .get("durationMs")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            ),
            result: workload
                .get("result")
                .and_then(Value::as_str)
                .unwrap_or("succeeded")
                .to_string(),
            probe: workload
                .get("probe")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            cancel_delay: workload
                .get("cancelDelayMs")
                .and_then(Value::as_u64)
                .map(Duration::from_millis),
        })
    }
}

/// How the listener loop ended: the process exit code and a stable reason for the diag log.
struct Exit {
    code: i32,
    reason: &'static str,
}

impl Exit {
    fn new(code: i32, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

pub async fn run(ctx: &Context, cmd: &CommandLine) -> i32 {
    let once = cmd.flag("once");
    match start(ctx, once).await {
        Ok(Exit { code, reason }) => {
            diag::event(&ctx.root, "exit", json!({"code": code, "reason": reason}));
            code
        }
        Err((code, e)) => {
            eprintln!("{e}");
            diag::event(
                &ctx.root,
                "exit",
                json!({"code": code, "reason": e.metric_label(), "error": e.to_string()}),
            );
            code
        }
    }
}

async fn start(ctx: &Context, once: bool) -> Result<Exit, (i32, StandinError)> {
    let fatal = |e| (return_code::TERMINATED_ERROR, e);
    if !files::is_configured(&ctx.root) {
        return Err(fatal(StandinError::NotConfigured(
            ctx.root.join(files::AGENT_FILE),
        )));
    }
    let _lock = ListenerLock::acquire(&ctx.root).map_err(fatal)?;
    let retryable = |e| (return_code::RETRYABLE_ERROR, e);
    let settings = files::load_settings(&ctx.root).map_err(retryable)?;
    let credentials = files::load_credentials(&ctx.root).map_err(retryable)?;
    let key = files::load_key(&ctx.root).map_err(retryable)?;
    let client = Client::new(ctx, &settings.server_url).map_err(retryable)?;
    let timing = Timing {
        cancel_delay: ctx.knob_ms(ENV_CANCEL_DELAY_MS, 200),
        empty_poll_delay: ctx.knob_ms(ENV_EMPTY_POLL_DELAY_MS, 5000),
        retry_interval: ctx.knob_ms(ENV_RETRY_INTERVAL_MS, 30_000),
        renew_interval: ctx.knob_ms(ENV_RENEW_INTERVAL_MS, 60_000),
    };
    let listener = Arc::new(Listener {
        ctx: ctx.clone(),
        tokens: TokenSource {
            client: client.clone(),
            credentials,
            key,
            current: Mutex::new(None),
        },
        settings,
        client,
        timing,
    });
    listener.event(
        "run_started",
        json!({"once": once, "argv": ctx.masked_argv(), "agentId": listener.settings.agent_id, "poolId": listener.settings.pool_id}),
    );
    let shutdown = spawn_signal_watch(ctx.root.clone());
    Ok(listen(listener, once, shutdown).await)
}

/// SIGTERM / SIGINT set the shutdown flag (`HostContext.ShutdownAgent`).
fn spawn_signal_watch(root: std::path::PathBuf) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            eprintln!("cannot install SIGTERM/SIGINT handlers");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        diag::event(&root, "signal", json!({"signal": name}));
        println!("Exiting...");
        let _ = tx.send(true);
        // Keep the handlers installed so further signals do not kill the process mid-cleanup.
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    });
    rx
}

async fn listen(listener: Arc<Listener>, once: bool, mut shutdown: watch::Receiver<bool>) -> Exit {
    println!("Scanning for tool capabilities.\nConnecting to the server.");
    let session = tokio::select! {
        s = create_session(&listener) => s,
        _ = shutdown.wait_for(|v| *v) => return Exit::new(return_code::SUCCESS, "shutdown_before_session"),
    };
    let mut session_id = match session {
        Ok(id) => id,
        Err(exit) => return exit,
    };
    println!("{}: Listening for Jobs", console_time());

    let mut last_message_id: Option<u64> = None;
    let mut job: Option<RunningJob> = None;
    let mut job_received = false;
    let exit = loop {
        let job_done = async {
            match job.as_mut() {
                Some(j) => (&mut j.handle).await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => {
                break Exit::new(return_code::SUCCESS, "shutdown");
            }
            outcome = job_done => {
                job = None;
                listener.event("job_done", json!({"outcome": format!("{outcome:?}")}));
                if once {
                    break Exit::new(return_code::SUCCESS, "run_once_job_done");
                }
            }
            polled = next_message(&listener, &session_id, last_message_id) => match polled {
                Ok(None) => {}
                Ok(Some(message)) => {
                    let delete = handle_message(&listener, &message, &mut job, &mut job_received, once);
                    if delete {
                        // `lastMessageId` acknowledges too: never advance it past a message left for
                        // another agent (a second job offered to a run-once agent), or the next poll
                        // would take that job and then abandon it.
                        last_message_id = Some(message.id);
                        delete_message(&listener, &session_id, message.id).await;
                    }
                }
                Err(PollError::SessionExpired(e)) => {
                    listener.event("session_expired", json!({"error": e.to_string()}));
                    match create_session(&listener).await {
                        Ok(id) => session_id = id,
                        // A revoked token ends the run like `TaskAgentAccessTokenExpiredException` (0); any
                        // other refusal rethrows the session-expired error out of the loop (2).
                        Err(revoked @ Exit { code: return_code::SUCCESS, .. }) => break revoked,
                        Err(_) => break Exit::new(return_code::RETRYABLE_ERROR, "session_expired_not_recreated"),
                    }
                }
                Err(PollError::Revoked(e)) => {
                    listener.event("token_revoked", json!({"error": e.to_string()}));
                    println!("Agent OAuth token has been revoked. Unable to pull message.");
                    break Exit::new(return_code::SUCCESS, "token_revoked");
                }
                Err(PollError::Fatal(e)) => {
                    eprintln!("{e}");
                    listener.event("poll_failed", json!({"error": e.to_string(), "label": e.metric_label()}));
                    break Exit::new(return_code::RETRYABLE_ERROR, "poll_failed");
                }
            }
        }
    };

    // JobDispatcher.ShutdownAsync: cancel the running job and wait for it to finish.
    if let Some(running) = job.take() {
        let _ = running.cancel.send(Some("agent_shutdown"));
        let _ = running.handle.await;
    }
    delete_session(&listener, &session_id).await;
    exit
}

struct Message {
    id: u64,
    message_type: String,
    body: String,
}

enum PollError {
    SessionExpired(StandinError),
    Revoked(StandinError),
    Fatal(StandinError),
}

/// One long poll; after an empty answer, the agent's pause before the next one. Retryable errors are
/// retried here after the retry interval.
async fn next_message(
    listener: &Listener,
    session_id: &str,
    last_message_id: Option<u64>,
) -> Result<Option<Message>, PollError> {
    loop {
        let mut query = vec![("sessionId", session_id.to_string())];
        if let Some(id) = last_message_id {
            query.push(("lastMessageId", id.to_string()));
        }
        let result = listener
            .call(
                "get message",
                Method::GET,
                &format!("{}/messages", listener.pool_path()),
                &query,
                None,
                Some(LONG_POLL_TIMEOUT),
            )
            .await;
        match result {
            Ok(resp)
                if resp.body.is_null()
                    || resp.status.as_u16() == 202
                    || resp.status.as_u16() == 204 =>
            {
                tokio::time::sleep(listener.timing.empty_poll_delay).await;
                return Ok(None);
            }
            Ok(resp) => {
                let body = &resp.body;
                let id = body.get("messageId").and_then(Value::as_u64);
                let Some(id) = id else {
                    return Err(PollError::Fatal(StandinError::Protocol {
                        call: "get message",
                        message: "message without a numeric messageId".into(),
                    }));
                };
                return Ok(Some(Message {
                    id,
                    message_type: body
                        .get("messageType")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    body: body
                        .get("body")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                }));
            }
            Err(CallError::Revoked(e)) => return Err(PollError::Revoked(e)),
            Err(CallError::Failed(e)) => match &e {
                StandinError::Http {
                    status: 404,
                    type_key,
                    ..
                } if type_key.as_deref() != Some("TaskAgentNotFoundException")
                    && type_key.as_deref() != Some("TaskAgentPoolNotFoundException") =>
                {
                    return Err(PollError::SessionExpired(e));
                }
                e2 if e2.is_transient() || matches!(e2, StandinError::Protocol { .. }) => {
                    listener.event("poll_retry", json!({"error": e.to_string()}));
                    tokio::time::sleep(listener.timing.retry_interval).await;
                }
                _ => {
                    // A deleted agent's token is revoked: the agent sees that before anything else
                    // ("Agent OAuth token has been revoked"), whatever its last call answered.
                    listener.tokens.invalidate().await;
                    if let Err(TokenError::Revoked(revoked)) = listener.tokens.get().await {
                        return Err(PollError::Revoked(revoked));
                    }
                    return Err(PollError::Fatal(e));
                }
            },
        }
    }
}

/// Dispatches one message; returns whether to acknowledge (delete) it.
fn handle_message(
    listener: &Arc<Listener>,
    message: &Message,
    job: &mut Option<RunningJob>,
    job_received: &mut bool,
    once: bool,
) -> bool {
    listener.event(
        "message",
        json!({"messageId": message.id, "messageType": message.message_type}),
    );
    let kind = message.message_type.to_ascii_lowercase();
    if kind == "pipelineagentjobrequest" || kind == "agentjobrequest" {
        if job.is_some() || (once && *job_received) {
            // The server sends one job at a time; a second one is left for another agent.
            return false;
        }
        match JobMessage::parse(&message.body) {
            Ok(parsed) => {
                *job_received = true;
                *job = Some(start_job(listener.clone(), parsed));
            }
            Err(e) => listener.event("bad_job_message", json!({"error": e.to_string()})),
        }
        true
    } else if kind == "jobcancellation" {
        let job_id = serde_json::from_str::<Value>(&message.body)
            .ok()
            .and_then(|v| {
                v.get("jobId").map(|j| {
                    j.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| j.to_string())
                })
            });
        match (job.as_ref(), job_id) {
            (Some(running), Some(id)) if running.job_id.eq_ignore_ascii_case(&id) => {
                let _ = running.cancel.send(Some("job_cancellation_message"));
                true
            }
            // Not our job: the agent keeps the message when it runs once and a job is running.
            _ => !(once && *job_received),
        }
    } else {
        listener.event(
            "unsupported_message",
            json!({"messageType": message.message_type}),
        );
        true
    }
}

async fn delete_message(listener: &Listener, session_id: &str, message_id: u64) {
    let result = listener
        .call(
            "delete message",
            Method::DELETE,
            &format!("{}/messages/{message_id}", listener.pool_path()),
            &[("sessionId", session_id.to_string())],
            None,
            None,
        )
        .await;
    if let Err(CallError::Failed(e) | CallError::Revoked(e)) = result {
        listener.event(
            "delete_message_failed",
            json!({"messageId": message_id, "error": e.to_string()}),
        );
    }
}

struct RunningJob {
    job_id: String,
    cancel: watch::Sender<Option<&'static str>>,
    handle: tokio::task::JoinHandle<String>,
}

fn start_job(listener: Arc<Listener>, job: JobMessage) -> RunningJob {
    let (cancel, cancel_rx) = watch::channel(None);
    listener.event(
        "job_received",
        json!({"requestId": job.request_id, "jobId": job.job_id, "jobDisplayName": job.display_name,
               "durationMs": job.duration.as_millis() as u64, "result": job.result, "probe": job.probe}),
    );
    println!("{}: Running job: {}", console_time(), job.display_name);
    let job_id = job.job_id.clone();
    let handle = tokio::spawn(run_job(listener, job, cancel_rx));
    RunningJob {
        job_id,
        cancel,
        handle,
    }
}

/// Runs one job to its end; returns the result it reported.
async fn run_job(
    listener: Arc<Listener>,
    job: JobMessage,
    mut cancel: watch::Receiver<Option<&'static str>>,
) -> String {
    let request_path = format!("{}/jobrequests/{}", listener.pool_path(), job.request_id);
    let lock_query = [("lockToken", job.lock_token.clone())];
    let renew_body = json!({"requestId": job.request_id});

    // The first renewal must succeed, else the request was canceled meanwhile.
    let first = listener
        .call(
            "renew job request",
            Method::PATCH,
            &request_path,
            &lock_query,
            Some(&renew_body),
            None,
        )
        .await;
    let mut result = job.result.clone();
    let mut canceled_by = None;
    match first {
        Ok(_) => {
            listener.event("lock_renewed", json!({"requestId": job.request_id}));
            if job.probe {
                run_probe(&listener, job.request_id).await;
            }
            let deadline = tokio::time::sleep(job.duration);
            tokio::pin!(deadline);
            let mut renew = tokio::time::interval_at(
                tokio::time::Instant::now() + listener.timing.renew_interval,
                listener
                    .timing
                    .renew_interval
                    .max(Duration::from_millis(10)),
            );
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    reason = async { cancel.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                        canceled_by = reason.or(Some("listener_gone"));
                        break;
                    }
                    _ = renew.tick() => {
                        match listener
                            .call("renew job request", Method::PATCH, &request_path, &lock_query, Some(&renew_body), None)
                            .await
                        {
                            Ok(_) => listener.event("lock_renewed", json!({"requestId": job.request_id})),
                            Err(CallError::Failed(e) | CallError::Revoked(e)) => {
                                listener.event("lock_renew_failed", json!({"requestId": job.request_id, "error": e.to_string()}));
                            }
                        }
                    }
                }
            }
        }
        Err(CallError::Failed(e) | CallError::Revoked(e)) => {
            listener.event(
                "lock_renew_failed",
                json!({"requestId": job.request_id, "error": e.to_string(), "first": true}),
            );
            canceled_by = Some("first_renewal_failed");
        }
    }
    if let Some(reason) = canceled_by {
        let delay = job.cancel_delay.unwrap_or(listener.timing.cancel_delay);
        listener.event(
            "job_canceling",
            json!({"requestId": job.request_id, "reason": reason, "cancelDelayMs": delay.as_millis() as u64}),
        );
        tokio::time::sleep(delay).await;
        result = "canceled".to_string();
    }
    let finish_body = json!({
        "requestId": job.request_id,
        "finishTime": jiff::Timestamp::now().to_string(),
        "result": result,
    });
    match listener
        .call(
            "finish job request",
            Method::PATCH,
            &request_path,
            &lock_query,
            Some(&finish_body),
            None,
        )
        .await
    {
        Ok(_) => listener.event(
            "job_finished",
            json!({"requestId": job.request_id, "result": result}),
        ),
        Err(CallError::Failed(e) | CallError::Revoked(e)) => listener.event(
            "job_finish_failed",
            json!({"requestId": job.request_id, "result": result, "error": e.to_string()}),
        ),
    }
    println!(
        "{}: Job {} completed with result: {}",
        console_time(),
        job.display_name,
        task_result_name(&result)
    );
    result
}

/// Runs the probe step with the listener's environment and posts what it saw.
async fn run_probe(listener: &Listener, request_id: u64) {
    let report = match probe(listener).await {
        Ok(r) => r,
        Err(e) => {
            listener.event("probe_failed", json!({"requestId": request_id, "error": e}));
            return;
        }
    };
    let body = match serde_json::to_value(&report) {
        Ok(v) => v,
        Err(e) => {
            listener.event(
                "probe_failed",
                json!({"requestId": request_id, "error": e.to_string()}),
            );
            return;
        }
    };
    match listener
        .call(
            "probe report",
            Method::POST,
            &format!("/_testbed/requests/{request_id}/report"),
            &[],
            Some(&body),
            None,
        )
        .await
    {
        Ok(_) => listener.event("probe_reported", json!({"requestId": request_id})),
        Err(CallError::Failed(e) | CallError::Revoked(e)) => listener.event(
            "probe_failed",
            json!({"requestId": request_id, "error": e.to_string()}),
        ),
    }
}

async fn probe(listener: &Listener) -> Result<ProbeReport, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the step program: {e}"))?;
    let output = tokio::process::Command::new(exe)
        .arg("standin-step")
        .env_clear()
        .envs(listener.ctx.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&listener.ctx.root)
        .output()
        .await
        .map_err(|e| format!("cannot run the step: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the step failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    #[derive(Deserialize)]
    struct StepOutput {
        env: BTreeMap<String, String>,
        readable: BTreeMap<String, bool>,
    }
    let step: StepOutput = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("the step printed no report: {e}"))?;
    Ok(ProbeReport {
        env: step.env,
        argv: listener.ctx.argv.clone(),
        readable: step.readable,
    })
}

/// The agent's console time format (.NET `{0:u}`): `2026-11-26 13:00:09Z`.
fn console_time() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%SZ")
        .to_string()
}

/// The `TaskResult` enum name the agent prints (`Succeeded`, `Failed`, `Canceled`, ...).
fn task_result_name(result: &str) -> String {
    match result.to_ascii_lowercase().as_str() {
        "succeeded" => "Succeeded".into(),
        "succeededwithissues" => "SucceededWithIssues".into(),
        "failed" => "Failed".into(),
        "canceled" | "cancelled" => "Canceled".into(),
        "skipped" => "Skipped".into(),
        "abandoned" => "Abandoned".into(),
        _ => result.to_string(),
    }
}

/// `CreateSessionAsync` with the agent's retry rules. `Err` carries the exit.
async fn create_session(listener: &Listener) -> Result<String, Exit> {
    // `TaskAgentSession(ownerName, agent, systemCapabilities)`: the capabilities are scanned again at
    // every start, from the listener's environment as it is now.
    let capabilities = super::capabilities::system_capabilities(
        &listener.ctx.env,
        &listener.settings.agent_name,
        &listener.ctx.root,
    );
    let body = json!({
        "ownerName": super::capabilities::computer_name(),
        "agent": {
            "id": listener.settings.agent_id,
            "name": listener.settings.agent_name,
            "version": AGENT_VERSION,
            "osDescription": super::capabilities::os_description(),
        },
        "systemCapabilities": capabilities,
    });
    let started = Instant::now();
    loop {
        let result = listener
            .call(
                "create session",
                Method::POST,
                &format!("{}/sessions", listener.pool_path()),
                &[],
                Some(&body),
                None,
            )
            .await;
        let error = match result {
            Ok(resp) => {
                let id = resp.body.get("sessionId").map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| s.to_string())
                });
                match id {
                    Some(id) => {
                        listener.event("session_created", json!({"sessionId": id}));
                        return Ok(id);
                    }
                    None => StandinError::Protocol {
                        call: "create session",
                        message: "no sessionId in the response".into(),
                    },
                }
            }
            Err(CallError::Revoked(e)) => {
                listener.event("token_revoked", json!({"error": e.to_string()}));
                println!("Agent OAuth token has been revoked. Session creation failed.");
                return Err(Exit::new(return_code::SUCCESS, "token_revoked"));
            }
            Err(CallError::Failed(e)) => e,
        };
        let retry = match &error {
            StandinError::Http { status: 409, .. } => started.elapsed() < SESSION_CONFLICT_LIMIT,
            StandinError::Http {
                status: 401 | 403 | 404,
                ..
            } => false,
            _ => true,
        };
        listener.event(
            "session_create_failed",
            json!({"error": error.to_string(), "label": error.metric_label(), "retry": retry}),
        );
        if !retry {
            eprintln!("Failed to create session. {error}");
            return Err(Exit::new(
                return_code::TERMINATED_ERROR,
                "session_create_failed",
            ));
        }
        tokio::time::sleep(listener.timing.retry_interval).await;
    }
}

async fn delete_session(listener: &Listener, session_id: &str) {
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        listener.call(
            "delete session",
            Method::DELETE,
            &format!("{}/sessions/{session_id}", listener.pool_path()),
            &[],
            None,
            None,
        ),
    )
    .await;
    match result {
        Ok(Ok(_)) => listener.event("session_deleted", json!({"sessionId": session_id})),
        Ok(Err(CallError::Failed(e) | CallError::Revoked(e))) => listener.event(
            "session_delete_failed",
            json!({"sessionId": session_id, "error": e.to_string()}),
        ),
        Err(_) => listener.event(
            "session_delete_failed",
            json!({"sessionId": session_id, "error": "timed out after 30 s"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_message_reads_the_workload() {
        let body = r#"{"requestId":42,"jobId":"J-1","jobDisplayName":"Build","lockToken":"00000000-0000-0000-0000-000000000000",
            "workload":{"durationMs":1500,"result":"failed","probe":true,"cancelDelayMs":7}}"#;
        let job = JobMessage::parse(body).expect("parse");
        assert_eq!(job.request_id, 42);
        assert_eq!(job.job_id, "J-1");
        assert_eq!(job.duration, Duration::from_millis(1500));
        assert_eq!(job.result, "failed");
        assert!(job.probe);
        assert_eq!(job.cancel_delay, Some(Duration::from_millis(7)));

        let job = JobMessage::parse(r#"{"requestId":1,"jobId":"x"}"#).expect("parse");
        assert_eq!(job.result, "succeeded");
        assert_eq!(job.duration, Duration::ZERO);
        assert!(!job.probe);

        let err = JobMessage::parse(r#"{"jobId":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("requestId"));
    }
}
