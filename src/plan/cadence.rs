//! How long a poll loop waits before its next poll: the AgentPools' interval, stretched by the ADO rate
//! limit's slow-down, and — opted in — stretched to a longer interval while service hooks flow (a recent
//! hook shows ADO pushes; polling stays the safety net, at the longer interval, and returns to the normal
//! one by itself when hooks stop).

use std::time::Duration;

/// Slower polling while hooks flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookCadence {
    /// The poll interval while hooks flow.
    pub interval: Duration,
    /// Hooks "flow" while the last one is at most this old.
    pub window: Duration,
}

/// The wait before the next poll. `since_last_hook`: time since the last hook woke this loop, if any.
pub fn next_poll_wait(
    base: Duration,
    slow_down: f64,
    hooks: Option<HookCadence>,
    since_last_hook: Option<Duration>,
) -> Duration {
    let rate_limited = base.mul_f64(if slow_down.is_finite() {
        slow_down.max(1.0)
    } else {
        1.0
    });
    match (hooks, since_last_hook) {
        (Some(h), Some(since)) if since <= h.window => rate_limited.max(h.interval),
        _ => rate_limited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_table() {
        let s = Duration::from_secs;
        let hooks = Some(HookCadence {
            interval: s(30),
            window: s(300),
        });
        for (what, base, slow, hooks, since, want) in [
            ("plain interval", s(5), 1.0, None, None, s(5)),
            ("rate limit stretches it", s(5), 3.0, None, None, s(15)),
            (
                "a factor below 1 never speeds up",
                s(5),
                0.2,
                None,
                None,
                s(5),
            ),
            ("a NaN factor is ignored", s(5), f64::NAN, None, None, s(5)),
            (
                "opted in, no hook yet: normal polling",
                s(5),
                1.0,
                hooks,
                None,
                s(5),
            ),
            (
                "hooks flow: the longer interval",
                s(5),
                1.0,
                hooks,
                Some(s(10)),
                s(30),
            ),
            (
                "window edge still counts",
                s(5),
                1.0,
                hooks,
                Some(s(300)),
                s(30),
            ),
            (
                "hooks stopped: back to normal",
                s(5),
                1.0,
                hooks,
                Some(s(301)),
                s(5),
            ),
            (
                "rate limit longer than the hook interval wins",
                s(5),
                10.0,
                hooks,
                Some(s(1)),
                s(50),
            ),
            (
                "not opted in: hooks change nothing",
                s(5),
                1.0,
                None,
                Some(s(1)),
                s(5),
            ),
        ] {
            assert_eq!(next_poll_wait(base, slow, hooks, since), want, "{what}");
        }
    }
}
