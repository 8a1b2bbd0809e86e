//! Settings of the entrypoint: flags, else the environment the controller sets, validated all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

use super::AgentArgs;
#[cfg(test)]
use super::AgentTuning;

/// How the entrypoint authenticates to Azure DevOps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Entra token through the pod's workload identity (`AZURE_*` env injected by the webhook). Default.
    WorkloadIdentity,
    /// A personal access token read from a file (explicit opt-in, for Azure DevOps Server).
    PatFile(PathBuf),
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Organization (or collection) URL, e.g. `https://dev.azure.com/contoso`.
    pub url: Url,
    /// ADO pool name.
    pub pool: String,
    /// Agent name (unique across clusters; set by the controller).
    pub agent_name: String,
    /// Folder holding the official agent (`config.sh`, `bin/Agent.Listener`).
    pub agent_dir: PathBuf,
    /// Work folder handed to `config.sh --work` (relative paths are relative to `agent_dir`).
    pub work: PathBuf,
    /// Authentication.
    pub auth: AuthMode,
    /// Exit with the pipeline job's result (codes 20–22).
    pub exit_with_job_result: bool,
    /// Total time registration may take, retries included.
    pub register_timeout: Duration,
    /// How long the listener gets to cancel its job after a forwarded SIGTERM before it is killed.
    pub listener_grace: Duration,
    /// Total time deregistration may take, retries included.
    pub deregister_timeout: Duration,
    /// Capabilities to advertise (`AZP_CAPABILITIES`): exported into the agent's environment, which the
    /// agent reports as capabilities.
    pub capabilities: BTreeMap<String, String>,
    /// `registration: controller`: the folder holding the agent's files the controller wrote (the
    /// mounted Secret). The entrypoint copies them and only runs the listener: it holds no identity, so
    /// it neither registers nor deregisters.
    pub agent_files: Option<PathBuf>,
}

/// Default for [`Settings::register_timeout`].
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(300);
/// Default for [`Settings::listener_grace`]: the listener itself waits up to 30 s for its job to cancel
/// (`Constants.Agent.ExitOnUnloadTimeout`), plus time to finish the request and delete its session.
pub const DEFAULT_LISTENER_GRACE: Duration = Duration::from_secs(45);
/// Default for [`Settings::deregister_timeout`].
pub const DEFAULT_DEREGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest agent name Azure DevOps accepts.
const MAX_AGENT_NAME: usize = 64;

/// Every problem found in the settings (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SettingsError {
    /// One line per problem, each naming the setting and the fix.
    pub problems: Vec<String>,
}

impl SettingsError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        "agent_settings_invalid"
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} agent setting(s) missing or malformed:",
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn parse_seconds(
    value: &Option<String>,
    flag: &str,
    var: &str,
    default: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match present(value) {
        None => default,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 && n <= 86_400 => Duration::from_secs(n),
            _ => {
                problems.push(format!(
                    "{var} (or {flag}) is `{s}`: give whole seconds between 1 and 86400, e.g. `{}`",
                    default.as_secs()
                ));
                default
            }
        },
    }
}

fn parse_bool(value: &Option<String>, flag: &str, var: &str, problems: &mut Vec<String>) -> bool {
    match present(value).map(str::to_ascii_lowercase).as_deref() {
        None => false,
        Some("1" | "true" | "yes" | "on") => true,
        Some("0" | "false" | "no" | "off") => false,
        Some(other) => {
            problems.push(format!(
                "{var} (or {flag}) is `{other}`: use `true` or `false`"
            ));
            false
        }
    }
}

/// Longest capability value the agent reports (it skips values of 1024 characters or more).
const MAX_CAPABILITY_VALUE: usize = 1023;

fn parse_capabilities(
    value: &Option<String>,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let Some(text) = present(value) else {
        return BTreeMap::new();
    };
    let map: BTreeMap<String, String> = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!(
                "AZP_CAPABILITIES (or --capabilities) is not a JSON object of strings ({e}): give e.g. `{{\"docker\":\"true\"}}`"
            ));
            return BTreeMap::new();
        }
    };
    for (name, value) in &map {
        let upper = name.to_ascii_uppercase();
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            problems.push(format!(
                "AZP_CAPABILITIES has the capability `{}`: names must be non-empty without `=`, values without NUL",
                name.escape_debug()
            ));
        } else if super::env::REMOVED_PREFIXES
            .iter()
            .any(|p| upper.starts_with(p))
            || upper == super::env::IGNORE_VAR
        {
            problems.push(format!(
                "AZP_CAPABILITIES has the capability `{name}`: names starting with AZURE_, AZP_ or VSTS_AGENT_INPUT_ (and VSO_AGENT_IGNORE) are reserved; rename it"
            ));
        } else if value.chars().count() > MAX_CAPABILITY_VALUE {
            problems.push(format!(
                "AZP_CAPABILITIES has the capability `{name}` with a value of {} characters: the agent ignores values of 1024 characters or more",
                value.chars().count()
            ));
        }
    }
    map
}

/// The log format asked for (`AZP_LOG_FORMAT` / `--log-format`), `None` when malformed.
pub fn log_format(args: &AgentArgs) -> Option<crate::telemetry::LogFormat> {
    match present(&args.tuning.log_format)
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("text") => Some(crate::telemetry::LogFormat::Text),
        Some("json") => Some(crate::telemetry::LogFormat::Json),
        Some(_) => None,
    }
}

impl Settings {
    /// Validates `args` (flags already merged with the environment by clap); `cwd` is the default agent
    /// folder. Reports every problem at once.
    pub fn resolve(args: &AgentArgs, cwd: &Path) -> Result<Settings, SettingsError> {
        let mut problems = Vec::new();

        let url = match present(&args.url) {
            None => {
                problems.push(
                    "AZP_URL (or --url) is missing: set the organization URL, e.g. `https://dev.azure.com/contoso`"
                        .to_owned(),
                );
                None
            }
            Some(s) => match Url::parse(s) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => {
                    if !u.username().is_empty() || u.password().is_some() {
                        problems.push(
                            "AZP_URL (or --url) carries credentials: remove `user:password@`; the token is obtained separately"
                                .to_owned(),
                        );
                        None
                    } else {
                        Some(u)
                    }
                }
                _ => {
                    problems.push(format!(
                        "AZP_URL (or --url) is `{s}`: give an absolute https URL of the organization, e.g. `https://dev.azure.com/contoso`"
                    ));
                    None
                }
            },
        };

        let pool = match present(&args.pool) {
            Some(p) => Some(p.to_owned()),
            None => {
                problems.push(
                    "AZP_POOL (or --pool) is missing: set the name of the ADO agent pool"
                        .to_owned(),
                );
                None
            }
        };

        let agent_name = match present(&args.agent_name) {
            None => {
                problems.push(
                    "AZP_AGENT_NAME (or --agent-name) is missing: set a name unique across clusters (the controller sets it)"
                        .to_owned(),
                );
                None
            }
            Some(n) => {
                const FORBIDDEN: &[char] = &[
                    '"', '/', '\\', '[', ']', ':', '|', '<', '>', '+', '=', ';', ',', '?', '*',
                ];
                if n.chars().count() > MAX_AGENT_NAME {
                    problems.push(format!(
                        "AZP_AGENT_NAME (or --agent-name) is {} characters long: Azure DevOps accepts at most {MAX_AGENT_NAME}",
                        n.chars().count()
                    ));
                    None
                } else if n.chars().any(|c| c.is_control() || FORBIDDEN.contains(&c)) {
                    problems.push(format!(
                        "AZP_AGENT_NAME (or --agent-name) is `{}`: it must not contain control characters or any of \" / \\ [ ] : | < > + = ; , ? *",
                        n.escape_debug()
                    ));
                    None
                } else {
                    Some(n.to_owned())
                }
            }
        };

        let agent_dir = match present(&args.agent_dir) {
            Some(d) => cwd.join(d),
            None => cwd.to_owned(),
        };
        for (rel, what) in [
            ("config.sh", "the agent's config.sh"),
            ("bin/Agent.Listener", "the agent's bin/Agent.Listener"),
        ] {
            if !agent_dir.join(rel).is_file() {
                problems.push(format!(
                    "AZP_AGENT_DIR (or --agent-dir, default: the working directory) is `{}`, which has no {what}: point it at the folder the official agent was unpacked into",
                    agent_dir.display()
                ));
                break;
            }
        }

        let work = PathBuf::from(present(&args.work).unwrap_or("_work"));

        let auth = match (
            present(&args.auth).map(str::to_ascii_lowercase).as_deref(),
            present(&args.pat_file),
        ) {
            (None | Some("workload-identity"), None) => Some(AuthMode::WorkloadIdentity),
            (None | Some("workload-identity"), Some(_)) => {
                problems.push(
                    "AZP_PAT_FILE (or --pat-file) is set but AZP_AUTH is workload-identity: a PAT is an explicit opt-in, set AZP_AUTH=pat to use it, or unset AZP_PAT_FILE"
                        .to_owned(),
                );
                None
            }
            (Some("pat"), Some(file)) => Some(AuthMode::PatFile(cwd.join(file))),
            (Some("pat"), None) => {
                problems.push(
                    "AZP_PAT_FILE (or --pat-file) is missing: AZP_AUTH=pat needs the path of a file holding the PAT (mount it from a Secret)"
                        .to_owned(),
                );
                None
            }
            (Some(other), _) => {
                problems.push(format!(
                    "AZP_AUTH (or --auth) is `{other}`: use `workload-identity` (default) or `pat`"
                ));
                None
            }
        };

        let exit_with_job_result = parse_bool(
            &args.tuning.exit_with_job_result,
            "--exit-with-job-result",
            "AZP_EXIT_WITH_JOB_RESULT",
            &mut problems,
        );
        let register_timeout = parse_seconds(
            &args.tuning.register_timeout,
            "--register-timeout",
            "AZP_REGISTER_TIMEOUT_SECONDS",
            DEFAULT_REGISTER_TIMEOUT,
            &mut problems,
        );
        let listener_grace = parse_seconds(
            &args.tuning.listener_grace,
            "--listener-grace",
            "AZP_LISTENER_GRACE_SECONDS",
            DEFAULT_LISTENER_GRACE,
            &mut problems,
        );
        let deregister_timeout = parse_seconds(
            &args.tuning.deregister_timeout,
            "--deregister-timeout",
            "AZP_DEREGISTER_TIMEOUT_SECONDS",
            DEFAULT_DEREGISTER_TIMEOUT,
            &mut problems,
        );

        let agent_files = present(&args.agent_files).map(|d| cwd.join(d));
        if let Some(dir) = &agent_files {
            let missing: Vec<&str> = crate::agent_files::FILES
                .into_iter()
                .filter(|f| !dir.join(f).is_file())
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "AZP_AGENT_FILES (or --agent-files) is `{}`, which has no {}: the controller writes the agent's files into the agent Job's Secret (registration: controller); check that the Secret `<job>-agent` exists and is mounted there",
                    dir.display(),
                    missing.join(", ")
                ));
            }
        }

        let capabilities = parse_capabilities(&args.capabilities, &mut problems);
        if log_format(args).is_none() {
            problems.push(format!(
                "AZP_LOG_FORMAT (or --log-format) is `{}`: use `text` (default) or `json`",
                present(&args.tuning.log_format).unwrap_or_default()
            ));
        }

        match (url, pool, agent_name, auth) {
            (Some(url), Some(pool), Some(agent_name), Some(auth)) if problems.is_empty() => {
                Ok(Settings {
                    url,
                    pool,
                    agent_name,
                    agent_dir,
                    work,
                    auth,
                    exit_with_job_result,
                    register_timeout,
                    listener_grace,
                    deregister_timeout,
                    capabilities,
                    agent_files,
                })
            }
            _ => Err(SettingsError { problems }),
        }
    }

    /// `config.sh` in the agent folder.
    pub fn config_sh(&self) -> PathBuf {
        self.agent_dir.join("config.sh")
    }

    /// `bin/Agent.Listener` in the agent folder.
    pub fn listener(&self) -> PathBuf {
        self.agent_dir.join("bin").join("Agent.Listener")
    }

    /// The `.agent` settings file `config.sh` writes.
    pub fn agent_file(&self) -> PathBuf {
        self.agent_dir.join(".agent")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_dir() -> tempdir::Dir {
        let dir = tempdir::Dir::new("settings");
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("config.sh"), "").unwrap();
        std::fs::write(dir.path().join("bin/Agent.Listener"), "").unwrap();
        dir
    }

    fn args() -> AgentArgs {
        AgentArgs {
            url: Some("https://dev.azure.com/contoso".into()),
            pool: Some("linux".into()),
            agent_name: Some("k8s-a-1".into()),
            ..AgentArgs::default()
        }
    }

    #[test]
    fn minimal_settings_take_defaults() {
        let dir = agent_dir();
        let s = Settings::resolve(&args(), dir.path()).unwrap();
        assert_eq!(s.url.as_str(), "https://dev.azure.com/contoso");
        assert_eq!(s.agent_dir, dir.path());
        assert_eq!(s.work, PathBuf::from("_work"));
        assert_eq!(s.auth, AuthMode::WorkloadIdentity);
        assert!(!s.exit_with_job_result);
        assert_eq!(s.listener_grace, DEFAULT_LISTENER_GRACE);
    }

    #[test]
    fn agent_files_must_hold_the_three_files() {
        let dir = agent_dir();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join(".agent"), "{}").unwrap();
        let with_files = AgentArgs {
            agent_files: Some("files".into()),
            ..args()
        };
        let err = Settings::resolve(&with_files, dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("AZP_AGENT_FILES"), "{text}");
        assert!(
            text.contains(".credentials, .credentials_rsaparams"),
            "{text}"
        );
        assert!(!text.contains("no .agent"), "{text}");
        std::fs::write(files.join(".credentials"), "{}").unwrap();
        std::fs::write(files.join(".credentials_rsaparams"), "{}").unwrap();
        let s = Settings::resolve(&with_files, dir.path()).unwrap();
        assert_eq!(s.agent_files, Some(files));
        assert_eq!(
            Settings::resolve(&args(), dir.path()).unwrap().agent_files,
            None
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempdir::Dir::new("settings-empty");
        let a = AgentArgs {
            url: Some("ftp://x".into()),
            agent_name: Some("bad/name".into()),
            auth: Some("pat".into()),
            tuning: Box::new(AgentTuning {
                listener_grace: Some("soon".into()),
                exit_with_job_result: Some("maybe".into()),
                ..AgentTuning::default()
            }),
            ..AgentArgs::default()
        };
        let err = Settings::resolve(&a, dir.path()).unwrap_err();
        let text = err.to_string();
        for needle in [
            "AZP_URL",
            "AZP_POOL",
            "AZP_AGENT_NAME",
            "AZP_AGENT_DIR",
            "AZP_PAT_FILE",
            "AZP_LISTENER_GRACE_SECONDS",
            "AZP_EXIT_WITH_JOB_RESULT",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert_eq!(err.problems.len(), 7, "{text}");
        assert_eq!(err.metric_label(), "agent_settings_invalid");
    }

    #[test]
    fn pat_is_opt_in() {
        let dir = agent_dir();
        let a = AgentArgs {
            pat_file: Some("/secrets/pat".into()),
            ..args()
        };
        let err = Settings::resolve(&a, dir.path()).unwrap_err();
        assert!(err.to_string().contains("AZP_AUTH=pat"), "{err}");
        let a = AgentArgs {
            auth: Some("pat".into()),
            pat_file: Some("/secrets/pat".into()),
            ..args()
        };
        let s = Settings::resolve(&a, dir.path()).unwrap();
        assert_eq!(s.auth, AuthMode::PatFile("/secrets/pat".into()));
    }

    #[test]
    fn url_with_credentials_is_refused() {
        let dir = agent_dir();
        let a = AgentArgs {
            url: Some("https://user:secret@dev.azure.com/contoso".into()),
            ..args()
        };
        let err = Settings::resolve(&a, dir.path()).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn long_agent_name_is_refused() {
        let dir = agent_dir();
        let a = AgentArgs {
            agent_name: Some("a".repeat(65)),
            ..args()
        };
        assert!(Settings::resolve(&a, dir.path()).is_err());
    }

    #[test]
    fn capabilities_are_a_json_object_without_reserved_names() {
        let dir = agent_dir();
        let a = AgentArgs {
            capabilities: Some(r#"{"docker":"true","azp-autoscaler.owner":"c/ns/p"}"#.into()),
            ..args()
        };
        let s = Settings::resolve(&a, dir.path()).unwrap();
        assert_eq!(
            s.capabilities.get("docker").map(String::as_str),
            Some("true")
        );
        for bad in [
            r#"["docker"]"#,
            r#"{"VSTS_AGENT_INPUT_TOKEN":"x"}"#,
            r#"{"azure_client_id":"x"}"#,
            r#"{"a=b":"x"}"#,
        ] {
            let a = AgentArgs {
                capabilities: Some(bad.into()),
                ..args()
            };
            let err = Settings::resolve(&a, dir.path()).unwrap_err();
            assert!(err.to_string().contains("AZP_CAPABILITIES"), "{bad}: {err}");
        }
    }

    /// A throw-away folder under the system temp dir.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new(tag: &str) -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "azp-agent-{tag}-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
