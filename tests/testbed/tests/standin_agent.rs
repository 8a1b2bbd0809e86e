//! The stand-in agent against the simulator, over HTTPS with the test CA, as separate processes laid out
//! like the official agent (`config.sh`, `run.sh`, `bin/Agent.Listener`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use azp_testbed::sim::{
    EndpointClass, Fault, FaultKind, OrgSpec, RequestSpec, SimConfig, Simulator,
};
use azp_testbed::standin::{self, AGENT_VERSION, DiagEvent};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const ORG: &str = "contoso";
const POOL: &str = "linux";
const PAT: &str = "pat-of-the-admin";
const OWNER: &str = "object-id-admin";
/// Bound for anything a test waits on; a hang fails the test instead of blocking CI.
const WAIT: Duration = Duration::from_secs(60);

struct Bed {
    sim: Simulator,
    root: PathBuf,
}

impl Bed {
    async fn start(name: &str) -> Bed {
        Bed::start_with(
            name,
            SimConfig {
                long_poll_secs: 2,
                ..SimConfig::default()
            },
        )
        .await
    }

    async fn start_with(name: &str, config: SimConfig) -> Bed {
        let sim = Simulator::start(config).await.expect("simulator starts");
        sim.add_org(
            OrgSpec::new(ORG)
                .pool(POOL)
                .pat(PAT, OWNER)
                .member(OWNER)
                .pat("pat-of-a-stranger", "object-id-stranger"),
        )
        .expect("org");
        let root = std::env::temp_dir().join(format!("standin-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&root).expect("temp dir");
        Bed { sim, root }
    }

    /// A fresh agent install folder.
    fn agent_dir(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        standin::layout(&dir, Some(Path::new(env!("CARGO_BIN_EXE_azp-testbed")))).expect("layout");
        dir
    }

    /// A command with a clean environment: PATH, the test CA, root allowed, short stand-in delays.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("AGENT_ALLOW_RUNASROOT", "1")
            .env("STANDIN_EMPTY_POLL_DELAY_MS", "50")
            .env("STANDIN_RETRY_INTERVAL_MS", "100")
            .env("STANDIN_HTTP_RETRY_BACKOFF_MS", "10")
            .env("STANDIN_CANCEL_DELAY_MS", "100")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(ca) = self.sim.ca_pem_path() {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd
    }

    fn configure_args(&self, agent: &str) -> Vec<String> {
        [
            "--unattended",
            "--url",
            &self.sim.org_url(ORG),
            "--auth",
            "pat",
            "--token",
            PAT,
            "--pool",
            POOL,
            "--agent",
            agent,
            "--work",
            "_work",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    async fn configure(&self, dir: &Path, agent: &str, extra: &[&str]) -> Outcome {
        let mut cmd = self.command(&dir.join("config.sh"));
        cmd.args(self.configure_args(agent)).args(extra);
        outcome(cmd).await
    }

    async fn remove(&self, dir: &Path) -> Outcome {
        let mut cmd = self.command(&dir.join("config.sh"));
        cmd.args(["remove", "--unattended", "--auth", "pat"])
            .env("VSTS_AGENT_INPUT_TOKEN", PAT);
        outcome(cmd).await
    }

    fn listener(&self, dir: &Path, once: bool) -> Command {
        let mut cmd = self.command(&dir.join("bin/Agent.Listener"));
        cmd.arg("run");
        if once {
            cmd.arg("--once");
        }
        cmd.current_dir(dir);
        cmd
    }

    fn agent(&self, name: &str) -> Option<azp_testbed::sim::AgentInfo> {
        self.sim
            .agents(ORG, POOL)
            .expect("agents")
            .into_iter()
            .find(|a| a.name == name)
    }

    async fn wait_received(&self, id: u64) -> azp_testbed::sim::RequestInfo {
        let r = self
            .sim
            .wait_request(ORG, id, WAIT, |r| r.receive_time.is_some())
            .await
            .expect("request");
        assert!(
            r.receive_time.is_some(),
            "request {id} never received: {r:?}"
        );
        r
    }

    async fn wait_finished(&self, id: u64) -> azp_testbed::sim::RequestInfo {
        let r = self
            .sim
            .wait_request(ORG, id, WAIT, |r| r.is_finished())
            .await
            .expect("request");
        assert!(r.is_finished(), "request {id} never finished: {r:?}");
        r
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn outcome(mut cmd: Command) -> Outcome {
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("command finishes")
        .expect("command runs");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn wait_exit(child: &mut Child) -> ExitStatus {
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("process exits")
        .expect("wait")
}

fn events(dir: &Path, name: &str) -> Vec<DiagEvent> {
    standin::read_events(dir)
        .into_iter()
        .filter(|e| e.event == name)
        .collect()
}

/// Waits until the agent folder's diag log holds `n` events named `name`.
async fn wait_for_events(dir: &Path, name: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while events(dir, name).len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        events(dir, name).len() >= n,
        "no {n} {name} events: {:?}",
        standin::read_events(dir)
    );
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_run_once_and_remove_serve_one_request_and_leave_nothing_behind() {
    let bed = Bed::start("roundtrip").await;
    let dir = bed.agent_dir("agent");

    let out = bed.configure(&dir, "agent-1", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let settings = json_file(&dir.join(".agent"));
    assert_eq!(settings["agentName"], "agent-1");
    assert_eq!(settings["poolName"], POOL);
    assert_eq!(settings["workFolder"], "_work");
    assert_eq!(settings["serverUrl"], bed.sim.org_url(ORG));
    let creds = json_file(&dir.join(".credentials"));
    assert_eq!(creds["scheme"], "OAuth");
    assert!(creds["data"]["clientId"].is_string() && creds["data"]["authorizationUrl"].is_string());
    let key = json_file(&dir.join(".credentials_rsaparams"));
    for field in ["d", "dp", "dq", "exponent", "inverseQ", "modulus", "p", "q"] {
        assert!(key[field].is_string(), "{field} in .credentials_rsaparams");
    }
    assert_eq!(mode(&dir.join(".credentials_rsaparams")), 0o600);
    let configured = events(&dir, "configured");
    let logged_argv = configured[0].data["argv"].to_string();
    assert!(
        logged_argv.contains("--token") && !logged_argv.contains(PAT),
        "{logged_argv}"
    );
    let agent = bed.agent("agent-1").expect("registered");
    assert_eq!(settings["agentId"], agent.id);
    assert_eq!(agent.version, AGENT_VERSION);
    assert!(!agent.online, "no session before run");

    let id = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_millis(300)),
        )
        .expect("queue");
    let out = outcome(bed.listener(&dir, true)).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("completed with result: Succeeded"),
        "{out:?}"
    );
    let r = bed.wait_finished(id).await;
    assert_eq!(r.result.as_deref(), Some("succeeded"));
    assert_eq!(r.agent_name.as_deref(), Some("agent-1"));
    assert!(r.receive_time.is_some());
    assert!(
        !bed.agent("agent-1").expect("still registered").online,
        "session deleted"
    );
    assert_eq!(events(&dir, "job_finished").len(), 1);
    assert_eq!(events(&dir, "session_deleted").len(), 1);

    let out = bed.remove(&dir).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        bed.agent("agent-1").is_none(),
        "agent deleted from the pool"
    );
    for file in [".agent", ".credentials", ".credentials_rsaparams"] {
        assert!(!dir.join(file).exists(), "{file} removed");
    }
    // Removing again is not an error: nothing is configured.
    assert_eq!(bed.remove(&dir).await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_come_from_env_vars_and_capabilities_from_the_environment_minus_ignored() {
    let bed = Bed::start("inputs").await;
    let dir = bed.agent_dir("agent");
    let mut cmd = bed.command(&dir.join("config.sh"));
    cmd.env("VSTS_AGENT_INPUT_UNATTENDED", "true")
        .env("VSTS_AGENT_INPUT_URL", bed.sim.org_url(ORG))
        .env("VSTS_AGENT_INPUT_AUTH", "PAT")
        .env("VSTS_AGENT_INPUT_TOKEN", PAT)
        .env("VSTS_AGENT_INPUT_POOL", POOL)
        .env("VSTS_AGENT_INPUT_AGENT", "env-agent")
        .env("JAVA_HOME", "/opt/java")
        .env("AZP_SECRET_THING", "hunter2")
        .env("AZURE_CLIENT_ID", "client")
        .env("VSO_AGENT_IGNORE", "AZP_SECRET_THING, AZURE_CLIENT_ID");
    let out = outcome(cmd).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !out.stdout.contains(PAT) && !out.stderr.contains(PAT),
        "token never printed"
    );

    let agent = bed.agent("env-agent").expect("registered from env inputs");
    let caps = &agent.system_capabilities;
    assert_eq!(caps.get("JAVA_HOME").map(String::as_str), Some("/opt/java"));
    assert_eq!(
        caps.get("Agent.Name").map(String::as_str),
        Some("env-agent")
    );
    assert_eq!(
        caps.get("Agent.Version").map(String::as_str),
        Some(AGENT_VERSION)
    );
    assert_eq!(caps.get("Agent.OS").map(String::as_str), Some("Linux"));
    assert_eq!(
        caps.get("Agent.HomeDirectory").map(PathBuf::from),
        Some(std::path::absolute(&dir).expect("abs"))
    );
    for key in ["Agent.OSArchitecture", "Agent.ComputerName", "PATH"] {
        assert!(caps.contains_key(key), "{key} missing: {caps:?}");
    }
    for gone in ["AZP_SECRET_THING", "AZURE_CLIENT_ID", "SHLVL"] {
        assert!(!caps.contains_key(gone), "{gone} must not be a capability");
    }
    assert!(
        !caps
            .keys()
            .any(|k| k.to_ascii_uppercase().starts_with("VSTS_AGENT_INPUT_")),
        "inputs are removed from the environment before the capability scan: {caps:?}"
    );
    assert!(
        !caps.values().any(|v| v.contains(PAT)),
        "the token is no capability"
    );
    let configured = events(&dir, "configured");
    assert_eq!(configured.len(), 1);
    assert_eq!(
        configured[0].data["envInputs"].as_array().map(Vec::len),
        Some(6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_name_fails_without_replace_and_is_taken_over_with_it() {
    let bed = Bed::start("replace").await;
    let first = bed.agent_dir("first");
    assert_eq!(bed.configure(&first, "same-name", &[]).await.code, Some(0));
    let original = bed.agent("same-name").expect("registered");

    let second = bed.agent_dir("second");
    let out = bed.configure(&second, "same-name", &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("--replace"), "{out:?}");
    assert!(!second.join(".agent").exists());

    let out = bed.configure(&second, "same-name", &["--replace"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("Successfully replaced the agent"),
        "{out:?}"
    );
    let replaced = bed.agent("same-name").expect("still registered");
    assert_eq!(replaced.id, original.id, "the same agent is taken over");
    assert_eq!(bed.sim.agents(ORG, POOL).expect("agents").len(), 1);
    assert_eq!(events(&second, "configured")[0].data["replaced"], true);

    // The new key works: the second folder's listener serves a request.
    let id = bed.sim.queue(ORG, POOL, RequestSpec::new()).expect("queue");
    let out = outcome(bed.listener(&second, true)).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        bed.wait_finished(id).await.result.as_deref(),
        Some("succeeded")
    );

    // Configuring a configured folder is refused, like the real agent.
    let out = bed.configure(&second, "other", &[]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("already configured"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_run_sh_does_not_reach_the_listener_but_sigterm_to_the_listener_cancels_the_job()
{
    let bed = Bed::start("signals").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-s", &[]).await.code, Some(0));

    // run.sh without exec: SIGTERM ends the wrapper, the listener goes on and finishes the job normally.
    let id = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(2)),
        )
        .expect("queue");
    let mut wrapper = bed.command(&dir.join("run.sh"));
    wrapper
        .arg("--once")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut wrapper = wrapper.spawn().expect("run.sh");
    bed.wait_received(id).await;
    let pid = Pid::from_raw(i32::try_from(wrapper.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM run.sh");
    let status = wait_exit(&mut wrapper).await;
    assert!(!status.success(), "run.sh dies of the signal: {status:?}");
    let r = bed.wait_finished(id).await;
    assert_eq!(
        r.result.as_deref(),
        Some("succeeded"),
        "the listener never saw the SIGTERM"
    );
    wait_for_events(&dir, "exit", 1).await;
    assert!(events(&dir, "signal").is_empty());

    // The listener itself: SIGTERM while the job runs cancels it, deletes the session, exits 0.
    let id = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(300)),
        )
        .expect("queue");
    let mut listener = bed.listener(&dir, true);
    listener.stdout(Stdio::null()).stderr(Stdio::null());
    let mut listener = listener.spawn().expect("listener");
    bed.wait_received(id).await;
    let pid = Pid::from_raw(i32::try_from(listener.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM listener");
    let status = wait_exit(&mut listener).await;
    assert_eq!(status.code(), Some(0));
    let r = bed.wait_finished(id).await;
    assert_eq!(r.result.as_deref(), Some("canceled"));
    assert!(
        !bed.agent("agent-s").expect("agent").online,
        "session deleted"
    );
    let canceling = events(&dir, "job_canceling");
    assert_eq!(canceling.len(), 1);
    assert_eq!(canceling[0].data["reason"], "agent_shutdown");

    // SIGTERM while idle: the session is deleted and the listener exits 0.
    let mut idle = bed.listener(&dir, true);
    idle.stdout(Stdio::null()).stderr(Stdio::null());
    let mut idle = idle.spawn().expect("listener");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !bed.agent("agent-s").expect("agent").online && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bed.agent("agent-s").expect("agent").online);
    let pid = Pid::from_raw(i32::try_from(idle.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGINT).expect("SIGINT listener");
    assert_eq!(wait_exit(&mut idle).await.code(), Some(0));
    assert!(!bed.agent("agent-s").expect("agent").online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancellation_message_cancels_the_running_job() {
    let bed = Bed::start("cancelmsg").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-c", &[]).await.code, Some(0));
    let id = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(300)),
        )
        .expect("queue");
    let mut listener = bed.listener(&dir, true);
    listener.stdout(Stdio::null()).stderr(Stdio::null());
    let mut listener = listener.spawn().expect("listener");
    bed.wait_received(id).await;
    bed.sim.cancel(ORG, id).expect("cancel");
    assert_eq!(wait_exit(&mut listener).await.code(), Some(0));
    let r = bed.wait_finished(id).await;
    assert_eq!(r.result.as_deref(), Some("canceled"));
    let canceling = events(&dir, "job_canceling");
    assert_eq!(canceling.len(), 1, "{canceling:?}");
    assert_eq!(canceling[0].data["reason"], "job_cancellation_message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_exit_codes_follow_the_real_agent() {
    let bed = Bed::start("faults").await;

    // Wrong PAT: 401.
    let dir = bed.agent_dir("bad-pat");
    let mut cmd = bed.command(&dir.join("config.sh"));
    let mut args = bed.configure_args("a1");
    let token_at = args.iter().position(|a| a == PAT).expect("token arg");
    args[token_at] = "not-a-pat".into();
    cmd.args(&args);
    let out = outcome(cmd).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("401"), "{out:?}");

    // A PAT of an identity that is not in the organization: 401 TF401444.
    let dir = bed.agent_dir("stranger");
    let mut cmd = bed.command(&dir.join("config.sh"));
    args[token_at] = "pat-of-a-stranger".into();
    cmd.args(&args);
    let out = outcome(cmd).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("TF401444"), "{out:?}");

    // Pool not found.
    let dir = bed.agent_dir("no-pool");
    let out = bed.configure(&dir, "a3", &["--pool", "nope"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("Agent pool not found: 'nope'"),
        "{out:?}"
    );

    // One 503: the VSS HTTP client's retry absorbs it.
    let dir = bed.agent_dir("one-503");
    bed.sim.inject_fault(Fault::once(
        EndpointClass::Pools,
        FaultKind::ServerError { status: 503 },
    ));
    let out = bed.configure(&dir, "a4", &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // A lasting 5xx: the real agent turns every configuration failure into exit 1 (TerminatedError).
    let dir = bed.agent_dir("down");
    bed.sim.inject_fault(Fault::always(
        EndpointClass::Pools,
        FaultKind::ServerError { status: 503 },
    ));
    let out = bed.configure(&dir, "a5", &[]).await;
    bed.sim.clear_faults();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("503"), "{out:?}");
    assert!(!dir.join(".agent").exists());
    assert!(bed.agent("a5").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_is_refused_while_the_listener_runs() {
    let bed = Bed::start("busy").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-b", &[]).await.code, Some(0));
    let mut listener = bed.listener(&dir, true);
    listener.stdout(Stdio::null()).stderr(Stdio::null());
    let mut listener = listener.spawn().expect("listener");
    wait_for_events(&dir, "session_created", 1).await;
    let out = bed.remove(&dir).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("running"), "{out:?}");
    assert!(bed.agent("agent-b").is_some(), "still registered");
    assert!(dir.join(".agent").exists());

    let pid = Pid::from_raw(i32::try_from(listener.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(wait_exit(&mut listener).await.code(), Some(0));
    let out = bed.remove(&dir).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(bed.agent("agent-b").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_job_reports_the_step_environment_argv_and_token_file_access() {
    let bed = Bed::start("probe").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-p", &[]).await.code, Some(0));
    let token_file = bed.root.join("federated-token");
    std::fs::write(&token_file, "not-a-real-token").expect("token file");
    let missing = bed.root.join("missing-token-file");

    let id = bed
        .sim
        .queue(ORG, POOL, RequestSpec::new().probe())
        .expect("queue");
    let mut cmd = bed.listener(&dir, true);
    cmd.env("AZURE_FEDERATED_TOKEN_FILE", &token_file)
        .env("MY_TOKEN_FILE_PATH", &missing)
        .env("VSTS_AGENT_INPUT_TOKEN", "must-not-leak")
        .env("JOB_VISIBLE", "yes");
    let out = outcome(cmd).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    bed.wait_finished(id).await;

    let reports = bed.sim.reports(id);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let body = &reports[0].body;
    let env: BTreeMap<String, String> =
        serde_json::from_value(body["env"].clone()).expect("env map");
    assert_eq!(env.get("JOB_VISIBLE").map(String::as_str), Some("yes"));
    assert!(
        !env.contains_key("VSTS_AGENT_INPUT_TOKEN"),
        "inputs never reach job steps"
    );
    assert!(!env.values().any(|v| v == "must-not-leak"));
    let argv: Vec<String> = serde_json::from_value(body["argv"].clone()).expect("argv");
    assert!(argv[0].ends_with("bin/Agent.Listener"), "{argv:?}");
    assert_eq!(&argv[1..], ["run", "--once"]);
    let readable: BTreeMap<String, bool> =
        serde_json::from_value(body["readable"].clone()).expect("readable");
    assert_eq!(
        readable.get(token_file.to_str().expect("utf8")),
        Some(&true)
    );
    assert_eq!(readable.get(missing.to_str().expect("utf8")), Some(&false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_deleted_while_listening_exits_0_like_a_revoked_token() {
    let bed = Bed::start("deleted").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-d", &[]).await.code, Some(0));
    let mut listener = bed.listener(&dir, true);
    listener.stdout(Stdio::null()).stderr(Stdio::null());
    let mut listener = listener.spawn().expect("listener");
    wait_for_events(&dir, "session_created", 1).await;

    let agent = bed.agent("agent-d").expect("agent");
    let pool_id = bed.sim.pool_id(ORG, POOL).expect("pool id");
    let resp = bed
        .sim
        .http_client()
        .delete(format!(
            "{}/_apis/distributedtask/pools/{pool_id}/agents/{}?api-version=7.1",
            bed.sim.org_url(ORG),
            agent.id
        ))
        .basic_auth("", Some(PAT))
        .send()
        .await
        .expect("delete");
    assert!(resp.status().is_success(), "{resp:?}");

    assert_eq!(wait_exit(&mut listener).await.code(), Some(0));
    assert_eq!(
        events(&dir, "token_revoked").len(),
        1,
        "{:?}",
        standin::read_events(&dir)
    );
    // The folder is still configured: deregistration is the caller's job (and finds the agent gone).
    let out = bed.remove(&dir).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!dir.join(".agent").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_agent_token_lifetime_still_finishes() {
    let bed = Bed::start_with(
        "short-token",
        SimConfig {
            long_poll_secs: 1,
            agent_token_lifetime_secs: 2,
            ..SimConfig::default()
        },
    )
    .await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-t", &[]).await.code, Some(0));
    let id = bed
        .sim
        .queue(
            ORG,
            POOL,
            RequestSpec::new().duration(Duration::from_secs(5)),
        )
        .expect("queue");
    let mut cmd = bed.listener(&dir, true);
    cmd.env("STANDIN_RENEW_INTERVAL_MS", "1500");
    let out = outcome(cmd).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = bed.wait_finished(id).await;
    assert_eq!(r.result.as_deref(), Some("succeeded"));
    assert!(
        events(&dir, "lock_renewed").len() >= 2,
        "renewed during the job"
    );
    assert!(events(&dir, "job_finish_failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_once_the_listener_serves_jobs_until_stopped() {
    let bed = Bed::start("loop").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-l", &[]).await.code, Some(0));
    // Knobs through the agent folder's .env, as with an entrypoint that clears the environment.
    standin::append_dot_env(&dir, &[("STANDIN_EMPTY_POLL_DELAY_MS", "20")]).expect(".env");
    let mut listener = bed.listener(&dir, false);
    listener.env_remove("STANDIN_EMPTY_POLL_DELAY_MS");
    listener.stdout(Stdio::null()).stderr(Stdio::null());
    let mut listener = listener.spawn().expect("listener");
    let first = bed.sim.queue(ORG, POOL, RequestSpec::new()).expect("queue");
    bed.wait_finished(first).await;
    let second = bed
        .sim
        .queue(ORG, POOL, RequestSpec::new().result("failed"))
        .expect("queue");
    assert_eq!(
        bed.wait_finished(second).await.result.as_deref(),
        Some("failed")
    );
    assert!(
        listener.try_wait().expect("try_wait").is_none(),
        "still listening"
    );
    let pid = Pid::from_raw(i32::try_from(listener.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(wait_exit(&mut listener).await.code(), Some(0));
    assert_eq!(events(&dir, "job_finished").len(), 2);
    let capabilities = &bed.agent("agent-l").expect("agent").system_capabilities;
    assert!(
        !capabilities.keys().any(|k| k.starts_with("STANDIN_")),
        "knobs are no capabilities"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_in_the_agent_flow_are_retried_until_the_job_is_served() {
    let bed = Bed::start("flaky").await;
    let dir = bed.agent_dir("agent");
    assert_eq!(bed.configure(&dir, "agent-f", &[]).await.code, Some(0));
    let id = bed.sim.queue(ORG, POOL, RequestSpec::new()).expect("queue");
    // 500 is not retried by the HTTP client itself, so the listener's own loops have to.
    bed.sim.inject_fault(Fault::times(
        EndpointClass::AgentFlow,
        FaultKind::ServerError { status: 500 },
        3,
    ));
    let out = outcome(bed.listener(&dir, true)).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        bed.wait_finished(id).await.result.as_deref(),
        Some("succeeded")
    );
    let failures = events(&dir, "session_create_failed");
    assert!(!failures.is_empty(), "the faults hit session creation");
    assert!(
        failures.iter().all(|e| e.data["retry"] == true),
        "{failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_listener_of_the_same_agent_waits_out_the_session_conflict() {
    let bed = Bed::start("conflict").await;
    let first = bed.agent_dir("first");
    assert_eq!(bed.configure(&first, "agent-x", &[]).await.code, Some(0));
    // The same agent's files in a second folder (e.g. a copied image layer).
    let second = bed.agent_dir("second");
    for file in [".agent", ".credentials", ".credentials_rsaparams"] {
        std::fs::copy(first.join(file), second.join(file)).expect("copy");
    }
    let mut one = bed.listener(&first, true);
    one.stdout(Stdio::null()).stderr(Stdio::null());
    let mut one = one.spawn().expect("first listener");
    wait_for_events(&first, "session_created", 1).await;

    let mut two = bed.listener(&second, true);
    two.stdout(Stdio::null()).stderr(Stdio::null());
    let mut two = two.spawn().expect("second listener");
    wait_for_events(&second, "session_create_failed", 1).await;
    assert_eq!(
        events(&second, "session_create_failed")[0].data["label"],
        "http_409"
    );

    let pid = Pid::from_raw(i32::try_from(one.id().expect("pid")).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(wait_exit(&mut one).await.code(), Some(0));
    wait_for_events(&second, "session_created", 1).await;
    let id = bed.sim.queue(ORG, POOL, RequestSpec::new()).expect("queue");
    assert_eq!(wait_exit(&mut two).await.code(), Some(0));
    assert_eq!(
        bed.wait_finished(id).await.result.as_deref(),
        Some("succeeded")
    );
}
