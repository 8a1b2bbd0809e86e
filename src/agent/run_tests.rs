//! The runner against scripted fakes: a fake `config.sh` and listener (shell scripts driven by files in
//! the agent folder) and a fake [`AdoOps`]. The simulator + stand-in tests live in `tests/agent_*.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::exit::{Exit, JobResult};
use super::ops::{AdoOps, AgentRef, OpsError, OpsKind, Removal, Secret};
use super::run::{Backoff, Runner};
use super::settings::{AuthMode, Settings};
use super::signals::Termination;

const TOKEN: &str = "tok-0123456789-abcdef";

/// `config.sh`: records argv and the token it got, exits with the next code of `config.codes` (default
/// 0); on success writes `.agent`. `remove` records the call and deletes `.agent`.
const CONFIG_SH: &str = r#"#!/bin/sh
cd "$(dirname "$0")"
if [ "$1" = "remove" ]; then
  echo "remove $VSTS_AGENT_INPUT_TOKEN" >> calls.log
  rm -f .agent
  exit "$(cat remove.code 2>/dev/null || echo 0)"
fi
echo "$*" >> argv.log
echo "configure $VSTS_AGENT_INPUT_TOKEN" >> calls.log
if [ -f config.sleep ]; then
  trap 'echo "config got TERM" >> calls.log; exit 1' TERM
  while true; do sleep 1 & wait $!; done
fi
codes="$(cat config.codes 2>/dev/null)"
code="${codes%% *}"
rest="${codes#* }"
[ "$rest" = "$codes" ] && rest=""
printf '%s' "$rest" > config.codes
code="${code:-0}"
echo "configuring with secret $VSTS_AGENT_INPUT_TOKEN"
if [ "$code" = "0" ]; then
  printf '\357\273\277{"agentId": 17, "poolId": 3, "agentName": "a"}' > .agent
fi
exit "$code"
"#;

/// Listener: records its environment; with a `job` file runs a job of that many seconds with the result
/// in `job.result`; SIGTERM cancels the job; exits with `listener.code` (default 0).
const LISTENER: &str = r#"#!/bin/sh
cd "$(dirname "$0")/.."
# The environment as exec'd (a shell drops names like `agent.disableupdate` from its own `env`).
tr '\0' '\n' < /proc/$$/environ > listener.env
echo "$*" > listener.argv
echo "$(date -u): Listening for Jobs"
injob=0
trap '[ "$injob" = 1 ] && echo "$(date -u): Job Build completed with result: Canceled"; exit 0' TERM
if [ -f job ]; then
  injob=1
  echo "$(date -u): Running job: Build"
  secs="$(cat job)"
  i=0
  while [ "$i" -lt "$secs" ]; do sleep 1 & wait $!; i=$((i+1)); done
  echo "$(date -u): Job Build completed with result: $(cat job.result 2>/dev/null || echo Succeeded)"
elif [ -f idle ]; then
  while true; do sleep 1 & wait $!; done
fi
exit "$(cat listener.code 2>/dev/null || echo 0)"
"#;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let p = std::env::temp_dir().join(format!("azp-agent-run-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(p.join("bin")).unwrap();
        for (rel, text) in [("config.sh", CONFIG_SH), ("bin/Agent.Listener", LISTENER)] {
            let f = p.join(rel);
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Dir(p)
    }
    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.0.join(rel), text).unwrap();
    }
    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.0.join(rel)).unwrap_or_default()
    }
    fn settings(&self) -> Settings {
        Settings {
            url: "https://dev.azure.com/contoso".parse().unwrap(),
            pool: "linux".into(),
            agent_name: "k8s-1".into(),
            agent_dir: self.0.clone(),
            work: "_work".into(),
            auth: AuthMode::WorkloadIdentity,
            exit_with_job_result: false,
            register_timeout: Duration::from_secs(20),
            listener_grace: Duration::from_secs(10),
            deregister_timeout: Duration::from_secs(5),
            capabilities: BTreeMap::new(),
            agent_files: None,
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Scripted Azure DevOps: token answers in order (then always OK), delete answers in order (then Removed).
#[derive(Default)]
struct FakeAdo {
    tokens: Mutex<VecDeque<Result<(), OpsError>>>,
    deletes: Mutex<VecDeque<Result<Removal, OpsError>>>,
    deleted: Mutex<Vec<AgentRef>>,
    token_calls: Mutex<u32>,
    diagnosis: Option<OpsError>,
    by_name: Option<AgentRef>,
}

fn transient() -> OpsError {
    OpsError {
        kind: OpsKind::Other,
        transient: true,
        label: "auth_entra_unavailable",
        message: "Entra down".into(),
    }
}

fn identity_error() -> OpsError {
    OpsError {
        kind: OpsKind::Identity,
        transient: false,
        label: "ado_not_in_organization",
        message: "TF401444: not in the organization".into(),
    }
}

impl AdoOps for FakeAdo {
    async fn fresh_token(&self) -> Result<Secret, OpsError> {
        let n = {
            let mut c = self.token_calls.lock().unwrap();
            *c += 1;
            *c
        };
        match self.tokens.lock().unwrap().pop_front() {
            Some(Err(e)) => Err(e),
            _ => Ok(Secret::new(format!("{TOKEN}-{n}"))),
        }
    }

    async fn delete_agent(&self, agent: AgentRef) -> Result<Removal, OpsError> {
        self.deleted.lock().unwrap().push(agent);
        self.deletes
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(Removal::Removed))
    }

    async fn find_agent(&self, _pool: &str, _name: &str) -> Result<Option<AgentRef>, OpsError> {
        Ok(self.by_name)
    }

    async fn diagnose_registration(&self, _pool: &str) -> Option<OpsError> {
        self.diagnosis.clone()
    }
}

fn parent_env() -> Vec<(OsString, OsString)> {
    [
        ("PATH", "/usr/bin:/bin"),
        ("AZURE_CLIENT_ID", "client"),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
        ("AZP_URL", "https://dev.azure.com/contoso"),
        ("JAVA_HOME", "/opt/java"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect()
}

async fn run_with(settings: Settings, ado: &FakeAdo, term: Termination) -> super::Outcome {
    let env = super::env::child_env(parent_env(), &BTreeMap::new());
    Runner::new(&settings, ado, term, env)
        .with_backoff(Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        })
        .run()
        .await
}

fn path(dir: &Dir) -> &Path {
    &dir.0
}

#[tokio::test]
async fn happy_path_registers_runs_and_removes_with_a_fresh_token() {
    let dir = Dir::new();
    dir.write("job", "0");
    let ado = FakeAdo::default();
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert!(outcome.job_started);
    assert_eq!(outcome.job_result, Some(JobResult::Succeeded));

    let argv = dir.read("argv.log");
    assert_eq!(
        argv.trim(),
        "--unattended --url https://dev.azure.com/contoso --auth pat --pool linux --agent k8s-1 --replace --work _work"
    );
    assert!(!argv.contains(TOKEN), "token in argv: {argv}");
    // The token reached config.sh through VSTS_AGENT_INPUT_TOKEN, and removal used a newer one.
    let calls = dir.read("calls.log");
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(
        lines,
        vec![format!("configure {TOKEN}-1"), format!("remove {TOKEN}-2")],
        "{calls}"
    );
    assert!(!path(&dir).join(".agent").exists());
    assert_eq!(dir.read("listener.argv").trim(), "run --once");

    let env = dir.read("listener.env");
    for forbidden in ["AZURE_", "AZP_", "VSTS_AGENT_INPUT_", TOKEN] {
        assert!(
            !env.contains(forbidden),
            "{forbidden} in the listener env:\n{env}"
        );
    }
    assert!(env.contains("agent.disableupdate=true"), "{env}");
    assert!(env.contains("JAVA_HOME=/opt/java"), "{env}");
}

#[tokio::test]
async fn exit_code_2_is_retried_and_stale_config_is_cleared() {
    let dir = Dir::new();
    dir.write("config.codes", "2 2 0");
    let ado = FakeAdo::default();
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert_eq!(dir.read("argv.log").lines().count(), 3);
    // Every attempt got its own freshly acquired token.
    let calls = dir.read("calls.log");
    assert!(calls.contains(&format!("configure {TOKEN}-3")), "{calls}");
}

#[tokio::test]
async fn exit_code_1_is_not_retried_and_is_explained() {
    let dir = Dir::new();
    dir.write("config.codes", "1 0");
    let ado = FakeAdo {
        diagnosis: Some(identity_error()),
        ..FakeAdo::default()
    };
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(
        outcome.exit(),
        Exit::Token,
        "TF401444 is an identity problem: {outcome:?}"
    );
    assert_eq!(dir.read("argv.log").lines().count(), 1);
    assert!(
        dir.read("listener.argv").is_empty(),
        "the listener must not start"
    );

    let dir = Dir::new();
    dir.write("config.codes", "1");
    let ado = FakeAdo::default();
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Registration);
}

/// config.sh exits 1 while ADO itself answers 503: an outage, retried like exit code 2.
#[tokio::test]
async fn exit_code_1_during_a_transient_ado_outage_is_retried() {
    let dir = Dir::new();
    dir.write("config.codes", "1 1 0");
    let ado = FakeAdo {
        diagnosis: Some(OpsError {
            kind: OpsKind::Other,
            transient: true,
            label: "ado_server_error",
            message: "503 Service Unavailable".into(),
        }),
        ..FakeAdo::default()
    };
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert_eq!(
        dir.read("argv.log").lines().count(),
        3,
        "two failed attempts during the outage, then registered"
    );
}

#[tokio::test]
async fn retries_of_exit_code_2_stop_at_the_registration_budget() {
    let dir = Dir::new();
    dir.write("config.codes", &"2 ".repeat(1000));
    let ado = FakeAdo::default();
    let mut settings = dir.settings();
    settings.register_timeout = Duration::from_secs(1);
    let outcome = run_with(settings, &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Registration);
    assert!(dir.read("argv.log").lines().count() >= 2);
}

#[tokio::test]
async fn transient_token_failures_are_retried_permanent_ones_are_not() {
    let dir = Dir::new();
    let ado = FakeAdo::default();
    ado.tokens
        .lock()
        .unwrap()
        .extend([Err(transient()), Err(transient())]);
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");

    let dir = Dir::new();
    let ado = FakeAdo::default();
    ado.tokens.lock().unwrap().push_back(Err(identity_error()));
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Token);
    assert_eq!(*ado.token_calls.lock().unwrap(), 1);
    assert!(
        dir.read("argv.log").is_empty(),
        "config.sh must not run without a token"
    );
}

#[tokio::test]
async fn failed_config_remove_falls_back_to_the_rest_delete_by_id() {
    let dir = Dir::new();
    dir.write("remove.code", "1");
    let ado = FakeAdo::default();
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert_eq!(
        *ado.deleted.lock().unwrap(),
        vec![AgentRef {
            pool_id: 3,
            agent_id: 17
        }]
    );
}

#[tokio::test]
async fn deregistration_that_never_succeeds_exits_15() {
    let dir = Dir::new();
    dir.write("remove.code", "1");
    let ado = FakeAdo::default();
    ado.deletes
        .lock()
        .unwrap()
        .extend((0..1000).map(|_| Err(transient())));
    let mut settings = dir.settings();
    settings.deregister_timeout = Duration::from_secs(1);
    let outcome = run_with(settings, &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Deregistration, "{outcome:?}");
}

#[tokio::test]
async fn listener_stopping_idle_when_the_controller_removed_the_agent_is_success() {
    let dir = Dir::new();
    dir.write("listener.code", "2");
    let ado = FakeAdo::default();
    ado.deletes
        .lock()
        .unwrap()
        .push_back(Ok(Removal::AlreadyGone));
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    // REST first: config.sh remove was not needed.
    assert!(!dir.read("calls.log").contains("remove"));

    // Same listener failure, but the agent was still there: a real failure.
    let dir = Dir::new();
    dir.write("listener.code", "2");
    let ado = FakeAdo::default();
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Agent, "{outcome:?}");
}

#[tokio::test]
async fn job_result_decides_the_exit_code_only_when_asked() {
    for (flag, want) in [(false, Exit::Success), (true, Exit::JobFailed)] {
        let dir = Dir::new();
        dir.write("job", "0");
        dir.write("job.result", "Failed");
        let mut settings = dir.settings();
        settings.exit_with_job_result = flag;
        let outcome = run_with(settings, &FakeAdo::default(), Termination::never()).await;
        assert_eq!(outcome.exit(), want);
    }
}

#[tokio::test]
async fn sigterm_while_busy_cancels_the_job_deregisters_and_exits_14() {
    let dir = Dir::new();
    dir.write("job", "60");
    let ado = FakeAdo::default();
    let (trigger, term) = Termination::manual();
    let settings = dir.settings();
    let run = tokio::spawn({
        let dir_path = path(&dir).to_owned();
        async move {
            let env = super::env::child_env(parent_env(), &BTreeMap::new());
            let ado = ado;
            let out = Runner::new(&settings, &ado, term, env).run().await;
            (out, dir_path)
        }
    });
    wait_for(|| dir.read("listener.env").contains("PATH")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.send(Some(Signal::SIGTERM)).unwrap();
    let (outcome, _) = run.await.unwrap();
    assert_eq!(outcome.exit(), Exit::Interrupted, "{outcome:?}");
    assert_eq!(outcome.job_result, Some(JobResult::Canceled));
    assert!(
        dir.read("calls.log").contains("remove"),
        "deregistered after the cancel"
    );
}

#[tokio::test]
async fn sigterm_while_idle_deregisters_and_exits_0() {
    let dir = Dir::new();
    dir.write("idle", "");
    let ado = FakeAdo::default();
    let (trigger, term) = Termination::manual();
    let settings = dir.settings();
    let run = tokio::spawn(async move {
        let env = super::env::child_env(parent_env(), &BTreeMap::new());
        Runner::new(&settings, &ado, term, env).run().await
    });
    wait_for(|| dir.read("listener.env").contains("PATH")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.send(Some(Signal::SIGTERM)).unwrap();
    let outcome = run.await.unwrap();
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert!(outcome.terminated && !outcome.job_started);
    assert!(dir.read("calls.log").contains("remove"));
}

#[tokio::test]
async fn sigterm_before_registration_registers_nothing() {
    let dir = Dir::new();
    let (trigger, term) = Termination::manual();
    trigger.send(Some(Signal::SIGTERM)).unwrap();
    let ado = FakeAdo {
        by_name: None,
        ..FakeAdo::default()
    };
    let outcome = run_with(dir.settings(), &ado, term).await;
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert!(dir.read("argv.log").is_empty());
    assert!(dir.read("listener.argv").is_empty());
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 10 s");
}

#[tokio::test]
async fn a_refused_rest_delete_falls_back_to_config_sh_remove() {
    let dir = Dir::new();
    dir.write("listener.code", "2");
    let ado = FakeAdo::default();
    ado.deletes.lock().unwrap().push_back(Err(OpsError {
        kind: OpsKind::Permission,
        transient: false,
        label: "ado_forbidden",
        message: "403".into(),
    }));
    let outcome = run_with(dir.settings(), &ado, Termination::never()).await;
    // The agent was still there (config.sh removed it): the listener really failed.
    assert_eq!(outcome.exit(), Exit::Agent, "{outcome:?}");
    assert!(!outcome.deregistration_failed);
    assert!(dir.read("calls.log").contains("remove"));
}

#[tokio::test]
async fn sigterm_while_config_sh_runs_stops_it_and_registers_nothing_more() {
    let dir = Dir::new();
    dir.write("config.sleep", "");
    let ado = FakeAdo::default();
    let (trigger, term) = Termination::manual();
    let settings = dir.settings();
    let run = tokio::spawn(async move {
        let env = super::env::child_env(parent_env(), &BTreeMap::new());
        Runner::new(&settings, &ado, term, env).run().await
    });
    wait_for(|| dir.read("calls.log").contains("configure")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.send(Some(Signal::SIGTERM)).unwrap();
    let outcome = run.await.unwrap();
    assert_eq!(outcome.exit(), Exit::Success, "{outcome:?}");
    assert!(
        dir.read("calls.log").contains("config got TERM"),
        "SIGTERM forwarded to config.sh"
    );
    assert!(
        dir.read("listener.argv").is_empty(),
        "the listener never started"
    );
    assert_eq!(
        dir.read("argv.log").lines().count(),
        1,
        "no retry after the signal"
    );
}

async fn run_preregistered(settings: Settings, ado: &FakeAdo, term: Termination) -> super::Outcome {
    let env = super::env::child_env(parent_env(), &BTreeMap::new());
    Runner::new(&settings, ado, term, env)
        .run_preregistered()
        .await
}

#[tokio::test]
async fn preregistered_agent_runs_once_without_config_sh_or_any_ado_call() {
    let dir = Dir::new();
    dir.write("job", "0");
    dir.write("job.result", "Failed");
    let ado = FakeAdo::default();
    let mut settings = dir.settings();
    settings.exit_with_job_result = true;
    let outcome = run_preregistered(settings, &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::JobFailed, "{outcome:?}");
    assert_eq!(dir.read("calls.log"), "", "config.sh never runs");
    assert_eq!(
        *ado.token_calls.lock().unwrap(),
        0,
        "no token: the pod has none"
    );
    assert!(
        ado.deleted.lock().unwrap().is_empty(),
        "the controller deregisters"
    );
    assert_eq!(dir.read("listener.argv").trim(), "run --once");
}

#[tokio::test]
async fn preregistered_listener_failing_on_its_own_exits_13_and_sigterm_while_busy_14() {
    let dir = Dir::new();
    dir.write("listener.code", "3");
    let ado = FakeAdo::default();
    let outcome = run_preregistered(dir.settings(), &ado, Termination::never()).await;
    assert_eq!(outcome.exit(), Exit::Agent, "{outcome:?}");

    let dir = Dir::new();
    dir.write("job", "30");
    let (trigger, term) = Termination::manual();
    let settings = dir.settings();
    let run = run_preregistered(settings, &ado, term);
    let kill = async {
        wait_for(|| dir.read("listener.env").contains("PATH")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.send(Some(Signal::SIGTERM)).unwrap();
    };
    let (outcome, ()) = tokio::join!(run, kill);
    assert_eq!(outcome.exit(), Exit::Interrupted, "{outcome:?}");
    assert_eq!(outcome.job_result, Some(JobResult::Canceled));
    assert!(ado.deleted.lock().unwrap().is_empty());
}
