//! The agent folder's files in the official formats (`ConfigurationStore`): `.agent` (settings),
//! `.credentials` (OAuth client data), `.credentials_rsaparams` (the key, see `key.rs`), all indented JSON
//! like Newtonsoft writes them; plus `.env` (read at start) and the stand-in's listener lock.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StandinError;
use super::key::RsaParams;

pub const AGENT_FILE: &str = ".agent";
pub const CREDENTIALS_FILE: &str = ".credentials";
pub const RSA_PARAMS_FILE: &str = ".credentials_rsaparams";
/// Held (flock) by a running listener; `config.sh remove` refuses to run while it is held.
pub const LISTENER_LOCK_FILE: &str = ".listener.lock";

/// `.agent`: `AgentSettings` with camelCase names, default values omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_tee_eula: bool,
    pub agent_id: u64,
    pub agent_name: String,
    pub pool_id: u64,
    pub pool_name: String,
    pub server_url: String,
    pub work_folder: String,
}

/// `.credentials`: `{"scheme": "OAuth", "data": {"clientId", "authorizationUrl", "oauthEndpointUrl"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialData {
    pub scheme: String,
    pub data: BTreeMap<String, String>,
}

impl CredentialData {
    pub fn oauth(client_id: &str, authorization_url: &str) -> Self {
        let mut data = BTreeMap::new();
        data.insert("clientId".into(), client_id.into());
        data.insert("authorizationUrl".into(), authorization_url.into());
        data.insert("oauthEndpointUrl".into(), authorization_url.into());
        Self {
            scheme: "OAuth".into(),
            data,
        }
    }

    /// The data value, looked up case-insensitively as the agent's dictionary does.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.data
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

pub fn is_configured(root: &Path) -> bool {
    root.join(AGENT_FILE).is_file()
}

pub fn save_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), StandinError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| StandinError::BadFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    text.push('\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| StandinError::io(path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| StandinError::io(path, e))?;
    // `mode` only applies on creation; the agent chmods the key file to 600 in any case.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| StandinError::io(path, e))
}

pub fn load_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StandinError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StandinError::NotConfigured(path.to_owned())
        } else {
            StandinError::io(path, e)
        }
    })?;
    // Files written by .NET may start with a BOM.
    serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| StandinError::BadFile {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

pub fn load_settings(root: &Path) -> Result<AgentSettings, StandinError> {
    load_json(&root.join(AGENT_FILE))
}

pub fn load_credentials(root: &Path) -> Result<CredentialData, StandinError> {
    load_json(&root.join(CREDENTIALS_FILE))
}

pub fn load_key(root: &Path) -> Result<RsaParams, StandinError> {
    load_json(&root.join(RSA_PARAMS_FILE))
}

/// `RSAFileKeyManager.CreateKey`: an existing key file is reused, else a new key is written (mode 600).
pub fn create_or_load_key(root: &Path) -> Result<(RsaParams, bool), StandinError> {
    let path = root.join(RSA_PARAMS_FILE);
    if path.is_file() {
        return Ok((load_json(&path)?, false));
    }
    let params = RsaParams::generate()?;
    save_json(&path, &params, 0o600)?;
    Ok((params, true))
}

pub fn remove_file_if_present(path: &Path) -> Result<bool, StandinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StandinError::io(path, e)),
    }
}

/// Program.cs: `KEY=VALUE` lines of the agent folder's `.env` are set in the listener's environment.
pub fn apply_dot_env(root: &Path, env: &mut Vec<(String, String)>) {
    let Ok(text) = std::fs::read_to_string(root.join(".env")) else {
        return;
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        }
    }
}

/// The running listener's lock: an exclusive `flock` on [`LISTENER_LOCK_FILE`], which holds its pid.
pub struct ListenerLock {
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl ListenerLock {
    /// Takes the lock, or says which listener holds it.
    pub fn acquire(root: &Path) -> Result<Self, StandinError> {
        let path = root.join(LISTENER_LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StandinError::io(&path, e))?;
        let mut lock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StandinError::AgentRunning(holder_pid(&path)));
                }
                Err((_, errno)) => return Err(StandinError::io(&path, errno.into())),
            };
        lock.set_len(0).map_err(|e| StandinError::io(&path, e))?;
        writeln!(*lock, "{}", std::process::id()).map_err(|e| StandinError::io(&path, e))?;
        Ok(Self { _lock: lock, path })
    }

    /// Fails with [`StandinError::AgentRunning`] while a listener holds the lock.
    pub fn ensure_not_running(root: &Path) -> Result<(), StandinError> {
        let path = root.join(LISTENER_LOCK_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StandinError::io(&path, e)),
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => Ok(()),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(StandinError::AgentRunning(holder_pid(&path)))
            }
            Err((_, errno)) => Err(StandinError::io(&path, errno.into())),
        }
    }
}

impl Drop for ListenerLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn holder_pid(path: &Path) -> u32 {
    let mut text = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    text.trim().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("standin-files-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn settings_and_credentials_use_the_official_names() {
        let settings = AgentSettings {
            accept_tee_eula: false,
            agent_id: 7,
            agent_name: "a".into(),
            pool_id: 3,
            pool_name: "p".into(),
            server_url: "https://sim/org/".into(),
            work_folder: "_work".into(),
        };
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"agentId":7,"agentName":"a","poolId":3,"poolName":"p",
                "serverUrl":"https://sim/org/","workFolder":"_work"})
        );
        let creds = CredentialData::oauth("cid", "https://sim/token");
        let json = serde_json::to_value(&creds).unwrap();
        assert_eq!(json["scheme"], "OAuth");
        assert_eq!(json["data"]["clientId"], "cid");
        assert_eq!(json["data"]["authorizationUrl"], "https://sim/token");
        assert_eq!(creds.get("CLIENTID"), Some("cid"));
    }

    #[test]
    fn key_file_is_private_and_reused() {
        let dir = temp_dir("key");
        let (first, created) = create_or_load_key(&dir).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.join(RSA_PARAMS_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let (second, created) = create_or_load_key(&dir).unwrap();
        assert!(!created);
        assert!(first == second);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dot_env_lines_override_and_extend_the_environment() {
        let dir = temp_dir("env");
        std::fs::write(
            dir.join(".env"),
            "LANG=C.UTF-8\nnoequals\n=x\nJAVA_HOME=/j=k\n",
        )
        .unwrap();
        let mut env = vec![("LANG".to_string(), "en".to_string())];
        apply_dot_env(&dir, &mut env);
        assert_eq!(
            env,
            vec![
                ("LANG".to_string(), "C.UTF-8".to_string()),
                ("JAVA_HOME".to_string(), "/j=k".to_string())
            ]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_held_listener_lock_names_its_pid_and_is_released_on_drop() {
        let dir = temp_dir("lock");
        ListenerLock::ensure_not_running(&dir).expect("no lock file: not running");
        let lock = ListenerLock::acquire(&dir).expect("acquire");
        match ListenerLock::ensure_not_running(&dir) {
            Err(StandinError::AgentRunning(pid)) => assert_eq!(pid, std::process::id()),
            other => panic!("expected AgentRunning, got {other:?}"),
        }
        assert!(matches!(
            ListenerLock::acquire(&dir),
            Err(StandinError::AgentRunning(_))
        ));
        drop(lock);
        ListenerLock::ensure_not_running(&dir).expect("released");
        assert!(!dir.join(LISTENER_LOCK_FILE).exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_agent_file_says_configure_first() {
        let dir = temp_dir("missing");
        let err = load_settings(&dir).unwrap_err();
        assert_eq!(err.metric_label(), "not_configured");
        assert!(err.to_string().contains("config.sh"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
