//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Expiry is judged by local observation, as client-go does: a Lease held by
//! someone else is taken over only when its record has not changed for a
//! whole lease duration *as seen by this process*, so clock skew between
//! controllers cannot cause two leaders. Every write carries the observed
//! `resourceVersion`, so two candidates can never both win a race.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

/// The Lease's name in the controller's namespace.
pub const LEASE_NAME: &str = "yukumo-controller";

/// One candidate's view of the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    lease_duration: Duration,
    observed: Option<(String, Instant)>,
}

/// Result of one attempt to acquire or renew.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This process holds the Lease.
    Leading,
    /// Another process holds it (its identity).
    Following(String),
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, identity: String, lease_duration: Duration) -> Self {
        LeaderElector {
            api,
            identity,
            lease_duration,
            observed: None,
        }
    }

    fn spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Try once to acquire or renew the Lease.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let current = match self.api.get_opt(LEASE_NAME).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Attempt::Leading),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        Ok(Attempt::Following(String::new()))
                    }
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let rv = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let record_key = format!(
            "{holder}|{}",
            spec.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        );
        // Track when this process last saw the record change.
        let changed = self.observed.as_ref().is_none_or(|(k, _)| *k != record_key);
        if changed {
            self.observed = Some((record_key, Instant::now()));
        }
        let held_by_me = holder == self.identity;
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.lease_duration);
        let expired = holder.is_empty()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= duration);
        if !held_by_me && !expired {
            return Ok(Attempt::Following(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
        let acquire = if held_by_me {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut lease = current;
        lease.spec = Some(self.spec(transitions, acquire));
        lease.metadata.resource_version = Some(rv);
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(holder)),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (on clean shutdown) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}
