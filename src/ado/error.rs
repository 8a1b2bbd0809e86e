//! Errors of the ADO client, each with a stable metric label and a message that says what to do.

use std::time::Duration;

use super::auth::AuthError;

/// An error from a call to Azure DevOps.
///
/// [`AdoError::is_transient`] separates "retry later, keep the last good view" from errors that need a
/// person (configuration, permissions). Neither kind may lead to destructive action by a caller.
#[derive(Debug, thiserror::Error)]
pub enum AdoError {
    /// 401 with `TF401444`: the identity is valid in Entra but not a user of the organization.
    #[error(
        "{identity} was never added to organization {organization} (TF401444): add it in \
         Organization settings → Users (a service principal or managed identity needs a Basic or \
         Stakeholder access level), then retry; Azure DevOps said: {detail}"
    )]
    NotInOrganization {
        /// The identity (e.g. `workload identity <client id>`).
        identity: String,
        /// The organization URL.
        organization: String,
        /// What the server said (names the identity's tenant and object id).
        detail: String,
    },

    /// 401 otherwise: the token was rejected (expired, wrong audience, wrong tenant, revoked PAT).
    #[error(
        "{organization} rejected the token of {identity} (401 on {endpoint}): {detail}; check that the \
         token is for Azure DevOps (scope 499b84ac-1321-427f-aa17-267ca6975798/.default), from the \
         organization's tenant, and not expired (a PAT: not revoked)"
    )]
    Unauthorized {
        /// The identity.
        identity: String,
        /// The organization URL.
        organization: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// What the server said.
        detail: String,
    },

    /// 403: authenticated, but not allowed to do this.
    #[error(
        "{identity} has no permission for {endpoint} in {organization} (403): {detail}; registering, \
         updating or removing agents needs the Administrator role on the agent pool (Organization \
         settings → Agent pools → the pool → Security), reading needs Reader"
    )]
    Forbidden {
        /// The identity.
        identity: String,
        /// The organization URL.
        organization: String,
        /// The endpoint label.
        endpoint: &'static str,
        /// What the server said.
        detail: String,
    },

    /// 404: the pool, agent or route does not exist.
    #[error(
        "not found (404) on {endpoint} ({url}): {detail}; check the organization URL and the pool or agent id"
    )]
    NotFound {
        /// The endpoint label.
        endpoint: &'static str,
        /// The URL called (no secrets in it).
        url: String,
        /// What the server said.
        detail: String,
    },

    /// 429 (`TF400733`): ADO throttles this identity; no call before `retry_after` has passed.
    #[error(
        "Azure DevOps throttles this identity (429 on {endpoint}): {detail}; the client waits {}s \
         before its next call to this organization",
        retry_after.as_secs_f64().ceil()
    )]
    Throttled {
        /// The endpoint label.
        endpoint: &'static str,
        /// How long to wait (from `Retry-After`, or a default when absent).
        retry_after: Duration,
        /// What the server said.
        detail: String,
    },

    /// 5xx: the service failed; retry later.
    #[error(
        "Azure DevOps failed on {endpoint} ({status}): {detail}; this is transient, retrying on the next poll"
    )]
    Server {
        /// The endpoint label.
        endpoint: &'static str,
        /// HTTP status.
        status: u16,
        /// What the server said.
        detail: String,
    },

    /// Another unexpected status (400, 409, …).
    #[error("Azure DevOps answered {status} on {endpoint}: {detail}")]
    Status {
        /// The endpoint label.
        endpoint: &'static str,
        /// HTTP status.
        status: u16,
        /// What the server said.
        detail: String,
    },

    /// No answer within the request timeout.
    #[error("no answer from Azure DevOps on {endpoint} within {}s; retrying on the next poll", timeout.as_secs_f64())]
    Timeout {
        /// The endpoint label.
        endpoint: &'static str,
        /// The timeout.
        timeout: Duration,
    },

    /// Connection, TLS or protocol failure.
    #[error(
        "cannot reach Azure DevOps for {endpoint}: {detail}; check network, DNS, proxy and the CA \
         trust (SSL_CERT_FILE / SSL_CERT_DIR)"
    )]
    Transport {
        /// The endpoint label.
        endpoint: &'static str,
        /// The underlying error, with its causes.
        detail: String,
    },

    /// A 2xx answer whose body is not the JSON expected.
    #[error(
        "Azure DevOps sent a malformed answer on {endpoint}: {error}; body starts with: {excerpt:?}"
    )]
    MalformedJson {
        /// The endpoint label.
        endpoint: &'static str,
        /// The parse error.
        error: String,
        /// The first bytes of the body.
        excerpt: String,
    },

    /// No token could be obtained.
    #[error(transparent)]
    Auth(#[from] AuthError),

    /// The HTTPS trust store could not be assembled (`SSL_CERT_FILE` / `SSL_CERT_DIR`).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),

    /// The client is configured wrongly (e.g. an organization URL that is not a URL).
    #[error("invalid ADO client configuration: {field}: {reason}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

impl AdoError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AdoError::NotInOrganization { .. } => "ado_not_in_organization",
            AdoError::Unauthorized { .. } => "ado_unauthorized",
            AdoError::Forbidden { .. } => "ado_forbidden",
            AdoError::NotFound { .. } => "ado_not_found",
            AdoError::Throttled { .. } => "ado_throttled",
            AdoError::Server { .. } => "ado_server_error",
            AdoError::Status { .. } => "ado_unexpected_status",
            AdoError::Timeout { .. } => "ado_timeout",
            AdoError::Transport { .. } => "ado_transport",
            AdoError::MalformedJson { .. } => "ado_malformed_json",
            AdoError::Auth(e) => e.metric_label(),
            AdoError::Tls(e) => e.metric_label(),
            AdoError::Config { .. } => "ado_config",
        }
    }

    /// Whether retrying later may succeed without anyone changing anything (throttling, 5xx,
    /// timeouts, network, malformed answers, token endpoint outages). Permanent errors (TF401444, 403,
    /// 404, bad configuration) need a person; both kinds keep a caller's last good view.
    pub fn is_transient(&self) -> bool {
        match self {
            AdoError::Throttled { .. }
            | AdoError::Server { .. }
            | AdoError::Timeout { .. }
            | AdoError::Transport { .. }
            | AdoError::MalformedJson { .. } => true,
            AdoError::Auth(e) => e.is_transient(),
            AdoError::NotInOrganization { .. }
            | AdoError::Unauthorized { .. }
            | AdoError::Forbidden { .. }
            | AdoError::NotFound { .. }
            | AdoError::Status { .. }
            | AdoError::Tls(_)
            | AdoError::Config { .. } => false,
        }
    }

    /// The HTTP status behind the error, if there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            AdoError::NotInOrganization { .. } | AdoError::Unauthorized { .. } => Some(401),
            AdoError::Forbidden { .. } => Some(403),
            AdoError::NotFound { .. } => Some(404),
            AdoError::Throttled { .. } => Some(429),
            AdoError::Server { status, .. } | AdoError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// For throttling: how long the client will hold calls back.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AdoError::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf401444_message_says_where_to_add_the_identity() {
        let e = AdoError::NotInOrganization {
            identity: "workload identity 1234".into(),
            organization: "https://dev.azure.com/contoso".into(),
            detail: "TF401444: Please sign-in at least once".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("workload identity 1234 was never added")
                && msg.contains("Organization settings → Users"),
            "{msg}"
        );
        assert_eq!(e.metric_label(), "ado_not_in_organization");
        assert!(!e.is_transient());
    }

    #[test]
    fn forbidden_names_the_role() {
        let e = AdoError::Forbidden {
            identity: "x".into(),
            organization: "o".into(),
            endpoint: "add_agent",
            detail: "denied".into(),
        };
        assert!(
            e.to_string()
                .contains("Administrator role on the agent pool")
        );
        assert_eq!(e.status(), Some(403));
    }

    #[test]
    fn transient_split() {
        let throttled = AdoError::Throttled {
            endpoint: "jobrequests",
            retry_after: Duration::from_secs(3),
            detail: "TF400733".into(),
        };
        assert!(throttled.is_transient());
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
        assert!(throttled.to_string().contains("waits 3s"));
        let server = AdoError::Server {
            endpoint: "agents",
            status: 503,
            detail: String::new(),
        };
        assert!(server.is_transient());
        let nf = AdoError::NotFound {
            endpoint: "agent",
            url: "u".into(),
            detail: String::new(),
        };
        assert!(!nf.is_transient());
    }
}
