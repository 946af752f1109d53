//! Site: aggregate its Hosts into status (counts, capacity, allocatable).

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use yukumo_api::Reason;
use yukumo_api::common::{Conditions, Resources, condition_types as ct};
use yukumo_api::host::Host;
use yukumo_api::site::{PoolStatus, Site, SiteStatus, StoragePool};

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
    let status = SiteStatus {
        observed_generation: site.metadata.generation,
        conditions: apply_verdict(&old.conditions, site.metadata.generation, &verdict),
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
