//! The controller-level allow-list: which organizations (and ADO pools) the AgentPools of a namespace may
//! use with the controller's identity. Without it, creating an AgentPool in any namespace would lend the
//! controller's managed identity to any organization named in it.
//!
//! File format (YAML or JSON), given with `--allow-list FILE`:
//!
//! ```yaml
//! namespaces:
//!   ci:                                   # AgentPools in namespace `ci` ...
//!     organizations:                      # ... may use these organizations
//!       - https://dev.azure.com/contoso
//!     pools: [linux, linux-large]          # ... and only these ADO pools (omit: any pool)
//!   "*":                                  # any other namespace (omit: denied)
//!     organizations: [https://dev.azure.com/contoso-sandbox]
//! ```
//!
//! No file: every namespace may use every organization (single-tenant clusters). With a file: what it
//! does not list is denied. Organizations compare without case and trailing slash; pools without case.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The parsed allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    /// Namespace (or `*`) → what its AgentPools may use.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Allowed>,
}

/// What the AgentPools of one namespace may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowed {
    /// Organization URLs.
    #[serde(default)]
    pub organizations: Vec<String>,
    /// ADO pool names; empty = any pool of those organizations.
    #[serde(default)]
    pub pools: Vec<String>,
}

/// A bad allow-list file; the message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("cannot read the allow-list {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the allow-list {path} is not valid ({message}); expected `namespaces: {{<namespace>: {{organizations: [...], pools: [...]}}}}`"
    )]
    Parse { path: String, message: String },
}

impl AllowListError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AllowListError::Read { .. } => "allow_list_unreadable",
            AllowListError::Parse { .. } => "allow_list_invalid",
        }
    }
}

fn normalize_org(org: &str) -> String {
    org.trim().trim_end_matches('/').to_ascii_lowercase()
}

impl AllowList {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, AllowListError> {
        let text = std::fs::read_to_string(path).map_err(|source| AllowListError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| AllowListError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses YAML (or JSON).
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Whether an AgentPool in `namespace` may use `organization`/`pool`; the error says why not and how to
    /// allow it.
    pub fn check(&self, namespace: &str, organization: &str, pool: &str) -> Result<(), String> {
        let entry = self
            .namespaces
            .get(namespace)
            .or_else(|| self.namespaces.get("*"));
        let Some(entry) = entry else {
            return Err(format!(
                "namespace {namespace} is not in the controller's allow-list: add it (with the organization) to the allow-list file (Helm value `allowList`)"
            ));
        };
        let org = normalize_org(organization);
        if !entry.organizations.iter().any(|o| normalize_org(o) == org) {
            return Err(format!(
                "organization {organization} is not allowed for namespace {namespace} by the controller's allow-list: add it to that namespace's organizations"
            ));
        }
        if !entry.pools.is_empty() && !entry.pools.iter().any(|p| p.eq_ignore_ascii_case(pool)) {
            return Err(format!(
                "ADO pool {pool} is not allowed for namespace {namespace} by the controller's allow-list: add it to that namespace's pools"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
namespaces:
  ci:
    organizations: [https://dev.azure.com/Contoso/]
    pools: [linux]
  "*":
    organizations: [https://dev.azure.com/sandbox]
"#;

    #[test]
    fn decisions_table() {
        let list = AllowList::parse(FILE).unwrap();
        let cases = [
            ("ci", "https://dev.azure.com/contoso", "LINUX", true),
            ("ci", "https://dev.azure.com/contoso", "windows", false),
            ("ci", "https://dev.azure.com/other", "linux", false),
            ("team-b", "https://dev.azure.com/sandbox", "anything", true),
            ("team-b", "https://dev.azure.com/contoso", "linux", false),
        ];
        for (ns, org, pool, allowed) in cases {
            assert_eq!(
                list.check(ns, org, pool).is_ok(),
                allowed,
                "{ns} {org} {pool}"
            );
        }
    }

    #[test]
    fn without_a_wildcard_unknown_namespaces_are_denied_with_the_fix() {
        let list =
            AllowList::parse("namespaces:\n  ci:\n    organizations: [https://dev.azure.com/x]\n")
                .unwrap();
        let err = list
            .check("other", "https://dev.azure.com/x", "p")
            .unwrap_err();
        assert!(
            err.contains("namespace other") && err.contains("allowList"),
            "{err}"
        );
    }

    #[test]
    fn typos_in_the_file_are_errors() {
        assert!(AllowList::parse("namespace:\n  ci: {}\n").is_err());
        assert!(AllowList::parse("namespaces:\n  ci:\n    organisations: [x]\n").is_err());
    }
}
