//! Admission of a dated reservation: once, against its sites' capacity,
//! what clusters without a dated reservation have placed, and every
//! reservation admitted before it (see [`capacity`]). Decided under the
//! placement lock (two reservations never take the same capacity); no API
//! write happens under it.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use yukumo_api::common::{Conditions, Resources, condition_types};
use yukumo_api::virtualcluster::{EndAction, Reservation, VirtualCluster};

use super::super::capacity;
use super::super::nodes::{DesiredNode, desired_nodes};
use crate::context::Ctx;

/// Whether a reservation is dated (has a start or an end) and so holds
/// capacity for a window that is admitted once.
pub fn dated(r: Option<&Reservation>) -> bool {
    r.is_some_and(|r| r.start.is_some() || r.end.is_some())
}

/// The window a dated reservation holds capacity for; `None` once it no
/// longer holds any (ended with `endAction: Delete`).
fn capacity_window(
    r: &Reservation,
    admitted: Option<Timestamp>,
    now: Timestamp,
) -> Option<capacity::Window> {
    let start = r.start.as_ref().map(|t| t.0).or(admitted).unwrap_or(now);
    let end = match r.end_action {
        EndAction::Delete => r.end.as_ref().map(|t| t.0),
        // Stopped nodes keep their hosts.
        EndAction::Stop => None,
    };
    if end.is_some_and(|e| e <= now) {
        return None;
    }
    Some(capacity::Window {
        start: start.max(now),
        end,
    })
}

fn demand(desired: &[DesiredNode]) -> Vec<capacity::Demand> {
    desired
        .iter()
        .map(|d| capacity::Demand {
            sites: d.sites.clone(),
            need: d.spec.resources,
        })
        .collect()
}

/// Admit `vc`'s dated reservation against its sites' capacity (see
/// [`capacity`]); the error names site, resource and window.
pub async fn admit_reservation(
    ctx: &Ctx,
    vc: &VirtualCluster,
    desired: &[DesiredNode],
    now: Timestamp,
) -> Result<(), String> {
    let Some(r) = vc.spec.reservation.as_ref() else {
        return Ok(());
    };
    let Some(window) = capacity_window(r, None, now) else {
        return Ok(());
    };
    let uid = vc.metadata.uid.clone().unwrap_or_default();
    let mut pending = ctx.placements.lock().await;
    pending.prune(&ctx.stores);
    let sites = ctx.stores.all_sites();
    let mut capacity_by_site: BTreeMap<String, Resources> = BTreeMap::new();
    for h in ctx.stores.hosts.state() {
        let st = h.status.clone().unwrap_or_default();
        if h.spec.schedulable && st.conditions.is_true(condition_types::READY) {
            let e = capacity_by_site.entry(h.spec.site.clone()).or_default();
            *e = e.plus(st.allocatable.unwrap_or_default());
        }
    }
    // Other clusters holding a dated, admitted reservation count by their
    // whole demand in their window; every other cluster by what it has placed.
    let mut others = Vec::new();
    let mut reserved_uids = HashSet::new();
    for other in ctx.stores.clusters.state() {
        let ouid = other.metadata.uid.clone().unwrap_or_default();
        if ouid == uid || !dated(other.spec.reservation.as_ref()) {
            continue;
        }
        let admitted_at = other
            .status
            .as_ref()
            .and_then(|s| s.capacity_admitted_at.as_ref())
            .map(|t| t.0);
        if admitted_at.is_none() && !pending.admitted.contains_key(&ouid) {
            continue;
        }
        reserved_uids.insert(ouid);
        let (Some(or), Some(ons)) = (other.spec.reservation.as_ref(), other.namespace()) else {
            continue;
        };
        let Some(window) = capacity_window(or, admitted_at, now) else {
            continue;
        };
        let Some(ong) = ctx.stores.network_group(&ons, &other.spec.network_group) else {
            continue;
        };
        if let Ok(d) = desired_nodes(&other, &ong, &sites) {
            others.push(capacity::Admitted {
                window,
                demand: demand(&d),
            });
        }
    }
    let mut permanent: BTreeMap<String, Resources> = BTreeMap::new();
    let owner_of = |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
        refs.iter()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone())
            .unwrap_or_default()
    };
    for n in ctx.stores.nodes.state() {
        let o = owner_of(n.owner_references());
        if o == uid || reserved_uids.contains(&o) {
            continue;
        }
        if let Some(site) = &n.spec.site {
            let e = permanent.entry(site.clone()).or_default();
            *e = e.plus(n.spec.resources);
        }
    }
    for p in pending.nodes.values() {
        if p.owner_uid != uid && !reserved_uids.contains(&p.owner_uid) {
            let e = permanent.entry(p.site.clone()).or_default();
            *e = e.plus(p.resources);
        }
    }
    capacity::admit(
        &window,
        &demand(desired),
        &capacity_by_site,
        &permanent,
        &others,
    )?;
    pending.admitted.insert(uid, std::time::Instant::now());
    Ok(())
}
