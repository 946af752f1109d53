//! VirtualCluster: validate what the spec refers to, place its nodes, and
//! report it.
//!
//! Observe → decide → write. The references are checked purely
//! ([`validate`]); a dated reservation is admitted once ([`admission`]);
//! the node writes are planned purely under the placement lock
//! ([`converge::plan_nodes`], so two clusters never take the same
//! capacity) and done after it is released, 16 at a time; the status is
//! derived purely from what converging found ([`status::verdict`]).

pub mod admission;
pub mod converge;
pub mod guarantee;
pub mod status;
pub mod validate;
pub mod volumes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use yukumo_api::virtualcluster::{
    FrontendEndpoint, NodeSummary, Transition, VirtualCluster, VirtualClusterStatus,
};
use yukumo_api::virtualnode::{NodeRole, VirtualNode};
use yukumo_api::{NetworkGroup, Reason, finalizers, managers};

use super::nodes::{DesiredNode, desired_nodes};
use super::reservation;
use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Error, Result};
use converge::{PlanInputs, Write, plan_nodes};
use validate::{Observed, validate};

/// Where users reach the frontend: its private address and the public IP
/// its group mapped to it, if any (ssh goes to the public one then).
pub fn frontend_endpoint(
    nodes: &[NodeSummary],
    group: Option<&NetworkGroup>,
) -> Option<FrontendEndpoint> {
    let fe = nodes.iter().find(|n| n.role == NodeRole::Frontend)?;
    let ip = fe.ip?;
    let public_ip = group
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.public_ips.iter().find(|p| p.node == fe.name))
        .map(|p| p.address);
    Some(FrontendEndpoint {
        ssh: Some(format!("ssh root@{}", public_ip.unwrap_or(ip))),
        address: Some(ip),
        public_ip,
    })
}

/// What converging a cluster's VirtualNodes found.
#[derive(Debug, Default)]
pub struct NodesOutcome {
    /// The cluster's nodes, in the order of the desired nodes.
    pub nodes: Vec<VirtualNode>,
    /// Workers not created yet: they wait for the frontend to run.
    pub waiting: Vec<String>,
    /// Nodes not created yet (and their roles): their NetworkGroup has no
    /// address for them yet.
    pub waiting_network: Vec<(String, NodeRole)>,
    /// Nodes not created yet: a volume of theirs waits.
    pub waiting_volumes: Vec<(String, NodeRole)>,
    pub unschedulable: Vec<String>,
    pub recovering: Vec<String>,
    /// A rollout: nodes that keep an earlier revision for now, and nodes
    /// being replaced.
    pub outdated: Vec<String>,
    pub replacing: Vec<String>,
    /// Nodes at the spec's revision.
    pub updated: i32,
}

/// A write done (with the node as applied), or the node's name and the error.
type WriteResult = std::result::Result<(Write, Option<VirtualNode>), (String, Error)>;

/// Writes in flight at once per reconcile.
const WRITE_CONCURRENCY: usize = 16;

/// Do one planned write.
async fn write(api: Api<VirtualNode>, w: Write) -> WriteResult {
    let name = w.name();
    let done: Result<Option<VirtualNode>> = async {
        match &w {
            Write::Apply { vn, .. } => {
                let pp = PatchParams::apply(managers::CONTROLLER).force();
                let mut applied = api.patch(&name, &pp, &Patch::Apply(vn)).await?;
                // Held until the whole reconcile's writes are done (for
                // every node of every cluster at once on a big apply), and
                // nothing reads them: as in the caches.
                applied.metadata.managed_fields = None;
                Ok(Some(applied))
            }
            Write::Delete { .. } | Write::Replace { .. } => {
                if let Write::Delete {
                    recovering: true, ..
                } = &w
                {
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

/// Create, update and delete the cluster's VirtualNodes: planned under the
/// placement lock against the stores plus what was just written, written
/// after it is released.
async fn converge_nodes(
    ctx: &Ctx,
    vc: &VirtualCluster,
    ns: &str,
    desired: Vec<DesiredNode>,
    cluster_running: bool,
) -> Result<NodesOutcome> {
    let api: Api<VirtualNode> = Api::namespaced(ctx.client.clone(), ns);
    let owner = vc
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let plan = {
        let mut pending = ctx.placements.lock().await;
        pending.prune(&ctx.stores);
        let wall = k8s_openapi::jiff::Timestamp::now();
        let seen = admission::calendar(ctx, &pending, owner.uid.as_str(), wall);
        let own_windows = seen.own_windows(vc, wall);
        let replacing: HashMap<(String, String), String> = pending
            .replacing
            .iter()
            .map(|(k, (uid, _))| (k.clone(), uid.clone()))
            .collect();
        let plan = plan_nodes(&PlanInputs {
            cluster: vc,
            owner: &owner,
            desired: &desired,
            cluster_running,
            all_nodes: &ctx.stores.nodes.state(),
            hosts: &ctx.stores.hosts.state(),
            pending: &pending.nodes,
            replacing: &replacing,
            calendar: &seen.calendar,
            asleep: &seen.asleep,
            own_windows: own_windows.as_deref(),
            now: Instant::now(),
            wall,
        });
        for key in &plan.forget {
            pending.nodes.remove(key);
        }
        pending.nodes.extend(plan.placed.iter().cloned());
        let now = Instant::now();
        for (key, uid) in &plan.replaced {
            pending.replacing.insert(key.clone(), (uid.clone(), now));
        }
        plan
    };
    let results: Vec<WriteResult> =
        futures::stream::iter(plan.writes.iter().cloned().map(|w| write(api.clone(), w)))
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
    let mut nodes = plan.unchanged;
    let (mut scheduled, mut removed, mut moved, mut replaced, mut relocated) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
            Ok((Write::Replace { name, moving }, _)) => {
                if moving {
                    relocated.push(name)
                } else {
                    replaced.push(name)
                }
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
    let replaced_what = format!(
        "replaced (rolling to revision {})",
        super::nodes::cluster_revision(&desired)
    );
    for (list, type_, reason, what) in [
        (
            &mut replaced,
            EventType::Normal,
            Reason::NodesReplaced,
            replaced_what.as_str(),
        ),
        (
            &mut scheduled,
            EventType::Normal,
            Reason::NodesScheduled,
            "placed",
        ),
        (
            &mut removed,
            EventType::Normal,
            Reason::NodesRemoved,
            "removed (scaled down)",
        ),
        (
            &mut moved,
            EventType::Warning,
            Reason::NodesRecovering,
            "were on a lost host; placing them again elsewhere",
        ),
        (
            &mut relocated,
            EventType::Warning,
            Reason::NodesRecovering,
            "had no room to start on their hosts (taken while they were stopped); placing them again elsewhere, their boot Volumes follow",
        ),
    ] {
        if !list.is_empty() {
            list.sort();
            ctx.event(vc, type_, &reason, abbreviated(what, list)).await;
        }
    }
    if let Some(e) = first_error {
        // Failed writes are decided again on the retry.
        let mut pending = ctx.placements.lock().await;
        for name in failed {
            let key = (ns.to_string(), name);
            pending.nodes.remove(&key);
            pending.replacing.remove(&key);
        }
        return Err(e);
    }
    if plan.waiting_for_cache > 0 {
        tracing::debug!(cluster = %vc.name_any(), nodes = plan.waiting_for_cache, "written nodes not yet in the cache");
    }
    let order: HashMap<&str, usize> = desired
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    nodes.sort_by_key(|n| order.get(n.name_any().as_str()).copied());
    Ok(NodesOutcome {
        nodes,
        waiting: plan.waiting,
        waiting_network: plan.waiting_network,
        waiting_volumes: plan.waiting_volumes,
        unschedulable: plan.unschedulable,
        recovering: plan.recovering,
        outdated: plan.outdated,
        replacing: plan.replacing,
        updated: plan.updated,
    })
}

/// Make the boot Volumes the cluster asks for (`rootVolume`: `<node>-root`,
/// from the node's image, owned by the cluster so they go with it), follow
/// a changed `rootVolume.size`, and delete those of nodes the cluster no
/// longer has (scaled down). A Volume of that name made by someone else is
/// used as it is (e.g. one restored from a snapshot), never changed.
/// `have`: the namespace's Volumes.
async fn ensure_roots(
    ctx: &Ctx,
    vc: &VirtualCluster,
    ns: &str,
    have: &[&yukumo_api::Volume],
) -> Result<()> {
    let name = vc.name_any();
    let want = volumes::roots(&name, &vc.spec);
    let api: Api<yukumo_api::Volume> = Api::namespaced(ctx.client.clone(), ns);
    let ours = |v: &yukumo_api::Volume| {
        v.labels().get(yukumo_api::labels::ROOT_OF) == Some(&name)
            && v.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == vc.uid().as_ref())
    };
    for r in &want {
        match have.iter().find(|v| v.name_any() == r.name) {
            None => {
                let mut v = yukumo_api::Volume::new(&r.name, r.spec.clone());
                v.metadata.namespace = Some(ns.to_string());
                v.metadata.labels =
                    Some([(yukumo_api::labels::ROOT_OF.to_string(), name.clone())].into());
                v.metadata.owner_references = vc.controller_owner_ref(&()).map(|o| vec![o]);
                match api.create(&Default::default(), &v).await {
                    Ok(_) => {
                        ctx.event(
                            vc,
                            EventType::Normal,
                            &Reason::VolumeClaimed,
                            format!(
                                "boot Volume {} made for node {} ({})",
                                r.name, r.node, r.field
                            ),
                        )
                        .await
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(v) if ours(v) && v.spec.size != r.spec.size => {
                let patch = serde_json::json!({"spec": {"size": r.spec.size}});
                if let Err(e) = api
                    .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    ctx.event(
                        vc,
                        EventType::Warning,
                        &Reason::InvalidSize,
                        format!("{}.size: boot Volume {} not resized: {e}", r.field, r.name),
                    )
                    .await;
                }
            }
            Some(_) => {}
        }
    }
    for v in have.iter().filter(|v| ours(v)) {
        if v.metadata.deletion_timestamp.is_none() && !want.iter().any(|r| r.name == v.name_any()) {
            match api.delete(&v.name_any(), &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Write the plan's claims: each Volume's `status.attachedTo` (or, read-
/// only, its `status.readers`), with the Volume's resourceVersion as a
/// precondition (a concurrent claim or change fails with a conflict and the
/// cluster is decided again).
async fn write_claims(
    ctx: &Ctx,
    vc: &VirtualCluster,
    ns: &str,
    claims: &[volumes::Claim],
) -> Result<()> {
    let api: Api<yukumo_api::Volume> = Api::namespaced(ctx.client.clone(), ns);
    for c in claims {
        let patch = match &c.readers {
            Some(readers) => serde_json::json!({
                "metadata": {"resourceVersion": c.resource_version},
                "status": {"readers": readers},
            }),
            None => serde_json::json!({
                "metadata": {"resourceVersion": c.resource_version},
                "status": {"attachedTo": c.attached_to},
            }),
        };
        api.patch_status(&c.volume, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        ctx.count_status_write("Volume");
        ctx.event(
            vc,
            EventType::Normal,
            &Reason::VolumeClaimed,
            format!(
                "Volume {} claimed{} for node {} as {}{}",
                c.volume,
                if c.readers.is_some() {
                    " read-only"
                } else {
                    ""
                },
                c.attached_to.node,
                c.attached_to.target,
                c.attached_to
                    .host
                    .as_ref()
                    .map(|h| format!(" on host {h}"))
                    .unwrap_or_default()
            ),
        )
        .await;
    }
    Ok(())
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
        namespace_labels: ctx.namespace_labels(&ns).await?,
    };
    let mut verdict = validate(&ns, &vc.spec, &observed);
    let old = vc.status.clone().unwrap_or_default();
    let mut capacity_admitted_at = old.capacity_admitted_at.clone();
    let mut held = old.guarantee.clone();
    let mut nodes_status = old.nodes.clone();
    let mut ready_nodes = old.ready_nodes;
    let mut revision = old.revision.clone();
    let mut updated_nodes = old.updated_nodes;
    let now = k8s_openapi::jiff::Timestamp::now();
    let power =
        reservation::plan(vc.spec.reservation.as_ref(), now).unwrap_or(reservation::PowerPlan {
            exists: false,
            run: false,
            next: None,
            why: "invalid reservation",
        });
    let running_now = vc.spec.running && power.run;
    let mut desired_count = if power.exists {
        vc.spec.desired_nodes()
    } else {
        0
    };
    let next_transition = power.next.map(|(t, action)| Transition {
        time: Time(t),
        action,
    });
    let mut requeue = Duration::from_secs(300);
    if let Some((t, _)) = power.next {
        // Requeue exactly at the next boundary of the reservation.
        let wait = Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
        requeue = requeue.min(wait + Duration::from_millis(200));
    }
    // Quota: the cluster's growth is granted whole or refused whole; a
    // refused cluster keeps the nodes it has and what it was granted.
    let ledger = ctx.stores.quota_ledger(&ns);
    let granted = ledger
        .as_ref()
        .and_then(|l| l.cluster_grant(&vc.name_any(), old.granted));
    if !verdict.is_stalled()
        && let Some(why) = ledger.as_ref().and_then(|l| {
            l.refusal(super::quota::Kind::VirtualCluster, &vc.name_any())
                .cloned()
        })
    {
        verdict = Verdict::stalled(Reason::QuotaExceeded, why);
        requeue = requeue.min(Duration::from_secs(30));
    }
    if let (false, Some(ng)) = (verdict.is_stalled(), observed.network_group.as_ref()) {
        let mut desired = desired_nodes(&vc, ng, &observed.sites);
        if let Ok(all) = &desired
            && capacity_admitted_at.is_none()
            && admission::scheduled(vc.spec.reservation.as_ref())
        {
            match admission::admit_reservation(&ctx, &vc, all, now).await {
                Ok(()) => capacity_admitted_at = Some(Time(now)),
                Err(msg) => desired = Err(Verdict::progressing(Reason::InsufficientCapacity, msg)),
            }
        }
        let uid = vc.metadata.uid.clone().unwrap_or_default();
        let all_nodes = ctx.stores.nodes.state();
        let mine: Vec<&VirtualNode> = all_nodes
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| {
                n.namespace().as_deref() == Some(ns.as_str())
                    && n.owner_references().iter().any(|o| o.uid == uid)
            })
            .collect();
        if let Ok(all) = &desired {
            let need: Vec<_> = all.iter().map(|d| d.spec.resources).collect();
            // A parked cluster's stopped nodes hold nothing.
            let parked = admission::parked(&vc);
            let placed: Vec<_> = mine
                .iter()
                .filter(|n| n.spec.host.is_some() && (n.spec.running || !parked))
                .map(|n| n.spec.resources)
                .collect();
            held = guarantee::guarantee(
                vc.spec.reservation.as_ref(),
                capacity_admitted_at.as_ref().map(|t| t.0),
                &need,
                &placed,
                now,
            );
        }
        match desired.map(|d| if power.exists { d } else { vec![] }) {
            Err(v) => {
                if v.reason() == &Reason::InsufficientCapacity {
                    // Capacity may be freed by other clusters at any time.
                    requeue = requeue.min(Duration::from_secs(10));
                }
                verdict = v
            }
            Ok(mut desired) => {
                let all_volumes = ctx.stores.volumes.state();
                let vols: Vec<&yukumo_api::Volume> = all_volumes
                    .iter()
                    .map(|v| v.as_ref())
                    .filter(|v| v.namespace().as_deref() == Some(ns.as_str()))
                    .collect();
                ensure_roots(&ctx, &vc, &ns, &vols).await?;
                let vplan =
                    volumes::plan(&ns, &vc.name_any(), &vc.spec, &mine, &vols, &observed.sites);
                write_claims(&ctx, &vc, &ns, &vplan.claims).await?;
                for d in &mut desired {
                    if let Some(nv) = vplan.nodes.get(&d.name) {
                        d.spec.disks = nv.disks.clone();
                        d.pinned = nv.pinned.clone();
                    }
                    d.hold = !vplan.may_create(&d.name);
                }
                let rev = super::nodes::cluster_revision(&desired);
                let switched_off: Vec<String> = desired
                    .iter()
                    .filter(|d| d.switched_off)
                    .map(|d| d.name.clone())
                    .collect();
                let outcome = converge_nodes(&ctx, &vc, &ns, desired, running_now).await?;
                updated_nodes = outcome.updated;
                nodes_status = status::summaries(&outcome);
                ready_nodes = status::ready_count(&outcome);
                let v = status::verdict(&status::Facts {
                    outcome: &outcome,
                    group: ng,
                    group_name: &vc.spec.network_group,
                    power: &power,
                    spec_running: vc.spec.running,
                    running_now,
                    desired: desired_count,
                    ready: ready_nodes,
                    revision: &rev,
                    switched_off: &switched_off,
                });
                revision = Some(rev);
                if !power.exists {
                    desired_count = 0;
                }
                if let Some(r) = v.requeue {
                    // Never later than the reservation's next boundary.
                    requeue = requeue.min(r);
                }
                verdict = v.verdict;
                if let Some(w) = vplan.waits.first()
                    && !verdict.is_stalled()
                {
                    let msg = vplan
                        .waits
                        .iter()
                        .map(|w| w.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    verdict = match w.reason {
                        Reason::VolumeNotReady => Verdict::progressing(w.reason.clone(), msg),
                        _ => Verdict::stalled(w.reason.clone(), msg),
                    };
                }
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
        guarantee: held,
        granted,
        revision,
        updated_nodes,
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
mod tests;
