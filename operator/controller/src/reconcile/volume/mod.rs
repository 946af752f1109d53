//! Volume: placed on a Site's storage pool (once), realised by the agent
//! of the pool's host (which reports `status.backing`), claimed by the
//! VirtualCluster that attaches it (`status.attachedTo`, see
//! [`super::virtualcluster::volumes`]) and released here once nobody holds
//! it. Observe → decide ([`decide`]) → write. The controller's status
//! apply never carries `attachedTo` or `backing`: those fields have their
//! own writers, and a stale apply must never undo them.

pub mod decide;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use yukumo_api::virtualcluster::VirtualCluster;
use yukumo_api::virtualnode::VirtualNode;
use yukumo_api::volume::{Volume, VolumeStatus};
use yukumo_api::{finalizers, labels};

use super::verdict::apply_verdict;
use super::virtualcluster::volumes::wanted;
use crate::context::{Ctx, Error, Result};
use decide::{Holder, decide};

/// What the holder in `status.attachedTo` still does with the Volume.
fn holder(ctx: &Ctx, vol: &Volume, ns: &str) -> Option<Holder> {
    let a = vol.status.as_ref()?.attached_to.as_ref()?;
    Some(holder_of(ctx, vol, ns, a))
}

/// What holder `a` (read-write or read-only) still does with the Volume.
fn holder_of(
    ctx: &Ctx,
    vol: &Volume,
    ns: &str,
    a: &yukumo_api::volume::VolumeAttachmentStatus,
) -> Holder {
    let uid = vol.metadata.uid.clone().unwrap_or_default();
    let cluster_wants = ctx
        .stores
        .clusters
        .get(&ObjectRef::<VirtualCluster>::new(&a.cluster).within(ns))
        .is_some_and(|vc| {
            vc.metadata.deletion_timestamp.is_none()
                && wanted(&a.cluster, &vc.spec)
                    .iter()
                    .any(|(node, _, att)| node == &a.node && att.name == vol.name_any())
        });
    let node_holds = ctx
        .stores
        .nodes
        .get(&ObjectRef::<VirtualNode>::new(&a.node).within(ns))
        .is_some_and(|n| {
            n.spec.disks.iter().any(|d| d.serial == uid)
                || n.status
                    .as_ref()
                    .is_some_and(|s| s.disks.iter().any(|d| d.serial == uid))
        });
    Holder {
        cluster_wants,
        node_holds,
    }
}

/// Merge `claims` (`attachedTo`, `readers`) into the Volume's status, with
/// its resourceVersion as a precondition: a claim written meanwhile makes
/// this fail with a conflict, and the Volume is decided again.
async fn patch_claims(
    ctx: &Ctx,
    api: &Api<Volume>,
    vol: &Volume,
    claims: serde_json::Value,
) -> Result<()> {
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": vol.resource_version()},
        "status": claims,
    });
    api.patch_status(
        &vol.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    ctx.count_status_write("Volume");
    Ok(())
}

/// The controller's part of the status (never `attachedTo` or `readers`, nor what the
/// agent writes: `backing`, `snapshots`, `restoredFrom`).
fn owned(s: &VolumeStatus) -> VolumeStatus {
    VolumeStatus {
        attached_to: None,
        readers: vec![],
        backing: None,
        snapshots: vec![],
        restored_from: None,
        ..s.clone()
    }
}

pub async fn reconcile(vol: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("Volume");
    let ns = vol
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api = Api::<Volume>::namespaced(ctx.client.clone(), &ns);
    let holder = holder(&ctx, &vol, &ns);
    let all = ctx.stores.volumes.state();
    let volumes: Vec<&Volume> = all.iter().map(|v| v.as_ref()).collect();
    let labels = ctx.namespace_labels(&ns).await?;
    let mut d = decide(&vol, &ctx.stores.all_sites(), &volumes, holder, &labels);
    let refusal = ctx.stores.quota_ledger(&ns).and_then(|l| {
        l.refusal(super::quota::Kind::Volume, &vol.name_any())
            .cloned()
    });
    decide::apply_quota(&mut d, &vol, refusal.as_deref());
    let old = vol.status.clone().unwrap_or_default();
    // Placing: the storage host's label (its agent selects by it) and the
    // finalizer its agent releases once the storage is gone, before the
    // location is written.
    if let Some(loc) = &d.location
        && vol.metadata.deletion_timestamp.is_none()
        && (vol.labels().get(labels::STORAGE_HOST) != Some(&loc.host)
            || !vol
                .finalizers()
                .iter()
                .any(|f| f == finalizers::STORAGE_CLEANUP))
    {
        let mut fins = vol.finalizers().to_vec();
        if !fins.iter().any(|f| f == finalizers::STORAGE_CLEANUP) {
            fins.push(finalizers::STORAGE_CLEANUP.into());
        }
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": vol.resource_version(),
                "labels": {labels::STORAGE_HOST: loc.host},
                "finalizers": fins,
            }
        });
        api.patch(
            &vol.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    // Readers that let go (their cluster no longer asks, their node no
    // longer holds the disk) are dropped; a writer may then take it.
    let readers: Vec<_> = vol
        .status
        .iter()
        .flat_map(|s| s.readers.iter())
        .map(|a| (a, holder_of(&ctx, &vol, &ns, a)))
        .collect();
    let readers_letting_go = readers.iter().any(|(_, h)| !h.cluster_wants);
    let kept: Vec<_> = readers
        .iter()
        .filter(|(_, h)| h.cluster_wants || h.node_holds)
        .map(|(a, _)| (*a).clone())
        .collect();
    if kept.len() != readers.len() {
        let readers = if kept.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(kept)
        };
        patch_claims(&ctx, &api, &vol, serde_json::json!({"readers": readers})).await?;
        tracing::info!(volume = %vol.name_any(), readers = kept.len(), "read-only holders released");
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if d.release {
        patch_claims(&ctx, &api, &vol, serde_json::json!({"attachedTo": null})).await?;
        tracing::info!(volume = %vol.name_any(), "released: no node holds it");
    }
    let status = VolumeStatus {
        observed_generation: vol.metadata.generation,
        conditions: apply_verdict(&old.conditions, vol.metadata.generation, &d.verdict),
        phase: d.phase,
        capacity: d.capacity.clone(),
        location: d.location.clone(),
        granted: d.granted.clone(),
        ..owned(&old)
    };
    if status != owned(&old) {
        ctx.apply_status(&api, vol.as_ref(), &status).await?;
    }
    ctx.announce(vol.as_ref(), &old.conditions, &d.verdict)
        .await;
    // A holder letting go (its node's deletion is not an event the shared
    // watch delivers) is looked at again soon.
    let letting_go = (!d.release && holder.is_some_and(|h| !h.cluster_wants)) || readers_letting_go;
    let busy = vol.metadata.deletion_timestamp.is_some()
        || !matches!(d.verdict, super::verdict::Verdict::Ready { .. });
    Ok(Action::requeue(Duration::from_secs(if letting_go {
        2
    } else if busy {
        10
    } else {
        300
    })))
}
