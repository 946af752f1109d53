//! Site: aggregate its Hosts into status (counts, capacity, allocatable).

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use yukumo_api::common::{Conditions, Resources, condition_types as ct};
use yukumo_api::host::Host;
use yukumo_api::site::{PoolStatus, Site, SiteStatus, StoragePool};
use yukumo_api::{Condition, ConditionStatus, Reason};

use super::verdict::{Verdict, apply_verdict, reason_changed};
use crate::context::{Ctx, Result};

/// Each declared pool as its host reported it (or why there is no report).
pub fn pools(declared: &[StoragePool], hosts: &[Host]) -> Vec<PoolStatus> {
    declared
        .iter()
        .map(|p| {
            let host = hosts.iter().find(|h| h.name_any() == p.host);
            let reported = host
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.storage_pools.iter().find(|r| r.name == p.name));
            match (host, reported) {
                (_, Some(r)) => r.clone(),
                (None, _) => PoolStatus {
                    name: p.name.clone(),
                    host: p.host.clone(),
                    error: Some(format!("host {} is not registered at this Site", p.host)),
                    ..Default::default()
                },
                (Some(_), None) => PoolStatus {
                    name: p.name.clone(),
                    host: p.host.clone(),
                    error: Some(format!("host {} has not reported the pool yet", p.host)),
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// Pure aggregation of a Site's hosts into its status fields and verdict.
pub fn aggregate(hosts: &[Host]) -> (SiteStatus, Verdict) {
    let mut names: Vec<String> = hosts.iter().map(|h| h.name_any()).collect();
    names.sort();
    let ready: Vec<&Host> = hosts
        .iter()
        .filter(|h| {
            h.status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true(ct::READY))
        })
        .collect();
    let sum = |f: fn(&yukumo_api::host::HostStatus) -> Option<Resources>| {
        ready
            .iter()
            .filter_map(|h| h.status.as_ref().and_then(f))
            .fold(Resources::default(), Resources::plus)
    };
    let status = SiteStatus {
        hosts: hosts.len() as i32,
        ready_hosts: ready.len() as i32,
        hosts_ready: Some(format!("{}/{}", ready.len(), hosts.len())),
        host_names: names,
        capacity: Some(sum(|s| s.capacity)),
        allocatable: Some(sum(|s| s.allocatable)),
        ..Default::default()
    };
    let verdict = if ready.is_empty() {
        Verdict::progressing(
            Reason::NoReadyHosts,
            format!("0/{} hosts ready", hosts.len()),
        )
    } else {
        Verdict::ready(
            Reason::HostsReady,
            format!("{}/{} hosts ready", ready.len(), hosts.len()),
        )
    };
    (status, verdict)
}

/// The Site's condition type that says whether its WAN settings are acted on.
pub const WAN_TUNNELS: &str = "WanTunnels";

/// The WAN settings a Site sets that this version does not act on, as the
/// message of its `WanTunnels` condition (`None`: it sets none).
pub fn wan_settings_unbuilt(spec: &yukumo_api::SiteSpec) -> Option<String> {
    let set: Vec<&str> = [
        ("spec.gateway", spec.gateway.is_some()),
        ("spec.tunnel", spec.tunnel.is_some()),
        (
            "spec.credentialsSecretRef",
            spec.credentials_secret_ref.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(f, on)| on.then_some(f))
    .collect();
    (!set.is_empty()).then(|| {
        format!(
            "{} not acted on: this version builds no WAN tunnels between Sites (no encryption, no bandwidth cap); a group stretched to another Site reaches it only where the hosts' underlays route to each other",
            set.join(", ")
        )
    })
}

pub async fn reconcile(site: Arc<Site>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("Site");
    let name = site.name_any();
    let hosts: Vec<Host> = ctx
        .stores
        .hosts
        .state()
        .iter()
        .filter(|h| h.spec.site == name)
        .map(|h| (**h).clone())
        .collect();
    let (agg, verdict) = aggregate(&hosts);
    let old = site.status.clone().unwrap_or_default();
    let mut conditions = apply_verdict(&old.conditions, site.metadata.generation, &verdict);
    let unbuilt = wan_settings_unbuilt(&site.spec);
    match &unbuilt {
        Some(msg) => conditions.set_condition(Condition::new(
            WAN_TUNNELS,
            ConditionStatus::False,
            Reason::WanTunnelsNotBuilt,
            msg.clone(),
            site.metadata.generation,
        )),
        None => conditions.retain(|c| c.type_ != WAN_TUNNELS),
    }
    let status = SiteStatus {
        observed_generation: site.metadata.generation,
        conditions,
        peers: old.peers.clone(),
        storage_pools: pools(&site.spec.storage_pools, &hosts),
        ..agg
    };
    if status != old {
        ctx.apply_status(
            &Api::<Site>::all(ctx.client.clone()),
            site.as_ref(),
            &status,
        )
        .await?;
    }
    let had = old
        .conditions
        .get_condition(WAN_TUNNELS)
        .map(|c| c.message.as_str());
    if let Some(msg) = unbuilt.as_deref().filter(|m| had != Some(*m)) {
        ctx.event(
            site.as_ref(),
            EventType::Warning,
            &Reason::WanTunnelsNotBuilt,
            msg.to_string(),
        )
        .await;
    }
    if reason_changed(&old.conditions, &verdict) {
        ctx.event(
            site.as_ref(),
            EventType::Normal,
            verdict.reason(),
            verdict.message().to_string(),
        )
        .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> yukumo_api::SiteSpec {
        let mut v = serde_json::json!({"publicIPPool": ["203.0.113.64/26"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn wan_settings_are_said_to_be_unbuilt_naming_each_field() {
        assert_eq!(wan_settings_unbuilt(&spec(serde_json::json!({}))), None);
        let msg = wan_settings_unbuilt(&spec(serde_json::json!({
            "gateway": {"wanEndpoint": "192.0.2.10:4789"},
            "tunnel": {"bandwidthMbps": 1000, "encryption": "none"},
        })))
        .unwrap();
        assert!(
            msg.starts_with(
                "spec.gateway, spec.tunnel not acted on: this version builds no WAN tunnels"
            ),
            "{msg}"
        );
        let msg = wan_settings_unbuilt(&spec(serde_json::json!({
            "credentialsSecretRef": {"name": "c", "namespace": "yukumo-system"},
        })))
        .unwrap();
        assert!(
            msg.starts_with("spec.credentialsSecretRef not acted on"),
            "{msg}"
        );
    }
}
