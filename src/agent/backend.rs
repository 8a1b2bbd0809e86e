//! [`AdoOps`] over the product's ADO module: its token sources and REST client (one client, no second).

use crate::ado::{AdoClient, AdoError, AgentQuery, AuthError, DeleteOutcome, TokenSource};

use super::ops::{AdoOps, AgentRef, OpsError, OpsKind, Removal, Secret};

/// Tokens and REST calls for the entrypoint.
///
/// The REST client is built on first use: the happy path never needs it, and building it (loading the
/// system's CA certificates) would only delay the start of `config.sh`.
#[derive(Debug)]
pub struct AdoBackend {
    url: String,
    tokens: TokenSource,
    client: tokio::sync::OnceCell<AdoClient>,
}

impl AdoBackend {
    /// A backend for the organization at `url`, using `tokens` for `config.sh` and the REST fallbacks.
    pub fn new(url: impl Into<String>, tokens: TokenSource) -> AdoBackend {
        AdoBackend {
            url: url.into(),
            tokens,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&AdoClient, OpsError> {
        self.client
            .get_or_try_init(|| async { AdoClient::new(&self.url, self.tokens.clone()) })
            .await
            .map_err(|e| from_ado(&e))
    }
}

fn auth_kind(e: &AuthError) -> OpsKind {
    if e.is_transient() {
        OpsKind::Other
    } else {
        match e {
            AuthError::Tls(_) => OpsKind::Other,
            _ => OpsKind::Identity,
        }
    }
}

/// Reduces an auth error to what the entrypoint decides on.
pub fn from_auth(e: &AuthError) -> OpsError {
    OpsError {
        kind: auth_kind(e),
        transient: e.is_transient(),
        label: e.metric_label(),
        message: e.to_string(),
    }
}

/// Reduces an ADO error to what the entrypoint decides on.
pub fn from_ado(e: &AdoError) -> OpsError {
    let kind = match e {
        AdoError::NotInOrganization { .. } | AdoError::Unauthorized { .. } => OpsKind::Identity,
        AdoError::Forbidden { .. } => OpsKind::Permission,
        AdoError::NotFound { .. } => OpsKind::NotFound,
        AdoError::Auth(a) => auth_kind(a),
        _ => OpsKind::Other,
    };
    OpsError {
        kind,
        transient: e.is_transient(),
        label: e.metric_label(),
        message: e.to_string(),
    }
}

impl AdoOps for AdoBackend {
    async fn fresh_token(&self) -> Result<Secret, OpsError> {
        self.tokens
            .fresh_token()
            .await
            .map(|t| Secret::new(t.expose_secret()))
            .map_err(|e| from_auth(&e))
    }

    async fn delete_agent(&self, agent: AgentRef) -> Result<Removal, OpsError> {
        let client = self.client().await?;
        match client.delete_agent(agent.pool_id, agent.agent_id).await {
            Ok(DeleteOutcome::Deleted) => Ok(Removal::Removed),
            Ok(DeleteOutcome::AlreadyGone) => Ok(Removal::AlreadyGone),
            Err(e) => Err(from_ado(&e)),
        }
    }

    async fn find_agent(&self, pool: &str, agent_name: &str) -> Result<Option<AgentRef>, OpsError> {
        let client = self.client().await?;
        let Some(p) = client.pool_by_name(pool).await.map_err(|e| from_ado(&e))? else {
            return Ok(None);
        };
        let agents = client
            .agents(p.id, &AgentQuery::named(agent_name))
            .await
            .map_err(|e| from_ado(&e))?;
        Ok(agents
            .into_iter()
            .find(|a| a.name.eq_ignore_ascii_case(agent_name))
            .map(|a| AgentRef {
                pool_id: p.id,
                agent_id: a.id,
            }))
    }

    async fn diagnose_registration(&self, pool: &str) -> Option<OpsError> {
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return Some(e),
        };
        match client.pool_by_name(pool).await {
            Ok(Some(_)) => None,
            Ok(None) => Some(OpsError {
                kind: OpsKind::NotFound,
                transient: false,
                label: "agent_pool_missing",
                message: format!(
                    "the organization {} has no agent pool named `{pool}`: create it (Organization settings → Agent pools) or fix AZP_POOL",
                    client.organization()
                ),
            }),
            Err(e) => Some(from_ado(&e)),
        }
    }
}
