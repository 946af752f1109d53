//! The capacity calendar as a cluster's reconcile sees it (see
//! [`capacity`]): built from the caches alone (a restarted controller
//! re-derives it), under the placement lock (two decisions never take the
//! same capacity); no API write happens under it.
//!
//! A dated reservation is admitted once against it; every node placed is
//! checked against it (it may not take what an admitted reservation needs
//! in a later window).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use yukumo_api::virtualcluster::{EndAction, Reservation, VirtualCluster};
use yukumo_api::virtualnode::VirtualNode;

use super::super::capacity::{self, Admitted, Calendar, HostCap};
use super::super::nodes::{DesiredNode, desired_nodes};
use super::converge::{NodeKey, host_views};
use crate::context::{Ctx, PendingNode, Placements};
use crate::scheduler::HostView;

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
            node: d.name.clone(),
            sites: d.sites.clone(),
            need: d.spec.resources,
        })
        .collect()
}

/// What is free now on every Ready, schedulable host that is not lost.
pub fn host_caps(views: &[HostView]) -> Vec<HostCap> {
    views
        .iter()
        .filter(|h| h.ready && h.schedulable && !h.lost)
        .map(|h| HostCap {
            name: h.name.clone(),
            site: h.site.clone(),
            free: capacity::minus(h.allocatable, h.used),
        })
        .collect()
}

/// The admitted reservations of every cluster but `exclude_uid`: each
/// one's placed nodes (in the cache or written moments ago) and the rest
/// of its desired nodes.
pub fn calendar(ctx: &Ctx, pending: &Placements, exclude_uid: &str, now: Timestamp) -> Calendar {
    let sites = ctx.stores.all_sites();
    let nodes = ctx.stores.nodes.state();
    let hosts = ctx.stores.hosts.state();
    let present: std::collections::HashSet<String> = host_views(&hosts, &[], &HashMap::new())
        .into_iter()
        .filter(|h| !h.lost)
        .map(|h| h.name)
        .collect();
    let mut reservations = Vec::new();
    for other in ctx.stores.clusters.state() {
        let ouid = other.metadata.uid.clone().unwrap_or_default();
        // A cluster being deleted places nothing more.
        if ouid == exclude_uid
            || !dated(other.spec.reservation.as_ref())
            || other.metadata.deletion_timestamp.is_some()
        {
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
        let (Some(or), Some(ons)) = (other.spec.reservation.as_ref(), other.namespace()) else {
            continue;
        };
        let Some(window) = capacity_window(or, admitted_at, now) else {
            continue;
        };
        let Some(ong) = ctx.stores.network_group(&ons, &other.spec.network_group) else {
            continue;
        };
        let Ok(desired) = desired_nodes(&other, &ong, &sites) else {
            continue;
        };
        // A node on a lost (or vanished) host is placed anew (recovery):
        // until then it is unplaced, so no other cluster's recovery takes
        // what it needs — a reservation's nodes come back first.
        let mut placed = placed_of(&nodes, &pending.nodes, &ons, &ouid);
        placed.retain(|_, (host, _)| present.contains(host.as_str()));
        let unplaced: Vec<DesiredNode> = desired
            .into_iter()
            .filter(|d| !placed.contains_key(&d.name))
            .collect();
        reservations.push(Admitted {
            who: format!("{ons}/{}", other.name_any()),
            window,
            placed: placed.into_values().collect(),
            unplaced: demand(&unplaced),
        });
    }
    Calendar { reservations }
}

/// The nodes of the cluster `uid` (namespace `ns`) that hold a host: name
/// to (host, need).
fn placed_of(
    nodes: &[Arc<VirtualNode>],
    pending: &HashMap<NodeKey, PendingNode>,
    ns: &str,
    uid: &str,
) -> HashMap<String, (String, yukumo_api::common::Resources)> {
    let mut out = HashMap::new();
    for n in nodes {
        if n.namespace().as_deref() == Some(ns)
            && n.owner_references().iter().any(|o| o.uid == uid)
            && let Some(h) = &n.spec.host
        {
            out.insert(n.name_any(), (h.clone(), n.spec.resources));
        }
    }
    for ((pns, name), p) in pending {
        if pns == ns && p.owner_uid == uid {
            out.insert(name.clone(), (p.host.clone(), p.resources));
        }
    }
    out
}

/// Admit `vc`'s dated reservation against the calendar; the error names
/// site, resource, window, instant and the reservations holding it.
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
    let cal = calendar(ctx, &pending, &uid, now);
    let views = host_views(
        &ctx.stores.hosts.state(),
        &ctx.stores.nodes.state(),
        &pending.nodes,
    );
    // A cluster given a reservation while it runs: its own nodes are in the
    // hosts' use and in its demand; count them once.
    let mut caps = host_caps(&views);
    let ns = vc.namespace().unwrap_or_default();
    for (host, need) in placed_of(&ctx.stores.nodes.state(), &pending.nodes, &ns, &uid).values() {
        if let Some(h) = caps.iter_mut().find(|h| &h.name == host) {
            h.free = h.free.plus(*need);
        }
    }
    cal.admit(&window, &demand(desired), &caps)?;
    pending.admitted.insert(uid, std::time::Instant::now());
    Ok(())
}
