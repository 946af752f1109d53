//! yukumo-controller: leader-elected reconcilers for every yukumo kind.
//!
//! All replicas campaign for one Lease; only the leader runs reconcilers. A
//! leader that cannot renew within the lease duration stops its reconcilers
//! and campaigns again; on SIGTERM it releases the Lease so a standby takes
//! over at once.
#![forbid(unsafe_code)]

mod authz;
mod check;
mod context;
#[cfg(test)]
mod fixtures;
mod fleet;
mod leader;
mod reconcile;
mod scheduler;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use yukumo_api::{Host, NetworkGroup, Site, VirtualCluster, VirtualNode, Volume};
use yukumo_telemetry::{Health, parse_duration};

use crate::context::{Ctx, Metrics, Stores, error_policy};
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
    /// Check the installation instead of running (the chart's `helm
    /// test`): a leader renewing the Lease, Hosts registered and Ready.
    /// Prints each finding; exits 1 naming what failed.
    #[arg(long)]
    check: bool,
    /// Serve the site agents' authorization webhook (`POST /authorize`,
    /// HTTPS) at this address; every replica serves it. Needs
    /// --authz-tls-cert and --authz-tls-key.
    #[arg(long, requires_all = ["authz_tls_cert", "authz_tls_key"])]
    authz_addr: Option<SocketAddr>,
    /// PEM certificate (chain) of the webhook.
    #[arg(long, requires = "authz_addr")]
    authz_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the webhook.
    #[arg(long, requires = "authz_addr")]
    authz_tls_key: Option<std::path::PathBuf>,
    /// Serve only the authorization webhook: no API client, no Lease, no
    /// reconcilers — beside an API server that cannot reach the
    /// controller's pods (a static pod on each control-plane node).
    #[arg(long, requires = "authz_addr")]
    authz_only: bool,
}

impl Args {
    /// The authorization webhook's settings, when it is to be served.
    fn authz_serve(&self) -> Option<authz::Serve> {
        Some(authz::Serve {
            addr: self.authz_addr?,
            cert: self.authz_tls_cert.clone()?,
            key: self.authz_tls_key.clone()?,
            reload_every: authz::RELOAD_EVERY,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    yukumo_telemetry::init_tracing();
    let args = Args::parse();
    if args.check {
        let client = Client::try_default().await?;
        return check::run(client, &args.namespace, args.lease_duration).await;
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    if args.authz_only {
        let serve = args.authz_serve().ok_or_else(|| {
            anyhow::anyhow!("--authz-only needs --authz-addr, --authz-tls-cert and --authz-tls-key")
        })?;
        let (listener, tls) = authz::bind(&serve)?;
        authz::run(listener, tls, yukumo_telemetry::shutdown_signal()).await;
        return Ok(());
    }
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Health::default();
    let shutdown = yukumo_telemetry::shutdown_signal();
    // The leader's context, for `/calendar` and the fleet gauges (None
    // while following).
    let leading: Leading = Default::default();
    registry.register_collector(Box::new(fleet::Fleet(leading.clone())));
    let server = tokio::spawn(yukumo_telemetry::serve(
        args.metrics_addr,
        registry,
        health.clone(),
        shutdown.clone(),
        calendar_route(leading.clone()),
    ));
    // Bound before campaigning, so a bad certificate stops the replica at
    // once, naming the file.
    let authz = match args.authz_serve() {
        Some(serve) => {
            let (listener, tls) = authz::bind(&serve)?;
            Some(tokio::spawn(authz::run(listener, tls, shutdown.clone())))
        }
        None => None,
    };
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
        let controllers = tokio::spawn(run_controllers(
            client.clone(),
            identity.clone(),
            metrics.clone(),
            health.clone(),
            stop_rx,
            leading.clone(),
        ));
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
    if let Some(a) = authz {
        let _ = a.await;
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Hash of what the VirtualCluster reconciler needs from a Host: its readiness.
/// A Site's spec generation: what matters to the groups and clusters that
/// name it (its status, aggregated from its hosts, does not).
/// A namespace's labels (the Sites' access selectors read them).
fn namespace_labels(n: &Namespace) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    n.metadata.labels.hash(&mut hasher);
    hasher.finish()
}

/// Namespaces whose labels changed (or that appeared): objects of a
/// namespace that a Site refused, or that may now lose access, are looked
/// at again at once.
fn namespace_label_changes(
    client: &Client,
) -> impl futures::Stream<Item = Arc<Namespace>> + Send + 'static {
    let stream = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|r| futures::future::ready(r.ok().map(Arc::new)));
    changed_only(stream, namespace_labels)
}

/// What the reconcilers read of a ResourceQuota: its limits.
fn quota_hard(q: &ResourceQuota) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Some(hard) = q.spec.as_ref().and_then(|s| s.hard.as_ref()) {
        for (k, v) in hard {
            (k, &v.0).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// The ResourceQuotas of `ns` that limit yukumo resources.
fn yukumo_quotas_in(
    store: &Store<ResourceQuota>,
    ns: Option<String>,
) -> Vec<ObjectRef<ResourceQuota>> {
    store
        .state()
        .into_iter()
        .filter(|q| {
            q.namespace() == ns
                && q.spec
                    .iter()
                    .flat_map(|s| s.hard.iter().flatten())
                    .any(|(k, _)| k.starts_with(reconcile::quota::PREFIX))
        })
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

/// The objects of `store` in namespace `ns`.
fn in_namespace<K>(store: &Store<K>, ns: &Namespace) -> Vec<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    in_namespace_of(store, Some(ns.name_any()))
}

/// The objects of `store` in namespace `name`.
fn in_namespace_of<K>(store: &Store<K>, name: Option<String>) -> Vec<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let Some(name) = name else {
        return vec![];
    };
    store
        .state()
        .into_iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(name.as_str()))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

fn site_spec(s: &Site) -> u64 {
    s.metadata.generation.unwrap_or_default() as u64
}

/// What a NetworkGroup reads of a Site: its spec, and which host holds its
/// WAN endpoint (the group's span lists that host).
fn site_for_groups(s: &Site) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    site_spec(s).hash(&mut hasher);
    s.status
        .as_ref()
        .and_then(|st| st.active_gateway.as_deref())
        .hash(&mut hasher);
    hasher.finish()
}

fn host_readiness(h: &Host) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let ready = h
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    ready
        .map(|c| (c.status, c.reason.clone()))
        .hash(&mut hasher);
    h.spec.schedulable.hash(&mut hasher);
    hasher.finish()
}

/// Hash of what the groups spanning a Host's Site read of it: readiness and
/// its WireGuard key (their encrypted tunnel ends carry it).
fn host_for_groups(h: &Host) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    host_readiness(h).hash(&mut hasher);
    h.status
        .as_ref()
        .map(|s| &s.wireguard_public_key)
        .hash(&mut hasher);
    hasher.finish()
}

/// Hash of what a Site aggregates from a Host: readiness and resources.
fn host_summary(h: &Host) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    host_readiness(h).hash(&mut hasher);
    h.spec.site.hash(&mut hasher);
    h.spec.gateway.hash(&mut hasher);
    if let Some(s) = &h.status {
        s.wan_interface.hash(&mut hasher);
        // Who may hold a WireGuard Site's endpoint.
        s.wireguard_public_key.hash(&mut hasher);
        // The tunnels the endpoint's holder measures (Site.status.peers).
        serde_json::to_string(&s.tunnels)
            .unwrap_or_default()
            .hash(&mut hasher);
        serde_json::to_string(&(s.capacity, s.allocatable, &s.storage_pools))
            .unwrap_or_default()
            .hash(&mut hasher);
    }
    hasher.finish()
}

/// Pass on only the objects whose `key` changed since last seen (a heartbeat
/// that changes nothing else triggers nothing).
fn changed_only<K: ResourceExt + Send + Sync + 'static>(
    stream: impl futures::Stream<Item = Arc<K>> + Send + 'static,
    key: fn(&K) -> u64,
) -> impl futures::Stream<Item = Arc<K>> + Send + 'static {
    let mut seen: HashMap<String, u64> = HashMap::new();
    stream.filter(move |obj| {
        let k = key(obj);
        let id = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
        let changed = seen.insert(id, k) != Some(k);
        futures::future::ready(changed)
    })
}

/// VirtualNode events that change a NetworkGroup's view: a node appearing,
/// going, or moving host (not its status updates).
fn node_network_changes(
    stream: impl futures::Stream<Item = Arc<VirtualNode>> + Send + 'static,
) -> impl futures::Stream<Item = Arc<VirtualNode>> + Send + 'static {
    use std::hash::{Hash, Hasher};
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    stream.filter(move |vn| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &vn.metadata.uid,
            &vn.spec.host,
            vn.spec.network.as_ref().map(|n| &n.group),
            vn.metadata.deletion_timestamp.is_some(),
        )
            .hash(&mut h);
        let key = (vn.namespace().unwrap_or_default(), vn.name_any());
        futures::future::ready(seen.insert(key, h.finish()) != Some(h.finish()))
    })
}

/// Buffer of each shared reflector's subscribers.
const SUBSCRIBER_BUFFER: usize = 4096;

/// A shared reflector for `K`: its store, its writer (to subscribe), and the
/// watch stream that fills it (must be polled).
fn shared_reflector<K>(
    client: &Client,
    wc: &watcher::Config,
    deleted: Option<futures::channel::mpsc::UnboundedSender<Arc<K>>>,
) -> (
    Store<K>,
    reflector::store::Writer<K>,
    impl FnOnce(reflector::store::Writer<K>) -> tokio::task::JoinHandle<()>,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store_shared::<K>(SUBSCRIBER_BUFFER);
    let api = Api::<K>::all(client.clone());
    let wc = wc.clone();
    let start = move |writer| {
        tokio::spawn(
            watcher(api, wc)
                .default_backoff()
                // Nothing reads managedFields: not keeping them roughly
                // halves the memory of the caches.
                .modify(|o| o.managed_fields_mut().clear())
                .reflect_shared(writer)
                .for_each(move |ev| {
                    // A shared store's subscribers see applies only; a
                    // deletion is passed on here.
                    if let (Some(tx), Ok(watcher::Event::Delete(o))) = (&deleted, &ev) {
                        let _ = tx.unbounded_send(Arc::new(o.clone()));
                    }
                    futures::future::ready(())
                }),
        )
    };
    (store, writer, start)
}

/// The leader's context while it leads.
type Leading = Arc<std::sync::Mutex<Option<Arc<Ctx>>>>;

/// Clears the leader's context when its reconcilers stop.
struct ForgetOnDrop(Leading);

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// `GET /calendar[?at=<RFC 3339>]`: the capacity calendar the leader
/// decides with at that instant (default now), as JSON — derived from its
/// caches alone, so a restarted controller serves the same one (503 while
/// not leading).
fn calendar_route(leading: Leading) -> yukumo_telemetry::axum::Router {
    use yukumo_telemetry::axum::{extract::RawQuery, http::StatusCode, routing::get};
    yukumo_telemetry::axum::Router::new().route(
        "/calendar",
        get(move |RawQuery(q): RawQuery| {
            let leading = leading.clone();
            async move {
                let at = q.as_deref().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("at="))
                        .map(|v| v.replace("%3A", ":").replace("%3a", ":"))
                });
                let at = match at.map(|v| v.parse::<k8s_openapi::jiff::Timestamp>()) {
                    None => k8s_openapi::jiff::Timestamp::now(),
                    Some(Ok(t)) => t,
                    Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("at: {e}\n")),
                };
                let ctx = leading.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(ctx) = ctx else {
                    return (StatusCode::SERVICE_UNAVAILABLE, "not leading\n".to_string());
                };
                let pending = ctx.placements.lock().await;
                let seen = reconcile::virtualcluster::admission::calendar(&ctx, &pending, "", at);
                (StatusCode::OK, seen.to_json().to_string())
            }
        }),
    )
}

/// Run every reconciler until `stop` turns true.
async fn run_controllers(
    client: Client,
    identity: String,
    metrics: Metrics,
    health: Health,
    stop: watch::Receiver<bool>,
    leading: Leading,
) {
    let stopper = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let wc = watcher::Config::default().any_semantic();

    // One watch per kind, shared by every reconciler that reads it.
    // VirtualNodes and VirtualClusters gone (capacity and reservations
    // freed): clusters waiting for capacity try again at once, not at
    // their next retry.
    let (vc_gone_tx, vc_gone) = futures::channel::mpsc::unbounded::<Arc<VirtualCluster>>();
    let (vn_gone_tx, vn_gone) = futures::channel::mpsc::unbounded::<Arc<VirtualNode>>();
    let (vc_store, vc_w, vc_start) =
        shared_reflector::<VirtualCluster>(&client, &wc, Some(vc_gone_tx));
    let (vn_store, vn_w, vn_start) =
        shared_reflector::<VirtualNode>(&client, &wc, Some(vn_gone_tx));
    let (host_store, host_w, host_start) = shared_reflector::<Host>(&client, &wc, None);
    let (site_store, site_w, site_start) = shared_reflector::<Site>(&client, &wc, None);
    let (ng_store, ng_w, ng_start) = shared_reflector::<NetworkGroup>(&client, &wc, None);
    let (vol_store, vol_w, vol_start) = shared_reflector::<Volume>(&client, &wc, None);
    let (rq_store, rq_w, rq_start) = shared_reflector::<ResourceQuota>(&client, &wc, None);
    // Writers made by `store_shared` always hand out subscriptions.
    const SHARED: &str = "a shared store's writer subscribes";
    let vc_for = vc_w.subscribe().expect(SHARED);
    let vn_owned = vn_w.subscribe().expect(SHARED);
    let host_for_vc = host_w.subscribe().expect(SHARED);
    let host_for_site = host_w.subscribe().expect(SHARED);
    let host_for = host_w.subscribe().expect(SHARED);
    let site_for = site_w.subscribe().expect(SHARED);
    let site_for_host = site_w.subscribe().expect(SHARED);
    let ng_for_vc = ng_w.subscribe().expect(SHARED);
    let ng_for = ng_w.subscribe().expect(SHARED);
    let vol_for_vc = vol_w.subscribe().expect(SHARED);
    let vc_for_ng = vc_w.subscribe().expect(SHARED);
    let vn_for_ng = vn_w.subscribe().expect(SHARED);
    let host_for_ng = host_w.subscribe().expect(SHARED);
    let site_for_ng = site_w.subscribe().expect(SHARED);
    let site_for_vc = site_w.subscribe().expect(SHARED);
    let vol_for = vol_w.subscribe().expect(SHARED);
    let vn_for_vol = vn_w.subscribe().expect(SHARED);
    let vc_for_vol = vc_w.subscribe().expect(SHARED);
    let site_for_vol = site_w.subscribe().expect(SHARED);
    let rq_for = rq_w.subscribe().expect(SHARED);
    let rq_for_vc = rq_w.subscribe().expect(SHARED);
    let rq_for_ng = rq_w.subscribe().expect(SHARED);
    let rq_for_vol = rq_w.subscribe().expect(SHARED);
    let vc_for_rq = vc_w.subscribe().expect(SHARED);
    let vn_for_rq = vn_w.subscribe().expect(SHARED);
    let ng_for_rq = ng_w.subscribe().expect(SHARED);
    let vol_for_rq = vol_w.subscribe().expect(SHARED);
    let reflectors = [
        vc_start(vc_w),
        vn_start(vn_w),
        host_start(host_w),
        site_start(site_w),
        ng_start(ng_w),
        vol_start(vol_w),
        rq_start(rq_w),
    ];
    let stores = Stores {
        clusters: vc_store.clone(),
        nodes: vn_store.clone(),
        hosts: host_store.clone(),
        sites: site_store.clone(),
        network_groups: ng_store.clone(),
        volumes: vol_store.clone(),
        quotas: rq_store.clone(),
    };
    // Nothing is decided on a partial view of the fleet.
    let ready = async {
        let _ = tokio::join!(
            vc_store.wait_until_ready(),
            vn_store.wait_until_ready(),
            host_store.wait_until_ready(),
            site_store.wait_until_ready(),
            ng_store.wait_until_ready(),
            vol_store.wait_until_ready(),
            rq_store.wait_until_ready(),
        );
    };
    let mut stop_rx = stop.clone();
    tokio::select! {
        _ = ready => tracing::info!("caches synced"),
        _ = stop_rx.wait_for(|s| *s) => {
            for r in reflectors { r.abort(); }
            return;
        }
    }
    let ctx = Ctx::new(client.clone(), &identity, metrics, health, stores);
    *leading.lock().unwrap_or_else(|e| e.into_inner()) = Some(ctx.clone());
    let _forget = ForgetOnDrop(leading);

    let vc_store2 = vc_store.clone();
    let vc_store3 = vc_store.clone();
    let vc_store4 = vc_store.clone();
    let vc_store5 = vc_store.clone();
    let vc_store6 = vc_store.clone();
    let vc_store7 = vc_store.clone();
    let vc_store8 = vc_store.clone();
    let vc_store9 = vc_store.clone();
    // A cluster with fewer nodes ready than it wants, not yet seen, or
    // refused or unplaced for want of capacity: maybe waiting for capacity.
    let waiting = |vc: &VirtualCluster| {
        use yukumo_api::Reason;
        use yukumo_api::common::{Conditions, condition_types};
        vc.status.as_ref().is_none_or(|s| {
            s.ready_nodes < s.desired_nodes
                || s.conditions
                    .get_condition(condition_types::READY)
                    .is_some_and(|c| {
                        matches!(
                            c.reason,
                            Reason::InsufficientCapacity | Reason::Unschedulable
                        )
                    })
        })
    };
    let ng_store_for_vc = ng_store.clone();
    let vcs = Controller::for_shared_stream(vc_for, vc_store)
        .with_config(controller::Config::default().debounce(Duration::from_millis(250)))
        .owns_shared_stream(vn_owned)
        .watches_shared_stream(ng_for_vc, move |ng| {
            let (ns, name) = (ng.namespace(), ng.name_any());
            vc_store2
                .state()
                .into_iter()
                .filter(|vc| vc.namespace() == ns && vc.spec.network_group == name)
                .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(vol_for_vc, move |vol| {
            let (ns, name) = (vol.namespace(), vol.name_any());
            vc_store3
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
        .watches_shared_stream(
            // A Site created or changed (its spec, not its status): the
            // clusters placed there or on its groups, in whatever order
            // they were applied.
            changed_only(site_for_vc, site_spec),
            move |site| {
                let name = site.name_any();
                let groups = ng_store_for_vc.state();
                vc_store5
                    .state()
                    .into_iter()
                    .filter(|vc| {
                        vc.spec.frontend.site.as_deref() == Some(name.as_str())
                            || vc
                                .spec
                                .pools
                                .iter()
                                .any(|p| p.sites.iter().any(|s| s.0 == name))
                            || groups.iter().any(|g| {
                                g.namespace() == vc.namespace()
                                    && g.name_any() == vc.spec.network_group
                                    && g.spec.home_site.0 == name
                            })
                    })
                    .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(namespace_label_changes(&client), move |ns| {
            in_namespace(&vc_store6, &ns)
        })
        .watches_shared_stream(changed_only(rq_for_vc, quota_hard), move |q| {
            in_namespace_of(&vc_store7, q.namespace())
        })
        .watches_shared_stream(
            // Only a change of a Host's readiness matters here, not every heartbeat.
            changed_only(host_for_vc, host_readiness),
            move |host| {
                // Host readiness changes matter to the clusters with nodes
                // there, and to clusters waiting for capacity.
                let name = host.name_any();
                vc_store4
                    .state()
                    .into_iter()
                    .filter(|vc| {
                        waiting(vc)
                            || vc.status.as_ref().is_some_and(|s| {
                                s.nodes
                                    .iter()
                                    .any(|n| n.host.as_deref() == Some(name.as_str()))
                            })
                    })
                    .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(vc_gone, move |gone| {
            vc_store9
                .state()
                .into_iter()
                .filter(|vc| waiting(vc) && vc.metadata.uid != gone.metadata.uid)
                .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(vn_gone, move |gone| {
            // A node gone frees its host's capacity: its cluster (a
            // replacement may be made now) and the clusters waiting for
            // capacity.
            let owner = gone.owner_references().first().map(|o| o.uid.clone());
            vc_store8
                .state()
                .into_iter()
                .filter(|vc| waiting(vc) || vc.metadata.uid == owner)
                .map(|vc| ObjectRef::from_obj(vc.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(
            reconcile::virtualcluster::reconcile,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    // A group's addresses follow its clusters' specs, its span follows
    // where their nodes run, and its router follows gateway hosts' readiness.
    let ng_store2 = ng_store.clone();
    let ng_store3 = ng_store.clone();
    let ng_store4 = ng_store.clone();
    let ng_store5 = ng_store.clone();
    let ngs = Controller::for_shared_stream(ng_for, ng_store)
        .with_config(controller::Config::default().debounce(Duration::from_millis(100)))
        .watches_shared_stream(vc_for_ng, |vc| {
            Some(ObjectRef::<NetworkGroup>::new(&vc.spec.network_group).within(&vc.namespace()?))
        })
        .watches_shared_stream(node_network_changes(vn_for_ng), |vn| {
            let group = vn.spec.network.as_ref()?.group.clone();
            Some(ObjectRef::<NetworkGroup>::new(&group).within(&vn.namespace()?))
        })
        .watches_shared_stream(changed_only(site_for_ng, site_for_groups), move |site| {
            let name = site.name_any();
            ng_store3
                .state()
                .into_iter()
                .filter(|g| g.spec.span().contains(&name.as_str()))
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(namespace_label_changes(&client), move |ns| {
            in_namespace(&ng_store4, &ns)
        })
        .watches_shared_stream(changed_only(rq_for_ng, quota_hard), move |q| {
            in_namespace_of(&ng_store5, q.namespace())
        })
        .watches_shared_stream(changed_only(host_for_ng, host_for_groups), move |h| {
            let site = h.spec.site.clone();
            ng_store2
                .state()
                .into_iter()
                .filter(|g| g.spec.span().contains(&site.as_str()))
                .map(|g| ObjectRef::from_obj(g.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(
            reconcile::networkgroup::reconcile,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    // A Volume's claim follows its holder: the node's disks (spec and the
    // agent's report) and the cluster's spec.
    let vol_store2 = vol_store.clone();
    let vol_store3 = vol_store.clone();
    let vol_store4 = vol_store.clone();
    let vol_store5 = vol_store.clone();
    let vol_store6 = vol_store.clone();
    let vols = Controller::for_shared_stream(vol_for, vol_store)
        .watches_shared_stream(vn_for_vol, move |vn| {
            let ns = vn.namespace();
            let name = vn.name_any();
            let serials: Vec<String> = vn
                .spec
                .disks
                .iter()
                .map(|d| d.serial.clone())
                .chain(
                    vn.status
                        .iter()
                        .flat_map(|s| s.disks.iter().map(|d| d.serial.clone())),
                )
                .collect();
            vol_store2
                .state()
                .into_iter()
                .filter(|v| {
                    v.namespace() == ns
                        && (v.metadata.uid.as_ref().is_some_and(|u| serials.contains(u))
                            || v.status.as_ref().is_some_and(|s| {
                                s.attached_to
                                    .iter()
                                    .chain(s.readers.iter())
                                    .any(|a| a.node == name)
                            }))
                })
                .map(|v| ObjectRef::from_obj(v.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(vc_for_vol, move |vc| {
            let ns = vc.namespace();
            let name = vc.name_any();
            let wanted: Vec<String> = reconcile::virtualcluster::volumes::wanted(&name, &vc.spec)
                .into_iter()
                .map(|(_, _, a)| a.name)
                .collect();
            vol_store3
                .state()
                .into_iter()
                .filter(|v| {
                    v.namespace() == ns
                        && (wanted.contains(&v.name_any())
                            || v.status.as_ref().is_some_and(|s| {
                                s.attached_to
                                    .iter()
                                    .chain(s.readers.iter())
                                    .any(|a| a.cluster == name)
                            }))
                })
                .map(|v| ObjectRef::from_obj(v.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(namespace_label_changes(&client), move |ns| {
            in_namespace(&vol_store5, &ns)
        })
        .watches_shared_stream(changed_only(rq_for_vol, quota_hard), move |q| {
            in_namespace_of(&vol_store6, q.namespace())
        })
        .watches_shared_stream(changed_only(site_for_vol, site_spec), move |_site| {
            // Pools were declared or changed: the volumes waiting for one.
            vol_store4
                .state()
                .into_iter()
                .filter(|v| v.status.as_ref().is_none_or(|s| s.location.is_none()))
                .map(|v| ObjectRef::from_obj(v.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::volume::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let sites = Controller::for_shared_stream(site_for, site_store)
        .watches_shared_stream(changed_only(host_for_site, host_summary), |h| {
            Some(ObjectRef::<Site>::new(&h.spec.site))
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::site::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let host_store2 = host_store.clone();
    let hosts = Controller::for_shared_stream(host_for, host_store)
        .watches_shared_stream(site_for_host, move |site| {
            let name = site.name_any();
            host_store2
                .state()
                .into_iter()
                .filter(|h| h.spec.site == name)
                .map(|h| ObjectRef::from_obj(h.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(reconcile::host::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    // A quota's `status.used` follows what its namespace's clusters,
    // nodes, groups and Volumes hold.
    let (rq1, rq2, rq3, rq4) = (
        rq_store.clone(),
        rq_store.clone(),
        rq_store.clone(),
        rq_store.clone(),
    );
    let quotas = Controller::for_shared_stream(rq_for, rq_store)
        .with_config(controller::Config::default().debounce(Duration::from_secs(1)))
        .watches_shared_stream(vc_for_rq, move |o| yukumo_quotas_in(&rq1, o.namespace()))
        .watches_shared_stream(vn_for_rq, move |o| yukumo_quotas_in(&rq2, o.namespace()))
        .watches_shared_stream(ng_for_rq, move |o| yukumo_quotas_in(&rq3, o.namespace()))
        .watches_shared_stream(vol_for_rq, move |o| yukumo_quotas_in(&rq4, o.namespace()))
        .graceful_shutdown_on(stopper(stop.clone()))
        .run(
            reconcile::quota::status::reconcile,
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    tokio::join!(vcs, ngs, vols, sites, hosts, quotas);
    for r in reflectors {
        r.abort();
    }
    tracing::info!("reconcilers stopped");
}
