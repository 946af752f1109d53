//! The agent's Volume reconciler: the Volumes whose storage this host
//! holds (label `yukumo.io/storage-host`), observed in the pool, decided
//! purely ([`super::decide`]), carried out through [`Pools`], reported in
//! the Volume's `status.backing`. A deleted Volume's storage is removed
//! only once no node holds it (the controller clears `status.attachedTo`
//! after the node's agent reported the disk gone), then its finalizer is
//! released. A periodic report writes each pool's capacity and free space
//! into the Host's status and counts files with yukumo's marker but no
//! Volume (an Event and a metric; they are never deleted).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use yukumo_api::host::Host;
use yukumo_api::quantity::parse_quantity;
use yukumo_api::site::{PoolStatus, PoolType, Site, StoragePool};
use yukumo_api::volume::{RbdImage, SnapshotStatus, Volume, VolumeBacking};
use yukumo_api::{Reason, finalizers, labels, managers};

use super::decide::{self, VolumeWant};
use super::pools::Pools;
use super::targets::{self, Targets};
use crate::hypervisor::HypervisorError;
use crate::register::{Metrics, OpLabel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Hypervisor(#[from] HypervisorError),
}

/// The initiators an `iscsi` pool's target admits: the underlay addresses
/// of the hosts the holding nodes run on (its writer, or its readers), or,
/// while no placed node holds the volume, of this Site's hosts.
async fn initiators(
    client: &Client,
    site: &str,
    holders: &[&str],
) -> Result<Vec<String>, kube::Error> {
    // By the Site's label: a site agent may list no other Hosts.
    let mut acl: Vec<String> = Api::<Host>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={site}", labels::SITE)))
        .await?
        .items
        .into_iter()
        .filter(|h| h.spec.site == site)
        .filter(|h| {
            holders.is_empty()
                || holders
                    .iter()
                    .any(|n| h.metadata.name.as_deref() == Some(*n))
        })
        .flat_map(|h| h.status.map(|s| s.addresses).unwrap_or_default())
        .map(|a| a.to_string())
        .collect();
    acl.sort();
    acl.dedup();
    Ok(acl)
}

pub struct StorageCtx<P: Pools, T: Targets> {
    pub client: Client,
    pub host: String,
    pub site: String,
    pub pools: P,
    /// The host's iSCSI target (`iscsi` pools).
    pub targets: T,
    pub state_dir: PathBuf,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The orphans last reported (an Event only when the set changes).
    reported: std::sync::Mutex<HashSet<String>>,
    /// Wakes the pool report after a change of the pool.
    changed: tokio::sync::Notify,
    /// The host's image cache (shared with compute): volumes from an image.
    pub images: crate::compute::images::ImageCache,
}

impl<P: Pools, T: Targets> StorageCtx<P, T> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        pools: P,
        targets: T,
        host: &str,
        site: &str,
        state_dir: PathBuf,
        metrics: Metrics,
        images: crate::compute::images::ImageCache,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: managers::AGENT.into(),
            instance: Some(host.to_string()),
        };
        Arc::new(StorageCtx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            host: host.into(),
            site: site.into(),
            pools,
            targets,
            state_dir,
            metrics,
            reported: Default::default(),
            changed: tokio::sync::Notify::new(),
            images,
        })
    }

    /// The folder of a pool of this host (`rbd`: its Ceph pool; `lvm`:
    /// its volume group).
    fn path(&self, pool: &StoragePool) -> String {
        if let Some(c) = &pool.ceph {
            return c.pool.clone();
        }
        if let Some(l) = &pool.lvm {
            return l.volume_group.clone();
        }
        pool.path.clone().unwrap_or_else(|| {
            self.state_dir
                .join("pools")
                .join(&pool.name)
                .to_string_lossy()
                .into_owned()
        })
    }

    async fn site(&self) -> Result<Option<Site>, Error> {
        Ok(Api::<Site>::all(self.client.clone())
            .get_opt(&self.site)
            .await?)
    }
}

/// What's promised to a pool's other volumes: their sizes.
fn promised(seen: &decide::PoolSeen, except: &str) -> u64 {
    seen.volumes
        .iter()
        .filter(|(n, _)| decide::file_uid(n).is_some() && n.as_str() != except)
        .map(|(_, v)| v.capacity)
        .sum()
}

/// What the agent writes into a Volume's status (field manager
/// `yukumo-agent-storage`): only when it changed.
#[derive(Debug, Clone, PartialEq, Default)]
struct AgentStatus {
    backing: Option<VolumeBacking>,
    snapshots: Vec<SnapshotStatus>,
    restored_from: Option<String>,
}

async fn write_status(vol: &Volume, client: &Client, st: AgentStatus) -> Result<(), Error> {
    let old = vol.status.clone().unwrap_or_default();
    let now = AgentStatus {
        backing: old.backing,
        snapshots: old.snapshots,
        restored_from: old.restored_from,
    };
    if now == st {
        return Ok(());
    }
    let api: Api<Volume> = Api::namespaced(client.clone(), &vol.namespace().unwrap_or_default());
    // Fields left out are released (and so removed): no nulls in an apply.
    let mut fields = serde_json::Map::new();
    if let Some(b) = &st.backing {
        fields.insert(
            "backing".into(),
            serde_json::to_value(b).unwrap_or_default(),
        );
    }
    if !st.snapshots.is_empty() {
        fields.insert(
            "snapshots".into(),
            serde_json::to_value(&st.snapshots).unwrap_or_default(),
        );
    }
    if let Some(r) = &st.restored_from {
        fields.insert("restoredFrom".into(), r.clone().into());
    }
    let body = serde_json::json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "Volume",
        "status": fields,
    });
    api.patch_status(
        &vol.name_any(),
        &PatchParams::apply(managers::AGENT_STORAGE).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// The snapshot file a new volume is seeded from (`spec.source.snapshot`),
/// which must be in the same pool.
async fn seed(
    client: &Client,
    vol: &Volume,
    pool: &str,
    host: &str,
    fmt: decide::Format,
) -> Result<Option<String>, (Reason, String)> {
    let Some(src) = vol.spec.source.as_ref().and_then(|s| s.snapshot.as_ref()) else {
        return Ok(None);
    };
    let api: Api<Volume> = Api::namespaced(client.clone(), &vol.namespace().unwrap_or_default());
    // Read as this host's (a site agent may read no other Volume): one in
    // another pool or on another host is not found here either.
    let from = crate::scoped::get(&api, &src.volume, &format!("{}={host}", labels::STORAGE_HOST))
        .await
        .map_err(|e| (Reason::StorageFailed, e.to_string()))?
        .ok_or_else(|| {
            (
                Reason::SourceNotFound,
                format!(
                    "spec.source.snapshot.volume: Volume {:?} not found in pool {pool:?} on {host}; a volume is made from a snapshot in the same pool",
                    src.volume
                ),
            )
        })?;
    let loc = from.status.as_ref().and_then(|s| s.location.as_ref());
    if loc.is_none_or(|l| l.pool != pool || l.host != host) {
        return Err((
            Reason::SourceNotFound,
            format!(
                "spec.source.snapshot: Volume {:?} is not in pool {pool:?} on {host}; a volume is made from a snapshot in the same pool",
                src.volume
            ),
        ));
    }
    Ok(Some(decide::snapshot_file(
        from.metadata.uid.as_deref().unwrap_or_default(),
        &src.name,
        fmt,
    )))
}

/// A pass that could not look at the storage: `backing` (its error) is
/// reported, the snapshots and restore stay as the status had them, and the
/// Volume is looked at again after `secs`.
async fn unlooked(
    vol: &Volume,
    client: &Client,
    backing: VolumeBacking,
    secs: u64,
) -> Result<Action, Error> {
    let status = vol.status.clone().unwrap_or_default();
    let st = AgentStatus {
        backing: Some(backing),
        snapshots: status.snapshots,
        restored_from: status.restored_from,
    };
    write_status(vol, client, st).await?;
    Ok(Action::requeue(Duration::from_secs(secs)))
}

pub async fn reconcile<P: Pools, T: Targets>(
    vol: Arc<Volume>,
    ctx: Arc<StorageCtx<P, T>>,
) -> Result<Action, Error> {
    let Some(uid) = vol.metadata.uid.clone() else {
        return Ok(Action::await_change());
    };
    let status = vol.status.clone().unwrap_or_default();
    let Some(loc) = status.location.clone().filter(|l| l.host == ctx.host) else {
        return Ok(Action::await_change());
    };
    let Some(pool) = ctx
        .site()
        .await?
        .and_then(|s| s.spec.storage_pool(&loc.pool).cloned())
        .filter(|p| p.host == ctx.host)
    else {
        let msg = format!(
            "storage pool {:?} is no longer declared for host {} at Site {}",
            loc.pool, ctx.host, loc.site
        );
        let b = VolumeBacking {
            error: Some(msg),
            reason: Some(Reason::PoolNotFound),
            ..Default::default()
        };
        return unlooked(&vol, &ctx.client, b, 30).await;
    };
    let path = ctx.path(&pool);
    let deleting = vol.metadata.deletion_timestamp.is_some();
    // A pool that cannot be read (Ceph unreachable, no keyring, libvirt
    // gone) is the Volume's condition, not only a log line.
    let seen = match ctx.pools.observe(&pool).await {
        Ok(s) => s,
        Err(e) => {
            let b = VolumeBacking {
                error: Some(format!("pool {:?}: {e}", pool.name)),
                reason: Some(Reason::StorageFailed),
                ..status.backing.clone().unwrap_or_default()
            };
            return unlooked(&vol, &ctx.client, b, 15).await;
        }
    };
    let fmt = decide::Format::of(pool.type_);
    let file = decide::volume_file(&uid, fmt);
    let iqn = targets::target_iqn(&pool.name, &uid);
    let mut error = None;
    // An `iscsi` pool's targets (observed once per pass; `None` when they
    // could not be read): whether a guest uses this one now.
    let mut exported = None;
    if pool.type_ == PoolType::Iscsi {
        match ctx.targets.observe().await {
            Ok(t) => exported = Some(t),
            Err(e) => {
                error = Some((Reason::StorageFailed, format!("pool {:?}: {e}", pool.name)));
            }
        }
    }
    let seed = if seen.volumes.contains_key(&file) {
        None
    } else {
        match seed(&ctx.client, &vol, &pool.name, &ctx.host, fmt).await {
            Ok(s) => s,
            Err(e) => {
                error = Some(e);
                None
            }
        }
    };
    // A new volume from an image: the verified copy in the image cache,
    // held (never evicted) until the volume is made from it.
    let image = match vol.spec.source.as_ref().and_then(|s| s.image.as_ref()) {
        Some(img) if !seen.volumes.contains_key(&file) && error.is_none() => {
            match ctx.images.ensure(img).await {
                Ok(cached) => {
                    let path = cached.path.clone();
                    let size = tokio::task::spawn_blocking(move || {
                        use crate::compute::disks::Disks;
                        crate::compute::disks::Files.image_size(&path)
                    })
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r);
                    match size {
                        Ok(size) => Some((cached, size)),
                        Err(e) => {
                            error = Some((
                                Reason::ImagePullFailed,
                                format!("spec.source.image: reading the image: {e}"),
                            ));
                            None
                        }
                    }
                }
                Err(e) => {
                    error = Some((Reason::ImagePullFailed, format!("spec.source.image: {e}")));
                    None
                }
            }
        }
        _ => None,
    };
    let restore = vol
        .spec
        .restore_from
        .clone()
        .filter(|r| status.restored_from.as_ref() != Some(r));
    let want = VolumeWant {
        uid: uid.clone(),
        // What the controller granted within the namespace's quota, never
        // more than asked.
        bytes: parse_quantity(&vol.spec.size)
            .unwrap_or(0)
            .min(
                status
                    .granted
                    .as_ref()
                    .and_then(|g| parse_quantity(g).ok())
                    .unwrap_or(u64::MAX),
            )
            // Held read-only by guests: its size stays until they let go.
            .min(
                status
                    .backing
                    .as_ref()
                    .filter(|b| !status.readers.is_empty() && b.capacity_bytes > 0)
                    .map_or(u64::MAX, |b| b.capacity_bytes),
            ),
        // Never while a node may hold it: the claim is cleared only after
        // the node's agent reported the disk detached.
        delete: deleting && status.attached_to.is_none() && status.readers.is_empty(),
        snapshots: vol.spec.snapshots.iter().map(|s| s.name.clone()).collect(),
        restore: restore.clone(),
        attached: status.attached_to.is_some() || !status.readers.is_empty(),
        seed,
        image: image.as_ref().map(|(c, size)| (c.path.clone(), *size)),
        format: fmt,
        in_use: exported
            .iter()
            .flatten()
            .any(|t| t.iqn == iqn && !t.sessions.is_empty()),
    };
    if want.bytes == 0 && !want.delete {
        return Ok(Action::await_change());
    }
    let mut requeue = Duration::from_secs(60);
    let mut restored = false;
    let decided = match &error {
        Some(_) => Ok(vec![]),
        None => decide::volume_ops(&pool.name, &path, &seen, &want, promised(&seen, &file)),
    };
    match decided {
        Err(e) => {
            error = Some((e.reason(), e.to_string()));
            requeue = Duration::from_secs(30);
        }
        Ok(ops) => {
            // The file of an exported volume is replaced or removed: its
            // target goes first (tgt would serve the old file), and is
            // added again below if the volume stays.
            let replaced = ops
                .iter()
                .any(|op| matches!(op, decide::StorageOp::Delete { name } if name == &file));
            let mut ops = ops;
            if let Some(seen) = exported.as_mut()
                && (want.delete || replaced)
            {
                let mut removed = true;
                for op in targets::export_ops(seen, &iqn, None) {
                    if let Err(e) = ctx.targets.apply(op).await {
                        error = Some((Reason::StorageFailed, format!("iSCSI target: {e}")));
                        ops.clear();
                        removed = false;
                    }
                }
                if removed {
                    seen.retain(|t| t.iqn != iqn);
                }
            }
            for op in ops {
                let label = match &op {
                    decide::StorageOp::EnsurePool { .. } => "pool",
                    decide::StorageOp::Create { .. } => "create",
                    decide::StorageOp::Grow { .. } => "grow",
                    decide::StorageOp::Delete { .. } => "delete",
                    decide::StorageOp::Clone { name, .. } if name == &file => "copy",
                    decide::StorageOp::Clone { .. } => "snapshot",
                    decide::StorageOp::CopyImage { .. } => "image",
                };
                let grow = label == "grow";
                if label == "copy" && restore.is_some() {
                    restored = true;
                }
                match ctx.pools.apply(&pool, op).await {
                    Ok(()) => {
                        ctx.metrics
                            .storage_ops
                            .get_or_create(&OpLabel { op: label.into() })
                            .inc();
                        tracing::info!(volume = %vol.name_any(), op = label, "storage changed");
                        ctx.changed.notify_one();
                    }
                    // A running guest holds the file: its node's agent grows
                    // the disk through QEMU, and the next pass sees it.
                    Err(e) if grow && status.attached_to.is_some() => {
                        tracing::debug!(volume = %vol.name_any(), error = %e, "grow waits for the node's agent");
                        requeue = Duration::from_secs(3);
                        break;
                    }
                    // QEMU holds a running guest's file: a consistent copy
                    // is taken once it lets go (detached, or its node stopped).
                    Err(e) if label == "snapshot" && status.attached_to.is_some() => {
                        tracing::debug!(volume = %vol.name_any(), error = %e, "snapshot waits for the guest");
                        error = Some((
                            Reason::SnapshotPending,
                            "spec.snapshots: a snapshot waits while a running guest uses the volume; it is taken once the volume is detached or its node is stopped".to_string(),
                        ));
                        requeue = Duration::from_secs(5);
                        break;
                    }
                    Err(e) => {
                        restored = false;
                        error = Some((Reason::StorageFailed, format!("{label}: {e}")));
                        requeue = Duration::from_secs(15);
                        break;
                    }
                }
            }
        }
    }
    drop(image);
    let seen = ctx.pools.observe(&pool).await?;
    if want.delete {
        if !seen.volumes.contains_key(&file) && decide::snapshots_of(&seen, &uid).is_empty() {
            release_finalizer(&ctx.client, &vol, &ctx.host).await?;
            return Ok(Action::await_change());
        }
        requeue = Duration::from_secs(5);
    }
    let mut backing = decide::backing(&seen, &uid, fmt, error);
    // An RBD image is reached by its name, wherever the guest runs.
    if let (Some(c), Some(b)) = (&pool.ceph, backing.as_mut())
        && !b.path.is_empty()
    {
        b.rbd = Some(RbdImage {
            monitors: c.monitors.clone(),
            pool: c.pool.clone(),
            image: super::ceph::image_of(&file),
            user: c.user.clone(),
        });
    }
    if let Some(seen) = &exported
        && !want.delete
        && let Some(b) = backing.as_mut().filter(|b| !b.path.is_empty())
    {
        let holders: Vec<&str> = status
            .attached_to
            .iter()
            .chain(status.readers.iter())
            .filter_map(|a| a.host.as_deref())
            .collect();
        match export(&*ctx, seen, &iqn, &holders, b).await {
            Ok(()) => {}
            Err(e) => {
                b.reason.get_or_insert(Reason::StorageFailed);
                b.error.get_or_insert(format!("iSCSI target: {e}"));
                requeue = requeue.min(Duration::from_secs(10));
            }
        }
    }
    if backing
        .as_ref()
        .is_some_and(|b| b.capacity_bytes != want.bytes)
    {
        requeue = requeue.min(Duration::from_secs(5));
    }
    // The snapshots that exist, in the spec's order; when each was taken
    // (kept from the status once written).
    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
    let have = decide::snapshots_of(&seen, &uid);
    let snapshots = vol
        .spec
        .snapshots
        .iter()
        .filter_map(|s| {
            let (_, f) = have.iter().find(|(n, _)| *n == s.name)?;
            let bytes = seen.volumes.get(*f).map_or(0, |v| v.capacity);
            let created = status
                .snapshots
                .iter()
                .find(|o| o.name == s.name)
                .map_or(now.clone(), |o| o.created.clone());
            Some(SnapshotStatus {
                name: s.name.clone(),
                created,
                size: Quantity(bytes.to_string()),
            })
        })
        .collect();
    let restored_from = if restored {
        tracing::info!(volume = %vol.name_any(), snapshot = ?restore, "restored in place");
        restore
    } else {
        status.restored_from.clone()
    };
    write_status(
        &vol,
        &ctx.client,
        AgentStatus {
            backing,
            snapshots,
            restored_from,
        },
    )
    .await?;
    Ok(Action::requeue(requeue))
}

/// Export a volume's file as its iSCSI target (`seen`: the host's targets
/// as this pass left them), at its current size, to the holder's host or
/// the Site's hosts; `b.iscsi` says where once it is.
async fn export<P: Pools, T: Targets>(
    ctx: &StorageCtx<P, T>,
    seen: &[targets::TargetSeen],
    iqn: &str,
    holders: &[&str],
    b: &mut VolumeBacking,
) -> Result<(), String> {
    let portal = ctx
        .targets
        .portal()
        .ok_or_else(|| targets::TargetError::NotConfigured.to_string())?;
    let want = targets::Export {
        iqn: iqn.to_string(),
        path: b.path.clone(),
        bytes: b.capacity_bytes,
        acl: initiators(&ctx.client, &ctx.site, holders)
            .await
            .map_err(|e| e.to_string())?,
    };
    for op in targets::export_ops(seen, iqn, Some(&want)) {
        tracing::info!(?op, "iSCSI target changed");
        ctx.targets.apply(op).await.map_err(|e| e.to_string())?;
    }
    b.iscsi = Some(yukumo_api::volume::IscsiTarget {
        portal,
        iqn: iqn.to_string(),
        lun: 1,
    });
    Ok(())
}

async fn release_finalizer(client: &Client, vol: &Volume, host: &str) -> Result<(), Error> {
    let api: Api<Volume> = Api::namespaced(client.clone(), &vol.namespace().unwrap_or_default());
    let scope = format!("{}={host}", labels::STORAGE_HOST);
    if crate::finalizer::release(&api, vol, finalizers::STORAGE_CLEANUP, &scope).await? {
        tracing::info!(volume = %vol.name_any(), "storage removed; finalizer released");
    }
    Ok(())
}

pub fn error_policy<P: Pools, T: Targets>(
    vol: Arc<Volume>,
    err: &Error,
    _ctx: Arc<StorageCtx<P, T>>,
) -> Action {
    tracing::warn!(volume = %vol.name_any(), error = %err, "storage reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One report: every pool of this host into the Host's status, and the
/// files that carry yukumo's marker but have no Volume.
async fn report<P: Pools, T: Targets>(ctx: &StorageCtx<P, T>) -> Result<(), Error> {
    let Some(site) = ctx.site().await? else {
        return Ok(());
    };
    let vols = Api::<Volume>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&format!("{}={}", labels::STORAGE_HOST, ctx.host)))
        .await?;
    let known: HashSet<String> = vols
        .items
        .iter()
        .filter_map(|v| v.metadata.uid.clone())
        .collect();
    let mut out = Vec::new();
    let mut orphans = HashSet::new();
    for pool in site
        .spec
        .storage_pools
        .iter()
        .filter(|p| p.host == ctx.host)
    {
        let mut st = PoolStatus {
            name: pool.name.clone(),
            host: ctx.host.clone(),
            ..Default::default()
        };
        let path = ctx.path(pool);
        let mut seen = ctx.pools.observe(pool).await;
        if let Ok(s) = &seen
            && (!s.active || s.path != path)
        {
            // Made on first use; a pool nobody used yet is made now so its
            // capacity shows.
            seen = match ctx
                .pools
                .apply(pool, decide::StorageOp::EnsurePool { path })
                .await
            {
                Ok(()) => ctx.pools.observe(pool).await,
                Err(e) => Err(e),
            };
        }
        match seen {
            Ok(seen) => {
                st.capacity_bytes = seen.capacity;
                st.available_bytes = seen.available;
                for (n, v) in &seen.volumes {
                    if decide::file_uid(n).is_some() {
                        // Snapshots are full copies: they take their size too.
                        st.provisioned_bytes += v.capacity;
                        if !n.contains('@') {
                            st.volumes += 1;
                        }
                    }
                }
                for file in decide::orphans(&seen, &known) {
                    orphans.insert(format!("{}/{file}", pool.name));
                }
            }
            Err(e) => st.error = Some(e.to_string()),
        }
        out.push(st);
    }
    ctx.metrics.orphaned_volumes.set(orphans.len() as i64);
    let news = {
        let mut last = ctx.reported.lock().unwrap_or_else(|e| e.into_inner());
        let news: Vec<String> = orphans.difference(&last).cloned().collect();
        *last = orphans;
        news
    };
    let hosts: Api<Host> = Api::all(ctx.client.clone());
    let host = hosts.get_opt(&ctx.host).await?;
    if !news.is_empty() {
        let mut news = news;
        news.sort();
        let ev = Event {
            type_: EventType::Warning,
            reason: Reason::OrphanedStorage.to_string(),
            note: Some(format!(
                "storage with yukumo's marker but no Volume (kept; delete it by hand if it is not needed): {}",
                news.join(", ")
            )),
            action: "Report".into(),
            secondary: None,
        };
        if let Some(h) = &host
            && let Err(e) = ctx.recorder.publish(&ev, &h.object_ref(&())).await
        {
            tracing::warn!(error = %e, "failed to publish event");
        }
    }
    // Written only when it changed: a steady host makes no writes.
    let Some(host) = host else {
        return Ok(());
    };
    let old: &[PoolStatus] = host
        .status
        .as_ref()
        .map_or(&[], |s| s.storage_pools.as_slice());
    if !pools_changed(old, &out) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "Host",
        "status": { "storagePools": out },
    });
    hosts
        .patch_status(
            &ctx.host,
            &PatchParams::apply(managers::AGENT_STORAGE).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// Whether a pool report is news: anything but the space figures changed,
/// or free space moved by more than 1% of the pool (at least 64 MiB) — the
/// file system's churn alone makes no write.
fn pools_changed(old: &[PoolStatus], new: &[PoolStatus]) -> bool {
    if old.len() != new.len() {
        return true;
    }
    old.iter().zip(new).any(|(a, b)| {
        let slack = (b.capacity_bytes / 100).max(64 << 20);
        a.name != b.name
            || a.host != b.host
            || a.volumes != b.volumes
            || a.provisioned_bytes != b.provisioned_bytes
            || a.error != b.error
            || a.capacity_bytes.abs_diff(b.capacity_bytes) > slack
            || a.available_bytes.abs_diff(b.available_bytes) > slack
    })
}

/// The Volume reconciler and the pool report, until shutdown.
pub async fn run<P: Pools, T: Targets>(
    ctx: Arc<StorageCtx<P, T>>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Volume> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().labels(&format!("{}={}", labels::STORAGE_HOST, ctx.host));
    let reporter = {
        let (ctx, mut shutdown) = (ctx.clone(), shutdown.clone());
        // A pool declared, moved or removed on the Site is reported at once,
        // not at the next resync: the Site's spec changes wake the report.
        let mut site_specs = watcher(
            Api::<Site>::all(ctx.client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", ctx.site)),
        )
        .default_backoff()
        .applied_objects()
        .boxed();
        async move {
            let mut generation = None;
            loop {
                if let Err(e) = report(&ctx).await {
                    tracing::warn!(error = %e, "storage pool report failed");
                }
                let tick = tokio::time::sleep(every);
                tokio::pin!(tick);
                loop {
                    tokio::select! {
                        _ = &mut tick => break,
                        _ = ctx.changed.notified() => break,
                        _ = shutdown.changed() => return,
                        ev = site_specs.next() => match ev {
                            Some(Ok(site)) if site.metadata.generation != generation => {
                                let first = generation.is_none();
                                generation = site.metadata.generation;
                                if !first {
                                    break;
                                }
                            }
                            Some(_) => {}
                            // The watch ended (never, with a backoff): the resync stays.
                            None => tokio::time::sleep(every).await,
                        },
                    }
                }
            }
        }
    };
    let controller = Controller::new(api, cfg)
        .graceful_shutdown_on(async move {
            let _ = shutdown.changed().await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    tokio::join!(reporter, controller);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_churn_alone_is_not_news() {
        let p = |avail: u64, vols: u32| PoolStatus {
            name: "default".into(),
            host: "h1".into(),
            capacity_bytes: 100 << 30,
            available_bytes: avail,
            provisioned_bytes: 0,
            volumes: vols,
            error: None,
        };
        let old = [p(50 << 30, 1)];
        assert!(!pools_changed(&old, &[p((50 << 30) + (100 << 20), 1)]));
        assert!(pools_changed(&old, &[p(48 << 30, 1)]));
        assert!(pools_changed(&old, &[p(50 << 30, 2)]));
        assert!(pools_changed(&[], &[p(1, 0)]));
        assert!(!pools_changed(&[], &[]));
    }
}
