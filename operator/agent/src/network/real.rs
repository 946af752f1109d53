//! The kernel itself behind the [`super::kernel`] traits: links, FDB,
//! addresses and routes by netlink ([`crate::netlink`]), namespaces and
//! sysctls in-process ([`crate::netns`]), nftables tables by `nft -f` (one
//! transaction per table: `nft` is the supported way to submit a whole
//! ruleset atomically), DHCP by dnsmasq (it keeps serving while the agent
//! restarts, and rereads its leases on SIGHUP), gratuitous ARP from a
//! packet socket ([`super::garp`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoMacVlan, InfoVeth, InfoVlan, InfoVxlan, LinkAttribute, MacVlanMode,
    VlanProtocol,
};
use netlink_packet_route::neighbour::NeighbourState;
use sha2::Digest as _;
use yukumo_api::net::MacAddr;

use super::kernel::{Announce, Firewall, KernelError, Links, Namespaces, NsLinks, Result, Shaper};
use super::observe::{self, NsState, Want};
use super::ops::{AddrOp, Family, FdbOp, LinkOp, NsOps, ShapeOp, TableOp};
use crate::netlink::{self, CREATE, Netlink, REPLACE, Request};
use crate::netns;

/// The machine's kernel, for one host: its namespace (None: the agent's
/// own) and where router files (DHCP) live.
pub struct RealKernel {
    host_ns: Option<String>,
    state_dir: PathBuf,
    host: tokio::sync::OnceCell<Arc<Netlink>>,
    /// This host's WireGuard keys (a gateway whose kernel has WireGuard).
    wireguard: Option<super::wireguard::Keys>,
}

impl RealKernel {
    pub fn new(host_ns: Option<String>, state_dir: PathBuf) -> RealKernel {
        RealKernel {
            host_ns,
            state_dir,
            host: tokio::sync::OnceCell::new(),
            wireguard: None,
        }
    }

    /// With the keys of this host's WireGuard device.
    pub fn with_wireguard(mut self, keys: Option<super::wireguard::Keys>) -> RealKernel {
        self.wireguard = keys;
        self
    }

    /// Where a router's DHCP files are: `<state>/net/<router>/`.
    /// The host's namespace (None: this process's).
    pub fn host_ns(&self) -> Option<String> {
        self.host_ns.clone()
    }

    pub fn router_dir(&self, router: &str) -> PathBuf {
        self.state_dir.join("net").join(router)
    }
}

/// One namespace's netlink connection.
pub struct RealNs {
    nl: Arc<Netlink>,
}

impl Links for RealKernel {
    type Ns = RealNs;

    async fn ns(&self, name: Option<&str>) -> Result<RealNs> {
        let nl = match name {
            // The host namespace: one connection for the agent's life.
            None => self
                .host
                .get_or_try_init(|| async {
                    Netlink::open(self.host_ns.as_deref()).await.map(Arc::new)
                })
                .await?
                .clone(),
            // A router's: opened for the pass that needs it.
            Some(n) => Arc::new(Netlink::open(Some(n)).await?),
        };
        Ok(RealNs { nl })
    }
}

impl RealNs {
    async fn indices(&self) -> Result<BTreeMap<String, u32>> {
        Ok(self
            .nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect())
    }
}

fn index_of(idx: &BTreeMap<String, u32>, name: &str, why: &str) -> Result<u32> {
    idx.get(name).copied().ok_or_else(|| {
        KernelError::io(
            format!("{why}: link {name}"),
            std::io::Error::from_raw_os_error(libc::ENODEV),
        )
    })
}

fn netns_fd(name: &str) -> Result<std::fs::File> {
    std::fs::File::open(netns::path(name))
        .map_err(|e| KernelError::io(format!("open namespace {name}"), e))
}

/// The netlink request of one link creation. Namespace files a request
/// refers to (by descriptor) are kept in `fds` until it is sent.
fn create_request(
    op: &LinkOp,
    idx: &BTreeMap<String, u32>,
    fds: &mut Vec<std::fs::File>,
) -> Result<Request> {
    use std::os::fd::AsRawFd;
    let (mut m, what) = match op {
        LinkOp::AddBridge { name, mtu } => {
            let mut m = netlink::link_of_kind(name, InfoKind::Bridge, None);
            m.attributes.push(LinkAttribute::Mtu(*mtu));
            netlink::set_up(&mut m);
            (m, format!("add bridge {name}"))
        }
        LinkOp::AddVxlan {
            name,
            vni,
            local,
            dev,
            port,
            mtu,
        } => {
            let mut data = vec![
                InfoVxlan::Id(*vni),
                InfoVxlan::Port(*port),
                InfoVxlan::Learning(false),
            ];
            if let Some(l) = local {
                data.push(InfoVxlan::Local(*l));
            }
            if let Some(d) = dev {
                data.push(InfoVxlan::Link(index_of(idx, d, "vxlan dev")?));
            }
            let mut m = netlink::link_of_kind(name, InfoKind::Vxlan, Some(InfoData::Vxlan(data)));
            m.attributes.push(LinkAttribute::Mtu(*mtu));
            (m, format!("add vxlan {name} id {vni}"))
        }
        LinkOp::AddVlan {
            name,
            parent,
            id,
            mtu,
        } => {
            let data = vec![
                InfoVlan::Id(*id),
                InfoVlan::Protocol(VlanProtocol::Ieee8021Q),
            ];
            let mut m = netlink::link_of_kind(name, InfoKind::Vlan, Some(InfoData::Vlan(data)));
            m.attributes
                .push(LinkAttribute::Link(index_of(idx, parent, "vlan parent")?));
            m.attributes.push(LinkAttribute::Mtu(*mtu));
            (m, format!("add vlan {name} id {id} on {parent}"))
        }
        LinkOp::AddVeth {
            name,
            mtu,
            peer,
            peer_mac,
            peer_netns,
        } => {
            let f = netns_fd(peer_netns)?;
            let mut p = netlink::link_named(peer);
            p.attributes.push(LinkAttribute::Mtu(*mtu));
            p.attributes
                .push(LinkAttribute::Address(peer_mac.octets().to_vec()));
            p.attributes.push(LinkAttribute::NetNsFd(f.as_raw_fd()));
            fds.push(f);
            let mut m = netlink::link_of_kind(
                name,
                InfoKind::Veth,
                Some(InfoData::Veth(InfoVeth::Peer(p))),
            );
            m.attributes.push(LinkAttribute::Mtu(*mtu));
            (m, format!("add veth {name} peer {peer} in {peer_netns}"))
        }
        LinkOp::AddMacvlan {
            name,
            parent,
            mac,
            netns,
        } => {
            let f = netns_fd(netns)?;
            let data = vec![InfoMacVlan::Mode(MacVlanMode::Bridge)];
            let mut m =
                netlink::link_of_kind(name, InfoKind::MacVlan, Some(InfoData::MacVlan(data)));
            m.attributes.push(LinkAttribute::Link(index_of(
                idx,
                parent,
                "macvlan parent",
            )?));
            m.attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
            m.attributes.push(LinkAttribute::NetNsFd(f.as_raw_fd()));
            fds.push(f);
            (m, format!("add macvlan {name} on {parent} in {netns}"))
        }
        other => unreachable!("not a creation: {other:?}"),
    };
    m.header.interface_family = netlink_packet_route::AddressFamily::Unspec;
    Ok(Request::new(RouteNetlinkMessage::NewLink(m), CREATE, what))
}

/// The temporary name a router's macvlan is born under: unique per router
/// namespace, stable across the agent's restarts (a leftover is found).
fn macvlan_birth_name(netns: &str) -> String {
    let h = sha2::Sha256::digest(netns.as_bytes());
    format!("ykm{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
}

/// Create a router's macvlan when the kernel refused it by its name: under
/// a temporary name, straight into the router's namespace, then renamed
/// there. Older kernels (Debian 12's 6.1 among them; not this machine's
/// 6.18) look a new link's name up in the namespace the request is sent
/// in, not in the one it is created in: `wan0` cannot be made from a host namespace holding a
/// `wan0` of its own (EEXIST). A link left under the temporary name by a
/// creation cut short (the agent killed between its two steps) is removed
/// first.
async fn add_macvlan_beside_its_name(
    host: &Netlink,
    op: &LinkOp,
    idx: &BTreeMap<String, u32>,
) -> Result<()> {
    let LinkOp::AddMacvlan { name, netns, .. } = op else {
        unreachable!("not a macvlan: {op:?}")
    };
    let birth = macvlan_birth_name(netns);
    let router = Netlink::open(Some(netns)).await?;
    let born = |links: Vec<crate::netlink::Link>| {
        links.into_iter().find(|l| l.name == birth).map(|l| l.index)
    };
    if born(router.links().await?).is_some() {
        router
            .apply(vec![Request::new(
                RouteNetlinkMessage::DelLink(netlink::link_named(&birth)),
                0,
                format!("delete the leftover {birth} in {netns}"),
            )])
            .await?;
    }
    let mut as_born = op.clone();
    if let LinkOp::AddMacvlan { name, .. } = &mut as_born {
        name.clone_from(&birth);
    }
    let mut fds = Vec::new();
    let req = create_request(&as_born, idx, &mut fds)?;
    host.apply(vec![req]).await?;
    drop(fds);
    let index = born(router.links().await?).ok_or_else(|| {
        KernelError::io(
            format!("macvlan {birth} in {netns} after its creation"),
            std::io::Error::from_raw_os_error(libc::ENODEV),
        )
    })?;
    let mut m = netlink_packet_route::link::LinkMessage::default();
    m.header.index = index;
    m.attributes.push(LinkAttribute::IfName(name.clone()));
    router
        .apply(vec![Request::new(
            RouteNetlinkMessage::NewLink(m),
            0,
            format!("rename {birth} to {name} in {netns}"),
        )])
        .await?;
    Ok(())
}

fn link_request(op: &LinkOp, idx: &BTreeMap<String, u32>) -> Result<Request> {
    Ok(match op {
        LinkOp::Delete(name) => Request::new(
            RouteNetlinkMessage::DelLink(netlink::link_named(name)),
            0,
            format!("delete {name}"),
        ),
        LinkOp::Set { name, master, mtu } => {
            let mut m = netlink::link_named(name);
            if let Some(b) = master {
                m.attributes
                    .push(LinkAttribute::Controller(index_of(idx, b, "master")?));
            }
            if let Some(mtu) = mtu {
                m.attributes.push(LinkAttribute::Mtu(*mtu));
            }
            netlink::set_up(&mut m);
            Request::new(RouteNetlinkMessage::NewLink(m), 0, format!("set {name} up"))
        }
        LinkOp::Port {
            name,
            learning,
            flood,
        } => Request::new(
            RouteNetlinkMessage::NewLink(netlink::port_settings(name, *learning, *flood)),
            0,
            format!("set port {name} learning {learning} flood {flood}"),
        ),
        other => unreachable!("a creation: {other:?}"),
    })
}

impl NsLinks for RealNs {
    async fn observe(&self, want: Want) -> Result<NsState> {
        // One dump at a time: a socket runs one.
        let links = self.nl.links().await?;
        let fdb = if want.fdb {
            self.nl.fdb().await?
        } else {
            vec![]
        };
        let addrs = if want.addrs {
            self.nl.addresses().await?
        } else {
            vec![]
        };
        let routes = if want.routes {
            self.nl.routes().await?
        } else {
            vec![]
        };
        Ok(observe::from_netlink(links, fdb, addrs, routes))
    }

    async fn apply(&self, ops: &NsOps) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut idx = self.indices().await?;
        // Links: deleted, created, configured, ported: each phase's
        // requests are independent of one another and sent pipelined.
        for phase in 0..=3u8 {
            let these: Vec<&LinkOp> = ops.links.iter().filter(|o| o.phase() == phase).collect();
            if these.is_empty() {
                continue;
            }
            let mut fds = Vec::new();
            let reqs = these
                .iter()
                .map(|op| {
                    if phase == 1 {
                        create_request(op, &idx, &mut fds)
                    } else {
                        link_request(op, &idx)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let results = self.nl.apply_each(reqs).await;
            drop(fds);
            for (op, res) in these.iter().zip(results) {
                match res {
                    // A host link of the macvlan's name: made another way.
                    Err(e)
                        if e.errno() == Some(libc::EEXIST)
                            && matches!(op, LinkOp::AddMacvlan { .. }) =>
                    {
                        add_macvlan_beside_its_name(&self.nl, op, &idx).await?
                    }
                    res => res?,
                }
            }
            if phase == 1 {
                idx = self.indices().await?;
            }
        }
        let mut reqs = Vec::new();
        for op in &ops.fdb {
            reqs.push(match op {
                FdbOp::AddRemote { dev, dst } => Request::new(
                    RouteNetlinkMessage::NewNeighbour(netlink::fdb_entry(
                        index_of(&idx, dev, "fdb")?,
                        MacAddr::default(),
                        Some(*dst),
                        false,
                        false,
                        NeighbourState::Permanent,
                    )),
                    netlink::APPEND,
                    format!("fdb append 00:00:00:00:00:00 dev {dev} dst {dst}"),
                ),
                FdbOp::DelRemote { dev, dst } => Request::new(
                    RouteNetlinkMessage::DelNeighbour(netlink::fdb_entry(
                        index_of(&idx, dev, "fdb")?,
                        MacAddr::default(),
                        Some(*dst),
                        false,
                        false,
                        NeighbourState::Permanent,
                    )),
                    0,
                    format!("fdb del 00:00:00:00:00:00 dev {dev} dst {dst}"),
                ),
                FdbOp::Pin { port, mac } => Request::new(
                    RouteNetlinkMessage::NewNeighbour(netlink::fdb_entry(
                        index_of(&idx, port, "fdb")?,
                        *mac,
                        None,
                        true,
                        true,
                        NeighbourState::Noarp,
                    )),
                    REPLACE,
                    format!("fdb replace {mac} dev {port} master static sticky"),
                ),
            });
        }
        for op in &ops.addrs {
            reqs.push(match op {
                AddrOp::Add { dev, net } => Request::new(
                    RouteNetlinkMessage::NewAddress(netlink::address(
                        index_of(&idx, dev, "address")?,
                        *net,
                    )),
                    CREATE,
                    format!("addr add {net} dev {dev}"),
                ),
                AddrOp::Del { dev, net } => Request::new(
                    RouteNetlinkMessage::DelAddress(netlink::address(
                        index_of(&idx, dev, "address")?,
                        *net,
                    )),
                    0,
                    format!("addr del {net} dev {dev}"),
                ),
            });
        }
        self.nl.apply(reqs).await?;
        // The route needs its device's address in place (the gateway must
        // be reachable on it).
        if let Some(r) = &ops.route {
            self.nl
                .apply(vec![Request::new(
                    RouteNetlinkMessage::NewRoute(netlink::default_route(
                        r.via,
                        index_of(&idx, &r.dev, "route")?,
                    )),
                    REPLACE,
                    format!("route replace default via {} dev {}", r.via, r.dev),
                )])
                .await?;
        }
        Ok(())
    }
}

impl Namespaces for RealKernel {
    fn list(&self) -> Vec<String> {
        netns::list()
    }

    fn inode(&self, name: &str) -> Option<u64> {
        netns::inode(name)
    }

    async fn create(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        tokio::task::spawn_blocking(move || netns::create(&n))
            .await
            .map_err(|e| {
                KernelError::io(format!("create namespace {name}"), std::io::Error::other(e))
            })?
            .map_err(|e| KernelError::io(format!("create namespace {name}"), e))
    }

    async fn delete(&self, name: &str) -> Result<()> {
        netns::delete(name).map_err(|e| KernelError::io(format!("delete namespace {name}"), e))
    }

    async fn forwarding(&self, name: &str) -> Result<bool> {
        netns::sysctl(name, "net/ipv4/ip_forward", None)
            .await
            .map(|v| v.trim() == "1")
            .map_err(|e| KernelError::io(format!("read ip_forward in {name}"), e))
    }

    async fn set_forwarding(&self, name: &str) -> Result<()> {
        netns::sysctl(name, "net/ipv4/ip_forward", Some("1"))
            .await
            .map(|_| ())
            .map_err(|e| KernelError::io(format!("set ip_forward in {name}"), e))
    }
}

/// Run `prog` (`nft`, `tc`) in `ns` (None: this process's) with `args`
/// (and a script on stdin), off the runtime.
async fn tool(
    prog: &'static str,
    ns: Option<String>,
    args: Vec<String>,
    script: Option<String>,
) -> std::io::Result<String> {
    tokio::task::spawn_blocking(move || {
        netns::run(
            ns.as_deref(),
            prog,
            &args,
            script.as_deref().map(str::as_bytes),
        )
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A rate as `tc` prints it (`1Gbit`, `50Mbit`, `800Kbit`), in Mbit/s.
fn mbit(rate: &str) -> Option<u32> {
    let split = rate.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = rate.split_at(split);
    let n: f64 = n.parse().ok()?;
    let f = match unit {
        "Gbit" => 1000.0,
        "Mbit" => 1.0,
        "Kbit" => 0.001,
        "bit" => 0.000_001,
        _ => return None,
    };
    Some((n * f).round() as u32)
}

/// The classes under the agent's root qdisc in `tc class show` output:
/// (minor, Mbit/s), by minor.
pub fn parse_classes(text: &str) -> Vec<(u16, u32)> {
    let ours = format!("{:x}:", super::plan::SHAPE_HANDLE);
    let mut out: Vec<(u16, u32)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() != Some(&"class") || w.get(1) != Some(&"htb") {
                return None;
            }
            let minor = w.get(2)?.strip_prefix(ours.as_str())?;
            let minor = u16::from_str_radix(minor, 16).ok()?;
            let i = w.iter().position(|x| *x == "rate")?;
            Some((minor, mbit(w.get(i + 1)?)?))
        })
        .collect();
    out.sort();
    out
}

impl Shaper for RealKernel {
    async fn shaping(&self, dev: &str) -> Result<Option<Vec<(u16, u32)>>> {
        let ns = self.host_ns.clone();
        let q = tool(
            "tc",
            ns.clone(),
            vec!["qdisc".into(), "show".into(), "dev".into(), dev.into()],
            None,
        )
        .await
        .map_err(|e| KernelError::io(format!("tc qdisc show dev {dev}"), e))?;
        let ours = format!("qdisc htb {:x}: root", super::plan::SHAPE_HANDLE);
        if !q.lines().any(|l| l.starts_with(&ours)) {
            return Ok(None);
        }
        let c = tool(
            "tc",
            ns,
            vec!["class".into(), "show".into(), "dev".into(), dev.into()],
            None,
        )
        .await
        .map_err(|e| KernelError::io(format!("tc class show dev {dev}"), e))?;
        Ok(Some(parse_classes(&c)))
    }

    async fn apply_shaping(&self, op: &ShapeOp) -> Result<()> {
        let h = super::plan::SHAPE_HANDLE;
        let (dev, script) = match op {
            // The agent's qdisc made again with exactly these classes (a
            // root qdisc of another kind is replaced: the Site asked for
            // caps on this interface).
            ShapeOp::Set { dev, classes } => {
                let mut s = format!(
                    "qdisc del dev {dev} root handle {h:x}:\nqdisc replace dev {dev} root handle {h:x}: htb\n"
                );
                for (minor, mbps) in classes {
                    s.push_str(&format!(
                        "class add dev {dev} parent {h:x}: classid {h:x}:{minor:x} htb rate {mbps}mbit ceil {mbps}mbit\n"
                    ));
                }
                (dev, s)
            }
            ShapeOp::Clear { dev } => (dev, format!("qdisc del dev {dev} root handle {h:x}:\n")),
        };
        // -force: the first line may find no qdisc of ours to delete.
        let out = tool(
            "tc",
            self.host_ns.clone(),
            vec!["-force".into(), "-batch".into(), "-".into()],
            Some(script),
        )
        .await;
        match (op, out) {
            (_, Ok(_)) => Ok(()),
            // A Set whose only failure was that first delete is checked by
            // reading back.
            (ShapeOp::Set { classes, .. }, Err(e)) => {
                let have = self.shaping(dev).await?;
                if have.as_deref() == Some(classes.as_slice()) {
                    Ok(())
                } else {
                    Err(KernelError::io(format!("tc shaping of {dev}"), e))
                }
            }
            (ShapeOp::Clear { .. }, Err(e)) => {
                Err(KernelError::io(format!("tc qdisc del dev {dev}"), e))
            }
        }
    }
}

impl super::kernel::Wireguard for RealKernel {
    fn wireguard_key(&self) -> Option<super::wireguard::Key> {
        self.wireguard.as_ref().map(|k| k.public)
    }

    async fn wireguard(&self) -> Result<Option<super::wireguard::WgSeen>> {
        use super::wireguard::{FWMARK, LINK, RULE_PRIORITY, TABLE, WgSeen};
        let nl = Links::ns(self, None).await?.nl;
        let link = nl.links().await?.into_iter().find(|l| l.name == LINK);
        let rule = nl
            .rules_to(TABLE)
            .await?
            .contains(&(RULE_PRIORITY, Some(FWMARK), true));
        let routes: std::collections::BTreeSet<Ipv4Addr> = nl
            .routes_of(TABLE)
            .await?
            .into_iter()
            .filter(|r| {
                r.dst.prefix() == 32 && link.as_ref().is_some_and(|l| r.oif == Some(l.index))
            })
            .map(|r| r.dst.addr())
            .collect();
        let Some(link) = link else {
            return Ok(rule.then(|| WgSeen {
                rule: true,
                ..Default::default()
            }));
        };
        let ns = self.host_ns.clone();
        let dev = tokio::task::spawn_blocking(move || {
            netns::in_netns_opt(ns.as_deref(), || crate::netlink::wg::get(LINK))
        })
        .await
        .map_err(|e| KernelError::io("wireguard get", std::io::Error::other(e)))?
        .map_err(|e| KernelError::io(format!("read WireGuard device {LINK}"), e))?
        .unwrap_or_default();
        Ok(Some(WgSeen {
            up: link.up,
            mtu: link.mtu,
            port: dev.port,
            fwmark: dev.fwmark,
            public: dev.public,
            peers: dev.peers,
            routes,
            rule,
        }))
    }

    async fn apply_wireguard(&self, op: &super::wireguard::WgOp) -> Result<()> {
        use super::wireguard::{FWMARK, KEEPALIVE, LINK, RULE_PRIORITY, TABLE, WgOp};
        let nl = Links::ns(self, None).await?.nl;
        let ours = |r: &(u32, Option<u32>, bool)| r.0 == RULE_PRIORITY;
        let stale_rules: Vec<(u32, Option<u32>, bool)> =
            nl.rules_to(TABLE).await?.into_iter().filter(ours).collect();
        let links = nl.links().await?;
        let link = links.iter().find(|l| l.name == LINK);
        let plan = match op {
            WgOp::Remove => {
                let mut reqs = Vec::new();
                if link.is_some() {
                    reqs.push(Request::new(
                        RouteNetlinkMessage::DelLink(netlink::link_named(LINK)),
                        0,
                        format!("delete {LINK}"),
                    ));
                }
                for _ in &stale_rules {
                    reqs.push(Request::new(
                        RouteNetlinkMessage::DelRule(netlink::unmarked_rule(
                            FWMARK,
                            TABLE,
                            RULE_PRIORITY,
                        )),
                        0,
                        "delete the WireGuard rule",
                    ));
                }
                return Ok(nl.apply(reqs).await?);
            }
            WgOp::Set(p) => p,
        };
        let keys = self.wireguard.clone().ok_or_else(|| {
            KernelError::io(
                "WireGuard",
                std::io::Error::other(
                    "this host has no WireGuard key (its kernel has no WireGuard)",
                ),
            )
        })?;
        if link.is_none() {
            let mut m = netlink::link_of_kind(LINK, InfoKind::Wireguard, None);
            m.header.interface_family = netlink_packet_route::AddressFamily::Unspec;
            nl.apply(vec![Request::new(
                RouteNetlinkMessage::NewLink(m),
                CREATE,
                format!("add wireguard {LINK}"),
            )])
            .await?;
        }
        let peers: Vec<crate::netlink::wg::PeerConf> = plan
            .peers
            .iter()
            .map(|(addr, key)| crate::netlink::wg::PeerConf {
                key: *key,
                endpoint: std::net::SocketAddrV4::new(*addr, plan.port),
                keepalive: KEEPALIVE,
            })
            .collect();
        let (ns, port) = (self.host_ns.clone(), plan.port);
        tokio::task::spawn_blocking(move || {
            netns::in_netns_opt(ns.as_deref(), || {
                crate::netlink::wg::set(LINK, &keys.private, port, FWMARK, &peers)
            })
        })
        .await
        .map_err(|e| KernelError::io("wireguard set", std::io::Error::other(e)))?
        .map_err(|e| KernelError::io(format!("configure WireGuard device {LINK}"), e))?;
        let mut m = netlink::link_named(LINK);
        m.attributes.push(LinkAttribute::Mtu(plan.mtu));
        netlink::set_up(&mut m);
        nl.apply(vec![Request::new(
            RouteNetlinkMessage::NewLink(m),
            0,
            format!("set {LINK} mtu {} up", plan.mtu),
        )])
        .await?;
        let index = nl
            .links()
            .await?
            .into_iter()
            .find(|l| l.name == LINK)
            .map(|l| l.index)
            .ok_or_else(|| {
                KernelError::io(LINK, std::io::Error::other("gone after its creation"))
            })?;
        let mut reqs = Vec::new();
        for net in nl.routes_of(TABLE).await?.into_iter().map(|r| r.dst) {
            if !(net.prefix() == 32 && plan.peers.contains_key(&net.addr())) {
                let mut r = netlink::table_route(net.addr(), TABLE, index);
                r.header.destination_prefix_length = net.prefix();
                r.attributes
                    .retain(|a| !matches!(a, netlink_packet_route::route::RouteAttribute::Oif(_)));
                reqs.push(Request::new(
                    RouteNetlinkMessage::DelRoute(r),
                    0,
                    format!("delete route {net} from table {TABLE}"),
                ));
            }
        }
        for addr in plan.peers.keys() {
            reqs.push(Request::new(
                RouteNetlinkMessage::NewRoute(netlink::table_route(*addr, TABLE, index)),
                REPLACE,
                format!("route {addr} into {LINK} (table {TABLE})"),
            ));
        }
        let exact = (RULE_PRIORITY, Some(FWMARK), true);
        if !stale_rules.contains(&exact) {
            reqs.push(Request::new(
                RouteNetlinkMessage::NewRule(netlink::unmarked_rule(FWMARK, TABLE, RULE_PRIORITY)),
                CREATE,
                "add the WireGuard rule",
            ));
        }
        Ok(nl.apply(reqs).await?)
    }
}

impl RealKernel {
    fn ns_of(&self, ns: Option<&str>) -> Option<String> {
        ns.map(str::to_string).or_else(|| self.host_ns.clone())
    }
}

impl Firewall for RealKernel {
    async fn table(&self, ns: Option<&str>, family: Family) -> Result<Option<String>> {
        let args = vec![
            "list".into(),
            "table".into(),
            family.as_str().into(),
            "yukumo".into(),
        ];
        match tool("nft", self.ns_of(ns), args, None).await {
            Ok(listing) => Ok(Some(listing)),
            // nft ran and found no such table.
            Err(e) if e.kind() == std::io::ErrorKind::Other => Ok(None),
            Err(e) => Err(KernelError::io("nft list table", e)),
        }
    }

    async fn apply_table(&self, ns: Option<&str>, op: &TableOp) -> Result<()> {
        let (args, script, what) = match op {
            TableOp::Replace { family, ruleset } => {
                let f = family.as_str();
                (
                    vec!["-f".to_string(), "-".to_string()],
                    Some(format!(
                        "table {f} yukumo {{}}\ndelete table {f} yukumo\n{ruleset}"
                    )),
                    format!("replace table {f} yukumo"),
                )
            }
            TableOp::Delete { family } => (
                vec![
                    "delete".into(),
                    "table".into(),
                    family.as_str().into(),
                    "yukumo".into(),
                ],
                None,
                format!("delete table {} yukumo", family.as_str()),
            ),
        };
        tool("nft", self.ns_of(ns), args, script)
            .await
            .map(|_| ())
            .map_err(|e| KernelError::io(what, e))
    }
}

impl Announce for RealKernel {
    async fn announce(&self, router: &str, parent: &str, mac: MacAddr, addrs: Vec<Ipv4Addr>) {
        // Sent out of the parent in the host's namespace, not from the
        // router's macvlan: a broadcast from a bridge-mode macvlan reaches
        // every other router's macvlan on that parent, and each runs the ARP
        // and a route lookup for it — 11 addresses × 1,000 routers made
        // programming 1,000 routers quadratic. The frame on the wire is
        // the same. Not awaited: closing a packet socket waits for an RCU
        // grace period (`synchronize_net`, ~10 ms), which the pass need not.
        let ns = self.host_ns.clone();
        let parent = parent.to_string();
        let router = router.to_string();
        tokio::task::spawn_blocking(move || {
            let res = netns::in_netns_opt(ns.as_deref(), || {
                super::garp::announce(&parent, mac.octets(), &addrs)
            });
            match res {
                Ok(n) => tracing::debug!(%router, announced = n, "gratuitous ARP"),
                Err(e) => tracing::warn!(%router, error = %e, "gratuitous ARP failed"),
            }
        });
    }
}

mod dhcp;

#[cfg(test)]
mod tests;
