//! The agent's VirtualNode reconciler: image, disks, config disk, domain,
//! power, status — and the resync that notices drift and sweeps orphans.
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
use yukumo_api::{labels, managers};
use yukumo_telemetry::Health;

use super::domain::{self, NodePaths};
use super::guestconfig;
use super::images::{ImageCache, ImageError};
use crate::hypervisor::{Hypervisor, HypervisorError};

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
    /// Boot times this agent wrote, by node uid: the watch cache may hand a
    /// reconcile an object older than our last status write, and a boot time
    /// must never be lost to that race. (The API keeps it across restarts.)
    boot_times: std::sync::Mutex<HashMap<String, Time>>,
}

impl ComputeCtx {
    pub fn new(
        client: Client,
        host: &str,
        hv: Hypervisor,
        state_dir: PathBuf,
        domain_type: &str,
        health: Health,
    ) -> std::io::Result<Arc<Self>> {
        let reporter = Reporter {
            controller: managers::AGENT.into(),
            instance: Some(host.to_string()),
        };
        Ok(Arc::new(ComputeCtx {
            recorder: Recorder::new(client.clone(), reporter),
            images: ImageCache::new(&state_dir)?,
            client,
            host: host.to_string(),
            hv,
            state_dir,
            domain_type: domain_type.to_string(),
            health,
            boot_times: Default::default(),
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
        let patch = serde_json::json!({
            "apiVersion": VirtualNode::api_version(&()),
            "kind": VirtualNode::kind(&()),
            "status": status,
        });
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
}

/// Remove a domain (by UUID) and its files. Idempotent.
async fn remove_node(ctx: &ComputeCtx, uid: &str) -> Result<(), Error> {
    let id = uid.to_string();
    ctx.hv
        .call(move |c| {
            if let Ok(d) = Domain::lookup_by_uuid_string(c, &id) {
                if d.is_active().unwrap_or(false) {
                    d.destroy()?;
                }
                d.undefine()?;
            }
            Ok(())
        })
        .await?;
    ctx.boot_times
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
    let dir = NodePaths::new(&ctx.state_dir, uid).dir;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::Disk(e.to_string()))?;
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
    std::fs::create_dir_all(&paths.dir).map_err(|e| Error::Disk(e.to_string()))?;
    ensure_root_disk(&paths, &image, format, vn.spec.disk_bytes)?;
    ensure_config_disk(&paths, &vn)?;

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
                            }
                            old.undefine()?;
                        }
                    }
                    defined = true;
                    Domain::define_xml(c, &xml)?
                }
            };
            let mut active = dom.is_active()?;
            let mut started = false;
            if running && !active {
                dom.create()?;
                started = true;
                active = true;
            } else if !running && active {
                dom.destroy()?;
                active = false;
            }
            Ok(DomainOutcome {
                active,
                started,
                defined,
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
    if outcome.defined {
        tracing::info!(node = %vn.name_any(), "domain defined");
    }
    if outcome.started {
        tracing::info!(node = %vn.name_any(), "domain started");
        ctx.event(
            &vn,
            EventType::Normal,
            "Started",
            format!("domain started on {}", ctx.host),
        )
        .await;
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
    let status = VirtualNodeStatus {
        domain_uuid: Some(uid.clone()),
        boot_time: if outcome.started {
            Some(Time(Timestamp::now()))
        } else if outcome.active {
            old_boot
        } else {
            None
        },
        last_error: None,
        ..status_with(&vn, phase, ready)
    };
    ctx.write_status(&vn, &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn error_policy(vn: Arc<VirtualNode>, err: &Error, _ctx: Arc<ComputeCtx>) -> Action {
    tracing::warn!(node = %vn.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One pass of the resync: two libvirt calls list every domain (active and
/// inactive); nodes whose domain is missing or in the wrong power state are
/// queued; yukumo-marked domains whose node is gone are removed.
async fn resync(ctx: &ComputeCtx, tx: &mpsc::UnboundedSender<ObjectRef<VirtualNode>>) {
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
        if drift && vn.metadata.deletion_timestamp.is_none() {
            tracing::info!(node = %vn.name_any(), "resync: domain missing or in the wrong power state");
            let _ = tx.send(ObjectRef::from_obj(vn));
        }
    }
    for uid in stale_node_dirs(ctx, &wanted, Duration::from_secs(15)) {
        if !domains.contains_key(&uid) {
            tracing::info!(%uid, "removing files of a node that is gone");
            let dir = NodePaths::new(&ctx.state_dir, &uid).dir;
            if let Err(e) = std::fs::remove_dir_all(&dir) {
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

/// Run the reconciler for the VirtualNodes placed on this host until shutdown.
pub async fn run(
    ctx: Arc<ComputeCtx>,
    resync_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api = Api::<VirtualNode>::all(ctx.client.clone());
    let wc = watcher::Config::default().labels(&format!("{}={}", labels::HOST, ctx.host));
    let controller = Controller::new(api, wc);
    let (tx, rx) = mpsc::unbounded_channel();
    let resync_ctx = ctx.clone();
    let mut resync_shutdown = shutdown.clone();
    let resync_task = tokio::spawn(async move {
        tracing::info!(every = ?resync_every, "resync of domains started");
        loop {
            resync(&resync_ctx, &tx).await;
            tokio::select! {
                _ = tokio::time::sleep(resync_every) => {}
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
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
