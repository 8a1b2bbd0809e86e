//! The run itself: register (with retries), listen for one job, deregister (with a fresh token), and
//! gather the [`Outcome`] that decides the exit code.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::agent_file::AgentFile;
use super::env::TOKEN_VAR;
use super::exit::{Exit, Outcome};
use super::ops::{AdoOps, AgentRef, OpsError, OpsKind, Removal, Secret};
use super::process::{JobWatch, Redactor, Running, Spec, Tail, describe};
use super::settings::Settings;
use super::signals::Termination;

/// `config.sh`'s and the listener's "retryable error" exit code (`Constants.Agent.ReturnCode.RetryableError`).
pub const RETRYABLE_EXIT: i32 = 2;
/// The listener's self-update exit codes (`AgentUpdating`, `RunOnceAgentUpdating`).
const UPDATE_EXITS: [i32; 2] = [3, 4];

/// Exponential backoff with jitter: `base`, doubling, at most `cap`, each delay 50–100 % of its step.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First step.
    pub base: Duration,
    /// Largest step.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        // Jitter from the v4 UUID generator (the crate's randomness source), 50–100 % of the step.
        let r = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
        step / 2 + step / 2 * r / 1000
    }
}

/// Why registration did not produce an agent.
enum RegisterStop {
    /// A termination signal arrived.
    Interrupted,
    /// It failed; the exit code and the explained message.
    Failed(Exit, String),
}

/// What the listener phase observed.
#[derive(Debug, Default)]
struct ListenReport {
    status: Option<ExitStatus>,
    spawn_error: Option<String>,
    terminated: bool,
}

/// One run of the entrypoint.
pub struct Runner<'a, A: AdoOps> {
    settings: &'a Settings,
    ops: &'a A,
    term: Termination,
    env: BTreeMap<OsString, OsString>,
    redactor: Redactor,
    backoff: Backoff,
}

impl<'a, A: AdoOps> Runner<'a, A> {
    /// A runner; `env` is the children's base environment (see [`super::env::child_env`]).
    pub fn new(
        settings: &'a Settings,
        ops: &'a A,
        term: Termination,
        env: BTreeMap<OsString, OsString>,
    ) -> Runner<'a, A> {
        Runner {
            settings,
            ops,
            term,
            env,
            redactor: Redactor::default(),
            backoff: Backoff::default(),
        }
    }

    /// Replaces the retry backoff (tests use short ones).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs to completion.
    pub async fn run(mut self) -> Outcome {
        let mut outcome = Outcome {
            exit_with_job_result: self.settings.exit_with_job_result,
            ..Outcome::default()
        };

        let agent = match self.register().await {
            Ok(agent) => agent,
            Err(RegisterStop::Interrupted) => {
                tracing::info!(
                    "termination requested during registration; removing whatever was registered"
                );
                outcome.terminated = true;
                let known = AgentFile::read(&self.settings.agent_file())
                    .ok()
                    .map(agent_ref);
                if self.deregister(known, true).await.is_err() {
                    outcome.deregistration_failed = true;
                }
                return outcome;
            }
            Err(RegisterStop::Failed(exit, message)) => {
                tracing::error!(exit = exit.label(), "registration failed: {message}");
                outcome.early = Some(exit);
                // A half-done registration must not leave an agent behind; best effort, the exit code
                // stays the registration's.
                if exit != Exit::Token {
                    let known = AgentFile::read(&self.settings.agent_file())
                        .ok()
                        .map(agent_ref);
                    let _ = self.deregister(known, true).await;
                }
                return outcome;
            }
        };

        let watch = Arc::new(JobWatch::default());
        let report = self.listen(watch.clone()).await;
        outcome.terminated = report.terminated;
        outcome.job_started = watch.job_started();
        outcome.job_result = watch.result();

        let code = report.status.and_then(|s| s.code());
        let stopped_on_its_own = !report.terminated && code != Some(0);
        if let Some(err) = &report.spawn_error {
            tracing::error!("cannot start the listener: {err}");
            outcome.agent_failed = true;
        } else if let Some(status) = report.status.filter(|_| stopped_on_its_own) {
            if code.is_some_and(|c| UPDATE_EXITS.contains(&c)) {
                tracing::error!(
                    "the listener stopped to update itself ({}), which agent.disableupdate should prevent: bake the wanted agent version into the image",
                    describe(&status)
                );
                outcome.agent_failed = true;
            } else if outcome.job_started {
                tracing::error!(
                    "the listener failed while running its job ({})",
                    describe(&status)
                );
                outcome.agent_failed = true;
            } else {
                // Without a job this is either a failure or the controller removing the idle agent;
                // the REST delete's answer tells which.
                tracing::warn!(
                    "the listener stopped before taking a job ({}); checking whether the agent was removed from the pool",
                    describe(&status)
                );
            }
        }

        let idle_stop = stopped_on_its_own && !outcome.job_started && report.spawn_error.is_none();
        match self.deregister(agent, idle_stop).await {
            Ok(Removal::AlreadyGone) if idle_stop => {
                tracing::info!(
                    "the agent had already been removed from the pool (by the controller, while idle)"
                );
            }
            Ok(_) if idle_stop => {
                tracing::error!("the listener failed before taking a job; the agent was removed");
                outcome.agent_failed = true;
            }
            Ok(_) => {}
            Err(()) => outcome.deregistration_failed = true,
        }
        outcome
    }

    /// Runs the listener once from agent files already in the agent folder (`registration: controller`):
    /// no token, no registration, no deregistration — the controller registered the agent and removes
    /// it when the Job ends. Exit codes as in [`Runner::run`]; a listener that stops on its own before a
    /// job is a failure (13), since only the controller can have removed the agent and it deletes the
    /// Job first (the pod is then terminated, which is no failure).
    pub async fn run_preregistered(mut self) -> Outcome {
        let mut outcome = Outcome {
            exit_with_job_result: self.settings.exit_with_job_result,
            ..Outcome::default()
        };
        let watch = Arc::new(JobWatch::default());
        let report = self.listen(watch.clone()).await;
        outcome.terminated = report.terminated;
        outcome.job_started = watch.job_started();
        outcome.job_result = watch.result();
        let code = report.status.and_then(|s| s.code());
        if let Some(err) = &report.spawn_error {
            tracing::error!("cannot start the listener: {err}");
            outcome.agent_failed = true;
        } else if let Some(status) = report
            .status
            .filter(|_| !report.terminated && code != Some(0))
        {
            tracing::error!(
                "the listener stopped on its own ({}){}",
                describe(&status),
                if outcome.job_started {
                    " while running its job"
                } else {
                    " before taking a job"
                }
            );
            outcome.agent_failed = true;
        }
        tracing::info!(
            "the controller removes the agent from the pool now that its one job is over (this pod holds no identity)"
        );
        outcome
    }

    /// Sleeps `delay` unless a termination request comes first (then returns `false`).
    async fn pause(&mut self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.term.wait() => false,
        }
    }

    async fn token_or_stop(&mut self) -> Option<Result<Secret, OpsError>> {
        let ops = self.ops;
        tokio::select! {
            biased;
            _ = self.term.wait() => None,
            t = ops.fresh_token() => Some(t),
        }
    }

    fn config_env(&self, token: &Secret) -> BTreeMap<OsString, OsString> {
        let mut env = self.env.clone();
        env.insert(OsString::from(TOKEN_VAR), OsString::from(token.expose()));
        env
    }

    fn remove_local_config(&self) {
        for f in [".agent", ".credentials", ".credentials_rsaparams"] {
            let _ = std::fs::remove_file(self.settings.agent_dir.join(f));
        }
    }

    async fn register(&mut self) -> Result<Option<AgentRef>, RegisterStop> {
        let s = self.settings;
        let deadline = Instant::now() + s.register_timeout;
        let work = s.work.to_string_lossy().into_owned();
        let url = s.url.as_str().to_owned();
        let args = [
            "--unattended",
            "--url",
            url.as_str(),
            "--auth",
            "pat",
            "--pool",
            s.pool.as_str(),
            "--agent",
            s.agent_name.as_str(),
            "--replace",
            "--work",
            work.as_str(),
        ];
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.term.requested().is_some() {
                return Err(RegisterStop::Interrupted);
            }
            let token = match self.token_or_stop().await {
                None => return Err(RegisterStop::Interrupted),
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    let delay = self.backoff.delay(attempt);
                    if e.transient && Instant::now() + delay < deadline {
                        tracing::warn!(
                            attempt,
                            label = e.label,
                            "no token yet, retrying in {delay:?}: {e}"
                        );
                        if !self.pause(delay).await {
                            return Err(RegisterStop::Interrupted);
                        }
                        continue;
                    }
                    // A permanent failure that is not about the identity is the local setup (the CA bundle
                    // of SSL_CERT_FILE / SSL_CERT_DIR): a configuration error.
                    let exit = if e.kind == OpsKind::Other && !e.transient {
                        Exit::Config
                    } else {
                        Exit::Token
                    };
                    return Err(RegisterStop::Failed(
                        exit,
                        format!("cannot obtain a token for Azure DevOps: {e}"),
                    ));
                }
            };
            self.redactor.add(token.expose());
            if attempt > 1 {
                // A failed attempt may have written half a configuration, and config.sh refuses to
                // configure over one; the server side is taken over by --replace.
                self.remove_local_config();
            }
            tracing::info!(attempt, pool = %s.pool, agent = %s.agent_name, "registering the agent (config.sh)");
            let env = self.config_env(&token);
            drop(token);
            let tail = Tail::default();
            let mut child = Running::spawn(Spec {
                program: &s.config_sh(),
                args: &args,
                env: &env,
                cwd: &s.agent_dir,
                redactor: &self.redactor,
                watch: None,
                tail: tail.clone(),
            })
            .map_err(|e| {
                RegisterStop::Failed(
                    Exit::Registration,
                    format!("cannot start {}: {e}; check that the image holds the agent there and that it is executable", s.config_sh().display()),
                )
            })?;
            drop(env);
            let status = tokio::select! {
                st = child.wait() => st.ok(),
                sig = self.term.wait() => {
                    child.signal(sig);
                    let _ = tokio::time::timeout(s.listener_grace, child.wait()).await;
                    child.finish().await;
                    return Err(RegisterStop::Interrupted);
                }
            };
            child.finish().await;
            let code = status.and_then(|st| st.code());
            match code {
                Some(0) => {
                    return match AgentFile::read(&s.agent_file()) {
                        Ok(f) => Ok(Some(agent_ref(f))),
                        Err(e) => {
                            tracing::warn!(
                                label = e.metric_label(),
                                "registered, but {e}; deregistration will look the agent up by name"
                            );
                            Ok(None)
                        }
                    };
                }
                Some(RETRYABLE_EXIT) => {
                    let delay = self.backoff.delay(attempt);
                    if Instant::now() + delay < deadline {
                        tracing::warn!(
                            attempt,
                            "config.sh failed with a retryable error (exit code 2); retrying in {delay:?}"
                        );
                        if !self.pause(delay).await {
                            return Err(RegisterStop::Interrupted);
                        }
                        continue;
                    }
                    return Err(RegisterStop::Failed(
                        Exit::Registration,
                        format!(
                            "config.sh kept failing with a retryable error (exit code 2) for {attempt} attempts within {:?} (AZP_REGISTER_TIMEOUT_SECONDS); its last output:\n{}",
                            s.register_timeout,
                            tail.lines().join("\n")
                        ),
                    ));
                }
                _ => {
                    let what = status
                        .as_ref()
                        .map(describe)
                        .unwrap_or_else(|| "an unknown status".into());
                    let diagnosis = self.ops.diagnose_registration(&s.pool).await;
                    // The official config.sh exits 1 on every failure, a passing ADO outage (5xx, 429,
                    // timeouts) included. When ADO answers our own check transiently too, the outage is
                    // the likely cause: retry like exit code 2 instead of failing the pod.
                    if let Some(e) = diagnosis.as_ref().filter(|e| e.transient) {
                        let delay = self.backoff.delay(attempt);
                        if Instant::now() + delay < deadline {
                            tracing::warn!(
                                attempt,
                                cause = %e,
                                "config.sh failed with {what} while Azure DevOps answers with a transient error; retrying in {delay:?}"
                            );
                            if !self.pause(delay).await {
                                return Err(RegisterStop::Interrupted);
                            }
                            continue;
                        }
                    }
                    let (exit, cause) = match diagnosis {
                        Some(e) if e.kind == OpsKind::Identity => {
                            (Exit::Token, format!("; cause: {e}"))
                        }
                        Some(e) => (Exit::Registration, format!("; cause: {e}")),
                        None if looks_forbidden(&tail.lines()) => (
                            Exit::Registration,
                            format!(
                                "; cause: the identity may read pool `{}` but not register agents in it (403): give it the Administrator role on the pool (Organization settings → Agent pools → {} → Security)",
                                s.pool, s.pool
                            ),
                        ),
                        None => (Exit::Registration, String::new()),
                    };
                    return Err(RegisterStop::Failed(
                        exit,
                        format!(
                            "config.sh failed with {what} (not retryable){cause}; its last output:\n{}",
                            tail.lines().join("\n")
                        ),
                    ));
                }
            }
        }
    }

    async fn listen(&mut self, watch: Arc<JobWatch>) -> ListenReport {
        let s = self.settings;
        let mut report = ListenReport::default();
        if self.term.requested().is_some() {
            report.terminated = true;
            return report;
        }
        tracing::info!("starting the listener for one job (bin/Agent.Listener run --once)");
        let mut child = match Running::spawn(Spec {
            program: &s.listener(),
            args: &["run", "--once"],
            env: &self.env,
            cwd: &s.agent_dir,
            redactor: &self.redactor,
            watch: Some(watch),
            tail: Tail::default(),
        }) {
            Ok(c) => c,
            Err(e) => {
                report.spawn_error = Some(format!("{}: {e}", s.listener().display()));
                return report;
            }
        };
        tokio::select! {
            st = child.wait() => report.status = st.ok(),
            sig = self.term.wait() => {
                report.terminated = true;
                tracing::info!(signal = %sig, "termination requested; forwarding it to the listener and giving it {:?} to cancel its job", s.listener_grace);
                child.signal(sig);
                match tokio::time::timeout(s.listener_grace, child.wait()).await {
                    Ok(st) => report.status = st.ok(),
                    Err(_) => tracing::warn!(
                        "the listener did not stop within {:?} (AZP_LISTENER_GRACE_SECONDS); killing its process group",
                        s.listener_grace
                    ),
                }
            }
        }
        let last = child.finish().await;
        if report.status.is_none() {
            report.status = last;
        }
        if let Some(st) = &report.status {
            tracing::info!("the listener exited with {}", describe(st));
        }
        report
    }

    /// Removes the agent with a freshly acquired token, retrying until the deregistration budget is
    /// spent. `rest_first`: delete by id through REST before trying `config.sh remove` (its 404 tells
    /// "already gone" apart from "removed now").
    async fn deregister(
        &mut self,
        known: Option<AgentRef>,
        rest_first: bool,
    ) -> Result<Removal, ()> {
        let s = self.settings;
        let deadline = Instant::now() + s.deregister_timeout;
        let mut attempt = 0u32;
        let mut last_error = String::from("no attempt made");
        let mut known = known;
        while attempt == 0 || Instant::now() < deadline {
            attempt += 1;
            if attempt > 1 {
                let delay = self
                    .backoff
                    .delay(attempt - 1)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(delay).await;
            }
            let token = match self.ops.fresh_token().await {
                Ok(t) => t,
                Err(e) => {
                    last_error = format!("cannot obtain a fresh token: {e}");
                    tracing::warn!(attempt, label = e.label, "deregistration: {last_error}");
                    if e.transient {
                        continue;
                    }
                    break;
                }
            };
            self.redactor.add(token.expose());
            let target = match known {
                Some(r) => r,
                None => match self.ops.find_agent(&s.pool, &s.agent_name).await {
                    Ok(Some(r)) => {
                        known = Some(r);
                        r
                    }
                    Ok(None) => {
                        tracing::info!(
                            "no agent named {} in pool {}: nothing to remove",
                            s.agent_name,
                            s.pool
                        );
                        return Ok(Removal::AlreadyGone);
                    }
                    Err(e) => {
                        last_error = format!("cannot look the agent up by name: {e}");
                        tracing::warn!(attempt, label = e.label, "deregistration: {last_error}");
                        if e.transient {
                            continue;
                        }
                        break;
                    }
                },
            };
            let config_possible = s.agent_file().is_file();
            let mut config_tried = false;
            if !rest_first && config_possible {
                config_tried = true;
                match self.config_remove(&token, deadline).await {
                    Ok(()) => {
                        tracing::info!(
                            agent_id = target.agent_id,
                            "agent removed from the pool (config.sh remove)"
                        );
                        return Ok(Removal::Removed);
                    }
                    Err(e) => tracing::warn!(
                        attempt,
                        "config.sh remove failed ({e}); deleting the agent by id instead"
                    ),
                }
            }
            match self.ops.delete_agent(target).await {
                Ok(r) => {
                    tracing::info!(agent_id = target.agent_id, pool_id = target.pool_id, removal = ?r, "agent removed from the pool (REST delete)");
                    return Ok(r);
                }
                Err(e) => {
                    last_error = format!(
                        "cannot delete agent {} of pool {}: {e}",
                        target.agent_id, target.pool_id
                    );
                    tracing::warn!(attempt, label = e.label, "deregistration: {last_error}");
                    if config_possible && !config_tried {
                        match self.config_remove(&token, deadline).await {
                            Ok(()) => {
                                tracing::info!(
                                    agent_id = target.agent_id,
                                    "agent removed from the pool (config.sh remove)"
                                );
                                return Ok(Removal::Removed);
                            }
                            Err(e) => tracing::warn!(attempt, "config.sh remove failed too ({e})"),
                        }
                    }
                    if !e.transient && e.kind != OpsKind::Other {
                        break;
                    }
                }
            }
        }
        tracing::error!(
            "the agent {} could not be removed from pool {} ({last_error}); the controller's cleanup removes offline agents it created",
            s.agent_name,
            s.pool
        );
        Err(())
    }

    async fn config_remove(&mut self, token: &Secret, deadline: Instant) -> Result<(), String> {
        let s = self.settings;
        let env = self.config_env(token);
        let mut child = Running::spawn(Spec {
            program: &s.config_sh(),
            args: &["remove", "--unattended", "--auth", "pat"],
            env: &env,
            cwd: &s.agent_dir,
            redactor: &self.redactor,
            watch: None,
            tail: Tail::default(),
        })
        .map_err(|e| format!("cannot start config.sh: {e}"))?;
        drop(env);
        let status = tokio::time::timeout_at(deadline, child.wait()).await;
        let status = child.finish().await.or(status.ok().and_then(Result::ok));
        match status {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(describe(&st)),
            None => Err("it did not finish in time".into()),
        }
    }
}

/// Whether `config.sh`'s output says it was refused for lack of permission (HTTP 403, or the official
/// agent's "Access denied … needs Manage permissions for pool …").
fn looks_forbidden(lines: &[String]) -> bool {
    lines.iter().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains(" 403") || l.contains("access denied") || l.contains("manage permissions")
    })
}

fn agent_ref(f: AgentFile) -> AgentRef {
    AgentRef {
        pool_id: f.pool_id,
        agent_id: f.agent_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_a_refusal_for_lack_of_permission() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(looks_forbidden(&lines(&[
            "add agent: HTTP 403 (AccessDeniedException): no"
        ])));
        assert!(looks_forbidden(&lines(&[
            "Access denied. x needs Manage permissions for pool linux to perform the action."
        ])));
        assert!(!looks_forbidden(&lines(&[
            "Pool 'linux' not found",
            "HTTP 401"
        ])));
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(8),
        };
        for (attempt, step) in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 8)] {
            let d = b.delay(attempt);
            let step = Duration::from_secs(step);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempt}: {d:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
    }
}
