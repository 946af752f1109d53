//! What the host's network should look like, as a pure function of the
//! NetworkGroups, this host's VirtualNodes and the Site: bridges, segment
//! links, guest taps, the anti-spoofing ruleset, and the routers this host
//! runs (their addresses, NAT and firewall ruleset, DHCP leases).
//!
//! Names are derived from segments (unique per Site and type, and a host
//! belongs to one Site) and node uids, so two tenants with the same CIDR never
//! share a link, a table or a namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::ResourceExt;
use sha2::{Digest, Sha256};
use yukumo_api::net::{Ipv4Net, MacAddr, Segment, SegmentType};
use yukumo_api::networkgroup::NetworkGroup;
use yukumo_api::site::{Encryption, ExternalNetwork};
use yukumo_api::virtualnode::{NodeRole, VirtualNode};

use super::ruleset::{guard_ruleset, router_ruleset, tunnel_ruleset};

/// The router namespace's interface on the group's segment.
pub const ROUTER_LAN: &str = "gw0";
/// The router namespace's interface on the Site's external network.
pub const ROUTER_WAN: &str = "wan0";
/// VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// The group's bridge on a host. VLAN ids and VNIs are allocated from
/// separate ranges and may be equal, so the two kinds never share a name.
pub fn bridge_name(seg: Segment) -> String {
    match seg.type_ {
        SegmentType::Vxlan => format!("ykbr{}", seg.id),
        SegmentType::Vlan => format!("ykbv{}", seg.id),
    }
}
pub fn segment_link_name(seg: Segment) -> String {
    match seg.type_ {
        SegmentType::Vxlan => format!("ykvx{}", seg.id),
        SegmentType::Vlan => format!("ykvl{}", seg.id),
    }
}
pub fn router_veth_name(seg: Segment) -> String {
    match seg.type_ {
        SegmentType::Vxlan => format!("ykgw{}", seg.id),
        SegmentType::Vlan => format!("ykgv{}", seg.id),
    }
}
/// A group's WAN port on the gateway holding its Site's tunnel end
/// (VXLAN groups only; the VNI is the segment id).
pub fn wan_link_name(seg: Segment) -> String {
    format!("ykw{}", seg.id)
}
/// The guest tap of a node: `ykt` and the first 12 hex digits of its uid.
pub fn tap_name(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("ykt{hex}")
}
/// A router's namespace: `<prefix>r<VNI>` or `<prefix>v<VLAN id>`.
pub fn router_netns(prefix: &str, seg: Segment) -> String {
    match seg.type_ {
        SegmentType::Vxlan => format!("{prefix}r{}", seg.id),
        SegmentType::Vlan => format!("{prefix}v{}", seg.id),
    }
}
/// Whether `name` is a router namespace of this host (`prefix`).
pub fn is_router_netns(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('r').or_else(|| rest.strip_prefix('v')))
        .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
}

/// One segment present on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPlan {
    pub segment: Segment,
    pub bridge: String,
    pub link: String,
    pub mtu: u32,
    /// Underlay addresses of the other hosts of the segment (VXLAN) that
    /// this host floods to directly: those of its own Site, and those of
    /// Sites no tunnel joins to it.
    pub remotes: BTreeSet<Ipv4Addr>,
    /// The segment's WAN port, on the host holding its Site's tunnel end.
    pub wan: Option<WanPort>,
}

/// A group's port to the other Sites' gateways: one VXLAN link from the
/// Site's WAN endpoint, flooding to every peer Site's endpoint. One port for
/// all peers: the bridge never sends a frame back out of the port it came
/// in by, so nothing is forwarded from one Site to another, and a full
/// mesh of Sites has no loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanPort {
    pub link: String,
    pub peers: BTreeSet<Ipv4Addr>,
    /// Its UDP port: the endpoint's, or with WireGuard the next one (inside
    /// the WireGuard device, which has the endpoint's).
    pub port: u16,
    /// Bound to the WAN interface (without WireGuard); with it, unbound:
    /// its packets take the policy rule into the WireGuard device.
    pub dev: Option<String>,
}

/// This host's part in its Site's WAN tunnels: it holds the Site's
/// endpoint (`active`) or must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    /// The WAN interface.
    pub dev: String,
    /// The Site's endpoint address, as a /32.
    pub endpoint: Ipv4Net,
    pub port: u16,
    pub active: bool,
    /// While active: the cap of the tunnel to each peer endpoint that has
    /// one (Mbit/s, the smaller of the two Sites' `tunnel.bandwidthMbps`),
    /// by peer address; class `SHAPE_HANDLE:<n>` shapes the n-th (from 1).
    pub caps: Vec<(Ipv4Addr, u32)>,
    /// While active: the peer Sites' endpoints (address → Site), open or
    /// closed.
    pub peers: BTreeMap<Ipv4Addr, String>,
    /// Those of `peers` whose Site has no holder (lost): closed, reported
    /// down without being measured.
    pub closed: BTreeSet<Ipv4Addr>,
    /// The `table inet yukumo` of the host: no VXLAN from the WAN to the
    /// Site's own port, and while active, tunnel packets to the endpoint
    /// only from peer Sites' endpoints, and those to capped peers given
    /// their class.
    pub ruleset: String,
    /// While active at a Site whose tunnels are WireGuard: the device.
    pub wireguard: Option<super::wireguard::WgPlan>,
}

/// The major handle of the root qdisc the agent puts on a gateway's WAN
/// interface to cap its tunnels ("yk"); a root qdisc with another handle
/// is not the agent's and is left alone.
pub const SHAPE_HANDLE: u16 = 0x796b;

/// This host's WAN facts: its WAN interface, its Site's endpoint, its
/// Site's tunnel cap, and whether the Site's status names it as the
/// endpoint's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInputs {
    pub dev: String,
    pub endpoint: std::net::SocketAddrV4,
    pub bandwidth_mbps: Option<u32>,
    pub active: bool,
    /// The Site's `tunnel.encryption` and `tunnel.mtu` (the WAN's).
    pub encryption: yukumo_api::site::Encryption,
    pub wan_mtu: u32,
}

/// A guest's tap and what it may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    pub name: String,
    pub bridge: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// The WAN side of a router.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WanPlan {
    /// Host interface on the Site's external network (macvlan parent).
    pub parent: String,
    /// The router's own address (on the external network's prefix), then
    /// each public IP as a /32.
    pub addresses: Vec<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
}

/// DHCP of a group: dnsmasq arguments (without file paths) and the static
/// leases (`mac,ip,hostname` lines).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DhcpPlan {
    pub args: Vec<String>,
    pub hosts: String,
}

/// A router this host runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouterPlan {
    pub segment: Segment,
    pub group: String,
    pub netns: String,
    pub host_veth: String,
    pub bridge: String,
    /// Gateway address on the segment (with the group's prefix).
    pub lan: Ipv4Net,
    /// MACs of the two legs, derived from the group: a router rebuilt or
    /// moved answers with the same MAC, so no guest's or upstream
    /// neighbour cache points at a MAC that no longer exists.
    pub lan_mac: MacAddr,
    pub wan_mac: MacAddr,
    pub mtu: u32,
    pub wan: Option<WanPlan>,
    /// The complete `table ip yukumo` of the router namespace.
    pub ruleset: String,
    pub dhcp: Option<DhcpPlan>,
}

/// Everything this host should have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostPlan {
    /// By bridge name.
    pub segments: BTreeMap<String, SegmentPlan>,
    pub taps: Vec<TapPlan>,
    /// By namespace name.
    /// Shared with the memo of the pass before ([`PlanMemo`]), not copied.
    pub routers: BTreeMap<String, Arc<RouterPlan>>,
    /// The complete `table bridge yukumo` of the host.
    pub guard: String,
    /// The Site's WAN tunnel end, where this host has a WAN interface and
    /// the Site an endpoint.
    pub tunnel: Option<TunnelPlan>,
}

/// What the plan is computed from.
pub struct Inputs<'a> {
    pub host: &'a str,
    pub netns_prefix: &'a str,
    pub groups: &'a [Arc<NetworkGroup>],
    pub nodes: &'a [Arc<VirtualNode>],
    pub external: Option<&'a ExternalNetwork>,
    pub underlay: Option<Ipv4Addr>,
    /// This host's Site.
    pub site: &'a str,
    pub gateway: Option<&'a GatewayInputs>,
}

/// A locally administered unicast MAC derived from `seed`.
fn derived_mac(seed: &str) -> MacAddr {
    let h = Sha256::digest(seed.as_bytes());
    MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
}

fn group_key(g: &NetworkGroup) -> String {
    format!("{}/{}", g.namespace().unwrap_or_default(), g.name_any())
}

/// Router plans kept between passes. A router's plan is a function of its
/// group's object and of the host's inputs; a group whose object did not
/// change (same uid and resourceVersion, which the API server changes on
/// every write) under the same inputs is not rendered again.
#[derive(Debug, Default)]
pub struct PlanMemo {
    /// Group uid → (resourceVersion, inputs hash, plan).
    routers: HashMap<String, (String, u64, Arc<RouterPlan>)>,
}

/// [`plan`], reusing the router plans of groups that did not change.
pub fn plan_memo(inp: &Inputs, memo: &mut PlanMemo) -> HostPlan {
    let env = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (inp.host, inp.netns_prefix, inp.site).hash(&mut h);
        serde_json::to_string(&inp.external)
            .unwrap_or_default()
            .hash(&mut h);
        h.finish()
    };
    let mut kept = HashMap::with_capacity(memo.routers.len());
    let out = plan_with(inp, &mut |g, seg, mtu| {
        let id = g
            .metadata
            .uid
            .as_ref()
            .zip(g.metadata.resource_version.as_ref());
        if let Some((uid, rv)) = id
            && let Some((v, e, r)) = memo.routers.get(uid)
            && v == rv
            && *e == env
        {
            kept.insert(uid.clone(), (v.clone(), *e, r.clone()));
            return Some(r.clone());
        }
        let r = Arc::new(router_plan(inp, g, seg, mtu)?);
        if let Some((uid, rv)) = id {
            kept.insert(uid.clone(), (rv.clone(), env, r.clone()));
        }
        Some(r)
    });
    memo.routers = kept;
    out
}

pub fn plan(inp: &Inputs) -> HostPlan {
    plan_with(inp, &mut |g, seg, mtu| {
        router_plan(inp, g, seg, mtu).map(Arc::new)
    })
}

/// How a group's router is planned (its segment and MTU given).
type RouterFn<'a> = dyn FnMut(&NetworkGroup, Segment, u32) -> Option<Arc<RouterPlan>> + 'a;

fn plan_with(inp: &Inputs, router: &mut RouterFn) -> HostPlan {
    let mut out = HostPlan::default();
    let key = |ns: &str, name: &str| format!("{ns}/{name}");
    // The groups this host takes part in: its own nodes', those whose span
    // names it, and those whose router it runs.
    let mut local_groups: BTreeSet<String> = BTreeSet::new();
    for n in inp.nodes {
        if let Some(net) = &n.spec.network {
            local_groups.insert(key(&n.namespace().unwrap_or_default(), &net.group));
        }
    }
    // Peer endpoints of the groups' tunnels here (address → Site), and
    // those closed (their Site has no holder).
    let mut probed: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut closed: BTreeSet<Ipv4Addr> = BTreeSet::new();
    // WireGuard peers' keys (endpoint address → key).
    let mut wg_peers: BTreeMap<Ipv4Addr, super::wireguard::Key> = BTreeMap::new();
    for g in inp.groups {
        let Some(st) = &g.status else { continue };
        let Some(seg) = st.segment else { continue };
        let router_here = st.router.as_ref().is_some_and(|r| r.host == inp.host);
        let spanned = st.hosts.iter().any(|h| h.name == inp.host);
        if !(router_here || spanned || local_groups.contains(&group_key(g))) {
            continue;
        }
        let mtu = st.mtu.unwrap_or_else(|| g.spec.mtu_or_default());
        // Sites joined by tunnels reach each other through their gateways.
        let tunnel_sites: BTreeSet<&str> = st.tunnels.iter().map(|t| t.site.as_str()).collect();
        let tunneled = |site: &str| {
            site != inp.site && tunnel_sites.contains(inp.site) && tunnel_sites.contains(site)
        };
        let remotes = match seg.type_ {
            SegmentType::Vxlan => st
                .hosts
                .iter()
                .filter(|h| h.name != inp.host)
                .filter(|h| !h.site.as_deref().is_some_and(tunneled))
                .map(|h| h.underlay)
                .filter(|a| Some(*a) != inp.underlay)
                .collect(),
            SegmentType::Vlan => BTreeSet::new(),
        };
        let wan = match inp.gateway {
            Some(gw)
                if gw.active
                    && seg.type_ == SegmentType::Vxlan
                    && tunnel_sites.contains(inp.site) =>
            {
                let ends = st
                    .tunnels
                    .iter()
                    .filter(|t| t.site != inp.site && t.address != *gw.endpoint.ip());
                let wireguard = gw.encryption == Encryption::Wireguard;
                // An end without a holder (its Site lost) is closed: no
                // FDB entry, its packets not accepted; still measured. So
                // is an end whose encryption is not this Site's, or
                // encrypted without its holder's key (never plaintext).
                let mut peers = BTreeSet::new();
                for t in ends {
                    probed.entry(t.address).or_insert_with(|| t.site.clone());
                    let key = t.public_key.as_deref().and_then(super::wireguard::decode);
                    let open = t.gateway.is_some()
                        && t.encryption == gw.encryption
                        && (!wireguard || key.is_some());
                    if open {
                        peers.insert(t.address);
                        if let Some(k) = key.filter(|_| wireguard) {
                            wg_peers.insert(t.address, k);
                        }
                    } else {
                        closed.insert(t.address);
                    }
                }
                (!peers.is_empty()).then(|| WanPort {
                    link: wan_link_name(seg),
                    peers,
                    port: if wireguard {
                        gw.endpoint.port().saturating_add(1)
                    } else {
                        gw.endpoint.port()
                    },
                    dev: (!wireguard).then(|| gw.dev.clone()),
                })
            }
            _ => None,
        };
        out.segments.insert(
            bridge_name(seg),
            SegmentPlan {
                segment: seg,
                bridge: bridge_name(seg),
                link: segment_link_name(seg),
                mtu,
                remotes,
                wan,
            },
        );
        if router_here && let Some(r) = router(g, seg, mtu) {
            out.routers.insert(r.netns.clone(), r);
        }
    }
    // Taps of this host's nodes on segments it has.
    let by_group: BTreeMap<String, String> = inp
        .groups
        .iter()
        .filter_map(|g| Some((group_key(g), bridge_name(g.status.as_ref()?.segment?))))
        .collect();
    for n in inp.nodes {
        let (Some(net), Some(uid)) = (&n.spec.network, &n.metadata.uid) else {
            continue;
        };
        let Some(bridge) = by_group.get(&key(&n.namespace().unwrap_or_default(), &net.group))
        else {
            continue;
        };
        out.taps.push(TapPlan {
            name: tap_name(uid),
            bridge: bridge.clone(),
            mac: net.mac,
            ip: net.ip,
        });
    }
    out.taps.sort_by(|a, b| a.name.cmp(&b.name));
    out.guard = guard_ruleset(&out.taps);
    out.tunnel = inp.gateway.map(|gw| {
        // The hosts this one floods to: the only underlay VXLAN it takes
        // while it holds the endpoint.
        let span: BTreeSet<Ipv4Addr> = out
            .segments
            .values()
            .flat_map(|s| s.remotes.iter().copied())
            .collect();
        let peers: BTreeSet<Ipv4Addr> = out
            .segments
            .values()
            .filter_map(|s| s.wan.as_ref())
            .flat_map(|w| w.peers.iter().copied())
            .collect();
        // A pair's cap: the smaller of the two Sites' (either may set none).
        let mut caps: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        if gw.active {
            for t in inp
                .groups
                .iter()
                .filter_map(|g| g.status.as_ref())
                .flat_map(|s| &s.tunnels)
            {
                if !peers.contains(&t.address) {
                    continue;
                }
                let pair = match (gw.bandwidth_mbps, t.bandwidth_mbps) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(c) = pair {
                    let e = caps.entry(t.address).or_insert(c);
                    *e = (*e).min(c);
                }
            }
        }
        let caps: Vec<(Ipv4Addr, u32)> = caps.into_iter().collect();
        let wireguard = gw.encryption == Encryption::Wireguard;
        TunnelPlan {
            wireguard: (gw.active && wireguard).then(|| super::wireguard::WgPlan {
                port: gw.endpoint.port(),
                mtu: gw.wan_mtu.saturating_sub(super::wireguard::OVERHEAD),
                peers: wg_peers.clone(),
            }),
            dev: gw.dev.clone(),
            endpoint: Ipv4Net::new(*gw.endpoint.ip(), 32).expect("a /32"),
            port: gw.endpoint.port(),
            active: gw.active,
            ruleset: tunnel_ruleset(
                &gw.dev,
                gw.active
                    .then(|| (*gw.endpoint.ip(), gw.endpoint.port(), &peers)),
                &span,
                &caps,
                wireguard,
            ),
            caps,
            closed: closed.difference(&peers).copied().collect(),
            peers: probed,
        }
    });
    out
}

/// A public IP mapping: public address, private address, the node's role.
pub type Mapping = (Ipv4Addr, Ipv4Addr, Option<NodeRole>);

fn router_plan(inp: &Inputs, g: &NetworkGroup, seg: Segment, mtu: u32) -> Option<RouterPlan> {
    let st = g.status.as_ref()?;
    let gw = st.gateway?;
    let alloc = |node: &str| st.allocations.iter().find(|a| a.node == node);
    // Public mappings to nodes that have an address.
    let maps: Vec<Mapping> = st
        .public_ips
        .iter()
        .filter_map(|p| {
            let a = alloc(&p.node)?;
            Some((p.address, a.ip, a.role))
        })
        .collect();
    let router_addr = st.router.as_ref().and_then(|r| r.address);
    let wan = match (inp.external, router_addr) {
        (Some(ext), Some(addr)) => {
            let mut addresses = vec![ext.cidr.with_addr(addr)];
            addresses.extend(
                maps.iter()
                    .map(|(p, _, _)| Ipv4Net::new(*p, 32).expect("a /32")),
            );
            ext.interface.clone().map(|parent| WanPlan {
                parent,
                addresses,
                gateway: ext.gateway,
            })
        }
        _ => None,
    };
    let ruleset = router_ruleset(g, &maps, router_addr.filter(|_| wan.is_some()));
    let dhcp = dhcp_plan(g, gw, mtu);
    let group = group_key(g);
    Some(RouterPlan {
        segment: seg,
        lan_mac: derived_mac(&format!("yukumo-router-lan:{group}")),
        wan_mac: derived_mac(&format!("yukumo-router-wan:{group}")),
        group,
        netns: router_netns(inp.netns_prefix, seg),
        host_veth: router_veth_name(seg),
        bridge: bridge_name(seg),
        lan: g.spec.cidr.with_addr(gw),
        mtu,
        wan,
        ruleset,
        dhcp,
    })
}

fn dhcp_plan(g: &NetworkGroup, gw: Ipv4Addr, mtu: u32) -> Option<DhcpPlan> {
    let spec = g.spec.dhcp.as_ref();
    if spec.is_some_and(|d| !d.enabled) {
        return None;
    }
    let st = g.status.as_ref()?;
    let lease = spec.map(|d| d.lease_seconds).unwrap_or(3600);
    let mask = g.spec.cidr.netmask();
    let mut args = vec![
        format!("--interface={}", super::plan::ROUTER_LAN),
        "--bind-interfaces".into(),
        "--except-interface=lo".into(),
        // DHCP only: no DNS service on the router.
        "--port=0".into(),
        "--dhcp-authoritative".into(),
        "--dhcp-rapid-commit".into(),
        format!("--dhcp-option=option:router,{gw}"),
        format!("--dhcp-option=option:mtu,{mtu}"),
    ];
    match g.spec.dhcp_range() {
        Some((a, b)) => args.push(format!("--dhcp-range={a},{b},{mask},{lease}")),
        None => args.push(format!(
            "--dhcp-range={},static,{mask},{lease}",
            g.spec.cidr.network()
        )),
    }
    if let Some(d) = spec
        && !d.dns_servers.is_empty()
    {
        let list: Vec<String> = d.dns_servers.iter().map(|a| a.to_string()).collect();
        args.push(format!(
            "--dhcp-option=option:dns-server,{}",
            list.join(",")
        ));
    }
    let mut hosts = String::new();
    for a in &st.allocations {
        let _ = writeln!(hosts, "{},{},{}", a.mac, a.ip, a.node);
    }
    Some(DhcpPlan { args, hosts })
}

#[cfg(test)]
mod tests;
