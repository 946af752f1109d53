//! Host registration and heartbeat.
//!
//! The agent owns, by server-side apply with its own field manager, the
//! Host's `spec.site`, `spec.gateway`, `spec.uplink` and every status field
//! except the controller's `Ready`/`Reconciling`/`Stalled` conditions. Each
//! heartbeat re-applies the whole agent-owned status (apply semantics would
//! otherwise drop fields left out), so the Host always shows current facts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use yukumo_api::common::{Condition, ConditionStatus, Conditions, Resources};
use yukumo_api::host::{Host, HostCapabilities, HostStatus};
use yukumo_api::{labels, managers};
use yukumo_telemetry::Health;

use crate::Args;
use crate::compute::images::CacheMetrics;
use crate::hypervisor::{Hypervisor, HypervisorInfo};

/// The agent's own condition on its Host.
pub const HYPERVISOR_READY: &str = "HypervisorReady";

/// How often the heartbeat re-reads the hypervisor's full facts.
const INFO_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Label of a libvirt domain lifecycle event (`stopped`, `crashed`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

/// Agent metrics.
#[derive(Clone)]
pub struct Metrics {
    pub heartbeats: Counter,
    pub heartbeat_errors: Counter,
    pub rss_bytes: Gauge,
    pub libvirt_events: Family<EventLabel, Counter>,
    /// Mutating libvirt calls (define, start, destroy, undefine), by op.
    pub libvirt_mutations: Family<OpLabel, Counter>,
    /// Forced full resyncs (SIGHUP) done.
    pub full_resyncs: Counter,
    /// Kernel changes made by the network reconciler (links, FDB entries,
    /// tables, addresses, namespaces, DHCP servers): 0 on a converged host.
    pub network_changes: Counter,
    /// Network passes that failed (retried).
    pub network_errors: Counter,
    pub images: CacheMetrics,
    /// Files in this host's pools that carry yukumo's marker but have no
    /// Volume (reported, never deleted).
    pub orphaned_volumes: Gauge,
    /// Storage operations done (create, grow, delete), by op.
    pub storage_ops: Family<OpLabel, Counter>,
    /// Seconds a network pass took, by pass (`changed`: on a watch event;
    /// `verify`: the periodic check of the host).
    pub network_pass_seconds: Family<PassLabel, Histogram>,
    /// Seconds from a VirtualNode's creation to its domain running here
    /// (scheduling, image, disks, define and start).
    pub provision_seconds: Histogram,
    /// 1 while the tunnel to a peer Site answers (this host holding its
    /// Site's WAN endpoint), by peer Site.
    pub tunnel_up: Family<SiteLabel, Gauge>,
    /// Round trip to a peer Site's endpoint.
    pub tunnel_rtt_seconds: Family<SiteLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Tunnel bytes to (`tx`) and from (`rx`) a peer Site, as the filter
    /// table counts them (from zero when the table is rewritten).
    pub tunnel_bytes: Family<TunnelBytesLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TunnelBytesLabel {
    pub site: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PassLabel {
    pub pass: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

impl Metrics {
    /// Count the mutating libvirt calls a step made.
    pub fn mutated(&self, ops: &[&'static str]) {
        for op in ops {
            self.libvirt_mutations
                .get_or_create(&OpLabel {
                    op: (*op).to_string(),
                })
                .inc();
        }
    }
}

impl Metrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Metrics {
            heartbeats: Counter::default(),
            heartbeat_errors: Counter::default(),
            rss_bytes: Gauge::default(),
            libvirt_events: Family::default(),
            libvirt_mutations: Family::default(),
            full_resyncs: Counter::default(),
            network_changes: Counter::default(),
            network_errors: Counter::default(),
            images: CacheMetrics::default(),
            orphaned_volumes: Gauge::default(),
            storage_ops: Family::default(),
            network_pass_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            provision_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
            tunnel_up: Family::default(),
            tunnel_rtt_seconds: Family::default(),
            tunnel_bytes: Family::default(),
        };
        r.register(
            "yukumo_agent_tunnel_up",
            "1 while the tunnel to the peer Site answers (on the host holding its Site's WAN endpoint)",
            m.tunnel_up.clone(),
        );
        r.register(
            "yukumo_agent_tunnel_rtt_seconds",
            "Round trip to the peer Site's WAN endpoint",
            m.tunnel_rtt_seconds.clone(),
        );
        r.register(
            "yukumo_agent_tunnel_bytes",
            "Tunnel bytes to (tx) and from (rx) the peer Site, as the filter table counts them",
            m.tunnel_bytes.clone(),
        );
        r.register(
            "yukumo_agent_orphaned_volumes",
            "Files in this host's pools with yukumo's marker but no Volume (kept, never deleted)",
            m.orphaned_volumes.clone(),
        );
        r.register(
            "yukumo_agent_storage_ops",
            "Storage operations done on this host's pools, by op",
            m.storage_ops.clone(),
        );
        r.register(
            "yukumo_agent_network_changes",
            "Kernel changes made by the network reconciler",
            m.network_changes.clone(),
        );
        r.register(
            "yukumo_agent_network_errors",
            "Network reconcile passes that failed",
            m.network_errors.clone(),
        );
        r.register(
            "yukumo_agent_heartbeats",
            "Heartbeats written",
            m.heartbeats.clone(),
        );
        r.register(
            "yukumo_agent_heartbeat_errors",
            "Heartbeats that failed",
            m.heartbeat_errors.clone(),
        );
        r.register(
            "yukumo_agent_resident_memory_bytes",
            "Resident memory of the agent",
            m.rss_bytes.clone(),
        );
        r.register(
            "yukumo_agent_libvirt_domain_events",
            "libvirt domain lifecycle events received, by event",
            m.libvirt_events.clone(),
        );
        r.register(
            "yukumo_agent_libvirt_mutations",
            "Mutating libvirt calls (define, start, destroy, undefine), by op",
            m.libvirt_mutations.clone(),
        );
        r.register(
            "yukumo_agent_full_resyncs",
            "Forced full resyncs (SIGHUP) done",
            m.full_resyncs.clone(),
        );
        r.register(
            "yukumo_agent_image_evictions",
            "Unused images evicted from the image cache",
            m.images.evictions.clone(),
        );
        r.register(
            "yukumo_agent_image_evicted_bytes",
            "Bytes freed by image cache evictions",
            m.images.evicted_bytes.clone(),
        );
        r.register(
            "yukumo_agent_image_cache_bytes",
            "Size of the image cache's files",
            m.images.bytes.clone(),
        );
        r.register(
            "yukumo_agent_image_fetched_bytes",
            "Image bytes fetched into the cache (counted as they arrive: the progress of a fetch)",
            m.images.fetched_bytes.clone(),
        );
        r.register(
            "yukumo_agent_image_fetch_duration_seconds",
            "Seconds an image fetch took, to the verified file",
            m.images.fetch_seconds.clone(),
        );
        r.register(
            "yukumo_agent_network_pass_duration_seconds",
            "Seconds a network pass took, by pass (changed: on a watch event; verify: the periodic check)",
            m.network_pass_seconds.clone(),
        );
        r.register(
            "yukumo_agent_provision_duration_seconds",
            "Seconds from a VirtualNode's creation to its domain running on this host",
            m.provision_seconds.clone(),
        );
        m
    }
}

/// The Host's spec as the agent declares it.
pub fn host_spec_patch(args: &Args) -> serde_json::Value {
    let mut spec = serde_json::json!({ "site": args.site, "gateway": args.gateway });
    if let Some(u) = &args.uplink {
        spec["uplink"] = u.clone().into();
    }
    serde_json::json!({
        "apiVersion": Host::api_version(&()),
        "kind": Host::kind(&()),
        "metadata": {
            "name": args.host_name,
            "labels": { labels::SITE: args.site, labels::MANAGED_BY: labels::MANAGED_BY_VALUE },
        },
        "spec": spec,
    })
}

/// What the host offers of what its kernel can do: 802.1Q only with an
/// uplink to carry the tagged segments (the scheduler and the router
/// placement keep VLAN groups on hosts that offer it), and no networking at
/// all with `--no-network`.
pub fn offered_capabilities(
    mut caps: HostCapabilities,
    uplink: Option<&str>,
    no_network: bool,
) -> HostCapabilities {
    let why = if no_network {
        Some("the agent manages no networking (--no-network)")
    } else if uplink.is_none() {
        Some("the kernel has it, but the agent has no --uplink to carry tagged segments")
    } else {
        None
    };
    if let Some(why) = why
        && caps.vlan_8021q
    {
        caps.vlan_8021q = false;
        for n in caps.notes.iter_mut().filter(|n| n.starts_with("vlan")) {
            *n = format!("vlan 802.1q: not offered ({why})");
        }
    }
    caps
}

/// Before the first sweep of stale domains (and the first network pass,
/// which puts its filters in), a working hypervisor is not reported ready:
/// a host returning after it was lost (its domains of nodes that restarted
/// elsewhere still running) is not Ready — nothing is placed on it, its
/// Site's tunnels stay closed — until they are gone. (The first heartbeat
/// waits for them, up to [`FIRST_HEARTBEAT_WAIT`]; this says why after.)
pub fn not_swept(status: &mut HostStatus) {
    if status.conditions.is_true(HYPERVISOR_READY) {
        status.conditions.set_condition(Condition::new(
            HYPERVISOR_READY,
            ConditionStatus::False,
            yukumo_api::Reason::StaleDomainsNotSwept,
            "removing the domains here whose nodes are no longer this host's before reporting ready",
            None,
        ));
    }
}

/// The agent-owned part of the Host's status, as a pure function of facts.
pub fn agent_status(
    args: &Args,
    info: Result<&HypervisorInfo, String>,
    caps: &HostCapabilities,
    addresses: &[std::net::Ipv4Addr],
    previous: &[Condition],
    now: Timestamp,
) -> HostStatus {
    let mut conditions: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ == HYPERVISOR_READY)
        .cloned()
        .collect();
    let (capacity, allocatable, hypervisor) = match &info {
        Ok(i) => {
            conditions.set_condition(Condition::new(
                HYPERVISOR_READY,
                ConditionStatus::True,
                yukumo_api::Reason::Connected,
                format!("connected to {}", args.libvirt_uri),
                None,
            ));
            let cap = Resources {
                cpu: i.cpus,
                memory_mib: i.memory_mib,
            };
            let alloc = Resources {
                cpu: (f64::from(i.cpus.saturating_sub(args.reserved_cpu))
                    * args.cpu_overcommit.max(0.0))
                .floor() as u32,
                memory_mib: i.memory_mib.saturating_sub(args.reserved_memory_mib),
            };
            (Some(cap), Some(alloc), Some(i.description.clone()))
        }
        Err(e) => {
            conditions.set_condition(Condition::new(
                HYPERVISOR_READY,
                ConditionStatus::False,
                yukumo_api::Reason::LibvirtUnreachable,
                e.clone(),
                None,
            ));
            (None, None, None)
        }
    };
    let caps = caps.clone();
    HostStatus {
        observed_generation: None,
        conditions,
        capacity,
        allocatable,
        addresses: addresses.to_vec(),
        wan_interface: args.wan_interface.clone(),
        wireguard_public_key: None,
        tunnels: vec![],
        capabilities: Some(caps),
        last_heartbeat_time: Some(Time(now)),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        hypervisor,
        storage_pools: vec![],
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
    }
}

/// How long the first heartbeat waits for the first sweep of stale domains
/// and the first network pass.
pub const FIRST_HEARTBEAT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the agent's other tasks tell the heartbeat.
pub struct FromTasks {
    /// The network's state (tunnels measured, first pass over).
    pub net: std::sync::Arc<crate::network::NetState>,
    /// The compute resync's first sweep of stale domains is done.
    pub swept: watch::Receiver<bool>,
    /// This host's WireGuard public key (a gateway with a WAN interface);
    /// published while the kernel has WireGuard.
    pub wireguard: Option<String>,
}

/// Register the Host, then heartbeat until shutdown.
pub async fn run(
    args: Args,
    client: Client,
    hv: Hypervisor,
    metrics: Metrics,
    health: Health,
    from: FromTasks,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let hosts: Api<Host> = Api::all(client);
    let pp = PatchParams::apply(managers::AGENT).force();
    // The site of a Host is immutable (CEL): a mismatch is refused by the API
    // server with a message naming spec.site, and the agent stops.
    hosts
        .patch(&args.host_name, &pp, &Patch::Apply(host_spec_patch(&args)))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "registering Host {:?} at site {:?}: {e}",
                args.host_name,
                args.site
            )
        })?;
    tracing::info!(host = %args.host_name, "registered Host");

    let caps = tokio::task::spawn_blocking(crate::probe::capabilities)
        .await?
        .unwrap_or_else(|e| HostCapabilities {
            notes: vec![format!("probe failed: {e}")],
            ..Default::default()
        });
    let caps = offered_capabilities(caps, args.uplink.as_deref(), args.no_network);
    tracing::info!(notes = ?caps.notes, "kernel capabilities probed");

    // KVM support is slow to read from libvirt: learn it in the background
    // and report it from the next heartbeat on.
    let kvm = std::sync::Arc::new(std::sync::OnceLock::new());
    {
        let (hv, kvm) = (hv.clone(), kvm.clone());
        tokio::spawn(async move {
            match hv.kvm_advertised().await {
                Ok(k) => {
                    let _ = kvm.set(k);
                }
                Err(e) => tracing::warn!(error = %e, "cannot read hypervisor capabilities"),
            }
        });
    }
    // The first heartbeat waits for the first sweep of stale domains and
    // the first network pass: a host returning after it was lost stays
    // NotReady (its last heartbeat is old) until they are done, and one
    // restarted within its grace stays Ready (no NotReady heartbeat in
    // between, which would move routers and WAN endpoints away). After
    // FIRST_HEARTBEAT_WAIT it heartbeats anyway, not ready, saying why.
    let FromTasks {
        net,
        swept,
        wireguard,
    } = from;
    let waited = std::time::Instant::now();
    loop {
        if *swept.borrow() && (args.no_network || net.passed()) {
            tracing::info!(took = ?waited.elapsed(), "stale domains swept and network passed: heartbeating");
            break;
        }
        if waited.elapsed() >= FIRST_HEARTBEAT_WAIT {
            tracing::warn!(
                "stale domains not swept (or no network pass) yet: heartbeating, not ready"
            );
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
    let mut previous: Vec<Condition> = Vec::new();
    let mut cached: Option<(std::time::Instant, HypervisorInfo)> = None;
    let mut interval = tokio::time::interval(args.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        // Full facts at start and every minute; a cheap ping in between.
        let stale = cached
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= INFO_REFRESH);
        let info = if stale {
            hv.info()
                .await
                .inspect(|i| cached = Some((std::time::Instant::now(), i.clone())))
        } else {
            let (_, i) = cached.clone().expect("cached");
            hv.ping().await.map(|()| i)
        };
        let info = info.map_err(|e| {
            cached = None;
            e.to_string()
        });
        if let Err(e) = &info {
            tracing::warn!(error = %e, "hypervisor unreachable");
        }
        let (ns, uplink) = (args.netns.clone(), args.uplink.clone());
        let addresses =
            tokio::task::spawn_blocking(move || crate::probe::underlay_addresses(ns, uplink))
                .await?
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot list underlay addresses");
                    Vec::new()
                });
        let caps = HostCapabilities {
            kvm: kvm.get().copied().unwrap_or(false),
            ..caps.clone()
        };
        let mut status = agent_status(
            &args,
            info.as_ref().map_err(|e| e.clone()),
            &caps,
            &addresses,
            &previous,
            Timestamp::now(),
        );
        status.tunnels = net.tunnels();
        status.wireguard_public_key = wireguard.clone().filter(|_| caps.wireguard);
        if !*swept.borrow() || !(args.no_network || net.passed()) {
            not_swept(&mut status);
        }
        let patch = yukumo_api::status_apply_patch::<Host, _>(&status);
        match hosts
            .patch_status(&args.host_name, &pp, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                previous = status.conditions.clone();
                metrics.heartbeats.inc();
                health.beat("heartbeat", args.heartbeat_interval * 3);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Deleted by hand: register again, level-triggered.
                tracing::warn!("Host object is gone; registering again");
                metrics.heartbeat_errors.inc();
                if let Err(e) = hosts
                    .patch(&args.host_name, &pp, &Patch::Apply(host_spec_patch(&args)))
                    .await
                {
                    tracing::warn!(error = %e, "re-registration failed");
                }
            }
            Err(e) => {
                metrics.heartbeat_errors.inc();
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        if let Some(rss) = yukumo_telemetry::rss_bytes() {
            metrics.rss_bytes.set(rss as i64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args() -> Args {
        Args::parse_from([
            "yukumo-agent",
            "--host-name",
            "h1",
            "--site",
            "a",
            "--reserved-cpu",
            "1",
        ])
    }

    #[test]
    fn a_working_hypervisor_is_not_ready_before_the_first_sweep() {
        let info = HypervisorInfo {
            cpus: 4,
            memory_mib: 8192,
            description: "libvirt".into(),
        };
        let mut s = agent_status(
            &args(),
            Ok(&info),
            &HostCapabilities::default(),
            &[],
            &[],
            Timestamp::now(),
        );
        not_swept(&mut s);
        let c = s.conditions.get_condition(HYPERVISOR_READY).unwrap();
        assert_eq!(c.status, ConditionStatus::False);
        assert_eq!(c.reason, yukumo_api::Reason::StaleDomainsNotSwept);
        // An unreachable libvirt keeps saying so.
        let mut s = agent_status(
            &args(),
            Err("down".into()),
            &HostCapabilities::default(),
            &[],
            &[],
            Timestamp::now(),
        );
        not_swept(&mut s);
        let c = s.conditions.get_condition(HYPERVISOR_READY).unwrap();
        assert_eq!(c.reason, yukumo_api::Reason::LibvirtUnreachable);
    }

    #[test]
    fn status_reflects_hypervisor() {
        let info = HypervisorInfo {
            cpus: 4,
            memory_mib: 8192,
            description: "libvirt 9.0.0 / QEMU".into(),
        };
        let now = Timestamp::now();
        let s = agent_status(
            &args(),
            Ok(&info),
            &HostCapabilities::default(),
            &["10.1.0.2".parse().unwrap()],
            &[],
            now,
        );
        assert!(s.conditions.is_true(HYPERVISOR_READY));
        assert_eq!(
            s.capacity,
            Some(Resources {
                cpu: 4,
                memory_mib: 8192
            })
        );
        assert_eq!(
            s.allocatable,
            Some(Resources {
                cpu: 3,
                memory_mib: 8192 - 256
            })
        );
        assert_eq!(s.addresses, vec![std::net::Ipv4Addr::new(10, 1, 0, 2)]);
        let down = agent_status(
            &args(),
            Err("connection refused".into()),
            &HostCapabilities::default(),
            &[],
            &s.conditions,
            now,
        );
        assert!(!down.conditions.is_true(HYPERVISOR_READY));
        assert_eq!(down.capacity, None);
        assert_eq!(
            down.conditions[0].reason,
            yukumo_api::Reason::LibvirtUnreachable
        );
    }

    #[test]
    fn vlan_is_offered_only_with_an_uplink() {
        let kernel = HostCapabilities {
            vlan_8021q: true,
            notes: vec!["bridge: ok".into(), "vlan 802.1q: ok".into()],
            ..Default::default()
        };
        let with = offered_capabilities(kernel.clone(), Some("ul0"), false);
        assert!(with.vlan_8021q);
        assert_eq!(with.notes, kernel.notes);
        let without = offered_capabilities(kernel.clone(), None, false);
        assert!(!without.vlan_8021q);
        assert!(
            without.notes[1].starts_with("vlan 802.1q: not offered")
                && without.notes[1].contains("--uplink"),
            "{:?}",
            without.notes
        );
        assert!(!offered_capabilities(kernel, Some("ul0"), true).vlan_8021q);
        // A kernel without 802.1Q keeps its own note (the kernel's error).
        let missing = HostCapabilities {
            notes: vec!["vlan 802.1q: unavailable (EOPNOTSUPP)".into()],
            ..Default::default()
        };
        assert_eq!(offered_capabilities(missing.clone(), None, false), missing);
    }

    #[test]
    fn spec_patch_names_site() {
        let p = host_spec_patch(&args());
        assert_eq!(p["spec"]["site"], "a");
        assert_eq!(p["metadata"]["labels"]["yukumo.io/site"], "a");
        assert!(
            p["spec"].get("schedulable").is_none(),
            "schedulable belongs to the operator"
        );
    }
}
