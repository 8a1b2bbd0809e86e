//! ADO-style rate limiting: TSTU usage per (organization, identity) over a sliding window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::RateLimitConfig;

/// Headers to put on a rate-limited endpoint's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RateHeaders {
    pub limit: f64,
    pub remaining: f64,
    /// Unix time at which usage would be back to 0 if calls stopped now.
    pub reset_unix: i64,
    /// `Retry-After` seconds (near or over the limit).
    pub retry_after: Option<u64>,
}

impl RateHeaders {
    pub(crate) fn apply(&self, h: &mut axum::http::HeaderMap) {
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set("x-ratelimit-resource", "ATCPU".into());
        set("x-ratelimit-delay", "0.000".into());
        set(
            "x-ratelimit-limit",
            format!("{}", self.limit.round() as i64),
        );
        set(
            "x-ratelimit-remaining",
            format!("{}", self.remaining.max(0.0).floor() as i64),
        );
        set("x-ratelimit-reset", self.reset_unix.to_string());
        if let Some(s) = self.retry_after {
            set("retry-after", s.to_string());
        }
    }
}

/// The outcome of charging one call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RateDecision {
    Allowed(RateHeaders),
    Blocked(RateHeaders),
}

#[derive(Default)]
struct Usage {
    entries: VecDeque<(Instant, f64)>,
    total: f64,
}

pub(crate) struct RateLimiter {
    cfg: RateLimitConfig,
    usage: HashMap<String, Usage>,
}

impl RateLimiter {
    pub(crate) fn new(cfg: RateLimitConfig) -> Self {
        RateLimiter {
            cfg,
            usage: HashMap::new(),
        }
    }

    pub(crate) fn set_config(&mut self, cfg: RateLimitConfig) {
        self.cfg = cfg;
    }

    /// Charges one call for `key` at `now` (`now_unix` is the same instant in Unix seconds).
    /// `None` when rate limiting is off.
    pub(crate) fn charge(
        &mut self,
        key: &str,
        now: Instant,
        now_unix: i64,
    ) -> Option<RateDecision> {
        if !self.cfg.enabled {
            return None;
        }
        let window = Duration::from_secs(self.cfg.window_secs.max(1));
        let u = self.usage.entry(key.to_owned()).or_default();
        while let Some(&(t, c)) = u.entries.front() {
            if now.duration_since(t) >= window {
                u.entries.pop_front();
                u.total -= c;
            } else {
                break;
            }
        }
        if u.entries.is_empty() {
            u.total = 0.0;
        }
        let cost = self.cfg.cost_per_call.max(0.0);
        let limit = self.cfg.limit;
        // Seconds until the oldest charge leaves the window (at least 1).
        let until_oldest_leaves = |u: &Usage| {
            u.entries
                .front()
                .map(|&(t, _)| {
                    window
                        .saturating_sub(now.duration_since(t))
                        .as_secs_f64()
                        .ceil() as u64
                })
                .unwrap_or(0)
                .max(1)
        };
        let reset_of = |u: &Usage| {
            u.entries
                .back()
                .map(|&(t, _)| {
                    now_unix + window.saturating_sub(now.duration_since(t)).as_secs() as i64
                })
                .unwrap_or(now_unix)
        };
        if u.total + cost > limit + 1e-9 {
            let h = RateHeaders {
                limit,
                remaining: limit - u.total,
                reset_unix: reset_of(u),
                retry_after: Some(until_oldest_leaves(u)),
            };
            return Some(RateDecision::Blocked(h));
        }
        u.entries.push_back((now, cost));
        u.total += cost;
        let near = u.total >= limit * self.cfg.near_fraction;
        Some(RateDecision::Allowed(RateHeaders {
            limit,
            remaining: limit - u.total,
            reset_unix: reset_of(u),
            retry_after: near.then(|| until_oldest_leaves(u)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(limit: f64, cost: f64) -> RateLimitConfig {
        RateLimitConfig {
            enabled: true,
            limit,
            window_secs: 300,
            cost_per_call: cost,
            near_fraction: 0.5,
        }
    }

    #[test]
    fn counts_down_warns_near_the_limit_then_blocks_and_recovers_after_the_window() {
        let mut rl = RateLimiter::new(cfg(4.0, 1.0));
        let t0 = Instant::now();
        let RateDecision::Allowed(h) = rl.charge("o/a", t0, 1000).unwrap() else {
            panic!("first call blocked")
        };
        assert_eq!(
            (h.limit, h.remaining, h.retry_after, h.reset_unix),
            (4.0, 3.0, None, 1300)
        );
        let RateDecision::Allowed(h) = rl
            .charge("o/a", t0 + Duration::from_secs(10), 1010)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(h.remaining, 2.0);
        assert_eq!(
            h.retry_after,
            Some(290),
            "at half the limit a 200 carries Retry-After"
        );
        rl.charge("o/a", t0 + Duration::from_secs(20), 1020)
            .unwrap();
        rl.charge("o/a", t0 + Duration::from_secs(30), 1030)
            .unwrap();
        let RateDecision::Blocked(h) = rl
            .charge("o/a", t0 + Duration::from_secs(40), 1040)
            .unwrap()
        else {
            panic!("fifth call must be blocked")
        };
        assert_eq!(h.retry_after, Some(260));
        // Another identity is not affected.
        assert!(matches!(
            rl.charge("o/b", t0, 1000),
            Some(RateDecision::Allowed(_))
        ));
        // Once the first call leaves the window, one more fits.
        assert!(matches!(
            rl.charge("o/a", t0 + Duration::from_secs(300), 1300),
            Some(RateDecision::Allowed(_))
        ));
    }

    #[test]
    fn disabled_means_no_headers() {
        let mut rl = RateLimiter::new(RateLimitConfig {
            enabled: false,
            ..cfg(1.0, 1.0)
        });
        assert_eq!(rl.charge("k", Instant::now(), 0), None);
    }
}
