//! Leader election over a `coordination.k8s.io/v1` Lease, as a pure decision: all replicas watch, only
//! the holder of an unexpired Lease writes. The controller reads the Lease, asks [`lease_step`] what to
//! do, writes with the Lease's resourceVersion as a precondition (a lost race is a 409: follow), and asks
//! [`still_leader`] before every round of writes.

use jiff::{SignedDuration, Timestamp};

/// What the Lease says (`spec.holderIdentity`, `spec.renewTime`, `spec.leaseDurationSeconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub duration: SignedDuration,
}

/// What this replica does about the Lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// No Lease yet: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver { previous: Option<String> },
    /// Another replica holds it until `until`: only watch.
    Follow { holder: String, until: Timestamp },
}

/// Decides the Lease step of replica `me` at `now`. A Lease without a renew time counts as expired; a
/// renew time in the future (clock skew) counts from now, so a skewed holder is not trusted longer than
/// one duration.
pub fn lease_step(current: Option<&LeaseRecord>, me: &str, now: Timestamp) -> LeaseStep {
    let Some(lease) = current else {
        return LeaseStep::Create;
    };
    let holder = lease.holder.as_deref().filter(|h| !h.is_empty());
    match holder {
        None => LeaseStep::TakeOver { previous: None },
        Some(h) if h == me => LeaseStep::Renew,
        Some(h) => match lease.renew_time {
            Some(renewed) => {
                let until = renewed.min(now) + lease.duration;
                if until > now {
                    LeaseStep::Follow {
                        holder: h.to_owned(),
                        until,
                    }
                } else {
                    LeaseStep::TakeOver {
                        previous: Some(h.to_owned()),
                    }
                }
            }
            None => LeaseStep::TakeOver {
                previous: Some(h.to_owned()),
            },
        },
    }
}

/// Whether a replica that last renewed the Lease at `renewed` may still write at `now`: only while the
/// Lease cannot have been taken over, with a `margin` to spare (a write in flight when it ends).
pub fn still_leader(
    renewed: Option<Timestamp>,
    now: Timestamp,
    duration: SignedDuration,
    margin: SignedDuration,
) -> bool {
    renewed.is_some_and(|r| now < r + duration - margin && r <= now + margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u32) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + i64::from(s)).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: Option<u32>) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_owned),
            renew_time: renewed.map(t),
            duration: SignedDuration::from_secs(15),
        }
    }

    #[test]
    fn lease_steps() {
        let cases: Vec<(&str, Option<LeaseRecord>, LeaseStep)> = vec![
            ("no Lease", None, LeaseStep::Create),
            ("ours", Some(lease(Some("a"), Some(95))), LeaseStep::Renew),
            (
                "ours even when expired (renew it)",
                Some(lease(Some("a"), Some(10))),
                LeaseStep::Renew,
            ),
            (
                "released (empty holder)",
                Some(lease(Some(""), Some(99))),
                LeaseStep::TakeOver { previous: None },
            ),
            (
                "no holder",
                Some(lease(None, None)),
                LeaseStep::TakeOver { previous: None },
            ),
            (
                "another's, fresh",
                Some(lease(Some("b"), Some(90))),
                LeaseStep::Follow {
                    holder: "b".into(),
                    until: t(105),
                },
            ),
            (
                "another's, expired exactly now",
                Some(lease(Some("b"), Some(85))),
                LeaseStep::TakeOver {
                    previous: Some("b".into()),
                },
            ),
            (
                "another's, never renewed",
                Some(lease(Some("b"), None)),
                LeaseStep::TakeOver {
                    previous: Some("b".into()),
                },
            ),
            (
                "another's, renewed in the future (skew): trusted one duration from now",
                Some(lease(Some("b"), Some(500))),
                LeaseStep::Follow {
                    holder: "b".into(),
                    until: t(115),
                },
            ),
        ];
        for (what, current, want) in cases {
            assert_eq!(lease_step(current.as_ref(), "a", t(100)), want, "{what}");
        }
    }

    #[test]
    fn a_leader_stops_writing_before_its_lease_can_be_taken() {
        let d = SignedDuration::from_secs(15);
        let m = SignedDuration::from_secs(3);
        assert!(still_leader(Some(t(100)), t(100), d, m));
        assert!(still_leader(Some(t(100)), t(111), d, m));
        assert!(!still_leader(Some(t(100)), t(112), d, m), "margin");
        assert!(!still_leader(Some(t(100)), t(200), d, m));
        assert!(!still_leader(None, t(100), d, m), "never renewed");
        assert!(
            !still_leader(Some(t(110)), t(100), d, m),
            "a renew time ahead of the clock is not trusted"
        );
    }
}
