//! Host liveness: a Host is Ready while its agent's heartbeat is younger than
//! its Site's grace period and the agent reports a working hypervisor.
//!
//! The controller writes only the `Ready`, `Reconciling` and `Stalled`
//! conditions of a Host (a map list keyed by type, so server-side apply keeps
//! the agent's fields and conditions intact).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use yukumo_api::Reason;
use yukumo_api::common::{Condition, ConditionStatus, Conditions, condition_types as ct};
use yukumo_api::finalizers;
use yukumo_api::host::Host;
use yukumo_api::site::Site;
use yukumo_api::virtualnode::VirtualNode;

use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Result};

/// The agent's condition saying its hypervisor connection works.
pub const HYPERVISOR_READY: &str = "HypervisorReady";

/// Pure liveness decision. Returns the verdict and, when the host is fresh,
/// how long until it would turn stale (to requeue exactly then).
pub fn liveness(host: &Host, site: Option<&Site>, now: Timestamp) -> (Verdict, Option<Duration>) {
    let Some(site) = site else {
        return (
            Verdict::stalled(
                Reason::SiteNotFound,
                format!("spec.site: Site {:?} not found", host.spec.site),
            ),
            None,
        );
    };
    let grace = Duration::from_secs(site.spec.host_grace_seconds as u64);
    let status = host.status.clone().unwrap_or_default();
    let Some(beat) = status.last_heartbeat_time else {
        return (
            Verdict::progressing(Reason::AwaitingHeartbeat, "the agent has not reported yet"),
            None,
        );
    };
    let age = now.duration_since(beat.0);
    let age = Duration::try_from(age).unwrap_or(Duration::ZERO);
    if age >= grace {
        return (
            Verdict::stalled(
                Reason::HeartbeatLost,
                format!(
                    "no heartbeat from the agent for {}s (grace {}s)",
                    age.as_secs(),
                    grace.as_secs()
                ),
            ),
            None,
        );
    }
    let remaining = grace - age;
    match status.conditions.get_condition(HYPERVISOR_READY) {
        Some(c) if c.status == ConditionStatus::True => (
            Verdict::ready(
                Reason::AgentHeartbeating,
                "agent and hypervisor are healthy",
            ),
            Some(remaining),
        ),
        Some(c) => (
            Verdict::stalled(
                Reason::HypervisorNotReady,
                format!("{}: {}", c.reason, c.message),
            ),
            Some(remaining),
        ),
        None => (
            Verdict::progressing(
                Reason::AwaitingHeartbeat,
                "the agent has not reported its hypervisor",
            ),
            Some(remaining),
        ),
    }
}

fn own_conditions(all: &[Condition]) -> Vec<Condition> {
    all.iter()
        .filter(|c| [ct::READY, ct::RECONCILING, ct::STALLED].contains(&c.type_.as_str()))
        .cloned()
        .collect()
}

pub async fn reconcile(host: Arc<Host>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("Host");
    let site = ctx.stores.site(&host.spec.site);
    let (verdict, remaining) = liveness(&host, site.as_deref(), Timestamp::now());
    let existing = host
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mine = own_conditions(&existing);
    let updated = own_conditions(&apply_verdict(&mine, host.metadata.generation, &verdict));
    if updated != mine {
        ctx.apply_status(
            &Api::<Host>::all(ctx.client.clone()),
            host.as_ref(),
            &serde_json::json!({ "observedGeneration": host.metadata.generation, "conditions": updated }),
        )
        .await?;
        tracing::info!(host = %host.name_any(), reason = %verdict.reason(), "host readiness changed");
    }
    if verdict.reason() != &Reason::AwaitingHeartbeat {
        ctx.announce(host.as_ref(), &mine, &verdict).await;
    }
    if verdict.reason() == &Reason::HeartbeatLost {
        // Nodes deleted while their host is lost cannot be cleaned up there
        // now: release them (the returning agent sweeps their domains).
        let name = host.name_any();
        for vn in ctx.stores.nodes.state() {
            if vn.spec.host.as_deref() == Some(name.as_str())
                && vn.metadata.deletion_timestamp.is_some()
                && vn
                    .finalizers()
                    .iter()
                    .any(|f| f == finalizers::HOST_CLEANUP)
            {
                let api = Api::<VirtualNode>::namespaced(
                    ctx.client.clone(),
                    &vn.namespace().unwrap_or_default(),
                );
                super::virtualcluster::release_finalizer(&api, &vn.name_any()).await?;
                tracing::info!(node = %vn.name_any(), host = %name, "released a deleted node of a lost host");
            }
        }
    }
    // Requeue exactly when the heartbeat would go stale.
    Ok(match remaining {
        Some(d) => Action::requeue(d + Duration::from_millis(250)),
        None => Action::requeue(Duration::from_secs(30)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use yukumo_api::host::{HostSpec, HostStatus};

    fn host(beat_secs_ago: Option<i64>, hyp: Option<ConditionStatus>, now: Timestamp) -> Host {
        let mut h = Host::new(
            "h1",
            HostSpec {
                site: "a".into(),
                gateway: false,
                schedulable: true,
                uplink: None,
            },
        );
        let mut st = HostStatus {
            last_heartbeat_time: beat_secs_ago
                .map(|s| Time(now - k8s_openapi::jiff::SignedDuration::from_secs(s))),
            ..Default::default()
        };
        if let Some(s) = hyp {
            st.conditions.push(Condition::new(
                HYPERVISOR_READY,
                s,
                Reason::Connected,
                "",
                None,
            ));
        }
        h.status = Some(st);
        h
    }

    fn site(grace: u32) -> Site {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": "a"},
            "spec": {"hostGraceSeconds": grace}
        }))
        .unwrap()
    }

    #[test]
    fn fresh_heartbeat_is_ready_and_requeues_at_expiry() {
        let now = Timestamp::now();
        let (v, rem) = liveness(
            &host(Some(10), Some(ConditionStatus::True), now),
            Some(&site(40)),
            now,
        );
        assert_eq!(v.reason(), &Reason::AgentHeartbeating);
        assert_eq!(rem, Some(Duration::from_secs(30)));
    }

    #[test]
    fn stale_heartbeat_is_lost() {
        let now = Timestamp::now();
        let (v, rem) = liveness(
            &host(Some(41), Some(ConditionStatus::True), now),
            Some(&site(40)),
            now,
        );
        assert_eq!(v.reason(), &Reason::HeartbeatLost);
        assert!(v.is_stalled());
        assert_eq!(rem, None);
    }

    #[test]
    fn hypervisor_down_or_site_missing() {
        let now = Timestamp::now();
        let (v, _) = liveness(
            &host(Some(1), Some(ConditionStatus::False), now),
            Some(&site(40)),
            now,
        );
        assert_eq!(v.reason(), &Reason::HypervisorNotReady);
        let (v, _) = liveness(&host(Some(1), Some(ConditionStatus::True), now), None, now);
        assert_eq!(v.reason(), &Reason::SiteNotFound);
        let (v, _) = liveness(&host(None, None, now), Some(&site(40)), now);
        assert_eq!(v.reason(), &Reason::AwaitingHeartbeat);
    }
}
