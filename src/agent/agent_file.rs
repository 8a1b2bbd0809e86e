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
}

impl AgentFileError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentFileError::Read { .. } => "agent_file_unreadable",
            AgentFileError::Parse { .. } => "agent_file_malformed",
        }
    }
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
    fn missing_ids_are_an_error() {
        assert!(AgentFile::parse(br#"{"agentName":"x"}"#).is_err());
        let err = AgentFile::read(Path::new("/nonexistent/.agent")).unwrap_err();
        assert_eq!(err.metric_label(), "agent_file_unreadable");
    }
}
