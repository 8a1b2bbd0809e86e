//! Prometheus metrics of the controller (prefix `azp_autoscaler_`), on prometheus-client.
//!
//! Names follow `azp_autoscaler_<noun>_<unit>`; counters are registered without `_total`, which
//! prometheus-client appends itself. Per-pool series carry `namespace`, `agentpool`, `ado_pool`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ado::observer::{AdoObserver, CallRecord, DelayReason, RateLimitState, TokenEvent};

/// Labels of per-AgentPool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub namespace: String,
    pub agentpool: String,
    pub ado_pool: String,
}

/// Labels of per-AgentPool series with a state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    pub namespace: String,
    pub agentpool: String,
    pub ado_pool: String,
    pub state: &'static str,
}

/// Labels of an ADO call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub organization: String,
    pub endpoint: &'static str,
    pub status: String,
}

/// Labels naming an organization.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabels {
    pub organization: String,
}

/// Labels of a delay before an ADO call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DelayLabels {
    pub organization: String,
    pub reason: &'static str,
}

/// Labels of token events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub source: &'static str,
    pub result: &'static str,
}

/// Labels of an error by its stable label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub namespace: String,
    pub agentpool: String,
    pub error: &'static str,
}

/// Phases of time-to-agent, each measured from the request's queue time.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Phase {
    job_created,
    pod_running,
    agent_registered,
    request_received,
}

/// Labels of time-to-agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub agentpool: String,
    pub ado_pool: String,
    pub phase: Phase,
}

/// Labels of a cleanup action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CleanupLabels {
    pub namespace: String,
    pub agentpool: String,
    pub kind: &'static str,
}

/// Labels of service-hook requests (`accepted`, `unauthorized`, `rate_limited`, `malformed`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub outcome: &'static str,
}

fn wait_buckets() -> impl Iterator<Item = f64> {
    [
        0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
        1800.0,
    ]
    .into_iter()
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13)
}

/// Every metric of the controller, registered once.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<PoolStateLabels, Gauge>,
    pub agents: Family<PoolStateLabels, Gauge>,
    pub jobs_created: Family<PoolLabels, Counter>,
    pub cleanups: Family<CleanupLabels, Counter>,
    pub jobs_lost_to_eviction: Family<PoolLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub poll_duration: Family<OrgLabels, Histogram>,
    pub queue_wait: Family<PoolLabels, Histogram>,
    pub time_to_agent: Family<PhaseLabels, Histogram>,
    pub ado_calls: Family<CallLabels, Counter>,
    pub ado_call_duration: Family<CallLabels, Histogram>,
    pub ado_ratelimit_headroom: Family<OrgLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub ado_delays: Family<DelayLabels, Counter>,
    pub ado_delay_seconds: Family<DelayLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub token_events: Family<TokenLabels, Counter>,
    pub leader: Gauge,
    pub hook_requests: Family<HookLabels, Counter>,
    pub hook_wakes: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("azp_autoscaler");
        let requests = Family::<PoolStateLabels, Gauge>::default();
        r.register(
            "requests",
            "Waiting ADO requests by state (pending, matched, capped, unservable)",
            requests.clone(),
        );
        let agents = Family::<PoolStateLabels, Gauge>::default();
        r.register(
            "agents",
            "Agents by state (starting, idle, busy)",
            agents.clone(),
        );
        let jobs_created = Family::<PoolLabels, Counter>::default();
        r.register("jobs_created", "Agent Jobs created", jobs_created.clone());
        let cleanups = Family::<CleanupLabels, Counter>::default();
        r.register("cleanups", "Cleanup actions by kind", cleanups.clone());
        let jobs_lost_to_eviction = Family::<PoolLabels, Counter>::default();
        r.register(
            "jobs_lost_to_eviction",
            "Pipeline jobs whose agent pod was evicted or lost its node",
            jobs_lost_to_eviction.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        r.register(
            "reconcile_errors",
            "Reconcile errors by error label",
            reconcile_errors.clone(),
        );
        let poll_duration = Family::<OrgLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        r.register(
            "poll_duration_seconds",
            "Duration of one poll of one ADO pool (fetch, plan, apply)",
            poll_duration.clone(),
        );
        let queue_wait =
            Family::<PoolLabels, Histogram>::new_with_constructor(
                || Histogram::new(wait_buckets()),
            );
        r.register(
            "queue_wait_seconds",
            "Time from a request's queue time until an agent received it",
            queue_wait.clone(),
        );
        let time_to_agent = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(wait_buckets())
        });
        r.register(
            "time_to_agent_seconds",
            "Time from a request's queue time to each phase of its agent",
            time_to_agent.clone(),
        );
        let ado_calls = Family::<CallLabels, Counter>::default();
        r.register(
            "ado_calls",
            "ADO REST calls by endpoint and HTTP status",
            ado_calls.clone(),
        );
        let ado_call_duration = Family::<CallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        r.register(
            "ado_call_duration_seconds",
            "Latency of ADO REST calls",
            ado_call_duration.clone(),
        );
        let ado_ratelimit_headroom =
            Family::<OrgLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "ado_ratelimit_headroom_ratio",
            "Fraction of the ADO rate-limit budget left (1 = untouched)",
            ado_ratelimit_headroom.clone(),
        );
        let ado_delays = Family::<DelayLabels, Counter>::default();
        r.register(
            "ado_delays",
            "ADO calls held back by Retry-After or our own budget",
            ado_delays.clone(),
        );
        let ado_delay_seconds =
            Family::<DelayLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "ado_delay_seconds",
            "Seconds ADO calls were held back",
            ado_delay_seconds.clone(),
        );
        let token_events = Family::<TokenLabels, Counter>::default();
        r.register(
            "token_events",
            "Token acquisitions by source and result (refreshed, failed)",
            token_events.clone(),
        );
        let leader = Gauge::default();
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let hook_requests = Family::<HookLabels, Counter>::default();
        r.register(
            "hook_requests",
            "ADO service-hook requests by outcome",
            hook_requests.clone(),
        );
        let hook_wakes = Counter::default();
        r.register(
            "hook_wakes",
            "Immediate polls of every ADO pool woken by service hooks (coalesced)",
            hook_wakes.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            requests,
            agents,
            jobs_created,
            cleanups,
            jobs_lost_to_eviction,
            reconcile_errors,
            poll_duration,
            queue_wait,
            time_to_agent,
            ado_calls,
            ado_call_duration,
            ado_ratelimit_headroom,
            ado_delays,
            ado_delay_seconds,
            token_events,
            leader,
            hook_requests,
            hook_wakes,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records a phase of time-to-agent for one request.
    pub fn observe_phase(&self, pool: &PoolLabels, phase: Phase, since_queued: Duration) {
        self.time_to_agent
            .get_or_create(&PhaseLabels {
                namespace: pool.namespace.clone(),
                agentpool: pool.agentpool.clone(),
                ado_pool: pool.ado_pool.clone(),
                phase,
            })
            .observe(since_queued.as_secs_f64());
    }
}

impl AdoObserver for Metrics {
    fn on_call(&self, call: &CallRecord<'_>) {
        let labels = CallLabels {
            organization: call.organization.to_owned(),
            endpoint: call.endpoint,
            status: call
                .status
                .map_or_else(|| call.outcome.to_owned(), |s| s.to_string()),
        };
        self.ado_calls.get_or_create(&labels).inc();
        self.ado_call_duration
            .get_or_create(&labels)
            .observe(call.latency.as_secs_f64());
    }

    fn on_rate_limit(&self, organization: &str, state: &RateLimitState) {
        self.ado_ratelimit_headroom
            .get_or_create(&OrgLabels {
                organization: organization.to_owned(),
            })
            .set(state.headroom);
    }

    fn on_delay(&self, organization: &str, reason: DelayReason, delay: Duration) {
        let labels = DelayLabels {
            organization: organization.to_owned(),
            reason: reason.label(),
        };
        self.ado_delays.get_or_create(&labels).inc();
        self.ado_delay_seconds
            .get_or_create(&labels)
            .inc_by(delay.as_secs_f64());
    }

    fn on_token(&self, event: &TokenEvent<'_>) {
        let (source, result) = match event {
            TokenEvent::Refreshed { source, .. } => (*source, "refreshed"),
            TokenEvent::Failed { source, .. } => (*source, "failed"),
        };
        self.token_events
            .get_or_create(&TokenLabels { source, result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_total_suffix_once_and_prefix() {
        let m = Metrics::new();
        m.jobs_created
            .get_or_create(&PoolLabels {
                namespace: "ns".into(),
                agentpool: "ap".into(),
                ado_pool: "linux".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains(r#"azp_autoscaler_jobs_created_total{namespace="ns",agentpool="ap",ado_pool="linux"} 1"#),
            "{text}"
        );
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn ado_observer_counts_calls_and_headroom() {
        let m = Metrics::new();
        m.on_call(&CallRecord {
            organization: "https://dev.azure.com/o",
            endpoint: "jobrequests",
            method: "GET",
            status: Some(429),
            outcome: "throttled",
            latency: Duration::from_millis(20),
        });
        m.on_rate_limit(
            "https://dev.azure.com/o",
            &RateLimitState {
                headroom: 0.25,
                remaining: Some(50.0),
                limit: Some(200.0),
                server_delay: None,
                retry_after: None,
            },
        );
        let text = m.encode();
        assert!(text.contains(r#"azp_autoscaler_ado_calls_total{organization="https://dev.azure.com/o",endpoint="jobrequests",status="429"} 1"#), "{text}");
        assert!(text.contains(r#"azp_autoscaler_ado_ratelimit_headroom_ratio{organization="https://dev.azure.com/o"} 0.25"#), "{text}");
    }
}
