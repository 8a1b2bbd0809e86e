//! A hook through which the metrics module sees every ADO call, rate-limit state and token event.
//!
//! `ado/` knows no metrics library: implement [`AdoObserver`] (all methods default to doing nothing)
//! and hand it to [`super::AdoClientConfig::observer`] and [`super::TokenSource::with_observer`].

use std::time::Duration;

/// One finished HTTP call to Azure DevOps.
#[derive(Debug, Clone)]
pub struct CallRecord<'a> {
    /// The organization URL.
    pub organization: &'a str,
    /// A stable endpoint label (`pools`, `jobrequests`, `agents`, `agent`, `add_agent`,
    /// `replace_agent`, `update_agent`, `delete_agent`, `resourceusage`).
    pub endpoint: &'static str,
    /// HTTP method.
    pub method: &'static str,
    /// HTTP status, or `None` when no answer came (timeout, network).
    pub status: Option<u16>,
    /// `ok`, or the error's metric label.
    pub outcome: &'static str,
    /// Time from sending the request to having read the body (waits for the limiter excluded).
    pub latency: Duration,
}

/// Why the client held a call back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayReason {
    /// A `Retry-After` from an earlier answer had not passed yet.
    RetryAfter,
    /// Our own steady request budget (the governor quota) was spent.
    Budget,
}

impl DelayReason {
    /// A stable label.
    pub fn label(self) -> &'static str {
        match self {
            DelayReason::RetryAfter => "retry_after",
            DelayReason::Budget => "budget",
        }
    }
}

/// Rate-limit state after an answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitState {
    /// Fraction of ADO's budget left, 0.0..=1.0 (1.0 when ADO sent no `X-RateLimit-*` headers).
    pub headroom: f64,
    /// `X-RateLimit-Remaining`, when sent.
    pub remaining: Option<f64>,
    /// `X-RateLimit-Limit`, when sent.
    pub limit: Option<f64>,
    /// `X-RateLimit-Delay` (seconds ADO delayed this request), when sent.
    pub server_delay: Option<Duration>,
    /// `Retry-After`, when sent.
    pub retry_after: Option<Duration>,
}

/// A token acquisition.
#[derive(Debug, Clone)]
pub enum TokenEvent<'a> {
    /// A new token was obtained (not a cache hit).
    Refreshed {
        /// `workload_identity`, `pat`, `azure_cli` or `static`.
        source: &'static str,
        /// How long the exchange took.
        latency: Duration,
    },
    /// Obtaining a token failed.
    Failed {
        /// As above.
        source: &'static str,
        /// The error's metric label.
        label: &'static str,
        /// The error message (no secrets).
        message: &'a str,
    },
}

/// Receives events from the ADO client. Called inline: keep it cheap and never block.
pub trait AdoObserver: Send + Sync + 'static {
    /// After every HTTP call.
    fn on_call(&self, _call: &CallRecord<'_>) {}
    /// After every answer, with the rate-limit state it left.
    fn on_rate_limit(&self, _organization: &str, _state: &RateLimitState) {}
    /// When a call was held back before being sent.
    fn on_delay(&self, _organization: &str, _reason: DelayReason, _delay: Duration) {}
    /// After every token exchange (success or failure); cache hits are not reported.
    fn on_token(&self, _event: &TokenEvent<'_>) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl AdoObserver for NoopObserver {}
