//! The resync of the compute reconciler: libvirt's domain lifecycle
//! events (a domain stopped, crashed or undefined by hand) queue the node
//! whose uid is the domain's UUID at once; the periodic resync is the
//! backstop (events lost across a reconnect trigger an immediate resync)
//! and sweeps orphans. Level-triggered both ways: a domain carrying
//! yukumo's marker whose VirtualNode is gone is destroyed with its files;
//! nothing without the marker is touched.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::{mpsc, watch};
use yukumo_api::labels;
use yukumo_api::virtualnode::VirtualNode;

use super::domain::NodePaths;
use super::domains::Domains;
use super::reconcile::{ComputeCtx, error_policy, reconcile};
use crate::hypervisor::{HvEvent, Lifecycle};
use crate::register::EventLabel;

/// One pass of the resync: two libvirt calls list every domain (active and
/// inactive); nodes whose domain is missing or in the wrong power state are
/// queued; yukumo-marked domains whose node is gone are removed. True when
/// the pass listed both and removed every such domain (the sweep is done).
async fn resync<D: Domains>(
    ctx: &ComputeCtx<D>,
    tx: &mpsc::UnboundedSender<ObjectRef<VirtualNode>>,
    full: bool,
) -> bool {
    // An authoritative list (one read) rather than the watch cache: an orphan
    // sweep must never act on a cache that is still filling.
    let api = Api::<VirtualNode>::all(ctx.client.clone());
    let lp = kube::api::ListParams::default().labels(&format!("{}={}", labels::HOST, ctx.host));
    let nodes = match api.list(&lp).await {
        Ok(l) => l.items,
        Err(e) => {
            tracing::warn!(error = %e, "resync: cannot list VirtualNodes");
            return false;
        }
    };
    let domains = match ctx.domains.list().await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "resync: cannot list domains");
            return false;
        }
    };
    // Images the nodes here refer to stay cached; then bound the cache.
    ctx.images.set_wanted(
        nodes
            .iter()
            .filter(|vn| vn.spec.host.as_deref() == Some(ctx.host.as_str()))
            .map(|vn| &vn.spec.image),
    );
    if let Err(e) = ctx.images.evict().await {
        tracing::warn!(error = %e, "resync: image cache eviction failed");
    }
    let mut wanted = HashSet::new();
    for vn in &nodes {
        let Some(uid) = vn.metadata.uid.clone() else {
            continue;
        };
        if vn.spec.host.as_deref() != Some(ctx.host.as_str()) {
            continue;
        }
        wanted.insert(uid.clone());
        let drift = match domains.get(&uid) {
            None => vn.spec.running,
            Some(d) => d.active != vn.spec.running,
        };
        if full {
            // A forced full resync reconciles every node (with nothing to
            // do, that is reads only).
            let _ = tx.send(ObjectRef::from_obj(vn));
        } else if drift && vn.metadata.deletion_timestamp.is_none() {
            tracing::info!(node = %vn.name_any(), "resync: domain missing or in the wrong power state");
            let _ = tx.send(ObjectRef::from_obj(vn));
        }
    }
    for uid in stale_node_dirs(ctx, &wanted, Duration::from_secs(15)) {
        if !domains.contains_key(&uid) {
            tracing::info!(%uid, "removing files of a node that is gone");
            let paths = NodePaths::new(&ctx.state_dir, &uid);
            let _ = std::fs::remove_file(&paths.control_socket);
            let _ = std::fs::remove_file(&paths.console_socket);
            if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
                tracing::warn!(%uid, error = %e, "cannot remove node files");
            }
        }
    }
    let mut swept = true;
    for (uid, d) in &domains {
        if wanted.contains(uid) || !d.name.starts_with("yk-") {
            continue;
        }
        // Confirm yukumo's marker before removing anything.
        match ctx.domains.marked(uid).await {
            Ok(true) => {
                tracing::info!(domain = %d.name, "removing orphaned domain (its VirtualNode is gone)");
                if let Err(e) = ctx.remove_node(uid).await {
                    tracing::warn!(domain = %d.name, error = %e, "orphan removal failed");
                    swept = false;
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(domain = %d.name, error = %e, "cannot read the domain's marker");
                swept = false;
            }
        }
    }
    swept
}

/// Node directories (under `<state>/nodes`) of nodes that are not wanted and
/// older than `min_age` (a node being created right now is never swept).
fn stale_node_dirs<D: Domains>(
    ctx: &ComputeCtx<D>,
    wanted: &HashSet<String>,
    min_age: Duration,
) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(ctx.state_dir.join("nodes")) else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let uid = e.file_name().to_string_lossy().to_string();
            let old = e.metadata().ok()?.modified().ok()?.elapsed().ok()? >= min_age;
            (!wanted.contains(&uid) && old).then_some(uid)
        })
        .collect()
}

/// Whether a lifecycle event may mean the domain no longer matches its node:
/// stopped, shut down, crashed, undefined or paused (by hand, or by the
/// agent itself, which a reconcile confirms at once). `started`, `defined`
/// and `resumed` follow the agent's own start, where a reconcile right away
/// would only race the watch with a stale object; a domain started by hand
/// is the resync's.
fn needs_reconcile(event: Lifecycle) -> bool {
    matches!(
        event,
        Lifecycle::Stopped
            | Lifecycle::Shutdown
            | Lifecycle::Crashed
            | Lifecycle::Undefined
            | Lifecycle::Suspended
            | Lifecycle::PmSuspended
    )
}

/// Turn libvirt events into reconcile requests: a domain's UUID is its
/// VirtualNode's uid, looked up in the controller's cache of the nodes
/// placed here (a domain of no such node is the resync's to sweep).
async fn forward_events<D: Domains>(
    ctx: Arc<ComputeCtx<D>>,
    mut events: mpsc::UnboundedReceiver<HvEvent>,
    store: kube::runtime::reflector::Store<VirtualNode>,
    tx: mpsc::UnboundedSender<ObjectRef<VirtualNode>>,
    resync_now: Arc<tokio::sync::Notify>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            HvEvent::Lifecycle {
                uuid,
                event,
                detail,
            } => {
                ctx.metrics
                    .libvirt_events
                    .get_or_create(&EventLabel {
                        event: event.as_str().into(),
                    })
                    .inc();
                let node = store.find(|vn| vn.metadata.uid.as_deref() == Some(uuid.as_str()));
                match node {
                    Some(vn) if needs_reconcile(event) => {
                        tracing::info!(
                            node = %vn.name_any(),
                            event = event.as_str(),
                            detail,
                            "libvirt domain event; reconciling"
                        );
                        let _ = tx.send(ObjectRef::from_obj(&*vn));
                    }
                    _ => tracing::debug!(
                        %uuid,
                        event = event.as_str(),
                        detail,
                        known = node.is_some(),
                        "libvirt domain event"
                    ),
                }
            }
            HvEvent::Reconnected => {
                tracing::info!("libvirt reconnected; resyncing now (events may have been missed)");
                resync_now.notify_one();
            }
        }
    }
}

/// Run the reconciler for the VirtualNodes placed on this host until
/// shutdown; `events` (libvirt's domain events) queue nodes between resyncs.
/// `swept` turns true after the first pass that removed every domain here
/// whose node is no longer this host's (the heartbeat reports the host's
/// hypervisor ready only from then on), and stays true.
pub async fn run<D: Domains>(
    ctx: Arc<ComputeCtx<D>>,
    resync_every: Duration,
    events: Option<mpsc::UnboundedReceiver<HvEvent>>,
    swept: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api = Api::<VirtualNode>::all(ctx.client.clone());
    let wc = watcher::Config::default().labels(&format!("{}={}", labels::HOST, ctx.host));
    // The cache keeps no managedFields: nothing reads them, and they are
    // most of a VirtualNode's size.
    let (store, writer) = reflector::store();
    let nodes = watcher(api, wc)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    let controller = Controller::for_stream(nodes, store);
    let (tx, rx) = mpsc::unbounded_channel();
    let resync_now = Arc::new(tokio::sync::Notify::new());
    let events_task = events.map(|events| {
        tokio::spawn(forward_events(
            ctx.clone(),
            events,
            controller.store(),
            tx.clone(),
            resync_now.clone(),
        ))
    });
    let resync_ctx = ctx.clone();
    let mut resync_shutdown = shutdown.clone();
    let resync_task = tokio::spawn(async move {
        tracing::info!(every = ?resync_every, "resync of domains started");
        // SIGHUP forces a full resync: every node of this host is reconciled.
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut full = false;
        loop {
            // Until the first sweep is done, retried every few seconds.
            let done = resync(&resync_ctx, &tx, full).await;
            if done && !*swept.borrow() {
                tracing::info!("first sweep of stale domains done");
                swept.send_replace(true);
            }
            let wait = if *swept.borrow() {
                resync_every
            } else {
                resync_every.min(Duration::from_secs(3))
            };
            if full {
                resync_ctx.metrics.full_resyncs.inc();
            }
            full = false;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = resync_now.notified() => {}
                Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: full resync");
                    full = true;
                }
                _ = resync_shutdown.wait_for(|s| *s) => break,
            }
        }
    });
    controller
        .reconcile_on(tokio_stream_from(rx))
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    resync_task.abort();
    if let Some(t) = events_task {
        t.abort();
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_that_queue_a_reconcile() {
        for e in [
            Lifecycle::Stopped,
            Lifecycle::Crashed,
            Lifecycle::Undefined,
            Lifecycle::Shutdown,
        ] {
            assert!(needs_reconcile(e), "{e:?}");
        }
        for e in [Lifecycle::Started, Lifecycle::Defined, Lifecycle::Resumed] {
            assert!(!needs_reconcile(e), "{e:?}");
        }
    }
}
