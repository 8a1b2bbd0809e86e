//! Rate limiting of one (organization, identity): our own steady budget (a governor quota), ADO's
//! `Retry-After` (obeyed on any status: no call before it passes) and `X-RateLimit-*` headroom.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::HeaderMap;

use super::observer::{AdoObserver, DelayReason, RateLimitState};

/// Below this headroom the poll loop should slow down (see `AdoClient::slow_down_factor`).
pub const LOW_HEADROOM: f64 = 0.25;

/// The longest slow-down factor suggested.
pub const MAX_SLOW_DOWN: f64 = 10.0;

/// The longest `Retry-After` honoured, against a broken or hostile header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// Rate-limit state shared by every caller of one client.
pub(crate) struct Limiter {
    budget: DefaultDirectRateLimiter,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    not_before: Option<Instant>,
    headroom: f64,
}

impl Limiter {
    pub(crate) fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            budget: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            state: Mutex::new(State {
                not_before: None,
                headroom: 1.0,
            }),
        }
    }

    fn state(&self) -> State {
        match self.state.lock() {
            Ok(s) => *s,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Waits until a call may be sent: past any `Retry-After`, then within our budget.
    pub(crate) async fn acquire(&self, organization: &str, observer: &dyn AdoObserver) {
        loop {
            if let Some(until) = self.state().not_before {
                let now = Instant::now();
                if until > now {
                    let wait = until - now;
                    observer.on_delay(organization, DelayReason::RetryAfter, wait);
                    tracing::debug!(
                        organization,
                        wait_ms = wait.as_millis() as u64,
                        "holding ADO call for Retry-After"
                    );
                    tokio::time::sleep_until(until).await;
                }
            }
            let started = Instant::now();
            if self.budget.check().is_err() {
                self.budget.until_ready().await;
                observer.on_delay(organization, DelayReason::Budget, started.elapsed());
            }
            // A Retry-After may have arrived while we waited for budget: honour it too.
            match self.state().not_before {
                Some(until) if until > Instant::now() => continue,
                _ => return,
            }
        }
    }

    /// Records what an answer said about rate limits; returns the state for the observer.
    pub(crate) fn observe(&self, headers: &HeaderMap) -> RateLimitState {
        let retry_after = header_str(headers, "retry-after").and_then(parse_retry_after);
        let remaining = header_f64(headers, "x-ratelimit-remaining");
        let limit = header_f64(headers, "x-ratelimit-limit");
        let server_delay = header_f64(headers, "x-ratelimit-delay")
            .filter(|d| d.is_finite() && *d > 0.0)
            .map(|d| Duration::from_secs_f64(d.min(MAX_RETRY_AFTER.as_secs_f64())));
        let headroom = headroom_of(remaining, limit);
        self.update(|s| {
            if let Some(delay) = retry_after {
                let until = Instant::now() + delay;
                s.not_before = Some(s.not_before.map_or(until, |t| t.max(until)));
            }
            s.headroom = headroom;
        });
        RateLimitState {
            headroom,
            remaining,
            limit,
            server_delay,
            retry_after,
        }
    }

    /// Holds calls back for at least `delay` (a 429 without `Retry-After`).
    pub(crate) fn hold_for(&self, delay: Duration) {
        let until = Instant::now() + delay.min(MAX_RETRY_AFTER);
        self.update(|s| s.not_before = Some(s.not_before.map_or(until, |t| t.max(until))));
    }

    /// Fraction of ADO's budget left after the last answer (1.0 = no pressure).
    pub(crate) fn headroom(&self) -> f64 {
        self.state().headroom
    }

    /// How much slower the poll loop should run: 1.0 normally; above 1 when headroom is below
    /// [`LOW_HEADROOM`] (inversely proportional, at most [`MAX_SLOW_DOWN`]).
    pub(crate) fn slow_down_factor(&self) -> f64 {
        slow_down_for(self.headroom())
    }

    /// Time left until calls may go out again (zero when none is pending).
    pub(crate) fn retry_after_remaining(&self) -> Duration {
        self.state()
            .not_before
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }
}

fn slow_down_for(headroom: f64) -> f64 {
    if headroom >= LOW_HEADROOM {
        1.0
    } else {
        (LOW_HEADROOM / headroom.max(LOW_HEADROOM / MAX_SLOW_DOWN)).min(MAX_SLOW_DOWN)
    }
}

/// Remaining/limit, clamped to 0..=1. ADO sends these headers only when a caller approaches its limit,
/// so an answer without them means no pressure (1.0). With `Remaining` but no `Limit`, ADO's
/// documented 200-TSTU window is the reference.
fn headroom_of(remaining: Option<f64>, limit: Option<f64>) -> f64 {
    match (remaining, limit) {
        (Some(r), Some(l)) if l > 0.0 => (r / l).clamp(0.0, 1.0),
        (Some(r), _) => (r / 200.0).clamp(0.0, 1.0),
        _ => 1.0,
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_f64(headers: &HeaderMap, name: &str) -> Option<f64> {
    header_str(headers, name)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
}

/// `Retry-After`: delta-seconds (fractions tolerated) or an HTTP-date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(Duration::from_secs_f64(
            secs.min(MAX_RETRY_AFTER.as_secs_f64()),
        ));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let delta = at.duration_since(jiff::Timestamp::now());
    let delta = Duration::try_from(delta).unwrap_or_default();
    Some(delta.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ado::observer::NoopObserver;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("99999999"), Some(MAX_RETRY_AFTER));
        let future = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(120))
            .unwrap();
        let http_date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&future)
            .unwrap();
        let d = parse_retry_after(&http_date).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn headroom_and_slow_down() {
        assert_eq!(headroom_of(None, None), 1.0);
        assert_eq!(headroom_of(Some(50.0), Some(200.0)), 0.25);
        assert_eq!(headroom_of(Some(10.0), None), 0.05);
        assert_eq!(headroom_of(Some(300.0), Some(200.0)), 1.0);
        assert_eq!(slow_down_for(1.0), 1.0);
        assert_eq!(slow_down_for(0.25), 1.0);
        assert_eq!(slow_down_for(0.125), 2.0);
        assert_eq!(slow_down_for(0.0), MAX_SLOW_DOWN);
    }

    #[test]
    fn retry_after_header_sets_not_before_and_only_moves_it_later() {
        let l = Limiter::new(NonZeroU32::new(100).unwrap(), NonZeroU32::new(100).unwrap());
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("30"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("20"));
        h.insert("x-ratelimit-limit", HeaderValue::from_static("200"));
        let state = l.observe(&h);
        assert_eq!(state.retry_after, Some(Duration::from_secs(30)));
        assert!((state.headroom - 0.1).abs() < 1e-9);
        assert!(l.retry_after_remaining() > Duration::from_secs(25));
        assert!(l.slow_down_factor() > 2.0);
        let mut shorter = HeaderMap::new();
        shorter.insert("retry-after", HeaderValue::from_static("1"));
        l.observe(&shorter);
        assert!(
            l.retry_after_remaining() > Duration::from_secs(25),
            "a shorter Retry-After must not shorten the hold"
        );
        assert_eq!(
            l.headroom(),
            1.0,
            "no X-RateLimit headers: pressure is gone"
        );
    }

    #[tokio::test]
    async fn acquire_waits_for_retry_after() {
        let l = Limiter::new(NonZeroU32::new(100).unwrap(), NonZeroU32::new(100).unwrap());
        l.hold_for(Duration::from_millis(300));
        let start = Instant::now();
        l.acquire("org", &NoopObserver).await;
        // A lower bound only: the call must not go out before the hold passes.
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(l.retry_after_remaining(), Duration::ZERO);
    }
}
