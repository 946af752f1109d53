//! Which VirtualNodes a cluster's reconcile writes, as a pure function of
//! its desired nodes, the fleet (caches) and what was written moments ago:
//! placement (persisted in the node when it is created, and never changed
//! while its host exists), recovery from lost hosts, scale-down, and power.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use yukumo_api::common::{Conditions, Resources, condition_types};
use yukumo_api::host::Host;
use yukumo_api::virtualcluster::{RecoveryPolicy, VirtualCluster};
use yukumo_api::virtualnode::{NodePhase, NodeRole, VirtualNode};
use yukumo_api::{Reason, finalizers, labels};

use super::super::capacity::{Calendar, Demand, Own, Window};
use super::super::nodes::{DesiredNode, should_run, template_revision};
use super::admission::host_caps;
use crate::context::PendingNode;
use crate::scheduler::{HostView, Placement, Request, place};

/// A node's key in the pending placements: (namespace, name).
pub type NodeKey = (String, String);

/// A write decided under the placement lock, done after releasing it.
#[derive(Debug, Clone)]
pub enum Write {
    /// Server-side apply of a node (created when `new`).
    Apply { vn: Box<VirtualNode>, new: bool },
    /// Delete a node; `recovering`: its host is lost (its finalizer is
    /// released first, nobody there can clean up), else scaled down.
    Delete { name: String, recovering: bool },
    /// Delete a node to make it again once its host's agent has removed
    /// it: an outdated node (a rollout), or (`moving`) a node that booted
    /// from a network Volume and has no room to start on its host.
    Replace { name: String, moving: bool },
}

impl Write {
    pub fn name(&self) -> String {
        match self {
            Write::Apply { vn, .. } => vn.name_any(),
            Write::Delete { name, .. } | Write::Replace { name, .. } => name.clone(),
        }
    }
}

/// What the plan reads.
pub struct PlanInputs<'a> {
    pub cluster: &'a VirtualCluster,
    /// The controller owner reference of the cluster (its uid: a cluster
    /// recreated under the same name never adopts its predecessor's nodes).
    pub owner: &'a OwnerReference,
    pub desired: &'a [DesiredNode],
    /// Whether the cluster's nodes should run now (spec and reservation).
    pub cluster_running: bool,
    pub all_nodes: &'a [Arc<VirtualNode>],
    pub hosts: &'a [Arc<Host>],
    /// Nodes written moments ago that the cache may not show yet.
    pub pending: &'a HashMap<NodeKey, PendingNode>,
    /// The admitted reservations of other clusters: a node placed now may
    /// not take what they need later.
    pub calendar: &'a Calendar,
    /// Clusters whose stopped nodes use nothing now: weekly clusters
    /// outside their windows, clusters stopped with `running: false`.
    pub asleep: &'a HashSet<String>,
    /// Nodes deleted moments ago to be replaced (by uid), which the cache
    /// may still show as they were.
    pub replacing: &'a HashMap<NodeKey, String>,
    /// This cluster's windows if it is scheduled (weekly, or a dated
    /// reservation: its nodes hold their hosts then only); `None`: for ever.
    pub own_windows: Option<&'a [Window]>,
    pub now: Instant,
    pub wall: Timestamp,
}

/// The plan: the writes, the nodes kept as they are, why others wait, and
/// the pending placements to record or forget.
#[derive(Debug, Default)]
pub struct NodePlan {
    pub writes: Vec<Write>,
    /// Existing nodes that need no write.
    pub unchanged: Vec<VirtualNode>,
    /// Workers not created yet: they wait for the frontend to run.
    pub waiting: Vec<String>,
    /// Nodes not created yet (and their roles): their NetworkGroup has no
    /// address for them yet.
    pub waiting_network: Vec<(String, NodeRole)>,
    /// Nodes not created yet: a volume of theirs waits.
    pub waiting_volumes: Vec<(String, NodeRole)>,
    pub unschedulable: Vec<String>,
    pub recovering: Vec<String>,
    /// Written moments ago and not in the cache yet (not written again).
    pub waiting_for_cache: usize,
    pub placed: Vec<(NodeKey, PendingNode)>,
    pub forget: Vec<NodeKey>,
    /// Outdated nodes deleted by this plan (key, uid), to remember until
    /// the cache shows them deleted.
    pub replaced: Vec<(NodeKey, String)>,
    /// Outdated nodes that keep their template until the rollout's budget
    /// lets them be replaced.
    pub outdated: Vec<String>,
    /// Outdated nodes being deleted, to be made again.
    pub replacing: Vec<String>,
    /// Nodes at (or being written from) the spec's revision.
    pub updated: i32,
}

/// The scheduler's view of every host: allocatable, and what placed nodes
/// (in the cache or written moments ago) use.
/// The stopped nodes of clusters in `asleep` (weekly clusters outside
/// their windows) use nothing: the calendar holds their hosts for their
/// next window.
pub fn host_views(
    hosts: &[Arc<Host>],
    all_nodes: &[Arc<VirtualNode>],
    pending: &HashMap<NodeKey, PendingNode>,
    asleep: &HashSet<String>,
) -> Vec<HostView> {
    let mut used: HashMap<&str, Resources> = HashMap::new();
    for n in all_nodes {
        let sleeping = !n.spec.running
            && !asleep.is_empty()
            && n.owner_references().iter().any(|o| asleep.contains(&o.uid));
        if sleeping {
            continue;
        }
        if let Some(h) = n.spec.host.as_deref() {
            let e = used.entry(h).or_default();
            *e = e.plus(n.spec.resources);
        }
    }
    for p in pending.values() {
        let e = used.entry(p.host.as_str()).or_default();
        *e = e.plus(p.resources);
    }
    hosts
        .iter()
        .map(|h| {
            let name = h.name_any();
            let status = h.status.clone().unwrap_or_default();
            let lost = status
                .conditions
                .get_condition(condition_types::READY)
                .is_some_and(|c| c.reason == Reason::HeartbeatLost);
            HostView {
                site: h.spec.site.clone(),
                gateway: h.spec.gateway,
                ready: status.conditions.is_true(condition_types::READY),
                lost,
                schedulable: h.spec.schedulable,
                vlan: status.capabilities.as_ref().is_some_and(|c| c.vlan_8021q),
                allocatable: status.allocatable.unwrap_or_default(),
                used: used.get(name.as_str()).copied().unwrap_or_default(),
                name,
            }
        })
        .collect()
}

/// Take room on `host` for a stopped node that starts: what is free there
/// must fit it, and `guard` (the calendar) must allow it.
fn room_to_start(
    views: &mut [HostView],
    host: &str,
    need: Resources,
    guard: impl Fn(&[HostView], &HostView, Resources) -> Result<(), String>,
) -> Result<(), String> {
    let i = views
        .iter()
        .position(|v| v.name == host)
        .ok_or_else(|| format!("host {host} is gone"))?;
    let v = &views[i];
    let free = v.free();
    if !v.ready {
        return Err(format!("host {host} is not Ready"));
    }
    if !free.fits(need) {
        return Err(format!(
            "{} cpu, {} MiB free there for {} cpu, {} MiB (its room was taken while it was stopped)",
            free.cpu, free.memory_mib, need.cpu, need.memory_mib
        ));
    }
    guard(views, v, need)?;
    views[i].used = views[i].used.plus(need);
    Ok(())
}

/// The labels of a node: its cluster, role, pool, host and site.
pub fn node_labels(
    vc_name: &str,
    d: &DesiredNode,
    host: &str,
    site: &str,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (labels::CLUSTER.to_string(), vc_name.to_string()),
        (labels::ROLE.to_string(), d.spec.role.as_str().to_string()),
        (labels::HOST.to_string(), host.to_string()),
        (labels::SITE.to_string(), site.to_string()),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    if let Some(p) = &d.spec.pool {
        l.insert(labels::POOL.to_string(), p.clone());
    }
    l
}

/// Plan the cluster's node writes.
pub fn plan_nodes(inp: &PlanInputs) -> NodePlan {
    let vc = inp.cluster;
    let vc_name = vc.name_any();
    let ns = vc.namespace().unwrap_or_default();
    let owner = inp.owner;
    let mut out = NodePlan::default();
    let mine: Vec<&VirtualNode> = inp
        .all_nodes
        .iter()
        .map(|n| n.as_ref())
        .filter(|n| {
            n.namespace().as_deref() == Some(ns.as_str())
                && n.owner_references().iter().any(|o| o.uid == owner.uid)
        })
        .collect();
    // A running cluster's own stopped nodes are not counted: each holds
    // its host again only when it starts, if there is room (below).
    let mut views = if inp.cluster_running {
        let mut me = inp.asleep.clone();
        me.insert(owner.uid.clone());
        host_views(inp.hosts, inp.all_nodes, inp.pending, &me)
    } else {
        host_views(inp.hosts, inp.all_nodes, inp.pending, inp.asleep)
    };
    // A weekly cluster outside its windows: its new nodes use nothing now,
    // and hold their hosts at its windows with its sleeping ones.
    let sleeping = inp.own_windows.is_some() && inp.asleep.contains(&owner.uid);
    let mut own_held: Vec<(String, Resources)> = if sleeping {
        mine.iter()
            .filter(|n| !n.spec.running)
            .filter_map(|n| Some((n.spec.host.clone()?, n.spec.resources)))
            .collect()
    } else {
        vec![]
    };
    // Its nodes counted in the views: they hold their hosts in its windows
    // only (a scheduled cluster's are given back for what comes after).
    let mut own_in_use: Vec<(String, Resources)> = Vec::new();
    if inp.own_windows.is_some() && !sleeping {
        own_in_use.extend(
            mine.iter()
                .filter(|n| n.spec.running)
                .filter_map(|n| Some((n.spec.host.clone()?, n.spec.resources))),
        );
        own_in_use.extend(
            inp.pending
                .iter()
                .filter(|((pns, name), p)| {
                    *pns == ns
                        && p.owner_uid == owner.uid
                        && !mine.iter().any(|n| &n.name_any() == name)
                })
                .map(|(_, p)| (p.host.clone(), p.resources)),
        );
    }
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for n in &mine {
        if let Some(h) = &n.spec.host {
            *counts.entry(h.clone()).or_default() += 1;
        }
    }
    // A rollout's budget: per node set (frontend, each pool), how many of
    // its desired nodes are unavailable now (missing, being deleted or
    // replaced, stopped, not ready).
    let replaced_now = |n: &VirtualNode| {
        let key = (ns.clone(), n.name_any());
        n.metadata.uid.is_some() && inp.replacing.get(&key) == n.metadata.uid.as_ref()
    };
    let available = |n: &VirtualNode| {
        n.metadata.deletion_timestamp.is_none()
            && !replaced_now(n)
            && n.spec.running
            && n.status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true(condition_types::READY))
    };
    let mut unavailable: HashMap<Option<String>, u32> = HashMap::new();
    for d in inp.desired {
        if !mine.iter().any(|n| n.name_any() == d.name && available(n)) {
            *unavailable.entry(d.spec.pool.clone()).or_default() += 1;
        }
    }
    // A frontend the user switched off does not hold the workers back.
    let frontend_running = mine.iter().any(|n| {
        n.spec.role == NodeRole::Frontend
            && n.status
                .as_ref()
                .is_some_and(|s| s.phase == NodePhase::Running)
    }) || inp
        .desired
        .iter()
        .any(|d| d.spec.role == NodeRole::Frontend && d.switched_off);
    // What an admitted reservation of another cluster needs later: a node
    // may take a host now only if every one still packs.
    let guard = |views: &[HostView],
                 h: &HostView,
                 need: Resources,
                 own_held: &[(String, Resources)],
                 own_in_use: &[(String, Resources)],
                 rest: &[Demand]| {
        let own = inp.own_windows.map(|windows| Own {
            windows,
            held: own_held,
            placed: own_in_use,
            rest,
        });
        if own.is_none() && !inp.calendar.holds_ahead() {
            return Ok(());
        }
        inp.calendar
            .permits(&host_caps(views), &h.name, need, inp.wall, own)
    };
    // A scheduled cluster's nodes are placed largest first, each leaving
    // room for the rest at its windows: what the calendar admitted (packed
    // largest first) is what is placed.
    let mut order: Vec<&DesiredNode> = inp.desired.iter().collect();
    if inp.own_windows.is_some() {
        order.sort_by_key(|d| {
            std::cmp::Reverse((d.spec.resources.cpu, d.spec.resources.memory_mib))
        });
    }
    let to_place: Vec<Demand> = order
        .iter()
        .filter(|d| {
            !mine.iter().any(|n| n.name_any() == d.name)
                && !inp.pending.contains_key(&(ns.clone(), d.name.clone()))
        })
        .map(|d| Demand {
            node: d.name.clone(),
            sites: d.sites.clone(),
            need: d.spec.resources,
        })
        .collect();
    let rest_after = |name: &str| -> &[Demand] {
        if inp.own_windows.is_none() {
            return &[];
        }
        match to_place.iter().position(|d| d.node == name) {
            Some(i) => &to_place[i + 1..],
            None => &to_place[..],
        }
    };
    for d in order {
        let key = (ns.clone(), d.name.clone());
        let existing = mine.iter().copied().find(|n| n.name_any() == d.name);
        // Host loss: with RestartElsewhere, a node on a lost (or vanished)
        // host is deleted and placed anew; the lost host's agent removes the
        // stale domain when it returns (its VirtualNode uid is gone).
        if let Some(n) = existing
            && let Some(h) = &n.spec.host
            && vc.spec.recovery == RecoveryPolicy::RestartElsewhere
            && views.iter().find(|v| &v.name == h).is_none_or(|v| v.lost)
        {
            if n.metadata.deletion_timestamp.is_none()
                || n.finalizers().iter().any(|f| f == finalizers::HOST_CLEANUP)
            {
                out.writes.push(Write::Delete {
                    name: n.name_any(),
                    recovering: true,
                });
                out.forget.push(key.clone());
            }
            out.recovering
                .push(format!("{} (was on {h})", n.name_any()));
            continue;
        }
        let want_revision = d.revision();
        if let Some(n) = existing
            && (n.metadata.deletion_timestamp.is_some() || replaced_now(n))
        {
            // Being deleted (a rollout's replacement, or recovery); placed
            // anew once gone.
            if template_revision(&n.spec, d.boots_from_volume) != want_revision {
                out.replacing.push(d.name.clone());
            } else {
                out.recovering.push(d.name.clone());
            }
            continue;
        }
        // A rollout: an outdated node is replaced when the budget of its
        // set allows (at once if it is unavailable anyway); until then it
        // keeps its template (and gets every other change).
        let mut outdated = None;
        if let Some(n) = existing
            && template_revision(&n.spec, d.boots_from_volume) != want_revision
        {
            let down = unavailable.entry(d.spec.pool.clone()).or_default();
            let free = !available(n);
            if free || *down < d.max_unavailable {
                if !free {
                    *down += 1;
                }
                out.writes.push(Write::Replace {
                    name: d.name.clone(),
                    moving: false,
                });
                out.replaced
                    .push((key.clone(), n.metadata.uid.clone().unwrap_or_default()));
                out.replacing.push(d.name.clone());
                out.forget.push(key.clone());
                continue;
            }
            out.outdated.push(d.name.clone());
            outdated = Some(n);
        }
        let mut spec = d.spec.clone();
        if let Some(n) = outdated {
            spec.resources = n.spec.resources;
            spec.image = n.spec.image.clone();
            spec.disk_bytes = n.spec.disk_bytes;
            spec.user_data = n.spec.user_data.clone();
        }
        spec.running = !d.switched_off
            && should_run(
                inp.cluster_running,
                spec.role,
                vc.spec.start_order,
                frontend_running,
                existing.is_some_and(|n| n.spec.running),
            );
        // A worker that may not start yet is created when it may (creating
        // it stopped and patching it later would cost a write per node);
        // it is placed now all the same, to say early if it cannot be.
        // (One switched off is created stopped, as in a stopped cluster.)
        let deferred =
            existing.is_none() && inp.cluster_running && !d.switched_off && !spec.running;
        let just_written = inp
            .pending
            .get(&key)
            .filter(|p| p.owner_uid == owner.uid)
            .map(|p| (p.host.clone(), p.site.clone()));
        if existing.is_none() && just_written.is_some() {
            // Written moments ago; the cache will show it (and trigger
            // this cluster again): writing it twice would be waste.
            out.waiting_for_cache += 1;
            out.updated += 1;
            continue;
        }
        let placement = match existing
            .and_then(|n| n.spec.host.clone().zip(n.spec.site.clone()))
            .or(just_written)
        {
            Some((host, site)) => Placement::Host { host, site },
            None => place(
                &Request {
                    node: d.name.clone(),
                    sites: d.sites.clone(),
                    need: d.spec.resources,
                    gateway: d.gateway,
                    vlan: d.vlan,
                    pinned: d.pinned.clone(),
                    holds_now: !sleeping,
                    pack: inp.own_windows.is_some(),
                },
                &mut views,
                &mut counts,
                &|views: &[HostView], h: &HostView, need: Resources| {
                    guard(views, h, need, &own_held, &own_in_use, rest_after(&d.name))
                },
            ),
        };
        // A stopped node that starts holds its host again only if there is
        // room there now (others may have taken what it left). Its boot
        // disk is there: without room it waits, unless it boots from a
        // network Volume, which follows it to another host.
        let starting =
            inp.cluster_running && spec.running && existing.is_some_and(|n| !n.spec.running);
        if starting
            && let Placement::Host { host, .. } = &placement
            && let Err(why) = room_to_start(&mut views, host, spec.resources, |v, h, need| {
                if inp.own_windows.is_some() {
                    // Admitted at its windows: held for it.
                    Ok(())
                } else {
                    guard(v, h, need, &own_held, &own_in_use, &[])
                }
            })
        {
            if d.boots_from_volume && d.pinned.is_none() {
                out.writes.push(Write::Replace {
                    name: d.name.clone(),
                    moving: true,
                });
                out.recovering
                    .push(format!("{} (no room to start on {host})", d.name));
                out.forget.push(key.clone());
            } else {
                out.unschedulable.push(format!(
                    "{} cannot start on {host}, where its boot disk is: {why}; it starts once there is room there",
                    d.name
                ));
            }
            continue;
        }
        if existing.is_none()
            && let Placement::Host { host, .. } = &placement
        {
            if sleeping {
                own_held.push((host.clone(), d.spec.resources));
            } else if inp.own_windows.is_some() {
                own_in_use.push((host.clone(), d.spec.resources));
            }
        }
        let (host, site) = match placement {
            Placement::Host { host, site } => (host, site),
            Placement::Unschedulable(msg) => {
                out.unschedulable.push(msg);
                continue;
            }
        };
        if deferred {
            out.waiting.push(d.name.clone());
            continue;
        }
        if existing.is_none() && d.hold {
            // Created with its volumes, not without them.
            out.waiting_volumes.push((d.name.clone(), d.spec.role));
            continue;
        }
        spec.host = Some(host.clone());
        spec.site = Some(site.clone());
        if let Some(n) = existing {
            // Keep what the controller allocated earlier (disks), and the
            // network identity unless the group now has one for a node
            // that had none.
            if spec.network.is_none() {
                spec.network = n.spec.network.clone();
            }
        } else if spec.network.is_none() {
            // Created only once its group has given it an address.
            out.waiting_network.push((d.name.clone(), d.spec.role));
            continue;
        }
        let mut labels = node_labels(&vc_name, d, &host, &site);
        labels.insert(
            labels::REVISION.to_string(),
            template_revision(&spec, d.boots_from_volume),
        );
        if outdated.is_none() {
            out.updated += 1;
        }
        let unchanged = existing.is_some_and(|n| {
            n.spec == spec
                && n.finalizers().iter().any(|f| f == finalizers::HOST_CLEANUP)
                && labels.iter().all(|(k, v)| n.labels().get(k) == Some(v))
                && n.owner_references().iter().any(|o| o.uid == owner.uid)
        });
        if unchanged {
            out.unchanged.push(existing.cloned().expect("existing"));
            continue;
        }
        out.placed.push((
            key,
            PendingNode {
                owner_uid: owner.uid.clone(),
                host,
                site,
                resources: spec.resources,
                since: inp.now,
            },
        ));
        out.writes.push(Write::Apply {
            new: existing.is_none(),
            vn: Box::new(VirtualNode {
                metadata: ObjectMeta {
                    name: Some(d.name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    owner_references: Some(vec![owner.clone()]),
                    finalizers: Some(vec![finalizers::HOST_CLEANUP.to_string()]),
                    ..Default::default()
                },
                spec,
                status: None,
            }),
        });
    }
    // Scale down: remove nodes no longer desired (the highest indexes).
    for n in &mine {
        if !inp.desired.iter().any(|d| d.name == n.name_any())
            && n.metadata.deletion_timestamp.is_none()
        {
            out.writes.push(Write::Delete {
                name: n.name_any(),
                recovering: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
