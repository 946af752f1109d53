//! VirtualCluster: validate what the spec refers to, place its nodes, and
//! report it.
//!
//! References are checked against the API (same namespace for namespaced
//! kinds, so one tenant can never name another tenant's NetworkGroup or
//! Volume). What the schema cannot say becomes a `Stalled` condition naming
//! the field, and an Event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use yukumo_api::common::{Conditions, NodeSize, Resources, builtin_size_classes, condition_types};
use yukumo_api::host::Host;
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::{
    EndAction, FrontendEndpoint, NodeSummary, RecoveryPolicy, Reservation, Transition,
    VirtualCluster, VirtualClusterSpec, VirtualClusterStatus,
};
use yukumo_api::virtualnode::{NodePhase, NodeRole, VirtualNode};
use yukumo_api::{NetworkGroup, finalizers, labels, managers};

use super::capacity;
use super::nodes::{DesiredNode, desired_nodes, should_run};
use super::reservation;
use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Error, PendingNode, Result};
use crate::scheduler::{HostView, Placement, Request, place};

/// What the referenced objects look like, fetched once per reconcile.
pub struct Observed {
    pub network_group: Option<NetworkGroup>,
    pub volumes: Vec<(String, bool)>,
    pub sites: Vec<Site>,
}

/// Sites the cluster may be placed at, as named by the spec.
fn named_sites(spec: &VirtualClusterSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(s) = &spec.frontend.site {
        out.push(("spec.frontend.site".to_string(), s.clone()));
    }
    for (i, p) in spec.pools.iter().enumerate() {
        for s in &p.sites {
            out.push((format!("spec.pools[{i}].sites"), s.0.clone()));
        }
    }
    out
}

fn size_class_known(size: &NodeSize, sites: &[Site]) -> bool {
    let Some(class) = &size.size_class else {
        return true;
    };
    builtin_size_classes().iter().any(|c| &c.name == class)
        || sites
            .iter()
            .any(|s| s.spec.size_classes.iter().any(|c| &c.name == class))
}

/// Pure validation of a cluster against the objects it refers to.
pub fn validate(vc_ns: &str, spec: &VirtualClusterSpec, obs: &Observed) -> Verdict {
    let Some(ng) = &obs.network_group else {
        return Verdict::stalled(
            "NetworkGroupNotFound",
            format!(
                "spec.networkGroup: NetworkGroup {:?} not found in namespace {vc_ns}",
                spec.network_group
            ),
        );
    };
    let site_names: HashSet<&str> = obs
        .sites
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap_or(""))
        .collect();
    if !site_names.contains(ng.spec.home_site.0.as_str()) {
        return Verdict::stalled(
            "SiteNotFound",
            format!(
                "spec.networkGroup: NetworkGroup {:?} has home site {:?}, which does not exist",
                spec.network_group, ng.spec.home_site.0
            ),
        );
    }
    for (field, site) in named_sites(spec) {
        if !site_names.contains(site.as_str()) {
            return Verdict::stalled("SiteNotFound", format!("{field}: Site {site:?} not found"));
        }
    }
    for (name, found) in &obs.volumes {
        if !found {
            return Verdict::stalled(
                "VolumeNotFound",
                format!("volumes: Volume {name:?} not found in namespace {vc_ns}"),
            );
        }
    }
    let mut seen = HashSet::new();
    let attachments = spec
        .frontend
        .volumes
        .iter()
        .map(|v| ("spec.frontend.volumes", v))
        .chain(
            spec.pools
                .iter()
                .flat_map(|p| p.volumes.iter().map(|v| ("spec.pools[].volumes", v))),
        );
    for (field, v) in attachments {
        if !seen.insert(v.name.as_str()) {
            return Verdict::stalled(
                "VolumeAttachedTwice",
                format!(
                    "{field}: Volume {:?} is attached to more than one node of this cluster",
                    v.name
                ),
            );
        }
    }
    if !size_class_known(&spec.frontend.size, &obs.sites) {
        return Verdict::stalled(
            "UnknownSizeClass",
            format!(
                "spec.frontend.size.sizeClass: {:?} is neither a built-in class nor defined by a Site",
                spec.frontend.size.size_class.as_deref().unwrap_or("")
            ),
        );
    }
    for (i, p) in spec.pools.iter().enumerate() {
        if !size_class_known(&p.size, &obs.sites) {
            return Verdict::stalled(
                "UnknownSizeClass",
                format!(
                    "spec.pools[{i}].size.sizeClass: {:?} is neither a built-in class nor defined by a Site",
                    p.size.size_class.as_deref().unwrap_or("")
                ),
            );
        }
    }
    if let Some(r) = &spec.reservation
        && k8s_openapi::jiff::tz::TimeZone::get(&r.time_zone).is_err()
    {
        return Verdict::stalled(
            "InvalidTimeZone",
            format!(
                "spec.reservation.timeZone: {:?} is not a known IANA time zone",
                r.time_zone
            ),
        );
    }
    Verdict::progressing(
        "ReferencesResolved",
        format!(
            "references resolved; {} nodes to place",
            spec.desired_nodes()
        ),
    )
}

/// Where users reach the frontend: its private address and the public IP
/// its group mapped to it, if any (ssh goes to the public one then).
pub fn frontend_endpoint(
    nodes: &[NodeSummary],
    group: Option<&NetworkGroup>,
) -> Option<FrontendEndpoint> {
    let fe = nodes.iter().find(|n| n.role == "frontend")?;
    let ip = fe.ip.clone()?;
    let public_ip = group
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.public_ips.iter().find(|p| p.node == fe.name))
        .map(|p| p.address.clone());
    Some(FrontendEndpoint {
        ssh: Some(format!("ssh root@{}", public_ip.as_deref().unwrap_or(&ip))),
        address: Some(ip),
        public_ip,
    })
}

/// What converging a cluster's VirtualNodes found.
struct NodesOutcome {
    /// The cluster's nodes, in the order of the desired nodes.
    nodes: Vec<VirtualNode>,
    /// Workers not created yet: they wait for the frontend to run.
    waiting: Vec<String>,
    /// Nodes not created yet: their NetworkGroup has no address for them yet.
    waiting_network: Vec<String>,
    unschedulable: Vec<String>,
    recovering: Vec<String>,
}

fn node_labels(vc_name: &str, d: &DesiredNode, host: &str, site: &str) -> BTreeMap<String, String> {
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

fn host_views(
    hosts: &[Arc<Host>],
    all_nodes: &[Arc<VirtualNode>],
    pending: &HashMap<(String, String), PendingNode>,
) -> Vec<HostView> {
    let mut used: HashMap<&str, Resources> = HashMap::new();
    for n in all_nodes {
        if let Some(h) = n.spec.host.as_deref() {
            let e = used.entry(h).or_default();
            *e = e.plus(n.spec.resources);
        }
    }
    // Written but not yet in the store.
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
                .is_some_and(|c| c.reason == "HeartbeatLost");
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

/// A write done (with the node as applied), or the node's name and the error.
type WriteResult = std::result::Result<(Write, Option<VirtualNode>), (String, Error)>;

/// A write decided while holding the placement lock, done after releasing it.
enum Write {
    /// Server-side apply of a node (created when `new`).
    Apply { vn: Box<VirtualNode>, new: bool },
    /// Delete a node; `recovering` tells why (host loss or scale-down).
    Delete { name: String, recovering: bool },
}

/// Create, update and delete the cluster's VirtualNodes. Placement is
/// persisted in the VirtualNode (spec.host and its label) when it is created,
/// and never changes while the host exists. Decisions are taken under the
/// placement lock against the stores plus what was just written (so two
/// clusters never take the same capacity); the writes then run concurrently.
async fn converge_nodes(
    ctx: &Ctx,
    vc: &VirtualCluster,
    ns: &str,
    desired: Vec<DesiredNode>,
    cluster_running: bool,
) -> Result<NodesOutcome> {
    let api: Api<VirtualNode> = Api::namespaced(ctx.client.clone(), ns);
    let vc_name = vc.name_any();
    let owner = vc
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let mut nodes = Vec::new();
    let mut unschedulable = Vec::new();
    let mut recovering = Vec::new();
    let mut waiting = Vec::new();
    let mut waiting_network = Vec::new();
    let mut waiting_for_cache = 0usize;
    let mut writes = Vec::new();
    {
        let mut pending = ctx.placements.lock().await;
        pending.prune(&ctx.stores);
        let all_nodes: Vec<Arc<VirtualNode>> = ctx.stores.nodes.state();
        // Only nodes this cluster object owns: a cluster recreated under the
        // same name never adopts its predecessor's nodes.
        let mine: Vec<&VirtualNode> = all_nodes
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| {
                n.namespace().as_deref() == Some(ns)
                    && n.owner_references().iter().any(|o| o.uid == owner.uid)
            })
            .collect();
        let hosts: Vec<Arc<Host>> = ctx.stores.hosts.state();
        let mut views = host_views(&hosts, &all_nodes, &pending.nodes);
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for n in &mine {
            if let Some(h) = &n.spec.host {
                *counts.entry(h.clone()).or_default() += 1;
            }
        }
        let frontend_running = mine.iter().any(|n| {
            n.spec.role == NodeRole::Frontend
                && n.status
                    .as_ref()
                    .is_some_and(|s| s.phase == NodePhase::Running)
        });
        for d in &desired {
            let key = (ns.to_string(), d.name.clone());
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
                    // Nobody on the lost host can clean up now: the node's
                    // finalizer goes with it (the returning agent sweeps).
                    writes.push(Write::Delete {
                        name: n.name_any(),
                        recovering: true,
                    });
                    pending.nodes.remove(&key);
                }
                recovering.push(format!("{} (was on {h})", n.name_any()));
                continue;
            }
            if existing.is_some_and(|n| n.metadata.deletion_timestamp.is_some()) {
                // Being deleted (recovery or recreation); placed anew once gone.
                recovering.push(d.name.clone());
                continue;
            }
            let mut spec = d.spec.clone();
            spec.running = should_run(
                cluster_running,
                spec.role,
                vc.spec.start_order,
                frontend_running,
                existing.is_some_and(|n| n.spec.running),
            );
            // A worker that may not start yet is created when it may (creating
            // it stopped and patching it later would cost a write per node);
            // it is placed now all the same, to say early if it cannot be.
            let deferred = existing.is_none() && cluster_running && !spec.running;
            let just_written = pending
                .nodes
                .get(&key)
                .filter(|p| p.owner_uid == owner.uid)
                .map(|p| (p.host.clone(), p.site.clone()));
            if existing.is_none() && just_written.is_some() {
                // Written moments ago; the cache will show it (and trigger
                // this cluster again): writing it twice would be waste.
                waiting_for_cache += 1;
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
                    },
                    &mut views,
                    &mut counts,
                ),
            };
            let (host, site) = match placement {
                Placement::Host { host, site } => (host, site),
                Placement::Unschedulable(msg) => {
                    unschedulable.push(msg);
                    continue;
                }
            };
            if deferred {
                waiting.push(d.name.clone());
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
                spec.disks = n.spec.disks.clone();
            } else if spec.network.is_none() {
                // Created only once its group has given it an address.
                waiting_network.push(d.name.clone());
                continue;
            }
            let labels = node_labels(&vc_name, d, &host, &site);
            let unchanged = existing.is_some_and(|n| {
                n.spec == spec
                    && n.finalizers().iter().any(|f| f == finalizers::HOST_CLEANUP)
                    && labels.iter().all(|(k, v)| n.labels().get(k) == Some(v))
                    && n.owner_references().iter().any(|o| o.uid == owner.uid)
            });
            if unchanged {
                nodes.push(existing.cloned().expect("existing"));
                continue;
            }
            pending.nodes.insert(
                key,
                PendingNode {
                    owner_uid: owner.uid.clone(),
                    host: host.clone(),
                    site: site.clone(),
                    resources: spec.resources,
                    since: std::time::Instant::now(),
                },
            );
            writes.push(Write::Apply {
                new: existing.is_none(),
                vn: Box::new(VirtualNode {
                    metadata: ObjectMeta {
                        name: Some(d.name.clone()),
                        namespace: Some(ns.to_string()),
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
            if !desired.iter().any(|d| d.name == n.name_any())
                && n.metadata.deletion_timestamp.is_none()
            {
                writes.push(Write::Delete {
                    name: n.name_any(),
                    recovering: false,
                });
            }
        }
    }
    // The writes, a bounded number at a time.
    let pp = PatchParams::apply(managers::CONTROLLER).force();
    let results: Vec<WriteResult> = futures::stream::iter(writes.into_iter().map(|w| {
        let (api, pp) = (api.clone(), pp.clone());
        async move {
            let name = match &w {
                Write::Apply { vn, .. } => vn.name_any(),
                Write::Delete { name, .. } => name.clone(),
            };
            let done: Result<Option<VirtualNode>> = async {
                match &w {
                    Write::Apply { vn, .. } => {
                        Ok(Some(api.patch(&name, &pp, &Patch::Apply(vn)).await?))
                    }
                    Write::Delete { recovering, .. } => {
                        if *recovering {
                            release_finalizer(&api, &name).await?;
                        }
                        match api.delete(&name, &Default::default()).await {
                            Ok(_) => {}
                            Err(kube::Error::Api(e)) if e.code == 404 => {}
                            Err(e) => return Err(e.into()),
                        }
                        Ok(None)
                    }
                }
            }
            .await;
            done.map(|applied| (w, applied)).map_err(|e| (name, e))
        }
    }))
    .buffer_unordered(WRITE_CONCURRENCY)
    .collect()
    .await;
    let (mut scheduled, mut removed, mut moved) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_error = None;
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok((Write::Apply { new, .. }, Some(applied))) => {
                if new {
                    scheduled.push(format!(
                        "{}→{}",
                        applied.name_any(),
                        applied.spec.host.as_deref().unwrap_or("?")
                    ));
                }
                nodes.push(applied);
            }
            Ok((Write::Delete { name, recovering }, _)) => {
                if recovering {
                    moved.push(name)
                } else {
                    removed.push(name)
                }
            }
            Ok(_) => {}
            Err((name, e)) => {
                failed.push(name);
                first_error.get_or_insert(e);
            }
        }
    }
    // One Event per kind of change and reconcile, not one per node.
    for (list, type_, reason, what) in [
        (
            &mut scheduled,
            EventType::Normal,
            "NodesScheduled",
            "placed",
        ),
        (
            &mut removed,
            EventType::Normal,
            "NodesRemoved",
            "removed (scaled down)",
        ),
        (
            &mut moved,
            EventType::Warning,
            "NodesRecovering",
            "were on a lost host; placing them again elsewhere",
        ),
    ] {
        if !list.is_empty() {
            list.sort();
            ctx.event(vc, type_, reason, abbreviated(what, list)).await;
        }
    }
    if let Some(e) = first_error {
        // Failed writes are decided again on the retry.
        let mut pending = ctx.placements.lock().await;
        for name in failed {
            pending.nodes.remove(&(ns.to_string(), name));
        }
        return Err(e);
    }
    if waiting_for_cache > 0 {
        tracing::debug!(cluster = %vc_name, nodes = waiting_for_cache, "written nodes not yet in the cache");
    }
    let order: HashMap<&str, usize> = desired
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    nodes.sort_by_key(|n| order.get(n.name_any().as_str()).copied());
    Ok(NodesOutcome {
        nodes,
        waiting,
        waiting_network,
        unschedulable,
        recovering,
    })
}

/// Remove the host-cleanup finalizer of a node whose host is lost.
pub async fn release_finalizer(api: &Api<VirtualNode>, name: &str) -> Result<()> {
    let Some(vn) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(patch) = finalizers::removal_patch(
        vn.finalizers(),
        finalizers::HOST_CLEANUP,
        vn.resource_version(),
    ) else {
        return Ok(());
    };
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes in flight at once per reconcile.
const WRITE_CONCURRENCY: usize = 16;

/// "3 nodes placed: a→h1, b→h2, …" with at most 10 names.
fn abbreviated(what: &str, names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "{} node{} {what}: {}{}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

fn summary(n: &VirtualNode) -> NodeSummary {
    NodeSummary {
        name: n.name_any(),
        role: n.spec.role.as_str().to_string(),
        host: n.spec.host.clone(),
        site: n.spec.site.clone(),
        ip: n.spec.network.as_ref().map(|net| net.ip.clone()),
        phase: Some(format!(
            "{:?}",
            n.status.as_ref().map(|s| s.phase).unwrap_or_default()
        )),
    }
}

fn node_ready(n: &VirtualNode) -> bool {
    n.status
        .as_ref()
        .is_some_and(|s| s.conditions.is_true(condition_types::READY))
}

/// Whether a reservation is dated (has a start or an end) and so holds
/// capacity for a window that is admitted once.
fn dated(r: Option<&Reservation>) -> bool {
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
async fn admit_reservation(
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

pub async fn reconcile(vc: Arc<VirtualCluster>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("VirtualCluster");
    let ns = vc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let volumes = vc
        .spec
        .frontend
        .volumes
        .iter()
        .chain(vc.spec.pools.iter().flat_map(|p| p.volumes.iter()))
        .map(|v| (v.name.clone(), ctx.stores.volume_exists(&ns, &v.name)))
        .collect();
    let observed = Observed {
        network_group: ctx
            .stores
            .network_group(&ns, &vc.spec.network_group)
            .map(|n| (*n).clone()),
        volumes,
        sites: ctx.stores.all_sites(),
    };
    let mut verdict = validate(&ns, &vc.spec, &observed);
    let old = vc.status.clone().unwrap_or_default();
    let mut capacity_admitted_at = old.capacity_admitted_at.clone();
    let desired_count = vc.spec.desired_nodes();
    let mut nodes_status = old.nodes.clone();
    let mut ready_nodes = old.ready_nodes;
    let mut requeue = Duration::from_secs(300);
    let now = k8s_openapi::jiff::Timestamp::now();
    let power =
        reservation::plan(vc.spec.reservation.as_ref(), now).unwrap_or(reservation::PowerPlan {
            exists: false,
            run: false,
            next: None,
            why: "invalid reservation",
        });
    let running_now = vc.spec.running && power.run;
    let mut desired_count = if power.exists { desired_count } else { 0 };
    let next_transition = power.next.map(|(t, action)| Transition {
        time: Time(t),
        action: action.to_string(),
    });
    if let Some((t, _)) = power.next {
        // Requeue exactly at the next boundary of the reservation.
        let wait = Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
        requeue = requeue.min(wait + Duration::from_millis(200));
    }
    if let (false, Some(ng)) = (verdict.is_stalled(), observed.network_group.as_ref()) {
        let mut desired = desired_nodes(&vc, ng, &observed.sites);
        if let Ok(all) = &desired
            && capacity_admitted_at.is_none()
            && dated(vc.spec.reservation.as_ref())
        {
            match admit_reservation(&ctx, &vc, all, now).await {
                Ok(()) => capacity_admitted_at = Some(Time(now)),
                Err(msg) => desired = Err(Verdict::stalled("InsufficientCapacity", msg)),
            }
        }
        match desired.map(|d| if power.exists { d } else { vec![] }) {
            Err(v) => {
                if v.reason() == "InsufficientCapacity" {
                    // Capacity may be freed by other clusters at any time.
                    requeue = requeue.min(Duration::from_secs(10));
                }
                verdict = v
            }
            Ok(desired) => {
                let outcome = converge_nodes(&ctx, &vc, &ns, desired, running_now).await?;
                nodes_status = outcome.nodes.iter().map(summary).collect();
                nodes_status.extend(outcome.waiting.iter().map(|name| NodeSummary {
                    name: name.clone(),
                    role: NodeRole::Worker.as_str().to_string(),
                    phase: Some("WaitingForFrontend".into()),
                    ..Default::default()
                }));
                nodes_status.extend(outcome.waiting_network.iter().map(|name| {
                    NodeSummary {
                        name: name.clone(),
                        role: if name.ends_with("-frontend") {
                            NodeRole::Frontend
                        } else {
                            NodeRole::Worker
                        }
                        .as_str()
                        .to_string(),
                        phase: Some("WaitingForAddress".into()),
                        ..Default::default()
                    }
                }));
                let stopped = outcome
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .is_some_and(|s| s.phase == NodePhase::Stopped)
                    })
                    .count() as i32;
                ready_nodes = outcome.nodes.iter().filter(|n| node_ready(n)).count() as i32;
                verdict = if !outcome.recovering.is_empty() {
                    requeue = Duration::from_secs(1);
                    Verdict::progressing(
                        "RecoveringNodes",
                        format!(
                            "placing again after host loss: {}",
                            outcome.recovering.join(", ")
                        ),
                    )
                } else if !outcome.unschedulable.is_empty() {
                    requeue = Duration::from_secs(10);
                    Verdict::stalled("Unschedulable", outcome.unschedulable.join("; "))
                } else if !outcome.waiting_network.is_empty() {
                    // The group's status change triggers this cluster again.
                    let why = ng
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                        .filter(|c| c.status != yukumo_api::common::ConditionStatus::True)
                        .map(|c| format!(" (NetworkGroup {}: {})", c.reason, c.message))
                        .unwrap_or_default();
                    Verdict::progressing(
                        "WaitingForNetwork",
                        format!(
                            "NetworkGroup {:?} has no address yet for {}{why}",
                            vc.spec.network_group,
                            outcome.waiting_network.join(", ")
                        ),
                    )
                } else if !power.exists {
                    desired_count = 0;
                    match power.next {
                        Some((t, _)) => Verdict::progressing(
                            "ReservationPending",
                            format!("nodes are created at {t}"),
                        ),
                        None => Verdict::ready(
                            "ReservationEnded",
                            "the reservation ended; its nodes were deleted",
                        ),
                    }
                } else if !running_now {
                    if stopped == desired_count {
                        Verdict::ready(
                            "Stopped",
                            format!(
                                "all {desired_count} nodes stopped ({})",
                                if vc.spec.running {
                                    power.why
                                } else {
                                    "spec.running is false"
                                }
                            ),
                        )
                    } else {
                        Verdict::progressing(
                            "Stopping",
                            format!("{stopped}/{desired_count} nodes stopped"),
                        )
                    }
                } else if ready_nodes == desired_count {
                    Verdict::ready(
                        "AllNodesReady",
                        format!("{ready_nodes}/{desired_count} nodes ready"),
                    )
                } else {
                    Verdict::progressing(
                        "NodesStarting",
                        format!("{ready_nodes}/{desired_count} nodes ready"),
                    )
                };
            }
        }
    }
    let frontend = frontend_endpoint(&nodes_status, observed.network_group.as_ref());
    let status = VirtualClusterStatus {
        observed_generation: vc.metadata.generation,
        conditions: apply_verdict(&old.conditions, vc.metadata.generation, &verdict),
        desired_nodes: desired_count,
        ready_nodes,
        ready: Some(format!("{ready_nodes}/{desired_count}")),
        nodes: nodes_status,
        frontend: frontend.or(old.frontend.clone()),
        next_transition,
        capacity_admitted_at,
    };
    if status != old {
        ctx.apply_status(
            &Api::<VirtualCluster>::namespaced(ctx.client.clone(), &ns),
            vc.as_ref(),
            &status,
        )
        .await?;
    }
    ctx.announce(vc.as_ref(), &old.conditions, &verdict).await;
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;
    use yukumo_api::common::ImageSource;
    use yukumo_api::networkgroup::{NetworkGroupSpec, SegmentSpec, SegmentType};
    use yukumo_api::site::SiteSpec;
    use yukumo_api::virtualcluster::{FrontendSpec, NodePool, SiteName, VolumeAttachment};

    fn spec() -> VirtualClusterSpec {
        let size = NodeSize {
            cpu: Some(1),
            memory: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "256Mi".into(),
            )),
            size_class: None,
        };
        VirtualClusterSpec {
            network_group: "net".into(),
            frontend: FrontendSpec {
                size: size.clone(),
                image: ImageSource {
                    url: "file:///x".into(),
                    checksum: format!("sha256:{}", "0".repeat(64)),
                    format: Default::default(),
                },
                disk_size: None,
                site: None,
                gateway_host: true,
                public_ip: false,
                public_ip_address: None,
                user_data: None,
                volumes: vec![],
            },
            pools: vec![NodePool {
                name: "compute".into(),
                replicas: 3,
                size,
                image: None,
                disk_size: None,
                sites: vec![],
                user_data: None,
                volumes: vec![],
            }],
            ssh_keys: vec![],
            running: true,
            reservation: None,
            start_order: Default::default(),
            recovery: Default::default(),
        }
    }

    fn site(name: &str) -> Site {
        let mut s = Site::new(
            name,
            serde_json::from_value::<SiteSpec>(serde_json::json!({})).unwrap(),
        );
        s.metadata.name = Some(name.into());
        s
    }

    fn ng(home: &str) -> NetworkGroup {
        NetworkGroup::new(
            "net",
            NetworkGroupSpec {
                cidr: "10.0.0.0/24".into(),
                gateway: None,
                segment: SegmentSpec {
                    type_: SegmentType::Vxlan,
                    id: None,
                },
                home_site: SiteName(home.into()),
                sites: vec![],
                dhcp: None,
                egress_nat: true,
                public_ips: vec![],
                firewall: vec![],
                mtu: None,
            },
        )
    }

    #[test]
    fn missing_network_group_is_stalled_naming_the_field() {
        let v = validate(
            "t1",
            &spec(),
            &Observed {
                network_group: None,
                volumes: vec![],
                sites: vec![site("a")],
            },
        );
        assert!(v.is_stalled());
        assert_eq!(v.reason(), "NetworkGroupNotFound");
        assert!(v.message().contains("spec.networkGroup"));
    }

    #[test]
    fn unknown_site_and_size_class() {
        let mut s = spec();
        s.pools[0].sites = vec![SiteName("b".into())];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![],
            sites: vec![site("a")],
        };
        let v = validate("t1", &s, &obs);
        assert_eq!(v.reason(), "SiteNotFound");
        assert!(v.message().contains("spec.pools[0].sites"));
        let mut s = spec();
        s.frontend.size = NodeSize {
            cpu: None,
            memory: None,
            size_class: Some("huge".into()),
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "UnknownSizeClass");
        s.frontend.size.size_class = Some("large".into());
        assert_eq!(validate("t1", &s, &obs).reason(), "ReferencesResolved");
    }

    #[test]
    fn volumes_must_exist_and_attach_once() {
        let mut s = spec();
        s.frontend.volumes = vec![VolumeAttachment {
            name: "data".into(),
            read_only: false,
        }];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![("data".into(), false)],
            sites: vec![site("a")],
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "VolumeNotFound");
        s.pools[0].replicas = 1;
        s.pools[0].volumes = vec![VolumeAttachment {
            name: "data".into(),
            read_only: false,
        }];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![("data".into(), true)],
            sites: vec![site("a")],
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "VolumeAttachedTwice");
    }

    #[test]
    fn the_frontend_endpoint_names_its_public_ip() {
        let nodes = vec![
            NodeSummary {
                name: "c-w-0".into(),
                role: "worker".into(),
                ip: Some("10.0.0.9".into()),
                ..Default::default()
            },
            NodeSummary {
                name: "c-frontend".into(),
                role: "frontend".into(),
                ip: Some("10.0.0.7".into()),
                ..Default::default()
            },
        ];
        let private = frontend_endpoint(&nodes, Some(&ng("a"))).unwrap();
        assert_eq!(private.address.as_deref(), Some("10.0.0.7"));
        assert_eq!(private.public_ip, None);
        assert_eq!(private.ssh.as_deref(), Some("ssh root@10.0.0.7"));
        let mut g = ng("a");
        g.status = Some(
            serde_json::from_value(serde_json::json!({
                "publicIPs": [{"address": "203.0.113.17", "node": "c-frontend"},
                              {"address": "203.0.113.18", "node": "c-w-0"}]
            }))
            .unwrap(),
        );
        let public = frontend_endpoint(&nodes, Some(&g)).unwrap();
        assert_eq!(public.public_ip.as_deref(), Some("203.0.113.17"));
        assert_eq!(public.ssh.as_deref(), Some("ssh root@203.0.113.17"));
        assert_eq!(frontend_endpoint(&nodes[..1], Some(&g)), None);
    }
}
