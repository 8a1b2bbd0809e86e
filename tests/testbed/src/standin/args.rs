//! The listener's command line, as `CommandSettings` of the official agent reads it: a command
//! (`configure`, `remove`, `run`, none = run), `--name value` arguments and `--flag` flags, each also from
//! `VSTS_AGENT_INPUT_<NAME>` (case-insensitive). Those variables are removed from the listener's
//! environment whatever their value, so neither capabilities nor job steps see them.

use std::collections::BTreeMap;

use super::StandinError;

const ENV_PREFIX: &str = "VSTS_AGENT_INPUT_";

/// Arguments that take a value (`Constants.Agent.CommandLine.Args`).
const ARGS: &[&str] = &[
    "agent",
    "auth",
    "collectionname",
    "deploymentgroupname",
    "deploymentpoolname",
    "deploymentgrouptags",
    "environmentname",
    "virtualmachineresourcetags",
    "machinegroupname",
    "machinegrouptags",
    "monitorsocketaddress",
    "notificationpipename",
    "notificationsocketaddress",
    "pool",
    "projectname",
    "proxyurl",
    "proxyusername",
    "sslcacert",
    "sslclientcert",
    "sslclientcertkey",
    "sslclientcertarchive",
    "startuptype",
    "url",
    "username",
    "windowslogonaccount",
    "work",
    "clientid",
    "tenantid",
    "password",
    "proxypassword",
    "sslclientcertpassword",
    "token",
    "windowslogonpassword",
    "clientsecret",
];

/// Arguments whose values are secrets (`Constants.Agent.CommandLine.Args.Secrets`).
pub const SECRET_ARGS: &[&str] = &[
    "password",
    "proxypassword",
    "sslclientcertpassword",
    "token",
    "windowslogonpassword",
    "clientsecret",
];

/// Boolean flags (`Constants.Agent.CommandLine.Flags`).
const FLAGS: &[&str] = &[
    "acceptteeeula",
    "adddeploymentgrouptags",
    "addmachinegrouptags",
    "addvirtualmachineresourcetags",
    "alwaysextracttask",
    "commit",
    "deploymentgroup",
    "deploymentpool",
    "diagnostics",
    "environment",
    "overwriteautologon",
    "gituseschannel",
    "help",
    "disableloguploads",
    "restreamlogstofiles",
    "machinegroup",
    "replace",
    "norestart",
    "launchbrowser",
    "once",
    "debug",
    "runasautologon",
    "runasservice",
    "preventservicestart",
    "sslskipcertvalidation",
    "unattended",
    "version",
    "enableservicesidtypeunrestricted",
    "usebasicauthforproxy",
];

/// Which command the listener runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Configure,
    Remove,
    Run,
    Version,
    Help,
}

/// A parsed command line plus the `VSTS_AGENT_INPUT_*` values taken from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub command: Command,
    args: BTreeMap<String, String>,
    flags: BTreeMap<String, bool>,
    env_args: BTreeMap<String, String>,
    /// Arguments the agent does not know (it warns and goes on).
    pub unknown: Vec<String>,
}

impl std::fmt::Debug for CommandLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets (token, passwords) never reach Debug output.
        f.debug_struct("CommandLine")
            .field("command", &self.command)
            .field("args", &self.args.keys().collect::<Vec<_>>())
            .field("flags", &self.flags)
            .field("env_args", &self.env_args.keys().collect::<Vec<_>>())
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl CommandLine {
    /// Parses `argv` (without the program name) and moves `VSTS_AGENT_INPUT_*` out of `env`.
    pub fn parse(argv: &[String], env: &mut Vec<(String, String)>) -> Self {
        let mut env_args = BTreeMap::new();
        env.retain(|(key, value)| {
            let upper = key.to_ascii_uppercase();
            let Some(name) = upper.strip_prefix(ENV_PREFIX) else {
                return true;
            };
            let value = value.trim();
            if !value.is_empty() {
                env_args.insert(name.to_ascii_lowercase(), value.to_string());
            }
            false
        });

        let mut iter = argv.iter().peekable();
        let mut command = None;
        if let Some(first) = iter.peek()
            && !first.starts_with('-')
        {
            command = match first.to_ascii_lowercase().as_str() {
                "configure" => Some(Command::Configure),
                "remove" => Some(Command::Remove),
                "run" => Some(Command::Run),
                _ => None,
            };
            if command.is_some() {
                iter.next();
            }
        }
        let mut args = BTreeMap::new();
        let mut flags = BTreeMap::new();
        let mut unknown = Vec::new();
        while let Some(arg) = iter.next() {
            let Some(name) = arg.strip_prefix("--") else {
                unknown.push(arg.clone());
                continue;
            };
            let name = name.to_ascii_lowercase();
            if FLAGS.contains(&name.as_str()) {
                flags.insert(name, true);
            } else if ARGS.contains(&name.as_str()) {
                match iter.next() {
                    Some(value) => {
                        args.insert(name, value.clone());
                    }
                    None => unknown.push(arg.clone()),
                }
            } else {
                unknown.push(arg.clone());
            }
        }
        let mut parsed = Self {
            command: Command::Run,
            args,
            flags,
            env_args,
            unknown,
        };
        parsed.command = match command {
            Some(c) => c,
            None if parsed.flag("version") => Command::Version,
            None if parsed.flag("help") => Command::Help,
            None => Command::Run,
        };
        parsed
    }

    /// An argument from argv, else from `VSTS_AGENT_INPUT_<NAME>`.
    pub fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .get(name)
            .or_else(|| self.env_args.get(name))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A flag from argv, else `VSTS_AGENT_INPUT_<NAME>` parsed like .NET `bool.TryParse` (`true`/`false`,
    /// any case; anything else is false).
    pub fn flag(&self, name: &str) -> bool {
        if self.flags.get(name).copied().unwrap_or(false) {
            return true;
        }
        self.env_args
            .get(name)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    /// A required argument in unattended mode: the default when there is one, else the agent's error.
    pub fn required(
        &self,
        name: &'static str,
        default: Option<&str>,
    ) -> Result<String, StandinError> {
        if let Some(v) = self.arg(name) {
            return Ok(v.to_string());
        }
        if !self.flag("unattended") {
            return Err(StandinError::Usage(format!(
                "--{name} is required: the stand-in agent does not prompt (pass it, or run with --unattended to take the default)"
            )));
        }
        default
            .map(str::to_string)
            .ok_or(StandinError::MissingInput(name))
    }

    /// The names of the `VSTS_AGENT_INPUT_*` inputs that were given (lower case), for diagnostics.
    pub fn env_input_names(&self) -> Vec<String> {
        self.env_args.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn argv_and_env_inputs_are_merged_and_env_inputs_leave_the_environment() {
        let mut env = vec![
            ("PATH".to_string(), "/bin".to_string()),
            ("VSTS_AGENT_INPUT_TOKEN".to_string(), " secret ".to_string()),
            ("vsts_agent_input_Pool".to_string(), "env-pool".to_string()),
            ("VSTS_AGENT_INPUT_REPLACE".to_string(), "True".to_string()),
            ("VSTS_AGENT_INPUT_EMPTY".to_string(), "  ".to_string()),
        ];
        let cmd = CommandLine::parse(
            &argv(&[
                "configure",
                "--unattended",
                "--url",
                "https://x/org",
                "--pool",
                "argv-pool",
            ]),
            &mut env,
        );
        assert_eq!(cmd.command, Command::Configure);
        assert_eq!(env, vec![("PATH".to_string(), "/bin".to_string())]);
        assert_eq!(cmd.arg("token"), Some("secret"));
        assert_eq!(cmd.arg("pool"), Some("argv-pool"), "argv wins over env");
        assert_eq!(cmd.arg("url"), Some("https://x/org"));
        assert!(cmd.flag("replace"));
        assert!(cmd.flag("unattended"));
        assert!(!cmd.flag("once"));
        assert!(!format!("{cmd:?}").contains("secret"));
    }

    #[test]
    fn flags_from_env_parse_like_dotnet_bool() {
        let mut env = vec![("VSTS_AGENT_INPUT_REPLACE".to_string(), "1".to_string())];
        let cmd = CommandLine::parse(&argv(&["configure"]), &mut env);
        assert!(!cmd.flag("replace"), "'1' is not a .NET bool");
        let mut env = vec![("VSTS_AGENT_INPUT_ONCE".to_string(), "TRUE".to_string())];
        let cmd = CommandLine::parse(&argv(&["run"]), &mut env);
        assert!(cmd.flag("once"));
    }

    #[test]
    fn commands_are_case_insensitive_and_default_to_run() {
        let mut env = Vec::new();
        assert_eq!(
            CommandLine::parse(&argv(&["REMOVE"]), &mut env).command,
            Command::Remove
        );
        assert_eq!(
            CommandLine::parse(&argv(&[]), &mut env).command,
            Command::Run
        );
        assert_eq!(
            CommandLine::parse(&argv(&["--once"]), &mut env).command,
            Command::Run
        );
        assert_eq!(
            CommandLine::parse(&argv(&["--version"]), &mut env).command,
            Command::Version
        );
        let cmd = CommandLine::parse(&argv(&["run", "--bogus", "stray"]), &mut env);
        assert_eq!(
            cmd.unknown,
            vec!["--bogus".to_string(), "stray".to_string()]
        );
    }

    #[test]
    fn unattended_uses_defaults_and_names_the_missing_input() {
        let mut env = Vec::new();
        let cmd = CommandLine::parse(&argv(&["configure", "--unattended"]), &mut env);
        assert_eq!(cmd.required("work", Some("_work")).unwrap(), "_work");
        let err = cmd.required("url", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid configuration provided for url. Terminating unattended configuration."
        );
        let cmd = CommandLine::parse(&argv(&["configure"]), &mut env);
        assert!(
            cmd.required("url", None)
                .unwrap_err()
                .to_string()
                .contains("--url")
        );
    }
}
