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
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use yukumo_api::host::Host;
use yukumo_api::quantity::parse_quantity;
use yukumo_api::site::{PoolStatus, Site, StoragePool};
use yukumo_api::volume::{Volume, VolumeBacking};
use yukumo_api::{Reason, finalizers, labels, managers};

use super::decide::{self, VolumeWant};
use super::pools::Pools;
use crate::hypervisor::HypervisorError;
use crate::register::{Metrics, OpLabel};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Hypervisor(#[from] HypervisorError),
}

pub struct StorageCtx<P: Pools> {
    pub client: Client,
    pub host: String,
    pub site: String,
    pub pools: P,
    pub state_dir: PathBuf,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The orphans last reported (an Event only when the set changes).
    reported: std::sync::Mutex<HashSet<String>>,
    /// Wakes the pool report after a change of the pool.
    changed: tokio::sync::Notify,
}

impl<P: Pools> StorageCtx<P> {
    pub fn new(
        client: Client,
        pools: P,
        host: &str,
        site: &str,
        state_dir: PathBuf,
        metrics: Metrics,
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
            state_dir,
            metrics,
            reported: Default::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The folder of a pool of this host.
    fn path(&self, pool: &StoragePool) -> String {
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

async fn write_backing(
    vol: &Volume,
    client: &Client,
    b: Option<VolumeBacking>,
) -> Result<(), Error> {
    if vol.status.as_ref().and_then(|s| s.backing.as_ref()) == b.as_ref() {
        return Ok(());
    }
    let api: Api<Volume> = Api::namespaced(client.clone(), &vol.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "Volume",
        "status": { "backing": b },
    });
    api.patch_status(
        &vol.name_any(),
        &PatchParams::apply(managers::AGENT_STORAGE).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

pub async fn reconcile<P: Pools>(
    vol: Arc<Volume>,
    ctx: Arc<StorageCtx<P>>,
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
        write_backing(&vol, &ctx.client, Some(b)).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let path = ctx.path(&pool);
    let deleting = vol.metadata.deletion_timestamp.is_some();
    let want = VolumeWant {
        uid: uid.clone(),
        bytes: parse_quantity(&vol.spec.size).unwrap_or(0),
        // Never while a node may hold it: the claim is cleared only after
        // the node's agent reported the disk detached.
        delete: deleting && status.attached_to.is_none(),
    };
    if want.bytes == 0 && !want.delete {
        return Ok(Action::await_change());
    }
    let seen = ctx.pools.observe(&pool.name).await?;
    let file = decide::volume_file(&uid);
    let mut error = None;
    let mut requeue = Duration::from_secs(60);
    match decide::volume_ops(&pool.name, &path, &seen, &want, promised(&seen, &file)) {
        Err(e) => {
            error = Some((e.reason(), e.to_string()));
            requeue = Duration::from_secs(30);
        }
        Ok(ops) => {
            for op in ops {
                let label = match &op {
                    decide::StorageOp::EnsurePool { .. } => "pool",
                    decide::StorageOp::Create { .. } => "create",
                    decide::StorageOp::Grow { .. } => "grow",
                    decide::StorageOp::Delete { .. } => "delete",
                };
                let grow = label == "grow";
                match ctx.pools.apply(&pool.name, op).await {
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
                    Err(e) => {
                        error = Some((Reason::StorageFailed, format!("{label}: {e}")));
                        requeue = Duration::from_secs(15);
                        break;
                    }
                }
            }
        }
    }
    let seen = ctx.pools.observe(&pool.name).await?;
    if want.delete {
        if !seen.volumes.contains_key(&file) {
            release_finalizer(&ctx.client, &vol).await?;
            return Ok(Action::await_change());
        }
        requeue = Duration::from_secs(5);
    }
    let backing = decide::backing(&seen, &uid, error);
    if backing
        .as_ref()
        .is_some_and(|b| b.capacity_bytes != want.bytes)
    {
        requeue = requeue.min(Duration::from_secs(5));
    }
    write_backing(&vol, &ctx.client, backing).await?;
    Ok(Action::requeue(requeue))
}

async fn release_finalizer(client: &Client, vol: &Volume) -> Result<(), Error> {
    let api: Api<Volume> = Api::namespaced(client.clone(), &vol.namespace().unwrap_or_default());
    let Some(patch) = finalizers::removal_patch(
        vol.finalizers(),
        finalizers::STORAGE_CLEANUP,
        vol.resource_version(),
    ) else {
        return Ok(());
    };
    match api
        .patch(
            &vol.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(volume = %vol.name_any(), "storage removed; finalizer released");
            Ok(())
        }
        // Gone, or changed since read: the next pass (a watch event) retries.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn error_policy<P: Pools>(vol: Arc<Volume>, err: &Error, _ctx: Arc<StorageCtx<P>>) -> Action {
    tracing::warn!(volume = %vol.name_any(), error = %err, "storage reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One report: every pool of this host into the Host's status, and the
/// files that carry yukumo's marker but have no Volume.
async fn report<P: Pools>(ctx: &StorageCtx<P>) -> Result<(), Error> {
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
        let mut seen = ctx.pools.observe(&pool.name).await;
        if let Ok(s) = &seen
            && (!s.active || s.path != path)
        {
            // Made on first use; a pool nobody used yet is made now so its
            // capacity shows.
            seen = match ctx
                .pools
                .apply(&pool.name, decide::StorageOp::EnsurePool { path })
                .await
            {
                Ok(()) => ctx.pools.observe(&pool.name).await,
                Err(e) => Err(e),
            };
        }
        match seen {
            Ok(seen) => {
                st.capacity_bytes = seen.capacity;
                st.available_bytes = seen.available;
                for (n, v) in &seen.volumes {
                    if decide::file_uid(n).is_some() {
                        st.volumes += 1;
                        st.provisioned_bytes += v.capacity;
                    }
                }
                for uid in decide::orphans(&seen, &known) {
                    orphans.insert(format!("{}/{}", pool.name, decide::volume_file(uid)));
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
    if host.status.as_ref().map(|s| &s.storage_pools) == Some(&out)
        || (out.is_empty()
            && host
                .status
                .as_ref()
                .is_none_or(|s| s.storage_pools.is_empty()))
    {
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

/// The Volume reconciler and the pool report, until shutdown.
pub async fn run<P: Pools>(
    ctx: Arc<StorageCtx<P>>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Volume> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().labels(&format!("{}={}", labels::STORAGE_HOST, ctx.host));
    let reporter = {
        let (ctx, mut shutdown) = (ctx.clone(), shutdown.clone());
        async move {
            loop {
                if let Err(e) = report(&ctx).await {
                    tracing::warn!(error = %e, "storage pool report failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = ctx.changed.notified() => {}
                    _ = shutdown.changed() => return,
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
