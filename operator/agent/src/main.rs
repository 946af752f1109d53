//! yukumo-agent: the per-host agent.
//!
//! It registers its Host (site, capacity from libvirt, underlay addresses,
//! kernel capabilities probed for real) and heartbeats into the Host's
//! status (the controller turns a stale heartbeat into `Ready=False`), and
//! turns the VirtualNodes placed on its host into libvirt domains.
// Unsafe code is allowed only where a module says why (a packet socket for
// gratuitous ARP, librados through dlopen).
#![deny(unsafe_code)]

mod compute;
mod console;
mod finalizer;
mod hypervisor;
mod libvirt;
mod network;
mod node_labels;
mod probe;
mod register;
mod scoped;
mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kube::Client;
use prometheus_client::registry::Registry;
use yukumo_telemetry::{Health, parse_duration};

#[derive(Parser, Debug, Clone)]
#[command(name = "yukumo-agent", version, about)]
pub struct Args {
    /// Name of this host's Host object (the node name on a real cluster).
    #[arg(long, env = "NODE_NAME")]
    pub host_name: String,
    /// Site the host belongs to (with `--from-node-labels`, the default
    /// for a Node without the `yukumo.io/site` label).
    #[arg(long, env = "YUKUMO_SITE", default_value = "")]
    pub site: String,
    /// Read the Site, the gateway role and the uplink from this host's
    /// Kubernetes Node labels `yukumo.io/site`, `yukumo.io/gateway`
    /// (`"true"`/`"false"`) and `yukumo.io/uplink`, where present (they win
    /// over `--site`, `--gateway` and `--uplink`).
    #[arg(long)]
    pub from_node_labels: bool,
    /// libvirt URI of the host's hypervisor.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Network namespace (under /run/netns) holding the host's networking;
    /// default: the agent's own namespace.
    #[arg(long)]
    pub netns: Option<String>,
    /// The host is attached to the Site's external network (routers, public IPs).
    #[arg(long)]
    pub gateway: bool,
    /// Interface carrying the segments.
    #[arg(long)]
    pub uplink: Option<String>,
    /// Interface facing the WAN: with `--gateway`, the host may hold its
    /// Site's `gateway.wanEndpoint` there and the tunnels to other Sites.
    #[arg(long)]
    pub wan_interface: Option<String>,
    /// How often to heartbeat.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// CPUs kept for the host itself.
    #[arg(long, default_value_t = 0)]
    pub reserved_cpu: u32,
    /// vCPUs offered per physical CPU (after the reserve), e.g. 4 for hosts
    /// that run many small, mostly idle guests.
    #[arg(long, default_value_t = 1.0)]
    pub cpu_overcommit: f64,
    /// Memory (MiB) kept for the host itself.
    #[arg(long, default_value_t = 256)]
    pub reserved_memory_mib: u64,
    /// libvirt domain type of guests: `kvm`, or `qemu` for software emulation
    /// (TCG) where KVM is not usable.
    #[arg(long, default_value = "kvm", value_parser = ["kvm", "qemu"])]
    pub domain_type: String,
    /// How often to compare libvirt's domains with the VirtualNodes (one list
    /// call per pass), sweep orphans and bound the image cache. libvirt's
    /// domain lifecycle events queue a changed domain's node at once; this
    /// is the backstop.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Bound of the image cache (e.g. `20Gi`, `500Mi`, or bytes): beyond
    /// it, the least recently used images no node uses are evicted.
    #[arg(long, default_value = "20Gi", value_parser = compute::images::parse_size)]
    pub image_cache_max_bytes: u64,
    /// How often the network reconciler verifies the kernel state (router
    /// namespaces, their tables and DHCP servers) besides reacting to
    /// `ip monitor` / `nft monitor` events of the host's namespace.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub network_verify_interval: Duration,
    /// Underlay (VXLAN tunnel endpoint) address; default: the first IPv4
    /// address of `--uplink`, else of the host's namespace.
    #[arg(long)]
    pub underlay_address: Option<std::net::Ipv4Addr>,
    /// Manage no networking (scale tests on the libvirt test driver).
    #[arg(long)]
    pub no_network: bool,
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Serve the guests' serial consoles here (TLS; each caller checked by
    /// the API server: `console.rs`). Unset: no console endpoint.
    #[arg(long)]
    pub console_addr: Option<SocketAddr>,
    /// The console endpoint's URL as clients reach it (published in the
    /// Host's status; its host is in the certificate). Default:
    /// `https://<the first underlay address>:<port of --console-addr>`.
    #[arg(long, requires = "console_addr")]
    pub console_url: Option<String>,
    /// Portal of this host's iSCSI target (tgtd), as other hosts reach it,
    /// e.g. `10.255.0.1:3260`, or `auto`: the host's first underlay address
    /// (of `--uplink`) on port 3260 (one value for a whole DaemonSet). The
    /// volumes of its `iscsi` pools are exported there.
    #[arg(long)]
    pub iscsi_portal: Option<String>,
    /// Control port of this host's tgtd (`tgtd -C`, default 0).
    #[arg(long, default_value_t = 0)]
    pub iscsi_control_port: u16,
    /// A Ceph keyring file with the key of each `rbd` pool's user
    /// (`[client.<user>] key = …`): the pool's host manages its images with
    /// it, and every host gets a libvirt secret of it for QEMU.
    #[arg(long)]
    pub ceph_keyring: Option<PathBuf>,
    /// Directory for the agent's files (image cache, disks, config disks).
    #[arg(long, default_value = "/var/lib/yukumo")]
    pub state_dir: PathBuf,
}

/// Keep glibc's allocator to two arenas: by default every thread that
/// allocates (the blocking pool preparing disks, libvirt's thread) gets an
/// arena of its own, and their pages stay resident.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(storage::rados::SUBCOMMAND))
    {
        storage::rados::child_main(&std::env::args_os().skip(2).collect::<Vec<_>>());
    }
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Disk preparation and namespace work run on the blocking pool: a
        // few threads at a time keep memory flat when 100 nodes arrive.
        .max_blocking_threads(8)
        .enable_all()
        .build()?
        .block_on(agent())
}

async fn agent() -> anyhow::Result<()> {
    yukumo_telemetry::init_tracing();
    let mut args = Args::parse();
    std::fs::create_dir_all(&args.state_dir)?;
    // Two netlink sockets per router namespace (network::watch): a host
    // with many routers needs more descriptors than the usual soft limit.
    raise_fd_limit();
    let client = Client::try_default().await?;
    let defaults = node_labels::Settings {
        site: args.site.clone(),
        gateway: args.gateway,
        uplink: args.uplink.clone(),
        wan_interface: args.wan_interface.clone(),
    };
    let labels = if args.from_node_labels {
        let node = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .get(&args.host_name)
            .await
            .map_err(|e| {
                anyhow::anyhow!("--from-node-labels: reading Node {}: {e}", args.host_name)
            })?;
        node.metadata.labels.unwrap_or_default()
    } else {
        Default::default()
    };
    let settings =
        node_labels::resolve(&args.host_name, &labels, defaults).map_err(anyhow::Error::msg)?;
    (args.site, args.gateway, args.uplink, args.wan_interface) = (
        settings.site,
        settings.gateway,
        settings.uplink,
        settings.wan_interface,
    );
    // A gateway with a WAN interface has a WireGuard key pair (made once,
    // kept in the state directory); its public key is published when the
    // kernel has WireGuard (register.rs).
    let wireguard = if args.gateway && args.wan_interface.is_some() && !args.no_network {
        Some(
            yukumo_agent::network::wireguard::Keys::load_or_create(&args.state_dir).map_err(
                |e| anyhow::anyhow!("WireGuard key in {}: {e}", args.state_dir.display()),
            )?,
        )
    } else {
        None
    };
    let mut registry = Registry::default();
    let metrics = register::Metrics::register(&mut registry);
    let health = Health::default();
    let shutdown = yukumo_telemetry::shutdown_signal();
    let server = tokio::spawn(yukumo_telemetry::serve(
        args.metrics_addr,
        registry,
        health.clone(),
        shutdown.clone(),
        Default::default(),
    ));
    // Domain lifecycle events (a domain stopped, crashed or undefined by
    // hand) reach the compute reconciler through this channel.
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let hv = hypervisor::Hypervisor::start_with_events(&args.libvirt_uri, events_tx);
    tracing::info!(host = %args.host_name, site = %args.site, uri = %args.libvirt_uri, "agent starting");
    let net_state = std::sync::Arc::new(network::NetState::default());
    // QEMU's key to `rbd` pools: this host's libvirt secrets, kept from the
    // keyring (at start, then every minute: a libvirtd with fresh state
    // gets them back).
    if let Some(keyring) = args.ceph_keyring.clone() {
        let (hv, mut stop) = (hv.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                match storage::ceph::ensure_secrets(&hv, &keyring).await {
                    Ok(w) if !w.is_empty() => tracing::info!(users = ?w, "Ceph secrets written"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "Ceph secrets"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
                    _ = stop.changed() => break,
                }
            }
        });
    }
    // The host's first underlay address (of `--uplink`), probed once when
    // something needs it: the iSCSI portal, the console URL, the dataplane.
    let probed = std::cell::OnceCell::new();
    let (netns, uplink) = (args.netns.clone(), args.uplink.clone());
    let first_underlay = || -> anyhow::Result<Option<std::net::Ipv4Addr>> {
        if let Some(a) = probed.get() {
            return Ok(*a);
        }
        let a = probe::underlay_addresses(netns.clone(), uplink.clone())?
            .first()
            .copied();
        Ok(*probed.get_or_init(|| a))
    };
    if args.iscsi_portal.as_deref() == Some("auto") {
        let a = first_underlay()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "--iscsi-portal auto: the host has no underlay address{}; give the portal as IP:PORT",
                    args.uplink
                        .as_deref()
                        .map(|u| format!(" on its uplink {u}"))
                        .unwrap_or_default()
                )
            })?;
        args.iscsi_portal = Some(format!("{a}:3260"));
        tracing::info!(portal = ?args.iscsi_portal, "iSCSI portal");
    }
    if let Some(p) = &args.iscsi_portal
        && !p
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0))
    {
        anyhow::bail!("--iscsi-portal {p:?}: give HOST:PORT (e.g. 10.255.0.1:3260) or auto");
    }
    let console = match args.console_addr {
        None => None,
        Some(addr) => {
            let url = match &args.console_url {
                Some(u) => u.clone(),
                None => {
                    let a = first_underlay()?.ok_or_else(|| {
                        anyhow::anyhow!(
                            "--console-addr: no address for the URL; give --console-url"
                        )
                    })?;
                    format!("https://{a}:{}", addr.port())
                }
            };
            Some(console::prepare(addr, &url, &args.state_dir)?)
        }
    };
    let endpoint = console.as_ref().map(|c| c.endpoint.clone());
    let compute = compute::reconcile::ComputeCtx::new(
        client.clone(),
        hv.clone(),
        std::sync::Arc::new(compute::disks::Files),
        &args,
        &metrics,
        health.clone(),
        compute::reconcile::HostServices {
            net: (!args.no_network).then(|| net_state.clone()),
            console: endpoint,
        },
    )?;
    let network_task = if args.no_network {
        None
    } else {
        let underlay = match args.underlay_address {
            Some(a) => Some(a),
            None => first_underlay()?,
        };
        tracing::info!(?underlay, "network dataplane");
        let cfg = network::NetConfig {
            host: args.host_name.clone(),
            site: args.site.clone(),
            wan_interface: args.wan_interface.clone(),
            verify_interval: args.network_verify_interval,
            dataplane: network::dataplane::Dataplane::new(
                network::real::RealKernel::new(args.netns.clone(), args.state_dir.clone())
                    .with_wireguard(wireguard.clone()),
                match &args.netns {
                    Some(ns) => format!("{ns}-"),
                    None => "yk-".to_string(),
                },
                yukumo_agent::network::decide::HostEnv {
                    underlay,
                    uplink: args.uplink.clone(),
                },
                args.netns.clone(),
            ),
        };
        Some(tokio::spawn(network::run(
            client.clone(),
            cfg,
            net_state.clone(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )))
    };
    let images = compute.images.clone();
    let (swept_tx, swept) = tokio::sync::watch::channel(false);
    let compute_task = tokio::spawn(compute::resync::run(
        compute,
        args.resync_interval,
        Some(events_rx),
        swept_tx,
        shutdown.clone(),
    ));
    let storage_task = tokio::spawn(storage::reconcile::run(
        storage::reconcile::StorageCtx::new(
            client.clone(),
            storage::pools::HostPools {
                libvirt: hv.clone(),
                ceph: storage::ceph::Ceph {
                    keyring: args.ceph_keyring.clone(),
                    netns: args.netns.clone(),
                    conf_dir: args.state_dir.join("ceph"),
                },
                lvm: storage::lvm::Lvm::default(),
            },
            storage::targets::Tgt {
                control_port: args.iscsi_control_port,
                portal: args.iscsi_portal.clone(),
            },
            &args.host_name,
            &args.site,
            args.state_dir.clone(),
            metrics.clone(),
            images,
        ),
        args.resync_interval,
        shutdown.clone(),
    ));
    let console_task = console.map(|c| {
        tokio::spawn(console::serve(
            c,
            client.clone(),
            args.host_name.clone(),
            args.state_dir.clone(),
            shutdown.clone(),
        ))
    });
    let result = register::run(
        args,
        client,
        hv,
        metrics,
        health,
        register::FromTasks {
            net: net_state,
            swept,
            wireguard: wireguard.map(|k| yukumo_agent::network::wireguard::encode(&k.public)),
        },
        shutdown,
    )
    .await;
    if let Some(t) = console_task
        && let Ok(Err(e)) = t.await
    {
        tracing::warn!(error = %e, "console endpoint");
    }
    let _ = storage_task.await;
    let _ = compute_task.await;
    if let Some(t) = network_task {
        let _ = t.await;
    }
    let _ = server.await;
    tracing::info!("agent stopped");
    result
}

/// Raise the soft limit of open files to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}
