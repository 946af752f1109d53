//! The agent's VirtualNode reconciler: image, disks, config disk, domain,
//! power, status — and the resync that notices drift and sweeps orphans.
//!
//! libvirt's domain lifecycle events (a domain stopped, crashed or undefined
//! by hand) queue the node whose uid is the domain's UUID at once; the
//! periodic resync is the backstop (events lost across a reconnect trigger
//! an immediate resync).
//!
//! Level-triggered both ways: what a VirtualNode placed here asks for is
//! created; a domain carrying yukumo's marker whose VirtualNode is gone is
//! destroyed with its files; nothing without the marker is touched.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};
use virt::domain::Domain;
use yukumo_api::common::{Condition, ConditionStatus, Conditions, condition_types as ct};
use yukumo_api::virtualnode::{NodePhase, VirtualNode, VirtualNodeStatus};
use yukumo_api::{finalizers, labels, managers};
use yukumo_telemetry::Health;

use super::domain::{self, NodePaths};
use super::guestconfig;
use super::images::{ImageCache, ImageError};
use crate::Args;
use crate::hypervisor::{HvEvent, Hypervisor, HypervisorError, Lifecycle};
use crate::register::{EventLabel, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Hypervisor(#[from] HypervisorError),
    #[error("disk preparation: {0}")]
    Disk(String),
    #[error("object has no {0}")]
    Missing(&'static str),
}

/// Shared state of the compute reconciler.
pub struct ComputeCtx {
    pub client: Client,
    pub host: String,
    pub hv: Hypervisor,
    pub images: ImageCache,
    pub state_dir: PathBuf,
    pub domain_type: String,
    pub recorder: Recorder,
    pub health: Health,
    pub metrics: Metrics,
    /// Boot times this agent wrote, by node uid: the watch cache may hand a
    /// reconcile an object older than our last status write, and a boot time
    /// must never be lost to that race. (The API keeps it across restarts.)
    boot_times: std::sync::Mutex<HashMap<String, Time>>,
    /// The host's network (None: networking is not managed here).
    pub net: Option<Arc<crate::network::NetState>>,
}

impl ComputeCtx {
    pub fn new(
        client: Client,
        hv: Hypervisor,
        args: &Args,
        metrics: &Metrics,
        health: Health,
        net: Option<Arc<crate::network::NetState>>,
    ) -> std::io::Result<Arc<Self>> {
        let reporter = Reporter {
            controller: managers::AGENT.into(),
            instance: Some(args.host_name.clone()),
        };
        Ok(Arc::new(ComputeCtx {
            recorder: Recorder::new(client.clone(), reporter),
            images: ImageCache::new(
                &args.state_dir,
                args.image_cache_max_bytes,
                metrics.images.clone(),
            )?,
            client,
            host: args.host_name.clone(),
            hv,
            state_dir: args.state_dir.clone(),
            domain_type: args.domain_type.clone(),
            health,
            metrics: metrics.clone(),
            boot_times: Default::default(),
            net,
        }))
    }

    async fn event(&self, vn: &VirtualNode, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &vn.object_ref(&())).await {
            tracing::warn!(error = %e, "failed to publish event");
        }
    }

    /// Mark the node Failed with `reason`, and publish a Warning Event when
    /// that is news (the condition changed), not on every retry.
    async fn report_failure(
        &self,
        vn: &VirtualNode,
        reason: &str,
        message: String,
    ) -> Result<(), Error> {
        let status = status_with(vn, NodePhase::Failed, (false, reason, message.clone()));
        let changed = vn.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions);
        self.write_status(
            vn,
            &VirtualNodeStatus {
                last_error: Some(message.clone()),
                ..status
            },
        )
        .await?;
        if changed {
            self.event(vn, EventType::Warning, reason, message).await;
        }
        Ok(())
    }

    async fn write_status(
        &self,
        vn: &VirtualNode,
        status: &VirtualNodeStatus,
    ) -> Result<(), Error> {
        if vn.status.as_ref() == Some(status) {
            return Ok(());
        }
        let api: Api<VirtualNode> =
            Api::namespaced(self.client.clone(), &vn.namespace().unwrap_or_default());
        let patch = yukumo_api::status_apply_patch::<VirtualNode, _>(status);
        api.patch_status(
            &vn.name_any(),
            &PatchParams::apply(managers::AGENT).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }
}

fn status_with(
    vn: &VirtualNode,
    phase: NodePhase,
    ready: (bool, &str, String),
) -> VirtualNodeStatus {
    let old = vn.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    conditions.set_condition(Condition::new(
        ct::READY,
        ConditionStatus::from_bool(ready.0),
        ready.1,
        ready.2,
        vn.metadata.generation,
    ));
    VirtualNodeStatus {
        observed_generation: vn.metadata.generation,
        conditions,
        phase,
        host: vn.spec.host.clone(),
        ..old
    }
}

/// Create the overlay disk on the cached image (once; it holds the guest's writes).
fn ensure_root_disk(
    paths: &NodePaths,
    image: &std::path::Path,
    format: &str,
    size: u64,
) -> Result<(), Error> {
    if paths.root_disk.exists() {
        return Ok(());
    }
    let tmp = paths.root_disk.with_extension("qcow2.tmp");
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(image)
        .arg(&tmp);
    if size > 0 {
        cmd.arg(size.to_string());
    }
    let out = cmd
        .output()
        .map_err(|e| Error::Disk(format!("running qemu-img: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Disk(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &paths.root_disk).map_err(|e| Error::Disk(e.to_string()))
}

/// Write the config disk when its content changed.
fn ensure_config_disk(paths: &NodePaths, vn: &VirtualNode) -> Result<(), Error> {
    let cfg = guestconfig::render(vn);
    let stamp = paths.dir.join("cidata.content");
    let content = format!(
        "{}\0{}\0{}",
        cfg.meta_data, cfg.user_data, cfg.network_config
    );
    if paths.config_iso.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(content.as_str())
    {
        return Ok(());
    }
    guestconfig::write_iso(&cfg, &paths.config_iso).map_err(|e| Error::Disk(e.to_string()))?;
    std::fs::write(&stamp, content).map_err(|e| Error::Disk(e.to_string()))
}

/// What the domain step did.
struct DomainOutcome {
    active: bool,
    started: bool,
    defined: bool,
    /// The mutating libvirt calls made.
    ops: Vec<&'static str>,
}

/// Remove a domain (by UUID) and its files. Idempotent.
async fn remove_node(ctx: &ComputeCtx, uid: &str) -> Result<(), Error> {
    let id = uid.to_string();
    let ops = ctx
        .hv
        .call(move |c| {
            let mut ops = Vec::new();
            if let Ok(d) = Domain::lookup_by_uuid_string(c, &id) {
                if d.is_active().unwrap_or(false) {
                    d.destroy()?;
                    ops.push("destroy");
                }
                d.undefine()?;
                ops.push("undefine");
            }
            Ok(ops)
        })
        .await?;
    ctx.metrics.mutated(&ops);
    ctx.boot_times
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
    let paths = NodePaths::new(&ctx.state_dir, uid);
    let _ = std::fs::remove_file(&paths.control_socket);
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir).map_err(|e| Error::Disk(e.to_string()))?;
    }
    Ok(())
}

/// Once the host holds nothing of a deleted node, let the deletion finish:
/// remove the host-cleanup finalizer (the only change of a VirtualNode
/// outside its status that the agent may make; an admission policy refuses
/// any other).
async fn release_finalizer(ctx: &ComputeCtx, vn: &VirtualNode) -> Result<(), Error> {
    let api: Api<VirtualNode> =
        Api::namespaced(ctx.client.clone(), &vn.namespace().unwrap_or_default());
    let mut current = vn.clone();
    // The cached object may be stale: on a conflict, read it and try again.
    for _ in 0..3 {
        let Some(patch) = finalizers::removal_patch(
            current.finalizers(),
            finalizers::HOST_CLEANUP,
            current.resource_version(),
        ) else {
            return Ok(());
        };
        match api
            .patch(
                &vn.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(node = %vn.name_any(), "host cleaned up; finalizer released");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&vn.name_any()).await? {
                Some(fresh) => current = fresh,
                None => return Ok(()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub async fn reconcile(vn: Arc<VirtualNode>, ctx: Arc<ComputeCtx>) -> Result<Action, Error> {
    ctx.health
        .beat("compute-reconcile", Duration::from_secs(600));
    let uid = vn
        .metadata
        .uid
        .clone()
        .ok_or(Error::Missing("metadata.uid"))?;
    if vn.metadata.deletion_timestamp.is_some()
        || vn.spec.host.as_deref() != Some(ctx.host.as_str())
    {
        remove_node(&ctx, &uid).await?;
        if vn.metadata.deletion_timestamp.is_some() {
            release_finalizer(&ctx, &vn).await?;
        }
        return Ok(Action::await_change());
    }
    // A node that should not run and has no domain yet is simply off: its
    // image and disks are prepared when it is first asked to run.
    if !vn.spec.running {
        let id = uid.clone();
        let defined = ctx
            .hv
            .call(move |c| Ok(Domain::lookup_by_uuid_string(c, &id).is_ok()))
            .await?;
        if !defined {
            let status = status_with(
                &vn,
                NodePhase::Stopped,
                (false, "Stopped", "powered off; not yet created".into()),
            );
            ctx.write_status(
                &vn,
                &VirtualNodeStatus {
                    last_error: None,
                    boot_time: None,
                    ..status
                },
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    }
    let paths = NodePaths::new(&ctx.state_dir, &uid);
    // The image first (it may take long); the node's directory, disks and
    // domain then follow within moments, so the sweep's age guard holds.
    let image = match ctx.images.ensure(&vn.spec.image).await {
        Ok(p) => p,
        Err(e) => {
            let reason = match e {
                ImageError::Io(_) => "ImageCacheError",
                _ => "ImagePullFailed",
            };
            ctx.report_failure(&vn, reason, e.to_string()).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let format = match vn.spec.image.format {
        yukumo_api::common::ImageFormat::Qcow2 => "qcow2",
        yukumo_api::common::ImageFormat::Raw => "raw",
    };
    // The disks are made by child processes (qemu-img, genisoimage): on the
    // blocking pool, so heartbeats and other nodes' reconciles never wait.
    // Holding `image` keeps it from eviction until the overlay on it exists.
    {
        let (paths, vn, size) = (paths.clone(), vn.clone(), vn.spec.disk_bytes);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&paths.dir).map_err(|e| Error::Disk(e.to_string()))?;
            if let Some(d) = paths.control_socket.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::Disk(e.to_string()))?;
            }
            ensure_root_disk(&paths, &image.path, format, size)?;
            drop(image);
            ensure_config_disk(&paths, &vn)
        })
        .await
        .map_err(|e| Error::Disk(format!("disk preparation task: {e}")))??;
    }

    // A guest joins its group's bridge: wait for the network reconciler to
    // have made it (it runs on the same change of the node).
    if let (Some(net), Some(n), Some(bridge)) = (
        &ctx.net,
        &vn.spec.network,
        vn.spec
            .network
            .as_ref()
            .and_then(|n| crate::network::plan::bridge_of_segment(&n.segment)),
    ) && vn.spec.running
        && !net.has_bridge(&bridge)
    {
        tracing::debug!(node = %vn.name_any(), group = %n.group, "waiting for the group's bridge");
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let (xml, hash) = domain::render(&vn, &paths, &ctx.domain_type);
    let running = vn.spec.running;
    let (id, dname) = (
        uid.clone(),
        domain::domain_name(&vn.namespace().unwrap_or_default(), &vn.name_any()),
    );
    let outcome = ctx
        .hv
        .call(move |c| {
            let mut defined = false;
            let mut ops = Vec::new();
            let dom = match Domain::lookup_by_uuid_string(c, &id) {
                Ok(d) => {
                    let current = d.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                    if domain::marker(&current).map(|m| m.3) != Some(hash.clone()) {
                        defined = true;
                        Domain::define_xml(c, &xml)?
                    } else {
                        d
                    }
                }
                Err(_) => {
                    // A stale domain of the same name (a deleted node recreated
                    // under its name) is yukumo's to remove, never to adopt.
                    if let Ok(old) = Domain::lookup_by_name(c, &dname) {
                        let old_xml = old.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                        if domain::marker(&old_xml).is_some_and(|m| m.0 != id) {
                            if old.is_active()? {
                                old.destroy()?;
                                ops.push("destroy");
                            }
                            old.undefine()?;
                            ops.push("undefine");
                        }
                    }
                    defined = true;
                    Domain::define_xml(c, &xml)?
                }
            };
            let mut active = dom.is_active()?;
            let mut started = false;
            if defined {
                ops.push("define");
            }
            if running && !active {
                dom.create()?;
                ops.push("start");
                started = true;
                active = true;
            } else if !running && active {
                dom.destroy()?;
                ops.push("destroy");
                active = false;
            }
            Ok(DomainOutcome {
                active,
                started,
                defined,
                ops,
            })
        })
        .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            ctx.report_failure(&vn, "DomainFailed", e.to_string())
                .await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    };
    ctx.metrics.mutated(&outcome.ops);
    if outcome.defined {
        tracing::info!(node = %vn.name_any(), "domain defined");
    }
    if outcome.started {
        tracing::info!(node = %vn.name_any(), "domain started");
        // The first boot is in the status; a start of a node that had booted
        // before (found stopped or crashed, or powered on again) is news.
        if vn.status.as_ref().is_some_and(|s| s.boot_time.is_some())
            || vn
                .status
                .as_ref()
                .is_some_and(|s| s.phase == NodePhase::Stopped)
        {
            ctx.event(
                &vn,
                EventType::Normal,
                "Started",
                format!("domain started again on {}", ctx.host),
            )
            .await;
        }
    }
    let (phase, ready) = if outcome.active {
        (
            NodePhase::Running,
            (true, "Running", format!("running on {}", ctx.host)),
        )
    } else {
        (
            NodePhase::Stopped,
            (false, "Stopped", "powered off as requested".to_string()),
        )
    };
    let old_boot = vn.status.as_ref().and_then(|s| s.boot_time.clone());
    let boot_time = boot_time(&ctx.boot_times, &uid, &outcome, old_boot);
    let status = VirtualNodeStatus {
        domain_uuid: Some(uid.clone()),
        boot_time,
        last_error: None,
        ..status_with(&vn, phase, ready)
    };
    ctx.write_status(&vn, &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The boot time to report: now for a domain just started, else the one this
/// agent wrote last (a reconcile soon after a start may see a cached object
/// without it), else the object's; none for a domain that is off.
fn boot_time(
    written: &std::sync::Mutex<HashMap<String, Time>>,
    uid: &str,
    outcome: &DomainOutcome,
    old_boot: Option<Time>,
) -> Option<Time> {
    let mut written = written.lock().unwrap_or_else(|e| e.into_inner());
    if outcome.started {
        // Whole seconds, as the API stores them: a finer time would never
        // equal the stored one and cost a second, no-op status write.
        let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
        written.insert(uid.to_string(), now.clone());
        Some(now)
    } else if outcome.active {
        written.get(uid).cloned().or(old_boot)
    } else {
        written.remove(uid);
        None
    }
}

pub fn error_policy(vn: Arc<VirtualNode>, err: &Error, _ctx: Arc<ComputeCtx>) -> Action {
    tracing::warn!(node = %vn.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One pass of the resync: two libvirt calls list every domain (active and
/// inactive); nodes whose domain is missing or in the wrong power state are
/// queued; yukumo-marked domains whose node is gone are removed.
async fn resync(ctx: &ComputeCtx, tx: &mpsc::UnboundedSender<ObjectRef<VirtualNode>>, full: bool) {
    // An authoritative list (one read) rather than the watch cache: an orphan
    // sweep must never act on a cache that is still filling.
    let api = Api::<VirtualNode>::all(ctx.client.clone());
    let lp = kube::api::ListParams::default().labels(&format!("{}={}", labels::HOST, ctx.host));
    let nodes = match api.list(&lp).await {
        Ok(l) => l.items,
        Err(e) => {
            tracing::warn!(error = %e, "resync: cannot list VirtualNodes");
            return;
        }
    };
    let listed = ctx
        .hv
        .call(|c| {
            let active = c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?;
            let inactive = c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)?;
            let mut out = HashMap::new();
            for (doms, is_active) in [(active, true), (inactive, false)] {
                for d in doms {
                    out.insert(d.get_uuid_string()?, (d.get_name()?, is_active));
                }
            }
            Ok(out)
        })
        .await;
    let domains = match listed {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "resync: cannot list domains");
            return;
        }
    };
    // Images the nodes here refer to stay cached; then bound the cache.
    ctx.images.set_wanted(
        nodes
            .iter()
            .filter(|vn| vn.spec.host.as_deref() == Some(ctx.host.as_str()))
            .map(|vn| vn.spec.image.checksum.as_str()),
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
            Some((_, active)) => *active != vn.spec.running,
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
            if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
                tracing::warn!(%uid, error = %e, "cannot remove node files");
            }
        }
    }
    for (uid, (name, _)) in &domains {
        if wanted.contains(uid) || !name.starts_with("yk-") {
            continue;
        }
        // Confirm yukumo's marker before removing anything.
        let id = uid.clone();
        let marked = ctx
            .hv
            .call(move |c| {
                let d = Domain::lookup_by_uuid_string(c, &id)?;
                Ok(domain::marker(&d.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?).is_some())
            })
            .await
            .unwrap_or(false);
        if marked {
            tracing::info!(domain = %name, "removing orphaned domain (its VirtualNode is gone)");
            if let Err(e) = remove_node(ctx, uid).await {
                tracing::warn!(domain = %name, error = %e, "orphan removal failed");
            }
        }
    }
}

/// Node directories (under `<state>/nodes`) of nodes that are not wanted and
/// older than `min_age` (a node being created right now is never swept).
fn stale_node_dirs(ctx: &ComputeCtx, wanted: &HashSet<String>, min_age: Duration) -> Vec<String> {
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
async fn forward_events(
    ctx: Arc<ComputeCtx>,
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
pub async fn run(
    ctx: Arc<ComputeCtx>,
    resync_every: Duration,
    events: Option<mpsc::UnboundedReceiver<HvEvent>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api = Api::<VirtualNode>::all(ctx.client.clone());
    let wc = watcher::Config::default().labels(&format!("{}={}", labels::HOST, ctx.host));
    let controller = Controller::new(api, wc);
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
            resync(&resync_ctx, &tx, full).await;
            if full {
                resync_ctx.metrics.full_resyncs.inc();
            }
            full = false;
            tokio::select! {
                _ = tokio::time::sleep(resync_every) => {}
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

    fn outcome(active: bool, started: bool) -> DomainOutcome {
        DomainOutcome {
            active,
            started,
            defined: false,
            ops: vec![],
        }
    }

    #[test]
    fn a_boot_time_written_survives_a_stale_object() {
        let written = std::sync::Mutex::default();
        let old = Some(Time(Timestamp::UNIX_EPOCH));
        let started = boot_time(&written, "u", &outcome(true, true), old.clone());
        assert!(started.is_some() && started != old);
        // A reconcile right after, on a cached object without it (or with
        // the previous boot's): what was written wins.
        assert_eq!(
            boot_time(&written, "u", &outcome(true, false), None),
            started
        );
        assert_eq!(
            boot_time(&written, "u", &outcome(true, false), old.clone()),
            started
        );
        assert_eq!(
            boot_time(&written, "u", &outcome(false, false), started),
            None
        );
        // Off, then running again without a start of ours (an agent restart
        // forgets too): the object's.
        assert_eq!(
            boot_time(&written, "u", &outcome(true, false), old.clone()),
            old
        );
    }

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
