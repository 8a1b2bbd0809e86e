//! The environment the agent's processes get: the pod's environment minus everything that is ours or a
//! credential.
//!
//! The official agent turns every environment variable of its process into a capability, and job steps
//! inherit the listener's environment. So the children must not merely *hide* secrets with
//! `VSO_AGENT_IGNORE`; they must not *have* them:
//! - removed: `AZURE_*` (workload identity: client id, tenant, authority, federated token file path),
//!   `AZP_*` (this entrypoint's settings), `VSTS_AGENT_INPUT_*` (agent inputs, e.g. a token), and
//!   `VSO_AGENT_IGNORE` (rebuilt below);
//! - added for the listener: `agent.disableupdate=true` (the listener's own switch that stops it from
//!   self-updating: the agent is baked into the image), and `VSO_AGENT_IGNORE` listing what is left that is
//!   infrastructure rather than a capability (`KUBERNETES_*` service links, `SSL_CERT_FILE`/`SSL_CERT_DIR`,
//!   plus whatever the pod's own `VSO_AGENT_IGNORE` listed);
//! - added for `config.sh` only: `VSTS_AGENT_INPUT_TOKEN`, the token (never argv; the agent reads and then
//!   removes it from its own environment).
//!
//! What stays is deliberate: a variable the pod template sets is meant as a capability (demands match it).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

/// Prefixes of variables that never reach the agent's processes.
pub const REMOVED_PREFIXES: &[&str] = &["AZURE_", "AZP_", "VSTS_AGENT_INPUT_"];

/// The listener's switch that disables self-update (`Agent.cs` reads it from the environment).
pub const DISABLE_UPDATE_VAR: &str = "agent.disableupdate";

/// The agent's list of variables that are not capabilities (comma-separated names).
pub const IGNORE_VAR: &str = "VSO_AGENT_IGNORE";

/// The agent input that carries the token to `config.sh`.
pub const TOKEN_VAR: &str = "VSTS_AGENT_INPUT_TOKEN";

/// Variables kept for the agent to work but not capabilities.
const INFRA_EXACT: &[&str] = &["SSL_CERT_FILE", "SSL_CERT_DIR"];
const INFRA_PREFIXES: &[&str] = &["KUBERNETES_"];

fn removed(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let upper = name.to_ascii_uppercase();
    upper == IGNORE_VAR || REMOVED_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// The environment for the agent's processes, built from `parent` (normally `std::env::vars_os()`) and
/// the capabilities to advertise (`AZP_CAPABILITIES`, validated by the settings: no reserved names).
///
/// The result is the complete environment: spawn with `env_clear()` and then these.
pub fn child_env<I>(
    parent: I,
    capabilities: &BTreeMap<String, String>,
) -> BTreeMap<OsString, OsString>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let mut pod_ignore: Vec<String> = Vec::new();
    let mut env = BTreeMap::new();
    for (name, value) in parent {
        if name == IGNORE_VAR {
            pod_ignore.extend(
                value
                    .to_string_lossy()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        if !removed(&name) {
            env.insert(name, value);
        }
    }
    for (name, value) in capabilities {
        if !removed(OsStr::new(name)) {
            env.insert(OsString::from(name), OsString::from(value));
        }
    }
    let mut ignore: Vec<String> = pod_ignore;
    for name in env.keys().filter_map(|n| n.to_str()) {
        if INFRA_EXACT.contains(&name) || INFRA_PREFIXES.iter().any(|p| name.starts_with(p)) {
            ignore.push(name.to_owned());
        }
    }
    ignore.push(DISABLE_UPDATE_VAR.to_owned());
    ignore.push(IGNORE_VAR.to_owned());
    ignore.sort();
    ignore.dedup();
    env.insert(OsString::from(DISABLE_UPDATE_VAR), OsString::from("true"));
    env.insert(OsString::from(IGNORE_VAR), OsString::from(ignore.join(",")));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        let caps = BTreeMap::from([(
            "azp-autoscaler.owner".to_owned(),
            "cluster-a/ci/linux".to_owned(),
        )]);
        child_env(
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            &caps,
        )
        .into_iter()
        .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
        .collect()
    }

    #[test]
    fn credentials_and_our_settings_are_removed() {
        let env = build(&[
            ("AZURE_CLIENT_ID", "c"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("azure_tenant_id", "t"),
            ("AZP_URL", "https://dev.azure.com/x"),
            ("AZP_PAT_FILE", "/pat"),
            ("VSTS_AGENT_INPUT_TOKEN", "secret"),
            ("VSTS_AGENT_INPUT_POOL", "p"),
            ("PATH", "/usr/bin"),
            ("JAVA_HOME", "/opt/java"),
        ]);
        assert!(env.keys().all(|k| {
            let u = k.to_ascii_uppercase();
            !u.starts_with("AZURE_")
                && !u.starts_with("AZP_")
                && !u.starts_with("VSTS_AGENT_INPUT_")
        }));
        assert_eq!(env.get("PATH").map(String::as_str), Some("/usr/bin"));
        assert_eq!(env.get("JAVA_HOME").map(String::as_str), Some("/opt/java"));
        assert!(!env.values().any(|v| v == "secret"));
        // The AgentPool's capabilities are exported for the agent to report.
        assert_eq!(
            env.get("azp-autoscaler.owner").map(String::as_str),
            Some("cluster-a/ci/linux")
        );
    }

    #[test]
    fn self_update_is_disabled_and_infrastructure_is_not_a_capability() {
        let env = build(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("SSL_CERT_FILE", "/etc/ca.pem"),
            ("VSO_AGENT_IGNORE", "MY_NOISE, OTHER"),
            ("JAVA_HOME", "/opt/java"),
        ]);
        assert_eq!(
            env.get(DISABLE_UPDATE_VAR).map(String::as_str),
            Some("true")
        );
        let ignore: Vec<&str> = env[IGNORE_VAR].split(',').collect();
        for name in [
            "KUBERNETES_SERVICE_HOST",
            "SSL_CERT_FILE",
            "MY_NOISE",
            "OTHER",
            DISABLE_UPDATE_VAR,
            IGNORE_VAR,
        ] {
            assert!(ignore.contains(&name), "{name} not in {ignore:?}");
        }
        assert!(!ignore.contains(&"JAVA_HOME"));
        // Infrastructure is kept for the agent to work (the CA bundle), only hidden as a capability.
        assert!(env.contains_key("SSL_CERT_FILE"));
    }
}
