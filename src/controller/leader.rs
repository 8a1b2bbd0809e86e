//! Leader election: every replica watches and keeps its caches warm; only the holder of the
//! `coordination.k8s.io/v1` Lease polls ADO and writes. Decisions are [`plan::lease_step`] and
//! [`plan::still_leader`]; this module reads and writes the Lease (with its resourceVersion as a
//! precondition, so two replicas never both win a round). An old leader that cannot renew stops writing
//! a margin before its Lease can be taken; deterministic Job names keep any overlap idempotent.

use std::sync::Mutex;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::metrics::Metrics;
use crate::plan::{self, LeaseRecord, LeaseStep};

/// Settings of leader election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace and name of the Lease.
    pub namespace: String,
    pub name: String,
    /// This replica's identity in the Lease (unique per process).
    pub identity: String,
    /// `leaseDurationSeconds`; the Lease is renewed every third of it.
    pub duration: Duration,
}

/// Whether this replica may write now.
#[derive(Debug)]
pub struct Leadership {
    /// None: no election, always the leader (one replica).
    election: Option<(SignedDuration, Mutex<Option<Timestamp>>)>,
}

impl Leadership {
    /// Always the leader (leader election off).
    pub fn single() -> Self {
        Leadership { election: None }
    }

    fn elected(duration: Duration) -> Self {
        Leadership {
            election: Some((
                SignedDuration::try_from(duration).unwrap_or(SignedDuration::from_secs(15)),
                Mutex::new(None),
            )),
        }
    }

    /// True while this replica holds an unexpired Lease (with a margin), or without election.
    pub fn is_leader(&self) -> bool {
        match &self.election {
            None => true,
            Some((duration, renewed)) => {
                let renewed = *renewed.lock().unwrap_or_else(|e| e.into_inner());
                plan::still_leader(renewed, Timestamp::now(), *duration, margin(*duration))
            }
        }
    }

    fn set(&self, renewed: Option<Timestamp>) {
        if let Some((_, r)) = &self.election {
            *r.lock().unwrap_or_else(|e| e.into_inner()) = renewed;
        }
    }
}

/// Stop writing this long before the Lease could be taken over.
fn margin(duration: SignedDuration) -> SignedDuration {
    duration / 5
}

fn record(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity,
        renew_time: spec.renew_time.map(|t| t.0),
        duration: SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds.unwrap_or(15).max(1),
        )),
    }
}

/// Starts leader election; the returned [`Leadership`] says whether to write.
pub fn start(client: Client, config: LeaderConfig, metrics: Metrics) -> std::sync::Arc<Leadership> {
    let leadership = std::sync::Arc::new(Leadership::elected(config.duration));
    let handle = leadership.clone();
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut was_leader = false;
        loop {
            let renewed = step(&api, &config).await;
            match renewed {
                Ok(Some(at)) => handle.set(Some(at)),
                Ok(None) => handle.set(None),
                // A failed read or write keeps the last renewal: it runs out by itself.
                Err(e) => {
                    tracing::warn!(lease = %config.name, error = %e, "leader lease: call failed")
                }
            }
            let leader = handle.is_leader();
            metrics.leader.set(i64::from(leader));
            if leader != was_leader {
                tracing::info!(lease = %config.name, identity = %config.identity, leader, "leadership changed");
                was_leader = leader;
            }
            tokio::time::sleep(config.duration / 3).await;
        }
    });
    leadership
}

/// One round: returns the renew time we wrote (we lead), None (another replica leads, or we lost a race).
async fn step(api: &Api<Lease>, config: &LeaderConfig) -> Result<Option<Timestamp>, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let now = Timestamp::now();
    let decision = plan::lease_step(current.as_ref().map(record).as_ref(), &config.identity, now);
    let duration_secs = i32::try_from(config.duration.as_secs())
        .unwrap_or(15)
        .max(1);
    let result = match (decision, current) {
        (LeaseStep::Follow { .. }, _) => return Ok(None),
        (LeaseStep::Create, _) | (_, None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        (step, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if let LeaseStep::TakeOver { previous } = &step {
                tracing::info!(lease = %config.name, ?previous, identity = %config.identity, "taking over the leader lease");
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(duration_secs);
            spec.renew_time = Some(MicroTime(now));
            // replace carries the resourceVersion: a concurrent writer makes this a 409.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match result {
        Ok(_) => Ok(Some(now)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}
