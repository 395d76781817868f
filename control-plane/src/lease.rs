//! One writer among the control plane's replicas, chosen with a `coordination.k8s.io/v1`
//! Lease. Every replica serves xDS, the CA and the webhook; only the Lease's holder writes
//! status back to the cluster's objects, so two replicas never fight over a condition.
//!
//! A replica takes the Lease when it is absent, expired (not renewed within its duration) or
//! already its own, and renews it at a third of the duration. Every write is conditional on
//! the resourceVersion it read, so of two replicas racing for an expired Lease one wins and
//! the other sees a conflict. A holder that cannot renew stops calling itself the holder
//! once its own lease would have run out, before another replica may take it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease as KubeLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

pub struct Lease {
    api: Api<KubeLease>,
    name: String,
    /// Who this replica is: its pod name.
    holder: String,
    duration: Duration,
    leading: AtomicBool,
    /// When this replica last renewed; its claim lapses `duration` later.
    renewed: std::sync::Mutex<Option<Instant>>,
}

impl Lease {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        holder: &str,
        duration: Duration,
    ) -> Lease {
        Lease {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            holder: holder.to_string(),
            duration,
            leading: AtomicBool::new(false),
            renewed: std::sync::Mutex::new(None),
        }
    }

    /// Whether this replica holds the Lease now.
    pub fn is_leader(&self) -> bool {
        let fresh = self
            .renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < self.duration);
        self.leading.load(Ordering::Relaxed) && fresh
    }

    /// Tries to take or renew the Lease, for as long as the process runs.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                self.try_acquire().await;
                tokio::time::sleep(self.duration / 3).await;
            }
        });
    }

    /// One round: takes or renews the Lease if it is free, expired or already ours.
    /// Returns whether this replica holds it now.
    pub async fn try_acquire(&self) -> bool {
        let held = match self.round().await {
            Ok(held) => held,
            Err(e) => {
                tracing::debug!(error = %e, lease = %self.name, "the lease round failed");
                false
            }
        };
        let was = self.leading.swap(held, Ordering::Relaxed);
        if held != was {
            tracing::info!(holder = %self.holder, lease = %self.name, leading = held, "status writer changed");
        }
        held
    }

    async fn round(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let started = Instant::now();
        let current = self.api.get_opt(&self.name).await?;
        let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match current {
            None => {
                let lease = KubeLease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(None, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let old = lease.spec.clone().unwrap_or_default();
                let ours = old.holder_identity.as_deref() == Some(self.holder.as_str());
                let expires = old.renew_time.as_ref().map(|t| {
                    let seconds = old.lease_duration_seconds.unwrap_or(0).max(0);
                    t.0 + std::time::Duration::from_secs(seconds as u64)
                });
                let expired = expires.is_none_or(|t| t < now);
                if !ours && !expired {
                    return Ok(false);
                }
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
                let acquired = if ours { old.acquire_time } else { None };
                // Replacing with the resourceVersion just read: a replica that raced us to it
                // gets a conflict, not both the lease.
                lease.spec = Some(spec(acquired, transitions));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => {
                *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
