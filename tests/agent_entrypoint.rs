//! `azp-autoscaler agent` as a process, with the environment a pod would have (workload-identity variables
//! and a federated token file written by the test), against the ADO + Entra simulator over HTTPS with its
//! test CA, driving the stand-in agent (`config.sh`, `bin/Agent.Listener`).
//!
//! Needs the `azp-testbed` binary next to `azp-autoscaler` (`cargo build --workspace --bins`, which
//! `tests/run.sh` does first).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use azp_testbed::sim::testing::TestIssuer;
use azp_testbed::sim::{
    AgentInfo, EndpointClass, Fault, FaultKind, IdentitySpec, OrgSpec, PoolRole, RequestSpec,
    SimConfig, Simulator,
};
use azp_testbed::standin;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const ORG: &str = "contoso";
const POOL: &str = "linux";
const NAMESPACE: &str = "ci";
const SERVICE_ACCOUNT: &str = "azp-agent";
/// Every JWT (Entra access tokens, service-account tokens) starts with this (`{"` base64url-encoded).
const JWT_PREFIX: &str = "eyJ";
/// The PAT of the Azure DevOps Server mode tests.
const TEST_PAT: &str = "pat0123456789abcdefghijklmnopqrstuvwxyz";

struct Bed {
    sim: Simulator,
    dir: PathBuf,
    agent_dir: PathBuf,
    token_file: PathBuf,
    federated_token: String,
    pat_file: Option<PathBuf>,
    client_id: String,
    object_id: String,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn testbed_binary() -> PathBuf {
    let ours = Path::new(env!("CARGO_BIN_EXE_azp-autoscaler"));
    let path = ours.with_file_name("azp-testbed");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p azp-testbed --bins` first (tests/run.sh does)",
        path.display()
    );
    path
}

struct Options {
    /// The identity is a member of the organization (else every ADO call answers 401 TF401444).
    member: bool,
    /// Azure DevOps Server mode: authenticate with this PAT (from a file) instead of workload identity.
    pat: Option<&'static str>,
}

impl Bed {
    async fn start() -> Bed {
        Self::with(Options {
            member: true,
            pat: None,
        })
        .await
    }

    async fn with(opts: Options) -> Bed {
        let sim = Simulator::start(SimConfig::default())
            .await
            .expect("simulator starts");
        let issuer = TestIssuer::new("https://oidc.test.local/cluster-a").expect("issuer");
        sim.add_federated_issuer(issuer.federated_issuer());
        let client_id = uuid::Uuid::new_v4().to_string();
        let identity =
            IdentitySpec::new(&client_id).federated_sa(&issuer.issuer, NAMESPACE, SERVICE_ACCOUNT);
        let object_id = identity.object_id.clone();
        sim.add_identity(identity);
        let mut org = OrgSpec::new(ORG).pool(POOL);
        if opts.member {
            org = org.member(&object_id);
        }
        if let Some(pat) = opts.pat {
            org = org.pat(pat, &object_id);
        }
        sim.add_org(org).expect("org");

        let dir = std::env::temp_dir().join(format!("azp-agent-e2e-{}", uuid::Uuid::new_v4()));
        let agent_dir = dir.join("agent");
        standin::layout(&agent_dir, Some(&testbed_binary())).expect("stand-in layout");
        standin::append_dot_env(
            &agent_dir,
            &[
                (standin::ENV_EMPTY_POLL_DELAY_MS, "100"),
                (standin::ENV_RETRY_INTERVAL_MS, "200"),
                (standin::ENV_HTTP_RETRY_BACKOFF_MS, "50"),
                (standin::ENV_RENEW_INTERVAL_MS, "500"),
            ],
        )
        .expect(".env");
        let token_file = dir.join("azure-identity-token");
        let federated_token =
            issuer.sa_token(NAMESPACE, SERVICE_ACCOUNT, Duration::from_secs(3600));
        std::fs::write(&token_file, &federated_token).expect("token file");
        let pat_file = opts.pat.map(|pat| {
            let f = dir.join("pat");
            std::fs::write(&f, format!("{pat}\n")).expect("pat file");
            f
        });
        Bed {
            pat_file,
            sim,
            dir,
            agent_dir,
            token_file,
            federated_token,
            client_id,
            object_id,
        }
    }

    /// The entrypoint with a pod's environment (nothing inherited from the test process but PATH/HOME).
    fn command(&self, extra: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_azp-autoscaler"));
        cmd.arg("agent")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("AZP_URL", self.sim.org_url(ORG))
            .env("AZP_POOL", POOL)
            .env("AZP_AGENT_NAME", "k8s-cluster-a-linux-1")
            .env("AZP_AGENT_DIR", &self.agent_dir)
            .env(
                "AZP_CAPABILITIES",
                r#"{"azp-autoscaler.owner":"cluster-a/ci/linux","docker":"true"}"#,
            )
            .env("AZP_DEREGISTER_TIMEOUT_SECONDS", "20")
            .env("AZP_LISTENER_GRACE_SECONDS", "20")
            .env(
                "SSL_CERT_FILE",
                self.sim.ca_pem_path().expect("TLS simulator"),
            )
            // The stand-in's config.sh refuses root like the real one; test machines often run as root.
            .env("AGENT_ALLOW_RUNASROOT", "1")
            .env("JAVA_HOME", "/opt/java")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match &self.pat_file {
            // What the workload-identity webhook injects into a labelled pod.
            None => cmd
                .env("AZURE_CLIENT_ID", &self.client_id)
                .env("AZURE_TENANT_ID", self.sim.tenant_id())
                .env("AZURE_AUTHORITY_HOST", self.sim.entra_url())
                .env("AZURE_FEDERATED_TOKEN_FILE", &self.token_file),
            Some(f) => cmd.env("AZP_AUTH", "pat").env("AZP_PAT_FILE", f),
        };
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&self, extra: &[(&str, &str)]) -> Proc {
        let child = self.command(extra).spawn().expect("entrypoint starts");
        let pid = Pid::from_raw(i32::try_from(child.id().expect("pid")).expect("pid fits"));
        let done =
            tokio::spawn(async move { child.wait_with_output().await.expect("entrypoint runs") });
        Proc { pid, done }
    }

    async fn run(&self, extra: &[(&str, &str)]) -> Finished {
        self.spawn(extra).finish().await
    }

    fn agents(&self) -> Vec<AgentInfo> {
        self.sim.agents(ORG, POOL).expect("pool")
    }

    /// The first agent matching `pred` within 30 s (`None`: the caller finishes the process first, so
    /// its output shows why).
    async fn wait_agent(&self, pred: impl Fn(&AgentInfo) -> bool) -> Option<AgentInfo> {
        for _ in 0..600 {
            if let Some(a) = self.agents().into_iter().find(&pred) {
                return Some(a);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts the entrypoint and queues `spec` once its agent is online (in ADO a request that no agent
    /// of the pool, even an offline one, can serve fails at once; in production the controller's
    /// placeholder agent prevents that). Returns the process, the request, and the agent as it was then.
    async fn start_with_job(
        &self,
        extra: &[(&str, &str)],
        spec: RequestSpec,
    ) -> (Proc, u64, AgentInfo) {
        let proc = self.spawn(extra);
        let Some(agent) = self.wait_agent(|a| a.online).await else {
            let _ = kill(proc.pid, Signal::SIGTERM);
            proc.finish().await;
            panic!("the agent never came online");
        };
        let request = self.sim.queue(ORG, POOL, spec).expect("queue");
        (proc, request, agent)
    }

    /// Any secret we know of, or anything that looks like a JWT.
    fn leaks(&self, text: &str) -> bool {
        text.contains(JWT_PREFIX) || text.contains(&self.federated_token) || text.contains(TEST_PAT)
    }
}

/// Whether the stand-in's `config.sh remove` deleted the agent from the pool (its diag record).
fn removed_by_config_sh(agent_dir: &Path) -> bool {
    standin::read_events(agent_dir)
        .iter()
        .any(|e| e.event == "removed" && e.data.get("deletedAgentId").is_some_and(|v| !v.is_null()))
}

struct Proc {
    pid: Pid,
    done: tokio::task::JoinHandle<std::process::Output>,
}

struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Proc {
    async fn finish(mut self) -> Finished {
        let (out, timed_out) =
            match tokio::time::timeout(Duration::from_secs(120), &mut self.done).await {
                Ok(out) => (out.expect("join"), false),
                Err(_) => {
                    let _ = kill(self.pid, Signal::SIGKILL);
                    (self.done.await.expect("join"), true)
                }
            };
        let f = Finished {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "--- entrypoint exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            f.code, f.stdout, f.stderr
        );
        assert!(!timed_out, "the entrypoint did not exit within 120 s");
        f
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_runs_one_job_and_leaves_no_agent_and_no_token_anywhere() {
    happy_path(Bed::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_with_a_pat_file_for_azure_devops_server() {
    happy_path(
        Bed::with(Options {
            member: true,
            pat: Some(TEST_PAT),
        })
        .await,
    )
    .await;
}

async fn happy_path(bed: Bed) {
    let spec = RequestSpec::new()
        .demand("docker")
        .duration(Duration::from_millis(500))
        .probe();
    let (proc, request, agent) = bed.start_with_job(&[], spec).await;
    let finished = proc.finish().await;

    assert_eq!(finished.code, Some(0), "exit code");
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("succeeded"), "{r:?}");
    assert_eq!(r.agent_name.as_deref(), Some("k8s-cluster-a-linux-1"));
    assert!(
        removed_by_config_sh(&bed.agent_dir),
        "deregistered by config.sh remove"
    );
    // config.sh got the token only through VSTS_AGENT_INPUT_TOKEN, never in argv.
    for e in standin::read_events(&bed.agent_dir) {
        if matches!(e.event.as_str(), "configured" | "removed") {
            assert_eq!(e.data["envInputs"], serde_json::json!(["token"]), "{e:?}");
            assert!(!bed.leaks(&e.data["argv"].to_string()), "{e:?}");
        }
    }
    assert!(
        bed.agents().is_empty(),
        "the agent is gone: {:?}",
        bed.agents()
    );

    // Capabilities: the AgentPool's are advertised; nothing of ours, no credential.
    let caps = &agent.system_capabilities;
    assert_eq!(
        caps.get("azp-autoscaler.owner").map(String::as_str),
        Some("cluster-a/ci/linux")
    );
    assert_eq!(caps.get("JAVA_HOME").map(String::as_str), Some("/opt/java"));
    for (k, v) in caps {
        let upper = k.to_ascii_uppercase();
        assert!(
            !upper.starts_with("AZURE_")
                && !upper.starts_with("AZP_")
                && !upper.starts_with("VSTS_AGENT_INPUT_"),
            "capability {k} must not exist"
        );
        assert!(!bed.leaks(v), "capability {k} holds a token");
    }

    // The job step's environment and the listener's argv.
    let reports = bed.sim.reports(request);
    assert_eq!(reports.len(), 1, "one probe report: {reports:?}");
    let report: standin::ProbeReport =
        serde_json::from_value(reports[0].body.clone()).expect("report shape");
    for (k, v) in &report.env {
        let upper = k.to_ascii_uppercase();
        assert!(
            !upper.starts_with("AZURE_")
                && !upper.starts_with("AZP_")
                && !upper.starts_with("VSTS_AGENT_INPUT_"),
            "the job step got {k}"
        );
        assert!(!bed.leaks(v), "the job step's {k} holds a token");
    }
    assert_eq!(
        report.env.get("agent.disableupdate").map(String::as_str),
        Some("true")
    );
    assert!(
        report.argv.iter().all(|a| !bed.leaks(a)),
        "argv: {:?}",
        report.argv
    );
    assert!(
        report.argv.iter().any(|a| a == "--once"),
        "run once: {:?}",
        report.argv
    );

    // Logs.
    assert!(
        !bed.leaks(&finished.stdout) && !bed.leaks(&finished.stderr),
        "a token in the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_token_lifetime_still_deregisters() {
    let bed = Bed::start().await;
    // Every access token lives 3 s; the job runs 6 s, so the registration token is dead at the end.
    bed.sim.set_token_lifetime(Duration::from_secs(3));
    let spec = RequestSpec::new().duration(Duration::from_secs(6));
    let (proc, request, _) = bed.start_with_job(&[], spec).await;
    let exchanges_before_deregistration = bed.sim.call_count("entra.token");
    let finished = proc.finish().await;
    assert_eq!(finished.code, Some(0));
    assert!(
        bed.sim.call_count("entra.token") > exchanges_before_deregistration,
        "a fresh token was exchanged for the deregistration: {:?}",
        bed.sim.calls()
    );
    // `config.sh remove` itself succeeded with that token (not only the REST fallback).
    assert!(
        removed_by_config_sh(&bed.agent_dir),
        "config.sh remove deleted the agent: {:?}",
        standin::read_events(&bed.agent_dir)
    );
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("succeeded"));
    assert!(
        bed.agents().is_empty(),
        "the agent is gone: {:?}",
        bed.agents()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_idle_deregisters_and_exits_0() {
    let bed = Bed::start().await;
    let proc = bed.spawn(&[]);
    let online = bed.wait_agent(|a| a.online).await;
    kill(proc.pid, Signal::SIGTERM).expect("signal");
    let finished = proc.finish().await;
    assert!(online.is_some(), "the agent came online");
    assert_eq!(finished.code, Some(0));
    assert!(
        bed.agents().is_empty(),
        "the agent is gone: {:?}",
        bed.agents()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_job_runs_cancels_it_deregisters_and_exits_14() {
    let bed = Bed::start().await;
    let spec = RequestSpec::new().duration(Duration::from_secs(120));
    let (proc, request, _) = bed.start_with_job(&[], spec).await;
    let r = bed
        .sim
        .wait_request(ORG, request, Duration::from_secs(30), |r| {
            r.receive_time.is_some()
        })
        .await
        .expect("request");
    assert!(r.receive_time.is_some(), "the job started: {r:?}");
    kill(proc.pid, Signal::SIGTERM).expect("signal");
    let finished = proc.finish().await;
    assert_eq!(finished.code, Some(14), "interrupted job");
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("canceled"), "{r:?}");
    assert!(
        bed.agents().is_empty(),
        "the agent is gone: {:?}",
        bed.agents()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_with_job_result_mirrors_a_failed_pipeline_job() {
    let bed = Bed::start().await;
    let spec = RequestSpec::new().result("failed");
    let (proc, _, _) = bed
        .start_with_job(&[("AZP_EXIT_WITH_JOB_RESULT", "true")], spec)
        .await;
    let finished = proc.finish().await;
    assert_eq!(finished.code, Some(20));
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_removed_by_the_controller_exits_0() {
    let bed = Bed::start().await;
    let proc = bed.spawn(&[]);
    let agent = bed.wait_agent(|a| a.online).await;
    if agent.is_none() {
        let _ = kill(proc.pid, Signal::SIGTERM);
        proc.finish().await;
        panic!("the agent never came online");
    }
    let agent = agent.expect("checked");
    // What the controller does to an idle agent: delete it through REST with its own token.
    let pool_id = bed.sim.pool_id(ORG, POOL).expect("pool");
    let token = bed
        .sim
        .mint_access_token(&bed.client_id, &bed.object_id, Duration::from_secs(600));
    let status = bed
        .sim
        .http_client()
        .delete(format!(
            "{}/_apis/distributedtask/pools/{pool_id}/agents/{}?api-version=7.1",
            bed.sim.org_url(ORG),
            agent.id
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("delete")
        .status();
    assert!(status.is_success(), "{status}");
    let finished = proc.finish().await;
    assert_eq!(finished.code, Some(0));
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_is_retried_then_exits_11_without_an_agent() {
    let bed = Bed::start().await;
    bed.sim
        .inject_fault(Fault::always(EndpointClass::Token, FaultKind::TokenOutage));
    let finished = bed.run(&[("AZP_REGISTER_TIMEOUT_SECONDS", "4")]).await;
    assert_eq!(finished.code, Some(11));
    assert!(
        finished.stderr.contains("Entra"),
        "explained: {}",
        finished.stderr
    );
    assert!(
        bed.sim.call_count("entra.token") >= 2,
        "retried: {:?}",
        bed.sim.calls()
    );
    assert!(bed.agents().is_empty());
    assert!(
        !bed.agent_dir.join(".agent").exists(),
        "config.sh never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_not_in_the_organization_exits_11_naming_tf401444() {
    let bed = Bed::with(Options {
        member: false,
        pat: None,
    })
    .await;
    let finished = bed.run(&[]).await;
    assert_eq!(finished.code, Some(11));
    assert!(
        finished.stderr.contains("TF401444")
            && finished.stderr.contains("Organization settings → Users"),
        "explained: {}",
        finished.stderr
    );
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pool_exits_12_naming_the_pool() {
    let bed = Bed::start().await;
    let finished = bed.run(&[("AZP_POOL", "no-such-pool")]).await;
    assert_eq!(finished.code, Some(12));
    assert!(
        finished
            .stderr
            .contains("has no agent pool named `no-such-pool`"),
        "explained: {}",
        finished.stderr
    );
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_sh_exit_code_2_is_retried() {
    let bed = Bed::start().await;
    // config.sh fails twice with the agent's "retryable error" code, then the real stand-in runs.
    let real = bed.agent_dir.join("config.real.sh");
    std::fs::rename(bed.agent_dir.join("config.sh"), &real).expect("rename");
    let wrapper = format!(
        "#!/bin/sh\nif [ \"$1\" != remove ]; then\n  n=$(cat {dir}/attempts 2>/dev/null || echo 0); n=$((n+1)); echo $n > {dir}/attempts\n  if [ $n -le 2 ]; then echo 'transient failure' >&2; exit 2; fi\nfi\nexec {real} \"$@\"\n",
        dir = bed.dir.display(),
        real = real.display()
    );
    let path = bed.agent_dir.join("config.sh");
    std::fs::write(&path, wrapper).expect("wrapper");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let (proc, request, _) = bed.start_with_job(&[], RequestSpec::new()).await;
    let finished = proc.finish().await;
    assert_eq!(finished.code, Some(0));
    let attempts = std::fs::read_to_string(bed.dir.join("attempts")).expect("attempts");
    assert_eq!(attempts.trim(), "3");
    let r = bed.sim.request(ORG, request).expect("request");
    assert_eq!(r.result.as_deref(), Some("succeeded"));
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_settings_are_listed_at_once_with_exit_10() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_azp-autoscaler"))
        .arg("agent")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AZP_URL", "not a url")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in ["AZP_URL", "AZP_POOL", "AZP_AGENT_NAME", "AZP_AGENT_DIR"] {
        assert!(stderr.contains(name), "{name} not named: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_without_workload_identity_or_with_a_bad_ca_bundle_is_explained() {
    let bed = Bed::start().await;
    // A pod not labelled for workload identity: no AZURE_* variables at all.
    let mut cmd = bed.command(&[]);
    for var in [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_AUTHORITY_HOST",
        "AZURE_FEDERATED_TOKEN_FILE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{stderr}");
    assert!(
        stderr.contains("AZURE_CLIENT_ID") && stderr.contains("azure.workload.identity/use"),
        "{stderr}"
    );

    // SSL_CERT_FILE names a file that does not exist: a configuration error naming the variable.
    let finished = bed.run(&[("SSL_CERT_FILE", "/nonexistent/ca.pem")]).await;
    assert_eq!(finished.code, Some(10));
    assert!(
        finished.stderr.contains("SSL_CERT_FILE"),
        "{}",
        finished.stderr
    );
    assert!(bed.agents().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_administrator_role_on_the_pool_exits_12_explaining_the_role() {
    let bed = Bed::start().await;
    bed.sim
        .set_pool_role(ORG, POOL, &bed.object_id, PoolRole::Reader)
        .expect("role");
    let finished = bed.run(&[]).await;
    assert_eq!(finished.code, Some(12));
    assert!(
        finished
            .stderr
            .contains("may read pool `linux` but not register agents"),
        "explained: {}",
        finished.stderr
    );
    assert!(bed.agents().is_empty());
}
