//! The agent's VirtualNode reconciler: observe → decide → execute.
//!
//! For a node placed here it observes what the host holds (its domain by
//! UUID, its disks), decides purely ([`super::decide`]) which disk and
//! domain operations close the gap, carries them out through the
//! [`Domains`] and [`Disks`] seams, and writes the node's status (only
//! when it changed). A node deleted or moved away is removed from the host
//! (domain, disks), then its finalizer released. The resync, the orphan
//! sweep and the libvirt events that queue nodes are in [`super::resync`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use yukumo_api::Reason;
use yukumo_api::virtualnode::{NodePhase, VirtualNode, VirtualNodeStatus};
use yukumo_api::{finalizers, managers};
use yukumo_telemetry::Health;

use super::decide::{self, NodeSeen};
use super::disks::Disks;
use super::domain::{self, NodePaths};
use super::domains::Domains;
use super::images::{ImageCache, ImageError};
use crate::Args;
use crate::hypervisor::HypervisorError;
use crate::register::Metrics;

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

/// Shared state of the compute reconciler, over a hypervisor `D`.
pub struct ComputeCtx<D: Domains> {
    pub client: Client,
    pub host: String,
    pub domains: D,
    pub disks: Arc<dyn Disks>,
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
    /// Where this agent serves consoles (in running nodes' status).
    pub console: Option<yukumo_api::virtualnode::ConsoleEndpoint>,
}

/// What else the agent runs on its host that nodes' reconciles refer to.
pub struct HostServices {
    /// The host's network (None: networking is not managed here).
    pub net: Option<Arc<crate::network::NetState>>,
    /// Where consoles are served (None: not here).
    pub console: Option<yukumo_api::virtualnode::ConsoleEndpoint>,
}

impl<D: Domains> ComputeCtx<D> {
    pub fn new(
        client: Client,
        domains: D,
        disks: Arc<dyn Disks>,
        args: &Args,
        metrics: &Metrics,
        health: Health,
        services: HostServices,
    ) -> std::io::Result<Arc<Self>> {
        let HostServices { net, console } = services;
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
            domains,
            disks,
            state_dir: args.state_dir.clone(),
            domain_type: args.domain_type.clone(),
            health,
            metrics: metrics.clone(),
            boot_times: Default::default(),
            net,
            console,
        }))
    }

    pub async fn event(&self, vn: &VirtualNode, type_: EventType, reason: Reason, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
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
        reason: Reason,
        message: String,
    ) -> Result<(), Error> {
        let status = decide::status_with(
            vn,
            NodePhase::Failed,
            false,
            reason.clone(),
            message.clone(),
        );
        let changed = vn.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions);
        self.write_status(
            vn,
            VirtualNodeStatus {
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
        mut status: VirtualNodeStatus,
    ) -> Result<(), Error> {
        // A running node's console is served here.
        status.console = self
            .console
            .clone()
            .filter(|_| status.phase == NodePhase::Running);
        if vn.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let api: Api<VirtualNode> =
            Api::namespaced(self.client.clone(), &vn.namespace().unwrap_or_default());
        let patch = yukumo_api::status_apply_patch::<VirtualNode, _>(&status);
        api.patch_status(
            &vn.name_any(),
            &PatchParams::apply(managers::AGENT).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        // First seen running (a restarted agent's nodes already say so).
        let was_running = vn
            .status
            .as_ref()
            .is_some_and(|s| s.phase == NodePhase::Running);
        if status.phase == NodePhase::Running
            && !was_running
            && let Some(created) = &vn.metadata.creation_timestamp
        {
            let secs = k8s_openapi::jiff::Timestamp::now()
                .duration_since(created.0)
                .as_secs_f64();
            if secs >= 0.0 {
                self.metrics.provision_seconds.observe(secs);
            }
        }
        Ok(())
    }

    /// Remove a node's domain (by UUID) and its files. Idempotent.
    pub async fn remove_node(&self, uid: &str) -> Result<(), Error> {
        let ops = self.domains.remove(uid).await?;
        self.metrics.mutated(&ops);
        self.boot_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        let paths = NodePaths::new(&self.state_dir, uid);
        let _ = std::fs::remove_file(&paths.control_socket);
        let _ = std::fs::remove_file(&paths.console_socket);
        if paths.dir.exists() {
            std::fs::remove_dir_all(&paths.dir).map_err(|e| Error::Disk(e.to_string()))?;
        }
        Ok(())
    }
}

/// Once the host holds nothing of a deleted node, let the deletion finish:
/// remove the host-cleanup finalizer (the only change of a VirtualNode
/// outside its status that the agent may make; an admission policy refuses
/// any other).
async fn release_finalizer<D: Domains>(ctx: &ComputeCtx<D>, vn: &VirtualNode) -> Result<(), Error> {
    let api: Api<VirtualNode> =
        Api::namespaced(ctx.client.clone(), &vn.namespace().unwrap_or_default());
    let scope = format!("{}={}", yukumo_api::labels::HOST, ctx.host);
    if crate::finalizer::release(&api, vn, finalizers::HOST_CLEANUP, &scope).await? {
        tracing::info!(node = %vn.name_any(), "host cleaned up; finalizer released");
    }
    Ok(())
}

pub async fn reconcile<D: Domains>(
    vn: Arc<VirtualNode>,
    ctx: Arc<ComputeCtx<D>>,
) -> Result<Action, Error> {
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
        ctx.remove_node(&uid).await?;
        if vn.metadata.deletion_timestamp.is_some() {
            release_finalizer(&ctx, &vn).await?;
        }
        return Ok(Action::await_change());
    }
    // Observe the domain.
    let dname = domain::domain_name(&vn.namespace().unwrap_or_default(), &vn.name_any());
    let (dom, stale_name) = match ctx.domains.observe(&uid, &dname).await {
        Ok(o) => o,
        Err(e) => {
            ctx.report_failure(&vn, Reason::DomainFailed, e.to_string())
                .await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    };
    // A node that should not run and has no domain yet is simply off: its
    // image and disks are prepared when it is first asked to run.
    if !vn.spec.running && dom.is_none() {
        let status = VirtualNodeStatus {
            last_error: None,
            boot_time: None,
            ..decide::status_with(
                &vn,
                NodePhase::Stopped,
                false,
                Reason::Stopped,
                "powered off; not yet created".into(),
            )
        };
        ctx.write_status(&vn, status).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    // The image first (it may take long); the node's directory, disks and
    // domain then follow within moments, so the sweep's age guard holds.
    // A node booting from a Volume needs no image here (its pool's host
    // copied the image into the Volume).
    let boots_from_volume = super::domain::root_volume(&vn).is_some();
    let image = if boots_from_volume {
        None
    } else {
        match ctx.images.ensure(&vn.spec.image).await {
            Ok(p) => Some(p),
            Err(e) => {
                let reason = match e {
                    ImageError::Io(_) => Reason::ImageCacheError,
                    _ => Reason::ImagePullFailed,
                };
                ctx.report_failure(&vn, reason, e.to_string()).await?;
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
        }
    };
    let paths = NodePaths::new(&ctx.state_dir, &uid);
    let mut seen = NodeSeen {
        domain: dom,
        stale_name,
        ..Default::default()
    };
    // The disks: observed, decided and written in-process, off the runtime
    // (file I/O). Holding `image` keeps it from eviction until the overlay
    // on it exists.
    let disks = {
        let (disks, vn, paths) = (ctx.disks.clone(), vn.clone(), paths.clone());
        let mut s = seen.clone();
        tokio::task::spawn_blocking(move || -> Result<NodeSeen, String> {
            std::fs::create_dir_all(&paths.dir).map_err(|e| e.to_string())?;
            if let Some(d) = paths.control_socket.parent() {
                std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            }
            disks.observe(&paths, &mut s);
            let base = match &image {
                Some(i) => Some((
                    i.path.as_path(),
                    disks
                        .image_size(&i.path)
                        .map_err(|e| format!("reading the image: {e}"))?,
                )),
                None => None,
            };
            let ops = decide::disk_ops(&vn, &paths, &s, base).map_err(|e| e.to_string())?;
            for op in &ops {
                disks.apply(op).map_err(|e| e.to_string())?;
            }
            drop(image);
            Ok(s)
        })
        .await
        .map_err(|e| Error::Disk(format!("disk preparation task: {e}")))?
    };
    match disks {
        Ok(s) => seen = s,
        Err(msg) => {
            ctx.report_failure(&vn, Reason::DiskFailed, msg).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    }
    // A guest joins its group's bridge: wait for the network reconciler to
    // have made it (it runs on the same change of the node).
    if let (Some(net), Some(n)) = (&ctx.net, &vn.spec.network)
        && vn.spec.running
        && !net.has_bridge(&crate::network::plan::bridge_name(n.segment))
    {
        tracing::debug!(node = %vn.name_any(), group = %n.group, "waiting for the group's bridge");
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    // The domain.
    let (xml, hash) = domain::render(&vn, &paths, &ctx.domain_type);
    let mut ops = decide::domain_ops(&seen, &dname, &xml, &hash, vn.spec.running);
    if vn.spec.running && !ops.contains(&super::ops::DomainOp::Start) {
        // A running guest's volumes are hot-plugged, unplugged and grown.
        ops.extend(decide::live_disk_ops(&seen, &vn.spec.disks));
    }
    let active = decide::active_after(&seen, &ops);
    let started = ops.contains(&super::ops::DomainOp::Start);
    let labels: Vec<&'static str> = ops.iter().map(|o| o.label()).collect();
    if !ops.is_empty()
        && let Err(e) = ctx.domains.apply(&uid, ops).await
    {
        ctx.report_failure(&vn, Reason::DomainFailed, e.to_string())
            .await?;
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    ctx.metrics.mutated(&labels);
    if labels.contains(&"define") {
        tracing::info!(node = %vn.name_any(), "domain defined");
    }
    if started {
        tracing::info!(node = %vn.name_any(), "domain started");
        // The first boot is in the status; a start of a node that had booted
        // before (found stopped or crashed, or powered on again) is news.
        if vn
            .status
            .as_ref()
            .is_some_and(|s| s.boot_time.is_some() || s.phase == NodePhase::Stopped)
        {
            ctx.event(
                &vn,
                EventType::Normal,
                Reason::Started,
                format!("domain started again on {}", ctx.host),
            )
            .await;
        }
    }
    let old_boot = vn.status.as_ref().and_then(|s| s.boot_time.clone());
    let boot_time = boot_time(&ctx.boot_times, &uid, started, active, old_boot);
    let disks = decide::disks_after(&seen, active, &vn.spec.disks);
    let mut wanted: Vec<(&str, &str)> = vn
        .spec
        .disks
        .iter()
        .map(|d| (d.serial.as_str(), d.target.as_str()))
        .collect();
    wanted.sort();
    let held: Vec<(&str, &str)> = disks
        .iter()
        .map(|d| (d.serial.as_str(), d.target.as_str()))
        .collect();
    ctx.write_status(
        &vn,
        VirtualNodeStatus {
            disks: disks.clone(),
            ..decide::settled_status(&vn, &ctx.host, active, boot_time)
        },
    )
    .await?;
    if labels
        .iter()
        .any(|l| matches!(*l, "attach" | "detach" | "resize"))
    {
        tracing::info!(node = %vn.name_any(), ops = ?labels, "volume disks changed");
    }
    // A detach completes when the guest lets go: look again soon.
    Ok(Action::requeue(Duration::from_secs(if held != wanted {
        2
    } else {
        300
    })))
}

/// The boot time to report: now for a domain just started, else the one this
/// agent wrote last (a reconcile soon after a start may see a cached object
/// without it), else the object's; none for a domain that is off.
fn boot_time(
    written: &std::sync::Mutex<HashMap<String, Time>>,
    uid: &str,
    started: bool,
    active: bool,
    old_boot: Option<Time>,
) -> Option<Time> {
    let mut written = written.lock().unwrap_or_else(|e| e.into_inner());
    if started {
        // Whole seconds, as the API stores them: a finer time would never
        // equal the stored one and cost a second, no-op status write.
        let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
        written.insert(uid.to_string(), now.clone());
        Some(now)
    } else if active {
        written.get(uid).cloned().or(old_boot)
    } else {
        written.remove(uid);
        None
    }
}

pub fn error_policy<D: Domains>(
    vn: Arc<VirtualNode>,
    err: &Error,
    _ctx: Arc<ComputeCtx<D>>,
) -> Action {
    tracing::warn!(node = %vn.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_time_written_survives_a_stale_object() {
        let written = std::sync::Mutex::default();
        let old = Some(Time(Timestamp::UNIX_EPOCH));
        let started = boot_time(&written, "u", true, true, old.clone());
        assert!(started.is_some() && started != old);
        // A reconcile right after, on a cached object without it (or with
        // the previous boot's): what was written wins.
        assert_eq!(boot_time(&written, "u", false, true, None), started);
        assert_eq!(boot_time(&written, "u", false, true, old.clone()), started);
        assert_eq!(boot_time(&written, "u", false, false, started), None);
        // Off, then running again without a start of ours (an agent restart
        // forgets too): the object's.
        assert_eq!(boot_time(&written, "u", false, true, old.clone()), old);
    }
}
