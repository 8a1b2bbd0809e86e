//! The `.agent` settings file `config.sh` writes into the agent folder (the official agent's
//! `AgentSettings`, camelCase JSON, possibly with a UTF-8 byte-order mark).

use std::path::Path;

use serde::Deserialize;

/// The part of `.agent` the entrypoint needs: who to delete when `config.sh remove` cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentFile {
    /// The agent's id in its pool.
    pub agent_id: i32,
    /// The pool's id.
    pub pool_id: i32,
}

/// Why `.agent` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AgentFileError {
    /// Missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not the expected JSON.
    #[error("{path} is not an agent settings file (need `agentId` and `poolId`): {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The agent folder cannot take the agent's files.
    #[error(
        "cannot write {path}: {source}; the agent folder (AZP_AGENT_DIR) must be writable by the agent's user"
    )]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl AgentFileError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentFileError::Read { .. } => "agent_file_unreadable",
            AgentFileError::Parse { .. } => "agent_file_malformed",
            AgentFileError::Write { .. } => "agent_file_unwritable",
        }
    }
}

/// Copies the agent's files the controller wrote (`registration: controller`, the mounted Secret
/// `from`) into the agent folder, where the listener reads them as if `config.sh` had run: `.agent`
/// with this pod's work folder, `.credentials`, and the key `.credentials_rsaparams` at mode 0600 (the
/// agent's own rule). Nothing else is changed or logged.
pub fn install_agent_files(
    from: &Path,
    agent_dir: &Path,
    work: &Path,
) -> Result<(), AgentFileError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for name in crate::agent_files::FILES {
        let source = from.join(name);
        let mut bytes = std::fs::read(&source).map_err(|source_err| AgentFileError::Read {
            path: source.display().to_string(),
            source: source_err,
        })?;
        let mode = if name == crate::agent_files::RSA_PARAMS_FILE {
            0o600
        } else {
            0o644
        };
        if name == crate::agent_files::AGENT_FILE {
            let shown = source.display().to_string();
            let parse_err = |source| AgentFileError::Parse {
                path: shown.clone(),
                source,
            };
            AgentFile::parse(&bytes).map_err(parse_err)?;
            let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let mut settings: serde_json::Value =
                serde_json::from_slice(text).map_err(parse_err)?;
            settings["workFolder"] = serde_json::Value::String(work.to_string_lossy().into_owned());
            bytes = serde_json::to_vec_pretty(&settings).map_err(parse_err)?;
            bytes.push(b'\n');
        }
        let target = agent_dir.join(name);
        let write_err = |source| AgentFileError::Write {
            path: target.display().to_string(),
            source,
        };
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(e)),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&target)
            .map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        // `mode` is filtered by the umask: set it exactly.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .map_err(write_err)?;
    }
    Ok(())
}

impl AgentFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<AgentFile, AgentFileError> {
        let bytes = std::fs::read(path).map_err(|source| AgentFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes).map_err(|source| AgentFileError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses the file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<AgentFile, serde_json::Error> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_official_format_with_bom() {
        let text = "\u{feff}{\n  \"agentId\": 42,\n  \"agentName\": \"k8s-1\",\n  \"poolId\": 7,\n  \"poolName\": \"linux\",\n  \"serverUrl\": \"https://dev.azure.com/contoso/\",\n  \"workFolder\": \"_work\"\n}";
        let f = AgentFile::parse(text.as_bytes()).unwrap();
        assert_eq!(
            f,
            AgentFile {
                agent_id: 42,
                pool_id: 7
            }
        );
    }

    #[test]
    fn installed_files_get_this_pods_work_folder_and_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("agent-files-{}", std::process::id()));
        let (from, to) = (base.join("secret"), base.join("agent"));
        std::fs::create_dir_all(&from).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(
            from.join(".agent"),
            "\u{feff}{\"agentId\":5,\"agentName\":\"a\",\"poolId\":2,\"poolName\":\"p\",\"serverUrl\":\"https://x/o\",\"workFolder\":\"_work\"}",
        )
        .unwrap();
        std::fs::write(from.join(".credentials"), "{\"scheme\":\"OAuth\"}").unwrap();
        std::fs::write(from.join(".credentials_rsaparams"), "{\"d\":\"AQ==\"}").unwrap();
        // A stale file in the agent folder is replaced.
        std::fs::write(to.join(".credentials"), "old").unwrap();

        install_agent_files(&from, &to, Path::new("/scratch/work")).unwrap();
        let settings: serde_json::Value =
            serde_json::from_slice(&std::fs::read(to.join(".agent")).unwrap()).unwrap();
        assert_eq!(settings["workFolder"], "/scratch/work");
        assert_eq!(settings["agentId"], 5);
        assert_eq!(settings["serverUrl"], "https://x/o");
        assert_eq!(
            std::fs::read_to_string(to.join(".credentials")).unwrap(),
            "{\"scheme\":\"OAuth\"}"
        );
        let mode = |f: &str| std::fs::metadata(to.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(".credentials_rsaparams"), 0o600);
        assert_eq!(mode(".agent"), 0o644);

        // A settings file without the ids is refused, naming the file.
        std::fs::write(from.join(".agent"), "{\"agentName\":\"a\"}").unwrap();
        let err = install_agent_files(&from, &to, Path::new("_work")).unwrap_err();
        assert_eq!(err.metric_label(), "agent_file_malformed");
        assert!(err.to_string().contains("secret/.agent"), "{err}");
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn missing_ids_are_an_error() {
        assert!(AgentFile::parse(br#"{"agentName":"x"}"#).is_err());
        let err = AgentFile::read(Path::new("/nonexistent/.agent")).unwrap_err();
        assert_eq!(err.metric_label(), "agent_file_unreadable");
    }
}
