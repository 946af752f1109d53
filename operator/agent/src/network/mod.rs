//! The host's network: per NetworkGroup present here a bridge and its
//! segment link, guest taps guarded by nftables, and the routers this host
//! runs. One level-triggered loop renders a [`plan::HostPlan`] from the
//! watched NetworkGroups, this host's VirtualNodes and its Site, and applies
//! it with [`dataplane::Dataplane`] on the real kernel. It runs on every
//! change of those objects, on every link, address, route or nftables change
//! in the host's namespace or inside a router namespace that the agent did
//! not make (netlink sockets in each, [`watch`]: that namespace is read in
//! full), on every name coming or going under /run/netns, and every
//! `verify_interval` as a backstop that lists the tables and reads up to
//! [`dataplane::ROUTERS_PER_VERIFY`] router namespaces in full.

pub use yukumo_agent::network::{dataplane, plan, real, ruleset, tunnels, watch};

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use yukumo_api::site::TunnelStatus;
use yukumo_api::{NetworkGroup, Site, VirtualNode, labels};
use yukumo_telemetry::Health;

use crate::register::Metrics;

/// What the compute side needs to know: the bridges that exist now (a guest
/// attached to its group's bridge is started only once that bridge exists).
#[derive(Default)]
pub struct NetState {
    bridges: RwLock<HashSet<String>>,
    /// The tunnels to other Sites, as last measured (while this host holds
    /// its Site's WAN endpoint); the heartbeat reports them.
    tunnels: RwLock<Vec<TunnelStatus>>,
    /// The first pass over the dataplane is over (its filters are in,
    /// whatever else failed).
    passed: std::sync::atomic::AtomicBool,
}

impl NetState {
    pub fn passed(&self) -> bool {
        self.passed.load(std::sync::atomic::Ordering::Acquire)
    }
    pub fn has_bridge(&self, name: &str) -> bool {
        self.bridges.read().expect("poisoned").contains(name)
    }
    pub fn tunnels(&self) -> Vec<TunnelStatus> {
        self.tunnels.read().expect("poisoned").clone()
    }
}

/// How often the tunnels are measured.
const TUNNEL_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Measure the tunnels of the current [`tunnels::Probe`] every
/// [`TUNNEL_PROBE_INTERVAL`] into `state` (and metrics); nothing while this
/// host holds no endpoint.
async fn probe_tunnels(
    ns: Option<String>,
    mut probe: tokio::sync::watch::Receiver<Option<tunnels::Probe>>,
    state: Arc<NetState>,
    metrics: Metrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tracker = tunnels::Tracker::default();
    let mut seen_sites: HashSet<String> = HashSet::new();
    loop {
        let current = probe.borrow_and_update().clone();
        let measured = match current {
            None => Vec::new(),
            Some(p) => {
                let listing = {
                    let ns = ns.clone();
                    tokio::task::spawn_blocking(move || {
                        yukumo_agent::netns::run(
                            ns.as_deref(),
                            "nft",
                            &[
                                "list".into(),
                                "table".into(),
                                "inet".into(),
                                "yukumo".into(),
                            ],
                            None,
                        )
                    })
                    .await
                };
                let counters = match listing {
                    Ok(Ok(l)) => ruleset::tunnel_counters(&l),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot list the tunnel counters");
                        Default::default()
                    }
                    Err(_) => Default::default(),
                };
                let mut jobs = Vec::new();
                for (addr, site) in &p.peers {
                    let (ns, src, dst, site) = (ns.clone(), p.endpoint, *addr, site.clone());
                    let closed = p.closed.contains(addr);
                    jobs.push(async move {
                        if closed {
                            return (dst, site, None);
                        }
                        let rtt = tokio::task::spawn_blocking(move || {
                            yukumo_agent::netns::in_netns_opt(ns.as_deref(), || {
                                tunnels::rtt(src, dst, 3, Duration::from_secs(1))
                            })
                        })
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                        let rtt = rtt.unwrap_or_else(|e| {
                            tracing::warn!(peer = %dst, error = %e, "cannot probe the tunnel");
                            None
                        });
                        (dst, site, rtt)
                    });
                }
                futures::future::join_all(jobs)
                    .await
                    .into_iter()
                    .map(|(dst, site, rtt)| {
                        let c = counters.get(&dst).copied().unwrap_or_default();
                        (dst, site, rtt, c)
                    })
                    .collect()
            }
        };
        let statuses = tracker.update(measured, jiff::Timestamp::now());
        let now_sites: HashSet<String> = statuses.iter().map(|s| s.site.clone()).collect();
        for gone in seen_sites.difference(&now_sites) {
            let l = crate::register::SiteLabel { site: gone.clone() };
            metrics.tunnel_up.remove(&l);
            metrics.tunnel_rtt_seconds.remove(&l);
            for direction in ["rx", "tx"] {
                metrics
                    .tunnel_bytes
                    .remove(&crate::register::TunnelBytesLabel {
                        site: gone.clone(),
                        direction,
                    });
            }
        }
        for s in &statuses {
            let l = crate::register::SiteLabel {
                site: s.site.clone(),
            };
            metrics
                .tunnel_up
                .get_or_create(&l)
                .set(i64::from(s.state == yukumo_api::site::TunnelState::Up));
            metrics
                .tunnel_rtt_seconds
                .get_or_create(&l)
                .set(s.rtt_ms.map_or(f64::NAN, |ms| ms / 1000.0));
            for (direction, v) in [("rx", s.rx_bytes), ("tx", s.tx_bytes)] {
                metrics
                    .tunnel_bytes
                    .get_or_create(&crate::register::TunnelBytesLabel {
                        site: s.site.clone(),
                        direction,
                    })
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        seen_sites = now_sites;
        *state.tunnels.write().expect("poisoned") = statuses;
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(TUNNEL_PROBE_INTERVAL) => {}
            // A new endpoint or peer set: measured at once.
            r = probe.changed() => if r.is_err() { break },
        }
    }
}

pub struct NetConfig {
    pub host: String,
    pub site: String,
    /// `--wan-interface`.
    pub wan_interface: Option<String>,
    pub dataplane: dataplane::Dataplane<real::RealKernel>,
    pub verify_interval: Duration,
}

/// This host's WAN facts: where it has a WAN interface and its Site a WAN
/// endpoint; active when the Site's status names it as the endpoint's holder.
fn gateway_inputs(cfg: &NetConfig, site: Option<&Site>) -> Option<plan::GatewayInputs> {
    let site = site?;
    Some(plan::GatewayInputs {
        dev: cfg.wan_interface.clone()?,
        endpoint: site.spec.gateway.as_ref()?.endpoint()?,
        bandwidth_mbps: site.spec.tunnel.as_ref().and_then(|t| t.bandwidth_mbps),
        encryption: site
            .spec
            .tunnel
            .as_ref()
            .map(|t| t.encryption)
            .unwrap_or_default(),
        wan_mtu: site.spec.tunnel.as_ref().map_or(1500, |t| t.mtu),
        active: site
            .status
            .as_ref()
            .and_then(|s| s.active_gateway.as_deref())
            == Some(cfg.host.as_str()),
    })
}

/// Drive a watch stream, poking the loop on every item it yields.
async fn poke_on<T>(stream: impl futures::Stream<Item = T>, tx: mpsc::Sender<()>) {
    stream
        .for_each(|_| {
            let _ = tx.try_send(());
            futures::future::ready(())
        })
        .await
}

pub async fn run(
    client: Client,
    cfg: NetConfig,
    state: Arc<NetState>,
    metrics: Metrics,
    health: Health,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    // Kernel events inside router namespaces, and names coming and going
    // under /run/netns, queue their routers (`watch`).
    let watches = watch::RouterWatches::new(tx.clone());
    if let Err(e) = watches.watch_netns_dir() {
        tracing::warn!(error = %e, "cannot watch /run/netns; the verification backstop covers deleted router namespaces");
    }
    let mut cfg = cfg;
    cfg.dataplane = cfg.dataplane.with_watches(watches.clone());
    let (ng_store, ng_writer) = reflector::store::<NetworkGroup>();
    let (vn_store, vn_writer) = reflector::store::<VirtualNode>();
    let (site_store, site_writer) = reflector::store::<Site>();
    let ngs = reflector(
        ng_writer,
        watcher(
            Api::<NetworkGroup>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .applied_objects();
    let vns = reflector(
        vn_writer,
        watcher(
            Api::<VirtualNode>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("{}={}", labels::HOST, cfg.host))
                .any_semantic(),
        )
        .modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    let sites = reflector(
        site_writer,
        watcher(
            Api::<Site>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", cfg.site)),
        ),
    )
    .default_backoff()
    .applied_objects();
    let watches = tokio::spawn(futures::future::join3(
        poke_on(ngs, tx.clone()),
        poke_on(vns, tx.clone()),
        poke_on(sites, tx.clone()),
    ));
    let _ = tokio::join!(ng_store.wait_until_ready(), vn_store.wait_until_ready());
    tracing::info!(host = %cfg.host, "network reconciler started");
    // The verification backstop comes every `verify_interval`, or less often
    // where a verification pass is slow (many routers), so that it takes at
    // most about a third of a core.
    let mut period = cfg.verify_interval;
    let mut next_verify = tokio::time::Instant::now();
    let mut first = true;
    let mut last_error: Option<String> = None;
    let mut memo = plan::PlanMemo::default();
    let (probe_tx, probe_rx) = tokio::sync::watch::channel::<Option<tunnels::Probe>>(None);
    let prober = tokio::spawn(probe_tunnels(
        cfg.dataplane.kernel.host_ns(),
        probe_rx,
        state.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    loop {
        let poked = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(next_verify) => false,
            _ = rx.recv() => true,
        };
        if poked {
            // Let a burst of changes settle into one pass.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
        }
        health.beat("network-reconcile", period * 5);
        let groups = ng_store.state();
        let nodes = vn_store.state();
        let site = site_store.state().into_iter().next();
        let external = site.as_ref().and_then(|s| s.spec.external_network.clone());
        let gateway = gateway_inputs(&cfg, site.as_deref());
        let prefix = cfg.dataplane.router_prefix.clone();
        let p = plan::plan_memo(
            &plan::Inputs {
                host: &cfg.host,
                netns_prefix: &prefix,
                groups: &groups,
                nodes: &nodes,
                external: external.as_ref(),
                underlay: cfg.dataplane.env.underlay,
                site: &cfg.site,
                gateway: gateway.as_ref(),
            },
            &mut memo,
        );
        let probe = p
            .tunnel
            .as_ref()
            .filter(|t| t.active && !t.peers.is_empty())
            .map(|t| tunnels::Probe {
                endpoint: t.endpoint.addr(),
                peers: t.peers.clone(),
                closed: t.closed.clone(),
            });
        probe_tx.send_if_modified(|cur| {
            let changed = *cur != probe;
            if changed {
                *cur = probe;
            }
            changed
        });
        let started = Instant::now();
        let pass = if poked {
            dataplane::Pass::Changed
        } else {
            dataplane::Pass::Verify
        };
        let result = cfg.dataplane.apply(&p, pass).await;
        metrics
            .network_pass_seconds
            .get_or_create(&crate::register::PassLabel { pass: pass.label() })
            .observe(started.elapsed().as_secs_f64());
        if !poked {
            period = cfg.verify_interval.max(started.elapsed() * 3);
            next_verify = tokio::time::Instant::now() + period;
        }
        state
            .passed
            .store(true, std::sync::atomic::Ordering::Release);
        match result {
            Ok(ch) => {
                let n = ch.total();
                if n > 0 {
                    metrics.network_changes.inc_by(n as u64);
                    if first {
                        tracing::info!(
                            ?ch,
                            took_ms = started.elapsed().as_millis() as u64,
                            "network converged"
                        );
                    } else {
                        tracing::info!(
                            ?ch,
                            took_ms = started.elapsed().as_millis() as u64,
                            "network repaired or updated"
                        );
                    }
                }
                *state.bridges.write().expect("poisoned") =
                    p.segments.values().map(|s| s.bridge.clone()).collect();
                first = false;
                last_error = None;
            }
            Err(e) => {
                metrics.network_errors.inc();
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, "network pass failed; retrying");
                }
                last_error = Some(msg);
                // Retry soon, not at the next tick.
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    watches.abort();
    prober.abort();
}
