//! System capabilities as the official agent reports them: the environment capabilities provider (every
//! variable of the listener's process minus well-known ignores, `VSO_AGENT_IGNORE` and values of 1024
//! characters or more) and the agent capabilities provider (`Agent.Name`, `Agent.Version`, ...).

use std::collections::BTreeMap;
use std::path::Path;

use super::AGENT_VERSION;

/// Names the agent's `EnvironmentCapabilitiesProvider` always skips (compared case-sensitively on Linux).
pub const WELL_KNOWN_IGNORED: &[&str] = &[
    "comp_wordbreaks",
    "ls_colors",
    "TERM",
    "TERM_PROGRAM",
    "TERM_PROGRAM_VERSION",
    "SHLVL",
    "PSMODULEPATH",
    "SYSTEM_ACCESSTOKEN",
];

const CUSTOM_IGNORE: &str = "VSO_AGENT_IGNORE";
const IGNORE_VALUE_LENGTH: usize = 1024;

/// The environment capabilities of `env` (already without `VSTS_AGENT_INPUT_*`).
pub fn capabilities_from_env(env: &[(String, String)]) -> BTreeMap<String, String> {
    let mut ignored: Vec<&str> = WELL_KNOWN_IGNORED.to_vec();
    if let Some((_, list)) = env.iter().find(|(k, _)| k == CUSTOM_IGNORE) {
        ignored.extend(list.split(',').map(str::trim).filter(|s| !s.is_empty()));
    }
    env.iter()
        .filter(|(name, value)| {
            !name.is_empty()
                && !name.starts_with(super::KNOB_PREFIX)
                && !ignored.contains(&name.as_str())
                && value.chars().count() < IGNORE_VALUE_LENGTH
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Environment capabilities plus the agent's own (`AgentCapabilitiesProvider`), which override them.
pub fn system_capabilities(
    env: &[(String, String)],
    agent_name: &str,
    root: &Path,
) -> BTreeMap<String, String> {
    let mut caps = capabilities_from_env(env);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "X64",
        "aarch64" => "ARM64",
        "arm" => "ARM",
        "x86" => "X86",
        other => other,
    };
    caps.insert("Agent.Name".into(), agent_name.into());
    caps.insert("Agent.Version".into(), AGENT_VERSION.into());
    caps.insert("Agent.OS".into(), "Linux".into());
    caps.insert("Agent.OSArchitecture".into(), arch.into());
    caps.insert("Agent.OSVersion".into(), os_version());
    caps.insert("Agent.HomeDirectory".into(), root.display().to_string());
    caps.insert("Agent.ComputerName".into(), computer_name());
    caps
}

/// `Environment.MachineName`: the host name.
pub fn computer_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `RuntimeInformation.OSDescription`-like: `Linux <release> <version>`.
pub fn os_description() -> String {
    let release = os_version();
    let version = kernel_file("version");
    format!("Linux {release} {version}").trim().to_string()
}

fn os_version() -> String {
    kernel_file("osrelease")
}

fn kernel_file(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys/kernel").join(name))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_minus_ignores_becomes_capabilities() {
        let long = "x".repeat(1024);
        let e = env(&[
            ("JAVA_HOME", "/opt/java"),
            ("AZP_TOKEN", "secret"),
            ("AZURE_CLIENT_ID", "id"),
            ("VSO_AGENT_IGNORE", " AZP_TOKEN , AZURE_CLIENT_ID,"),
            ("TERM", "xterm"),
            ("SHLVL", "1"),
            ("BIG", &long),
            ("term", "lower case is another name on Linux"),
            ("STANDIN_CANCEL_DELAY_MS", "5"),
        ]);
        let caps = capabilities_from_env(&e);
        assert_eq!(caps.get("JAVA_HOME").map(String::as_str), Some("/opt/java"));
        assert!(
            caps.contains_key("VSO_AGENT_IGNORE"),
            "the agent reports the list itself"
        );
        assert!(caps.contains_key("term"));
        for gone in [
            "AZP_TOKEN",
            "AZURE_CLIENT_ID",
            "TERM",
            "SHLVL",
            "BIG",
            "STANDIN_CANCEL_DELAY_MS",
        ] {
            assert!(!caps.contains_key(gone), "{gone} must be ignored: {caps:?}");
        }
    }

    #[test]
    fn agent_capabilities_override_the_environment() {
        let e = env(&[("Agent.Name", "spoof")]);
        let caps = system_capabilities(&e, "real-name", Path::new("/agent"));
        assert_eq!(caps["Agent.Name"], "real-name");
        assert_eq!(caps["Agent.Version"], AGENT_VERSION);
        assert_eq!(caps["Agent.OS"], "Linux");
        assert_eq!(caps["Agent.HomeDirectory"], "/agent");
        assert!(caps.contains_key("Agent.OSArchitecture"));
        assert!(!caps["Agent.ComputerName"].is_empty());
    }
}
