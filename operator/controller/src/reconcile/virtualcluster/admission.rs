//! The capacity calendar as a cluster's reconcile sees it (see
//! [`capacity`]): built from the caches alone (a restarted controller
//! re-derives it), under the placement lock (two decisions never take the
//! same capacity); no API write happens under it.
//!
//! A scheduled cluster (a dated reservation, weekly windows, or both) is
//! admitted once against it; every node placed is checked against it (it
//! may not take what an admitted reservation needs in a later window). A
//! weekly cluster's nodes, stopped outside its windows, hold no capacity
//! then: they keep their host (and disks) and hold it again at each window.
//! A cluster stopped with `running: false` (no reservation) holds none
//! either; its nodes take their hosts again when it starts, if there is
//! room.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use yukumo_api::virtualcluster::{EndAction, Reservation, VirtualCluster};
use yukumo_api::virtualnode::VirtualNode;

use super::super::capacity::{self, Admitted, Calendar, HostCap, Window};
use super::super::nodes::{DesiredNode, desired_nodes};
use super::super::reservation;
use super::converge::{NodeKey, host_views};
use crate::context::{Ctx, PendingNode, Placements};
use crate::scheduler::HostView;

/// How far ahead weekly windows are listed: a week and a day past now, or
/// past the latest dated start (capped at about a year).
pub(super) const WEEK_AND_A_DAY: SignedDuration = SignedDuration::from_hours(8 * 24);
const MAX_HORIZON: SignedDuration = SignedDuration::from_hours(400 * 24);

/// Whether a reservation is scheduled (dated: a start or an end; or
/// weekly) and so holds capacity in windows that are admitted once.
pub fn scheduled(r: Option<&Reservation>) -> bool {
    r.is_some_and(|r| r.start.is_some() || r.end.is_some() || !r.weekly.is_empty())
}

/// The windows a scheduled reservation holds capacity in up to `horizon`;
/// empty once it holds none (ended with `endAction: Delete`, or a weekly
/// one past its end).
pub fn capacity_windows(
    r: &Reservation,
    admitted: Option<Timestamp>,
    now: Timestamp,
    horizon: Timestamp,
) -> Vec<Window> {
    if !r.weekly.is_empty() {
        return reservation::weekly_windows(r, now, horizon)
            .unwrap_or_default()
            .into_iter()
            .map(|(start, end)| Window {
                start,
                end: Some(end),
            })
            .collect();
    }
    let start = r.start.as_ref().map(|t| t.0).or(admitted).unwrap_or(now);
    let end = dated_until(r);
    if end.is_some_and(|e| e <= now) {
        return vec![];
    }
    vec![Window {
        start: start.max(now),
        end,
    }]
}

/// When a dated reservation stops holding capacity: its end with
/// `endAction: Delete`; `None` with `Stop` (stopped at its end for good,
/// its nodes keep their hosts).
pub(super) fn dated_until(r: &Reservation) -> Option<Timestamp> {
    match r.end_action {
        EndAction::Delete => r.end.as_ref().map(|t| t.0),
        EndAction::Stop => None,
    }
}

/// Whether `vc` is stopped with `running: false` and holds no reservation:
/// its stopped nodes hold no capacity (they keep host and disks, and hold
/// the host again when they start, if there is room).
pub fn parked(vc: &VirtualCluster) -> bool {
    !vc.spec.running && !scheduled(vc.spec.reservation.as_ref())
}

/// Whether `vc`'s stopped nodes hold no capacity now: a weekly cluster
/// outside its windows, or a parked one.
fn asleep(vc: &VirtualCluster, now: Timestamp) -> bool {
    if parked(vc) {
        return true;
    }
    let Some(r) = vc
        .spec
        .reservation
        .as_ref()
        .filter(|r| !r.weekly.is_empty())
    else {
        return false;
    };
    reservation::plan(Some(r), now).is_ok_and(|p| p.exists && !p.run)
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
            free: h.free(),
        })
        .collect()
}

/// The calendar as one decision sees it.
pub struct Seen {
    /// The admitted reservations of every cluster but the deciding one.
    pub calendar: Calendar,
    /// Uids of weekly clusters outside their windows and of parked
    /// clusters: their stopped nodes hold no capacity now.
    pub asleep: HashSet<String>,
    /// How far ahead windows are listed.
    pub horizon: Timestamp,
}

impl Seen {
    /// The calendar as JSON, in a stable order (reservations by holder,
    /// their nodes sorted), to compare two controllers' views object for
    /// object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut reservations: Vec<serde_json::Value> = self
            .calendar
            .reservations
            .iter()
            .map(|a| {
                let mut placed: Vec<_> = a
                    .placed
                    .iter()
                    .map(|(h, r)| serde_json::json!([h, r.cpu, r.memory_mib]))
                    .collect();
                placed.sort_by_key(|v| v.to_string());
                let mut unplaced: Vec<_> = a
                    .unplaced
                    .iter()
                    .map(|d| serde_json::json!([d.node, d.sites, d.need.cpu, d.need.memory_mib]))
                    .collect();
                unplaced.sort_by_key(|v| v.to_string());
                serde_json::json!({
                    "who": a.who,
                    "windows": a.windows.iter().map(|w| serde_json::json!({
                        "start": w.start.to_string(),
                        "end": w.end.map(|e| e.to_string()),
                    })).collect::<Vec<_>>(),
                    "placed": placed,
                    "unplaced": unplaced,
                    "inUse": a.in_use,
                })
            })
            .collect();
        reservations.sort_by_key(|v| v["who"].to_string());
        let mut asleep: Vec<&String> = self.asleep.iter().collect();
        asleep.sort();
        serde_json::json!({
            "reservations": reservations,
            "asleep": asleep,
            "horizon": self.horizon.to_string(),
        })
    }

    /// The windows `vc`'s nodes hold their hosts in, if it is scheduled:
    /// a weekly cluster's windows, a dated reservation's window (to its
    /// end with `endAction: Delete`, else for ever); `None`: for ever once
    /// placed. A node placed now is judged against the other reservations
    /// in these windows only: one that ends before another reservation on
    /// the same capacity starts does not take it from that one.
    pub fn own_windows(&self, vc: &VirtualCluster, now: Timestamp) -> Option<Vec<Window>> {
        let r = vc
            .spec
            .reservation
            .as_ref()
            .filter(|r| scheduled(Some(r)))?;
        let admitted = vc
            .status
            .as_ref()
            .and_then(|s| s.capacity_admitted_at.as_ref())
            .map(|t| t.0);
        Some(capacity_windows(r, admitted, now, self.horizon))
    }
}

/// The calendar for a decision about the cluster `exclude_uid`: every other
/// admitted reservation's windows, placed nodes (in the cache or written
/// moments ago) and the rest of its desired nodes.
pub fn calendar(ctx: &Ctx, pending: &Placements, exclude_uid: &str, now: Timestamp) -> Seen {
    let sites = ctx.stores.all_sites();
    let nodes = ctx.stores.nodes.state();
    let hosts = ctx.stores.hosts.state();
    let clusters = ctx.stores.clusters.state();
    let asleep: HashSet<String> = clusters
        .iter()
        .filter(|c| asleep(c, now))
        .filter_map(|c| c.metadata.uid.clone())
        .collect();
    let latest = clusters
        .iter()
        .filter_map(|c| c.spec.reservation.as_ref()?.start.as_ref().map(|t| t.0))
        .max()
        .unwrap_or(now)
        .max(now);
    let horizon = (latest + WEEK_AND_A_DAY).min(now + MAX_HORIZON);
    let present: HashSet<String> = host_views(&hosts, &[], &HashMap::new(), &HashSet::new())
        .into_iter()
        .filter(|h| !h.lost)
        .map(|h| h.name)
        .collect();
    let mut reservations = Vec::new();
    for other in &clusters {
        let ouid = other.metadata.uid.clone().unwrap_or_default();
        // A cluster being deleted places nothing more.
        if ouid == exclude_uid
            || !scheduled(other.spec.reservation.as_ref())
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
        let windows = capacity_windows(or, admitted_at, now, horizon);
        if windows.is_empty() {
            continue;
        }
        let Some(ong) = ctx.stores.network_group(&ons, &other.spec.network_group) else {
            continue;
        };
        let Ok(desired) = desired_nodes(other, &ong, &sites) else {
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
            windows,
            placed: placed.into_values().collect(),
            in_use: !asleep.contains(&ouid),
            unplaced: demand(&unplaced),
        });
    }
    Seen {
        calendar: Calendar { reservations },
        asleep,
        horizon,
    }
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

/// Admit `vc`'s scheduled reservation against the calendar; the error
/// names site, resource, window, instant and the reservations holding it.
pub async fn admit_reservation(
    ctx: &Ctx,
    vc: &VirtualCluster,
    desired: &[DesiredNode],
    now: Timestamp,
) -> Result<(), String> {
    let Some(r) = vc.spec.reservation.as_ref() else {
        return Ok(());
    };
    let uid = vc.metadata.uid.clone().unwrap_or_default();
    let mut pending = ctx.placements.lock().await;
    pending.prune(&ctx.stores);
    let seen = calendar(ctx, &pending, &uid, now);
    let windows = capacity_windows(r, None, now, seen.horizon);
    if windows.is_empty() {
        return Ok(());
    }
    let views = host_views(
        &ctx.stores.hosts.state(),
        &ctx.stores.nodes.state(),
        &pending.nodes,
        &seen.asleep,
    );
    // A cluster given a reservation while it runs: its own nodes are in the
    // hosts' use and in its demand; count them once.
    let mut caps = host_caps(&views);
    if !seen.asleep.contains(&uid) {
        let ns = vc.namespace().unwrap_or_default();
        for (host, need) in placed_of(&ctx.stores.nodes.state(), &pending.nodes, &ns, &uid).values()
        {
            if let Some(h) = caps.iter_mut().find(|h| &h.name == host) {
                h.free = h.free.plus(*need);
            }
        }
    }
    seen.calendar.admit(&windows, &demand(desired), &caps)?;
    pending.admitted.insert(uid, std::time::Instant::now());
    Ok(())
}
