//! yukumo-controller: leader-elected reconcilers for every yukumo kind.
//!
//! All replicas campaign for one Lease; only the leader runs reconcilers. A
//! leader that cannot renew within the lease duration stops its reconcilers
//! and campaigns again; on SIGTERM it releases the Lease so a standby takes
//! over at once.
#![forbid(unsafe_code)]

mod context;
mod leader;
mod reconcile;
mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use yukumo_api::{Host, NetworkGroup, Site, VirtualCluster, VirtualNode, Volume};
use yukumo_telemetry::{Health, parse_duration};

use crate::context::{Ctx, Metrics, error_policy};
use crate::leader::{Attempt, LeaderElector};

#[derive(Parser, Debug)]
#[command(name = "yukumo-controller", version, about)]
struct Args {
    /// Namespace holding the leader-election Lease.
    #[arg(long, env = "YUKUMO_NAMESPACE", default_value = "yukumo-system")]
    namespace: String,
    /// Identity in the Lease (defaults to the pod name or hostname + pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration: a dead leader is replaced after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yukumo_telemetry::init_tracing();
    let args = Args::parse();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::default();
    let shutdown = yukumo_telemetry::shutdown_signal();
    let server = tokio::spawn(yukumo_telemetry::serve(
        args.metrics_addr,
        registry,
        health.clone(),
        shutdown.clone(),
    ));
    let ctx = Ctx::new(client.clone(), &identity, metrics.clone(), health.clone());
    tracing::info!(%identity, namespace = %args.namespace, "controller starting");

    let mut elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        identity.clone(),
        args.lease_duration,
    );
    let retry = (args.lease_duration / 5).max(Duration::from_millis(500));
    let mut shutdown_rx = shutdown.clone();
    'campaign: loop {
        // Follow until the Lease is ours.
        let mut last_holder = None;
        loop {
            health.beat("leader-election", args.lease_duration * 3);
            match elector.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => break,
                Ok(Attempt::Following(h)) => {
                    if last_holder.as_ref() != Some(&h) {
                        tracing::info!(leader = %h, "following");
                        last_holder = Some(h);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown_rx.wait_for(|s| *s) => break 'campaign,
            }
        }
        tracing::info!(%identity, "became leader");
        metrics.leader.set(1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let controllers = tokio::spawn(run_controllers(ctx.clone(), stop_rx));
        // Renew; stop leading if a renewal has not succeeded within the lease duration.
        let mut last_renew = tokio::time::Instant::now();
        let lost = loop {
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown_rx.wait_for(|s| *s) => break false,
            }
            health.beat("leader-election", args.lease_duration * 3);
            match elector.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => last_renew = tokio::time::Instant::now(),
                Ok(Attempt::Following(h)) => {
                    tracing::warn!(leader = %h, "lost the Lease");
                    break true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if last_renew.elapsed() >= args.lease_duration * 2 / 3 {
                        break true;
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        let _ = controllers.await;
        metrics.leader.set(0);
        if !lost {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "could not release the Lease");
            } else {
                tracing::info!("released the Lease");
            }
            break;
        }
    }
    let _ = server.await;
    tracing::info!("controller stopped");
    Ok(())
}

/// Hash of what the VirtualCluster reconciler needs from a Host: its readiness.
fn host_readiness(h: &Host) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let ready = h
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    ready
        .map(|c| (format!("{:?}", c.status), c.reason.clone()))
        .hash(&mut hasher);
    h.spec.schedulable.hash(&mut hasher);
    Some(hasher.finish())
}

/// Run every reconciler until `stop` turns true.
async fn run_controllers(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let stopper = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let wc = watcher::Config::default().any_semantic();

    let vc_controller = Controller::new(Api::<VirtualCluster>::all(client.clone()), wc.clone());
    let vc_store = vc_controller.store();
    let vc_store2 = vc_store.clone();
    let vc_store3 = vc_store.clone();
    let vcs = vc_controller
        .owns(Api::<VirtualNode>::all(client.clone()), wc.clone())
        .watches(
            Api::<NetworkGroup>::all(client.clone()),
            wc.clone(),
            move |ng| {
                let (ns, name) = (ng.namespace(), ng.name_any());
                vc_store
                    .state()
                    .into_iter()
                    .filter(|vc| vc.namespace() == ns && vc.spec.network_group == name)
                    .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(Api::<Volume>::all(client.clone()), wc.clone(), move |vol| {
            let (ns, name) = (vol.namespace(), vol.name_any());
            vc_store2
                .state()
                .into_iter()
                .filter(|vc| {
                    vc.namespace() == ns
                        && vc
                            .spec
                            .frontend
                            .volumes
                            .iter()
                            .chain(vc.spec.pools.iter().flat_map(|p| p.volumes.iter()))
                            .any(|v| v.name == name)
                })
                .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(
            // Only a change of a Host's readiness matters here, not every heartbeat.
            watcher(Api::<Host>::all(client.clone()), wc.clone())
                .touched_objects()
                .predicate_filter(host_readiness, Default::default()),
            move |host| {
                // Host readiness changes matter to the clusters with nodes there.
                let name = host.name_any();
                vc_store3
                    .state()
                    .into_iter()
                    .filter(|vc| {
                        vc.status.as_ref().is_some_and(|s| {
                            s.nodes
                                .iter()
                                .any(|n| n.host.as_deref() == Some(name.as_str()))
                        })
                    })
                    .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(
            reconcile::virtualcluster::reconcile,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let ngs = Controller::new(Api::<NetworkGroup>::all(client.clone()), wc.clone())
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(
            reconcile::networkgroup::reconcile,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let vols = Controller::new(Api::<Volume>::all(client.clone()), wc.clone())
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::volume::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let sites = Controller::new(Api::<Site>::all(client.clone()), wc.clone())
        .watches(Api::<Host>::all(client.clone()), wc.clone(), |h| {
            Some(ObjectRef::<Site>::new(&h.spec.site))
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::site::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let host_controller = Controller::new(Api::<Host>::all(client.clone()), wc.clone());
    let host_store = host_controller.store();
    let hosts = host_controller
        .watches(Api::<Site>::all(client.clone()), wc.clone(), move |site| {
            let name = site.name_any();
            host_store
                .state()
                .into_iter()
                .filter(|h| h.spec.site == name)
                .map(|h| ObjectRef::from_obj(h.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::host::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    tokio::join!(vcs, ngs, vols, sites, hosts);
    tracing::info!("reconcilers stopped");
}
