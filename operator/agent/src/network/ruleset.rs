//! The nftables rulesets yukumo renders, as pure functions of the plan: a
//! router's `table ip yukumo` (NAT and the inbound firewall) and the host's
//! `table bridge yukumo` (anti-spoofing). Each table carries a hash of its
//! own text in a comment, so a listed table is recognised as current
//! without parsing it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};
use yukumo_api::networkgroup::{FirewallTarget, NetworkGroup, Protocol};
use yukumo_api::virtualnode::NodeRole;

use super::plan::{Mapping, ROUTER_LAN, ROUTER_WAN, TapPlan};

fn hash_of(s: &str) -> String {
    let mut h = Sha256::new();
    h.update(s.as_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
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
pub fn router_ruleset(g: &NetworkGroup, maps: &[Mapping], router_addr: Option<Ipv4Addr>) -> String {
    let mut body = String::new();
    let elems = |pairs: &mut dyn Iterator<Item = (Ipv4Addr, Ipv4Addr)>| {
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
        elems(&mut maps.iter().map(|(p, i, _)| (*p, *i)))
    );
    let _ = write!(
        body,
        "  map to_public {{\n    type ipv4_addr : ipv4_addr;{}\n  }}\n",
        elems(&mut maps.iter().map(|(p, i, _)| (*i, *p)))
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
        let targets: Vec<String> = maps
            .iter()
            .filter(|(_, _, role)| r.to == FirewallTarget::All || *role == Some(NodeRole::Frontend))
            .map(|(_, ip, _)| ip.to_string())
            .collect();
        if targets.is_empty() {
            continue;
        }
        let mut rule = format!("    ip daddr {{ {} }}", targets.join(", "));
        if !r.from.is_empty() {
            let from: Vec<String> = r.from.iter().map(|n| n.to_string()).collect();
            let _ = write!(rule, " ip saddr {{ {} }}", from.join(", "));
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

/// The `table inet yukumo` of a host with a WAN interface `wan`: the
/// Site's own VXLAN port is never taken from the WAN, and on the gateway
/// holding the Site's WAN endpoint (`endpoint`: address, port, peers)
/// tunnel packets are taken only from the peer Sites' endpoints (anyone
/// else could inject frames into a group). The holder also takes the
/// segments' VXLAN from the underlay only from the hosts it floods to
/// (`span`, the hosts its groups span): a host whose nodes restarted
/// elsewhere while it was lost, back with their domains still running, is
/// in no span, so nothing of theirs reaches another Site.
///
/// With WireGuard (`wireguard`), the endpoint's port is WireGuard's (taken
/// from peer endpoints only, WireGuard's own packets leaving from the
/// endpoint: source NAT) and the groups' VXLAN runs inside it on the next
/// port: taken only from the WireGuard device, from peer endpoints, never
/// sent out on the WAN interface; its bytes are the tunnel's, and the caps
/// classify WireGuard's packets to each peer.
pub fn tunnel_ruleset(
    wan: &str,
    endpoint: Option<(Ipv4Addr, u16, &BTreeSet<Ipv4Addr>)>,
    span: &BTreeSet<Ipv4Addr>,
    caps: &[(Ipv4Addr, u32)],
    wireguard: bool,
) -> String {
    let mut body = String::new();
    let mut rules = format!(
        "    iifname \"{wan}\" udp dport {} counter drop\n",
        super::plan::VXLAN_PORT
    );
    let peers = endpoint.map(|(_, _, p)| p.clone()).unwrap_or_default();
    // The port the groups' VXLAN uses between the gateways.
    let vx = |port: u16| {
        if wireguard {
            port.saturating_add(1)
        } else {
            port
        }
    };
    if let Some((endpoint, port, _)) = endpoint {
        let _ = writeln!(
            rules,
            "    udp dport {} ip saddr != @span counter drop",
            super::plan::VXLAN_PORT
        );
        if wireguard {
            let _ = writeln!(
                rules,
                "    udp dport {} iifname != \"{}\" counter drop",
                vx(port),
                super::wireguard::LINK
            );
        }
        let _ = writeln!(
            rules,
            "    ip daddr {endpoint} udp dport {port} ip saddr != @peers counter drop"
        );
        if wireguard {
            let _ = writeln!(
                rules,
                "    ip daddr {endpoint} udp dport {} ip saddr != @peers counter drop",
                vx(port)
            );
        }
        // Each peer's tunnel bytes, received (tunnel status).
        for p in &peers {
            let _ = writeln!(
                rules,
                "    ip daddr {endpoint} ip saddr {p} udp dport {} counter",
                vx(port)
            );
        }
    }
    let elems = |set: &BTreeSet<Ipv4Addr>| {
        if set.is_empty() {
            String::new()
        } else {
            let v: Vec<String> = set.iter().map(|p| p.to_string()).collect();
            format!("\n    elements = {{ {} }}", v.join(", "))
        }
    };
    let _ = write!(
        body,
        "  set peers {{\n    type ipv4_addr;{}\n  }}\n",
        elems(&peers)
    );
    if endpoint.is_some() {
        let _ = write!(
            body,
            "  set span {{\n    type ipv4_addr;{}\n  }}\n",
            elems(span)
        );
    }
    let _ = write!(
        body,
        "  chain wan {{\n    type filter hook input priority filter; policy accept;\n{rules}  }}\n"
    );
    if let Some((endpoint, port, _)) = endpoint
        && wireguard
    {
        // WireGuard sends from whichever address the WAN route gives; its
        // packets leave from the Site's endpoint, as the peers' filters
        // and caps expect (and they never see it roam).
        let _ = write!(
            body,
            "  chain wgsnat {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{wan}\" udp sport {port} ip saddr != {endpoint} snat ip to {endpoint}\n  }}\n"
        );
    }
    if let Some((endpoint, port, _)) = endpoint
        && !peers.is_empty()
    {
        // Each peer's tunnel bytes, sent; the packets to a capped peer go
        // to its class of the WAN interface's shaper (HTB takes a packet's
        // priority as its class).
        let mut out = String::new();
        if wireguard {
            // The groups' VXLAN never leaves on the WAN interface itself
            // (only inside WireGuard), whatever the routes say.
            let _ = writeln!(
                out,
                "    oifname \"{wan}\" udp dport {} counter drop",
                vx(port)
            );
        }
        for p in &peers {
            let _ = write!(
                out,
                "    ip saddr {endpoint} ip daddr {p} udp dport {} counter",
                vx(port)
            );
            let cap = caps.iter().position(|(c, _)| c == p);
            if wireguard && cap.is_some() {
                // The caps classify WireGuard's packets (from whichever
                // source address the WAN route gives them).
                out.push('\n');
                let _ = write!(out, "    ip daddr {p} udp dport {port}");
            }
            if let Some(i) = cap {
                let _ = write!(
                    out,
                    " meta priority set {:x}:{:x}",
                    super::plan::SHAPE_HANDLE,
                    i + 1
                );
            }
            out.push('\n');
        }
        let _ = write!(
            body,
            "  chain out {{\n    type filter hook output priority filter; policy accept;\n{out}  }}\n"
        );
    }
    let hash = hash_of(&body);
    format!("table inet yukumo {{\n  comment \"yukumo:{hash}\"\n{body}}}\n")
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

/// Rules of a listed table (`nft list table …`): the lines one level inside
/// a chain, without the chain headers and map declarations.
pub fn listed_rule_count(listing: &str) -> usize {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("\t\t"))
        .filter(|l| !l.starts_with('\t') && !l.starts_with(' '))
        .filter(|l| {
            !["type ", "elements", "policy ", "flags "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .count()
}

/// Whether a listed table is the rendered one: its hash comment and every
/// rule (a hand-flushed table has none).
pub fn listing_is(listing: &str, ruleset: &str) -> bool {
    ruleset_hash(listing).is_some()
        && ruleset_hash(listing) == ruleset_hash(ruleset)
        && listed_rule_count(listing) == rule_count(ruleset)
}

/// Each peer's tunnel bytes in a listing of the gateway's `table inet
/// yukumo` (`nft list table inet yukumo`): peer → (received, sent).
pub fn tunnel_counters(listing: &str) -> std::collections::BTreeMap<Ipv4Addr, (u64, u64)> {
    let mut out: std::collections::BTreeMap<Ipv4Addr, (u64, u64)> = Default::default();
    let mut chain = "";
    for line in listing.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("chain ") {
            chain = name.trim_end_matches(" {").trim();
            continue;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        let after = |key: &str, key2: &str| {
            w.windows(3)
                .find(|x| x[0] == key && x[1] == key2)
                .and_then(|x| x[2].parse::<Ipv4Addr>().ok())
        };
        let bytes = w
            .windows(2)
            .find(|x| x[0] == "bytes")
            .and_then(|x| x[1].parse::<u64>().ok());
        let Some(bytes) = bytes else { continue };
        if l.contains("!=") {
            continue;
        }
        match chain {
            "wan" => {
                if let Some(p) = after("ip", "saddr") {
                    out.entry(p).or_default().0 = bytes;
                }
            }
            "out" => {
                if let Some(p) = after("ip", "daddr") {
                    out.entry(p).or_default().1 = bytes;
                }
            }
            _ => {}
        }
    }
    out
}
