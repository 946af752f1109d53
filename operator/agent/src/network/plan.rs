//! What the host's network should look like, as a pure function of the
//! NetworkGroups, this host's VirtualNodes and the Site: bridges, segment
//! links, guest taps, the anti-spoofing ruleset, and the routers this host
//! runs (their addresses, NAT and firewall ruleset, DHCP leases).
//!
//! Names are derived from segment ids (unique per Site and type, and a host
//! belongs to one Site) and node uids, so two tenants with the same CIDR never
//! share a link, a table or a namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::ResourceExt;
use sha2::{Digest, Sha256};
use yukumo_api::networkgroup::{FirewallTarget, NetworkGroup, Protocol, SegmentType};
use yukumo_api::site::ExternalNetwork;
use yukumo_api::virtualnode::VirtualNode;

/// The router namespace's interface on the group's segment.
pub const ROUTER_LAN: &str = "gw0";
/// The router namespace's interface on the Site's external network.
pub const ROUTER_WAN: &str = "wan0";
/// VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// The group's bridge on a host. VLAN ids and VNIs are allocated from
/// separate ranges and may be equal, so the two kinds never share a name.
pub fn bridge_name(kind: SegmentType, id: u32) -> String {
    match kind {
        SegmentType::Vxlan => format!("ykbr{id}"),
        SegmentType::Vlan => format!("ykbv{id}"),
    }
}
/// The bridge of a VirtualNode's `spec.network.segment` (`vxlan:1000`,
/// `vlan:100`).
pub fn bridge_of_segment(segment: &str) -> Option<String> {
    let (kind, id) = segment.split_once(':')?;
    let id = id.parse().ok()?;
    match kind {
        "vxlan" => Some(bridge_name(SegmentType::Vxlan, id)),
        "vlan" => Some(bridge_name(SegmentType::Vlan, id)),
        _ => None,
    }
}
pub fn segment_link_name(kind: SegmentType, id: u32) -> String {
    match kind {
        SegmentType::Vxlan => format!("ykvx{id}"),
        SegmentType::Vlan => format!("ykvl{id}"),
    }
}
pub fn router_veth_name(kind: SegmentType, id: u32) -> String {
    match kind {
        SegmentType::Vxlan => format!("ykgw{id}"),
        SegmentType::Vlan => format!("ykgv{id}"),
    }
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
pub fn router_netns(prefix: &str, kind: SegmentType, id: u32) -> String {
    match kind {
        SegmentType::Vxlan => format!("{prefix}r{id}"),
        SegmentType::Vlan => format!("{prefix}v{id}"),
    }
}

/// One segment present on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPlan {
    pub id: u32,
    pub kind: SegmentType,
    pub bridge: String,
    pub link: String,
    pub mtu: u32,
    /// Underlay addresses of the other hosts of the segment (VXLAN).
    pub remotes: BTreeSet<Ipv4Addr>,
}

/// A guest's tap and what it may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    pub name: String,
    pub bridge: String,
    pub mac: String,
    pub ip: String,
}

/// The WAN side of a router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanPlan {
    /// Host interface on the Site's external network (macvlan parent).
    pub parent: String,
    /// `address/prefix` of the router itself, then each public IP as /32.
    pub addresses: Vec<String>,
    pub gateway: Option<String>,
}

/// DHCP of a group: dnsmasq arguments (without file paths) and the static
/// leases (`mac,ip,hostname` lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpPlan {
    pub args: Vec<String>,
    pub hosts: String,
}

/// A router this host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterPlan {
    pub id: u32,
    pub group: String,
    pub netns: String,
    pub host_veth: String,
    pub bridge: String,
    /// Gateway `address/prefix` on the segment.
    pub lan: String,
    /// MACs of the two legs, derived from the group: a router rebuilt or
    /// moved answers with the same MAC, so no guest's or upstream
    /// neighbour cache points at a MAC that no longer exists.
    pub lan_mac: String,
    pub wan_mac: String,
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
    pub routers: BTreeMap<String, RouterPlan>,
    /// The complete `table bridge yukumo` of the host.
    pub guard: String,
}

/// What the plan is computed from.
pub struct Inputs<'a> {
    pub host: &'a str,
    pub netns_prefix: &'a str,
    pub groups: &'a [Arc<NetworkGroup>],
    pub nodes: &'a [Arc<VirtualNode>],
    pub external: Option<&'a ExternalNetwork>,
    pub underlay: Option<Ipv4Addr>,
}

fn hash_of(s: &str) -> String {
    let mut h = Sha256::new();
    h.update(s.as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

/// A locally administered unicast MAC derived from `seed`.
fn derived_mac(seed: &str) -> String {
    let h = Sha256::digest(seed.as_bytes());
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

fn prefix_of(cidr: &str) -> Option<u8> {
    cidr.split_once('/')?.1.parse().ok()
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    })
}

pub fn plan(inp: &Inputs) -> HostPlan {
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
    for g in inp.groups {
        let Some(st) = &g.status else { continue };
        let Some(id) = st.segment_id else { continue };
        let gkey = key(&g.namespace().unwrap_or_default(), &g.name_any());
        let router_here = st.router.as_ref().is_some_and(|r| r.host == inp.host);
        let spanned = st.hosts.iter().any(|h| h.name == inp.host);
        if !(router_here || spanned || local_groups.contains(&gkey)) {
            continue;
        }
        let mtu = st.mtu.unwrap_or(1450);
        let kind = g.spec.segment.type_;
        let remotes = match kind {
            SegmentType::Vxlan => st
                .hosts
                .iter()
                .filter(|h| h.name != inp.host)
                .filter_map(|h| h.underlay.parse().ok())
                .filter(|a| Some(*a) != inp.underlay)
                .collect(),
            SegmentType::Vlan => BTreeSet::new(),
        };
        out.segments.insert(
            bridge_name(kind, id),
            SegmentPlan {
                id,
                kind,
                bridge: bridge_name(kind, id),
                link: segment_link_name(kind, id),
                mtu,
                remotes,
            },
        );
        if router_here && let Some(r) = router_plan(inp, g, kind, id, mtu) {
            out.routers.insert(r.netns.clone(), r);
        }
    }
    // Taps of this host's nodes on segments it has.
    let by_group: BTreeMap<String, String> = inp
        .groups
        .iter()
        .filter_map(|g| {
            Some((
                key(&g.namespace().unwrap_or_default(), &g.name_any()),
                bridge_name(g.spec.segment.type_, g.status.as_ref()?.segment_id?),
            ))
        })
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
            mac: net.mac.clone(),
            ip: net.ip.clone(),
        });
    }
    out.taps.sort_by(|a, b| a.name.cmp(&b.name));
    out.guard = guard_ruleset(&out.taps);
    out
}

fn router_plan(
    inp: &Inputs,
    g: &NetworkGroup,
    kind: SegmentType,
    id: u32,
    mtu: u32,
) -> Option<RouterPlan> {
    let st = g.status.as_ref()?;
    let gw = st.gateway.clone()?;
    let prefix = prefix_of(&g.spec.cidr)?;
    let ip_of = |node: &str| {
        st.allocations
            .iter()
            .find(|a| a.node == node)
            .map(|a| a.ip.clone())
    };
    // Public mappings to nodes that have an address.
    let maps: Vec<(String, String, Option<String>)> = st
        .public_ips
        .iter()
        .filter_map(|p| {
            let role = st
                .allocations
                .iter()
                .find(|a| a.node == p.node)
                .and_then(|a| a.role.clone());
            Some((p.address.clone(), ip_of(&p.node)?, role))
        })
        .collect();
    let router_addr = st.router.as_ref().and_then(|r| r.address.clone());
    let wan = match (inp.external, &router_addr) {
        (Some(ext), Some(addr)) => {
            let ext_prefix = prefix_of(&ext.cidr).unwrap_or(24);
            let mut addresses = vec![format!("{addr}/{ext_prefix}")];
            addresses.extend(maps.iter().map(|(p, _, _)| format!("{p}/32")));
            ext.interface.clone().map(|parent| WanPlan {
                parent,
                addresses,
                gateway: ext.gateway.clone(),
            })
        }
        _ => None,
    };
    let ruleset = router_ruleset(g, &maps, router_addr.as_deref().filter(|_| wan.is_some()));
    let dhcp = dhcp_plan(g, &gw, prefix, mtu);
    let group = format!("{}/{}", g.namespace().unwrap_or_default(), g.name_any());
    Some(RouterPlan {
        id,
        lan_mac: derived_mac(&format!("yukumo-router-lan:{group}")),
        wan_mac: derived_mac(&format!("yukumo-router-wan:{group}")),
        group,
        netns: router_netns(inp.netns_prefix, kind, id),
        host_veth: router_veth_name(kind, id),
        bridge: bridge_name(kind, id),
        lan: format!("{gw}/{prefix}"),
        mtu,
        wan,
        ruleset,
        dhcp,
    })
}

fn dhcp_plan(g: &NetworkGroup, gw: &str, prefix: u8, mtu: u32) -> Option<DhcpPlan> {
    let spec = g.spec.dhcp.clone();
    if spec.as_ref().is_some_and(|d| !d.enabled) {
        return None;
    }
    let st = g.status.as_ref()?;
    let net = g.spec.cidr.split_once('/')?.0.to_string();
    let lease = spec.as_ref().map(|d| d.lease_seconds).unwrap_or(3600);
    let mask = netmask(prefix);
    let mut args = vec![
        format!("--interface={ROUTER_LAN}"),
        "--bind-interfaces".into(),
        "--except-interface=lo".into(),
        // DHCP only: no DNS service on the router.
        "--port=0".into(),
        "--dhcp-authoritative".into(),
        "--dhcp-rapid-commit".into(),
        format!("--dhcp-option=option:router,{gw}"),
        format!("--dhcp-option=option:mtu,{mtu}"),
    ];
    match spec
        .as_ref()
        .and_then(|d| Some((d.range_start.clone()?, d.range_end.clone()?)))
    {
        Some((a, b)) => args.push(format!("--dhcp-range={a},{b},{mask},{lease}")),
        None => args.push(format!("--dhcp-range={net},static,{mask},{lease}")),
    }
    if let Some(d) = &spec
        && !d.dns_servers.is_empty()
    {
        args.push(format!(
            "--dhcp-option=option:dns-server,{}",
            d.dns_servers.join(",")
        ));
    }
    let mut hosts = String::new();
    for a in &st.allocations {
        let _ = writeln!(hosts, "{},{},{}", a.mac, a.ip, a.node);
    }
    Some(DhcpPlan { args, hosts })
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
    }
}

/// The router's `table ip yukumo`: 1:1 NAT for public IPs (maps, so 10,000
/// mappings are two rules), masquerade of the rest of the group to the
/// router's address, and the inbound firewall.
pub fn router_ruleset(
    g: &NetworkGroup,
    maps: &[(String, String, Option<String>)],
    router_addr: Option<&str>,
) -> String {
    let mut body = String::new();
    let elems = |pairs: &mut dyn Iterator<Item = (String, String)>| {
        let v: Vec<String> = pairs.map(|(a, b)| format!("{a} : {b}")).collect();
        if v.is_empty() {
            String::new()
        } else {
            format!("\n    elements = {{ {} }}", v.join(", "))
        }
    };
    let _ = write!(
        body,
        "  map to_private {{\n    type ipv4_addr : ipv4_addr;{}\n  }}\n",
        elems(&mut maps.iter().map(|(p, i, _)| (p.clone(), i.clone())))
    );
    let _ = write!(
        body,
        "  map to_public {{\n    type ipv4_addr : ipv4_addr;{}\n  }}\n",
        elems(&mut maps.iter().map(|(p, i, _)| (i.clone(), p.clone())))
    );
    let _ = write!(
        body,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    iifname \"{ROUTER_WAN}\" dnat to ip daddr map @to_private\n  }}\n"
    );
    let mut post = format!("    oifname \"{ROUTER_WAN}\" snat to ip saddr map @to_public\n");
    if g.spec.egress_nat
        && let Some(addr) = router_addr
    {
        let _ = writeln!(
            post,
            "    oifname \"{ROUTER_WAN}\" ip saddr {} snat to {addr}",
            g.spec.cidr
        );
    }
    let _ = write!(
        body,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{post}  }}\n"
    );
    // Inbound: established traffic, then what the firewall opens, to nodes
    // with a public IP (frontends only unless a rule says All).
    let mut inbound = String::new();
    for r in &g.spec.firewall {
        let targets: Vec<&str> = maps
            .iter()
            .filter(|(_, _, role)| {
                r.to == FirewallTarget::All || role.as_deref() == Some("frontend")
            })
            .map(|(_, ip, _)| ip.as_str())
            .collect();
        if targets.is_empty() {
            continue;
        }
        let mut rule = format!("    ip daddr {{ {} }}", targets.join(", "));
        if !r.from.is_empty() {
            let _ = write!(rule, " ip saddr {{ {} }}", r.from.join(", "));
        }
        match (r.protocol, &r.ports) {
            (Protocol::Icmp, _) => rule.push_str(" icmp type echo-request"),
            (p, Some(ports)) => {
                let _ = write!(rule, " {} dport {ports}", proto(p));
            }
            (p, None) => {
                let _ = write!(rule, " meta l4proto {}", proto(p));
            }
        }
        rule.push_str(" accept\n");
        inbound.push_str(&rule);
    }
    let egress = if g.spec.egress_nat || !maps.is_empty() {
        format!("    iifname \"{ROUTER_LAN}\" oifname \"{ROUTER_WAN}\" accept\n")
    } else {
        String::new()
    };
    let _ = write!(
        body,
        "  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n    ct state invalid drop\n{egress}    iifname \"{ROUTER_WAN}\" oifname \"{ROUTER_LAN}\" ct status dnat jump inbound\n  }}\n  chain inbound {{\n{inbound}  }}\n"
    );
    let _ = write!(
        body,
        "  chain input {{\n    type filter hook input priority filter; policy drop;\n    ct state established,related accept\n    iifname \"lo\" accept\n    iifname \"{ROUTER_LAN}\" udp dport 67 accept\n    iifname \"{ROUTER_LAN}\" icmp type echo-request accept\n  }}\n"
    );
    let hash = hash_of(&body);
    format!("table ip yukumo {{\n  comment \"yukumo:{hash}\"\n{body}}}\n")
}

/// The host's `table bridge yukumo`: a guest may send only from its own MAC
/// and IP (and DHCP from 0.0.0.0), ARP only for its own MAC and IP, never as
/// a DHCP server, never IPv6 (router advertisements included) and never a
/// tagged frame. Frames from yukumo's own ports (segment links, routers) pass.
pub fn guard_ruleset(taps: &[TapPlan]) -> String {
    let mut body = String::new();
    let vmap: Vec<String> = taps
        .iter()
        .map(|t| format!("\"{}\" : jump {}", t.name, t.name))
        .collect();
    let dispatch = if vmap.is_empty() {
        String::new()
    } else {
        format!("    iifname vmap {{ {} }}\n", vmap.join(", "))
    };
    let _ = write!(
        body,
        "  chain guard {{\n    type filter hook prerouting priority -200; policy accept;\n{dispatch}  }}\n"
    );
    for t in taps {
        let _ = write!(
            body,
            "  chain {name} {{\n    ether saddr != {mac} drop\n    ether type arp arp saddr ether {mac} arp saddr ip {{ {ip}, 0.0.0.0 }} accept\n    ether type ip udp sport 67 drop\n    ether type ip ip saddr {ip} accept\n    ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n    drop\n  }}\n",
            name = t.name,
            mac = t.mac,
            ip = t.ip
        );
    }
    let hash = hash_of(&body);
    format!("table bridge yukumo {{\n  comment \"yukumo:{hash}\"\n{body}}}\n")
}

/// The `comment "yukumo:<hash>"` of a rendered table.
pub fn ruleset_hash(ruleset: &str) -> Option<&str> {
    let i = ruleset.find("comment \"yukumo:")? + "comment \"yukumo:".len();
    Some(&ruleset[i..i + 16])
}

/// Rules in a rendered table (for checking a table nobody flushed).
pub fn rule_count(ruleset: &str) -> usize {
    ruleset
        .lines()
        .filter(|l| {
            l.starts_with("    ")
                && !l.trim_start().starts_with("type ")
                && !l.trim_start().starts_with("elements")
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ng(status: serde_json::Value) -> Arc<NetworkGroup> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
                "metadata": {"name": "net", "namespace": "t1", "uid": "g1"},
                "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "local",
                         "firewall": [{"protocol": "tcp", "ports": "22"}, {"protocol": "icmp", "to": "All"}]},
                "status": status
            }))
            .unwrap(),
        )
    }

    fn vn(name: &str, uid: &str, ip: &str, mac: &str) -> Arc<VirtualNode> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
                "metadata": {"name": name, "namespace": "t1", "uid": uid},
                "spec": {"cluster": "c", "role": "worker", "hostname": name, "host": "h1",
                         "resources": {"cpu": 1, "memoryMiB": 128},
                         "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                         "network": {"group": "net", "ip": ip, "prefix": 24, "gateway": "10.0.0.1",
                                     "mac": mac, "segment": "vxlan:1000", "mtu": 1450}}
            }))
            .unwrap(),
        )
    }

    fn status() -> serde_json::Value {
        serde_json::json!({
            "segmentId": 1000, "segment": "vxlan:1000", "gateway": "10.0.0.1", "mtu": 1450,
            "router": {"host": "h1", "site": "local", "address": "203.0.113.16"},
            "allocations": [
                {"node": "c-frontend", "ip": "10.0.0.7", "mac": "02:00:00:00:00:07", "role": "frontend"},
                {"node": "c-w-0", "ip": "10.0.0.9", "mac": "02:00:00:00:00:09", "role": "worker"}],
            "publicIPs": [{"address": "203.0.113.17", "node": "c-frontend"}],
            "hosts": [{"name": "h1", "underlay": "10.255.0.1"}, {"name": "h2", "underlay": "10.255.0.2"}]
        })
    }

    /// One group with a router on h1, a worker on h1, the external network.
    fn fixture() -> (
        Vec<Arc<NetworkGroup>>,
        Vec<Arc<VirtualNode>>,
        ExternalNetwork,
    ) {
        let nodes = vec![vn(
            "c-w-0",
            "0123abcd-ef45-6789",
            "10.0.0.9",
            "02:00:00:00:00:09",
        )];
        let ext = ExternalNetwork {
            cidr: "203.0.113.0/24".into(),
            gateway: Some("203.0.113.1".into()),
            interface: Some("ext0".into()),
        };
        (vec![ng(status())], nodes, ext)
    }

    #[test]
    fn host_plan_is_deterministic_and_complete() {
        let (groups, nodes, ext) = fixture();
        let inp = Inputs {
            host: "h1",
            netns_prefix: "yk-",
            groups: &groups,
            nodes: &nodes,
            external: Some(&ext),
            underlay: Some("10.255.0.1".parse().unwrap()),
        };
        let p = plan(&inp);
        assert_eq!(p, plan(&inp), "pure and deterministic");
        let seg = &p.segments["ykbr1000"];
        assert_eq!(
            (seg.bridge.as_str(), seg.link.as_str()),
            ("ykbr1000", "ykvx1000")
        );
        assert_eq!(
            seg.remotes
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>(),
            vec!["10.255.0.2"]
        );
        assert_eq!(p.taps[0].name, "ykt0123abcdef45");
        assert!(p.guard.contains("ether saddr != 02:00:00:00:00:09 drop"));
        assert!(p.guard.contains("ip saddr 10.0.0.9 accept"));
        let r = &p.routers["yk-r1000"];
        assert_eq!(r.netns, "yk-r1000");
        assert_eq!(r.lan, "10.0.0.1/24");
        let wan = r.wan.as_ref().unwrap();
        assert_eq!(wan.addresses, vec!["203.0.113.16/24", "203.0.113.17/32"]);
        assert!(r.ruleset.contains("elements = { 203.0.113.17 : 10.0.0.7 }"));
        assert!(
            r.ruleset
                .contains("ip saddr 10.0.0.0/24 snat to 203.0.113.16")
        );
        assert!(
            r.ruleset
                .contains("ip daddr { 10.0.0.7 } tcp dport 22 accept")
        );
        assert!(
            r.ruleset
                .contains("ip daddr { 10.0.0.7 } icmp type echo-request accept")
        );
        let dhcp = r.dhcp.as_ref().unwrap();
        assert!(dhcp.hosts.contains("02:00:00:00:00:09,10.0.0.9,c-w-0"));
        assert!(
            dhcp.args
                .contains(&"--dhcp-range=10.0.0.0,static,255.255.255.0,3600".to_string())
        );
        assert_eq!(ruleset_hash(&r.ruleset).map(str::len), Some(16));
        assert!(rule_count(&p.guard) >= 7, "{}", p.guard);
        // The router's legs have MACs of their own, locally administered,
        // the same on any host that runs it (a moved router keeps them).
        assert!(r.lan_mac.starts_with("02:") && r.wan_mac.starts_with("02:"));
        assert_ne!(r.lan_mac, r.wan_mac);
        let moved = Inputs {
            host: "h9",
            netns_prefix: "h9-",
            nodes: &[],
            ..inp
        };
        let mut g = (*groups[0]).clone();
        g.status.as_mut().unwrap().router.as_mut().unwrap().host = "h9".into();
        let moved_groups = [Arc::new(g)];
        let moved = plan(&Inputs {
            groups: &moved_groups,
            ..moved
        });
        let m = &moved.routers["h9-r1000"];
        assert_eq!((&m.lan_mac, &m.wan_mac), (&r.lan_mac, &r.wan_mac));
        // Another host with no member and no router has nothing.
        let other = Inputs {
            host: "h9",
            nodes: &[],
            ..inp
        };
        assert_eq!(plan(&other).segments.len(), 0);
    }

    /// A VLAN group and a VXLAN group may hold the same id (separate
    /// ranges): their bridges, links, router veths and namespaces differ.
    #[test]
    fn a_vlan_and_a_vxlan_group_with_the_same_id_share_no_name() {
        let (groups, _, ext) = fixture();
        let mut vlan = (*groups[0]).clone();
        vlan.metadata.name = Some("lan".into());
        vlan.metadata.uid = Some("g2".into());
        vlan.spec.segment.type_ = SegmentType::Vlan;
        vlan.status.as_mut().unwrap().segment = Some("vlan:1000".into());
        let both = vec![groups[0].clone(), Arc::new(vlan)];
        let mut on_lan = (*vn(
            "c-w-1",
            "4567abcd-ef45-6789",
            "10.0.0.8",
            "02:00:00:00:00:08",
        ))
        .clone();
        on_lan.spec.network.as_mut().unwrap().group = "lan".into();
        on_lan.spec.network.as_mut().unwrap().segment = "vlan:1000".into();
        let nodes = vec![Arc::new(on_lan.clone())];
        let p = plan(&Inputs {
            host: "h1",
            netns_prefix: "yk-",
            groups: &both,
            nodes: &nodes,
            external: Some(&ext),
            underlay: Some("10.255.0.1".parse().unwrap()),
        });
        let names: Vec<(&str, &str)> = p
            .segments
            .values()
            .map(|s| (s.bridge.as_str(), s.link.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("ykbr1000", "ykvx1000"), ("ykbv1000", "ykvl1000")]
        );
        assert!(
            p.segments["ykbv1000"].remotes.is_empty(),
            "no FDB on a VLAN"
        );
        let routers: Vec<(&str, &str, &str)> = p
            .routers
            .values()
            .map(|r| (r.netns.as_str(), r.host_veth.as_str(), r.bridge.as_str()))
            .collect();
        assert_eq!(
            routers,
            vec![
                ("yk-r1000", "ykgw1000", "ykbr1000"),
                ("yk-v1000", "ykgv1000", "ykbv1000")
            ]
        );
        assert_eq!(
            p.taps[0].bridge, "ykbv1000",
            "the node joins its own group's bridge"
        );
        assert_eq!(
            bridge_of_segment(&on_lan.spec.network.unwrap().segment).as_deref(),
            Some("ykbv1000")
        );
        assert_eq!(bridge_of_segment("vxlan:7").as_deref(), Some("ykbr7"));
        assert_eq!(bridge_of_segment("geneve:7"), None);
    }

    /// The rendered tables are valid nftables (checked by `nft -c`, which
    /// changes nothing); skipped, saying so, without root or nft.
    #[test]
    fn rendered_tables_pass_nft_check() {
        use std::io::Write;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: nft -c needs CAP_NET_ADMIN");
            return;
        }
        let (groups, nodes, ext) = fixture();
        let p = plan(&Inputs {
            host: "h1",
            netns_prefix: "yk-",
            groups: &groups,
            nodes: &nodes,
            external: Some(&ext),
            underlay: None,
        });
        for table in [
            &p.guard,
            &p.routers["yk-r1000"].ruleset,
            &guard_ruleset(&[]),
        ] {
            let mut child = match std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("skipped: nft: {e}");
                    return;
                }
            };
            child
                .stdin
                .take()
                .unwrap()
                .write_all(table.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}\n{table}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
