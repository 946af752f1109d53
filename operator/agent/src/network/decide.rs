//! The decisions of a network pass, as pure functions of the plan (what
//! should be) and the observed state (what is): each returns the typed
//! operations that close the gap, and nothing when there is none — so a
//! pass over a converged host changes nothing.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use yukumo_api::net::{Ipv4Net, SegmentType};

use super::observe::{LinkKind, NsState};
use super::ops::{AddrOp, DefaultRoute, DhcpOp, Family, FdbOp, LinkOp, NsOps, ShapeOp, TableOp};
use super::plan::{
    DhcpPlan, HostPlan, ROUTER_LAN, ROUTER_WAN, RouterPlan, SegmentPlan, TunnelPlan, VXLAN_PORT,
    WanPort,
};
use super::ruleset::listing_is;

/// The host's own facts a decision needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostEnv {
    /// The underlay address VXLAN devices send from.
    pub underlay: Option<Ipv4Addr>,
    /// The interface carrying segments (VXLAN `dev`, VLAN parent).
    pub uplink: Option<String>,
}

/// A plan that cannot be carried out on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Impossible(pub String);

/// Links yukumo makes in a host namespace: bridges (`ykbr` VXLAN, `ykbv`
/// VLAN groups), segment links (`ykvx`, `ykvl`), WAN ports (`ykw`) and
/// router veths (`ykgw`, `ykgv`). Guest taps (`ykt`) belong to libvirt.
pub fn is_ours(name: &str) -> bool {
    // The WireGuard device is the WireGuard step's (`wireguard.rs`).
    name != super::wireguard::LINK
        && ["ykbr", "ykbv", "ykvx", "ykvl", "ykgw", "ykgv", "ykw"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// Step 1: the host namespace's bridges and segment links; stale yukumo
/// links go.
pub fn host_links(
    plan: &HostPlan,
    have: &NsState,
    env: &HostEnv,
) -> Result<Vec<LinkOp>, Impossible> {
    let mut ops = Vec::new();
    let wanted: BTreeSet<&str> = plan
        .segments
        .values()
        .flat_map(|s| [s.bridge.as_str(), s.link.as_str()])
        .chain(
            plan.segments
                .values()
                .filter_map(|s| Some(s.wan.as_ref()?.link.as_str())),
        )
        .chain(plan.routers.values().map(|r| r.host_veth.as_str()))
        .collect();
    for name in have.links.keys() {
        if is_ours(name) && !wanted.contains(name.as_str()) {
            ops.push(LinkOp::Delete(name.clone()));
        }
    }
    for s in plan.segments.values() {
        match have.link(&s.bridge) {
            None => ops.push(LinkOp::AddBridge {
                name: s.bridge.clone(),
                mtu: s.mtu,
            }),
            Some(l) if !l.up || l.mtu != s.mtu => ops.push(LinkOp::Set {
                name: s.bridge.clone(),
                master: None,
                mtu: Some(s.mtu),
            }),
            Some(_) => {}
        }
        let current = have
            .link(&s.link)
            .is_some_and(|l| match (&l.kind, s.segment.type_) {
                (LinkKind::Vxlan { vni, local, port }, SegmentType::Vxlan) => {
                    *vni == s.segment.id && *local == env.underlay && *port == VXLAN_PORT
                }
                (LinkKind::Vlan { id: Some(id) }, SegmentType::Vlan) => {
                    u32::from(*id) == s.segment.id && l.parent.is_some() && l.parent == env.uplink
                }
                _ => false,
            });
        let set = LinkOp::Set {
            name: s.link.clone(),
            master: Some(s.bridge.clone()),
            mtu: Some(s.mtu),
        };
        if !current {
            if have.has(&s.link) {
                ops.push(LinkOp::Delete(s.link.clone()));
            }
            ops.push(match s.segment.type_ {
                SegmentType::Vxlan => LinkOp::AddVxlan {
                    name: s.link.clone(),
                    vni: s.segment.id,
                    local: env.underlay,
                    dev: env.uplink.clone(),
                    port: VXLAN_PORT,
                    mtu: s.mtu,
                },
                SegmentType::Vlan => {
                    // The Host does not offer 802.1Q without an uplink
                    // (register.rs), so the scheduler keeps VLAN groups
                    // away; a group planned here anyway is refused.
                    let Some(up) = &env.uplink else {
                        return Err(Impossible(format!(
                            "VLAN segment {} needs an uplink (--uplink) to carry it",
                            s.segment.id
                        )));
                    };
                    let id = u16::try_from(s.segment.id)
                        .ok()
                        .filter(|id| (1..=4094).contains(id))
                        .ok_or_else(|| {
                            Impossible(format!("VLAN id {} out of range", s.segment.id))
                        })?;
                    LinkOp::AddVlan {
                        name: s.link.clone(),
                        parent: up.clone(),
                        id,
                        mtu: s.mtu,
                    }
                }
            });
            ops.push(set);
        } else if let Some(l) = have.link(&s.link)
            && (l.master.as_deref() != Some(s.bridge.as_str()) || !l.up || l.mtu != s.mtu)
        {
            ops.push(set);
        }
        if let (Some(w), Some(t)) = (&s.wan, &plan.tunnel) {
            wan_port_ops(s, w, t, have, &mut ops);
        }
    }
    Ok(ops)
}

/// A segment's WAN port: a VXLAN link from the Site's endpoint on the WAN
/// interface, on the tunnels' port, enslaved to the group's bridge.
fn wan_port_ops(
    s: &SegmentPlan,
    w: &WanPort,
    t: &TunnelPlan,
    have: &NsState,
    ops: &mut Vec<LinkOp>,
) {
    let local = t.endpoint.addr();
    let current = have.link(&w.link).is_some_and(|l| {
        matches!(l.kind, LinkKind::Vxlan { vni, local: Some(a), port }
            if vni == s.segment.id && a == local && port == w.port)
    });
    let set = LinkOp::Set {
        name: w.link.clone(),
        master: Some(s.bridge.clone()),
        mtu: Some(s.mtu),
    };
    if !current {
        if have.has(&w.link) {
            ops.push(LinkOp::Delete(w.link.clone()));
        }
        ops.push(LinkOp::AddVxlan {
            name: w.link.clone(),
            vni: s.segment.id,
            local: Some(local),
            dev: w.dev.clone(),
            port: w.port,
            mtu: s.mtu,
        });
        ops.push(set);
    } else if let Some(l) = have.link(&w.link)
        && (l.master.as_deref() != Some(s.bridge.as_str()) || !l.up || l.mtu != s.mtu)
    {
        ops.push(set);
    }
}

/// The Site's WAN endpoint on this host's WAN interface: held (a /32) while
/// this host is the Site's active gateway, and let go when it is not.
/// Returns the address ops and whether the endpoint was just taken (to be
/// announced).
/// `taken`: an endpoint this agent took before (interface, address), let
/// go too when it is not the one to hold now (the Site's endpoint changed,
/// or the Site or this host has none any more).
pub fn tunnel_addr_ops(
    plan: &HostPlan,
    have: &NsState,
    taken: Option<&(String, Ipv4Net)>,
) -> Vec<AddrOp> {
    let on = |dev: &str, net: &Ipv4Net| have.addrs.get(dev).is_some_and(|a| a.contains(net));
    let mut ops = Vec::new();
    if let Some((dev, net)) = taken
        && on(dev, net)
        && !plan
            .tunnel
            .as_ref()
            .is_some_and(|t| t.active && &t.dev == dev && &t.endpoint == net)
    {
        ops.push(AddrOp::Del {
            dev: dev.clone(),
            net: *net,
        });
    }
    let Some(t) = &plan.tunnel else {
        return ops;
    };
    let held = on(&t.dev, &t.endpoint);
    match (t.active, held) {
        (true, false) if have.has(&t.dev) => ops.push(AddrOp::Add {
            dev: t.dev.clone(),
            net: t.endpoint,
        }),
        (false, true)
            if !ops.iter().any(
                |o| matches!(o, AddrOp::Del { dev, net } if *dev == t.dev && *net == t.endpoint),
            ) =>
        {
            ops.push(AddrOp::Del {
                dev: t.dev.clone(),
                net: t.endpoint,
            })
        }
        _ => {}
    }
    ops
}

/// Step 0b: the shaper of the WAN interface: one class per capped tunnel
/// while this host holds the Site's endpoint; the agent's qdisc removed
/// when nothing is capped (another's root qdisc is never touched: `seen`
/// is None for it).
pub fn shape_op(plan: &HostPlan, seen: Option<&[(u16, u32)]>) -> Option<ShapeOp> {
    let t = plan.tunnel.as_ref()?;
    let want: Vec<(u16, u32)> = t
        .caps
        .iter()
        .enumerate()
        .map(|(i, (_, mbps))| (u16::try_from(i + 1).unwrap_or(u16::MAX), *mbps))
        .collect();
    match (want.is_empty(), seen) {
        (true, None) => None,
        (true, Some(_)) => Some(ShapeOp::Clear { dev: t.dev.clone() }),
        (false, Some(s)) if s == want.as_slice() => None,
        (false, _) => Some(ShapeOp::Set {
            dev: t.dev.clone(),
            classes: want,
        }),
    }
}

/// Step 0: the WAN filter of a host with a WAN interface at a Site with a
/// WAN endpoint.
pub fn tunnel_table_op(plan: &HostPlan, seen: &TableSeen) -> Option<TableOp> {
    match plan.tunnel.as_ref().map(|t| &t.ruleset) {
        Some(r) => (!table_current(seen, r)).then(|| TableOp::Replace {
            family: Family::Inet,
            ruleset: r.clone(),
        }),
        None => (seen != &TableSeen::Absent).then_some(TableOp::Delete {
            family: Family::Inet,
        }),
    }
}

/// Step 2a: the legs of a router whose namespace this pass creates (made
/// from the host namespace for all new routers at once).
pub fn fresh_router_legs(r: &RouterPlan, host: &NsState) -> Vec<LinkOp> {
    let mut ops = Vec::new();
    if host.has(&r.host_veth) {
        ops.push(LinkOp::Delete(r.host_veth.clone()));
    }
    ops.extend(veth_ops(r));
    if let Some(w) = &r.wan {
        ops.push(macvlan_op(r, &w.parent));
    }
    ops
}

/// A router's LAN leg: a veth from its group's bridge into its namespace.
fn veth_ops(r: &RouterPlan) -> [LinkOp; 2] {
    [
        LinkOp::AddVeth {
            name: r.host_veth.clone(),
            mtu: r.mtu,
            peer: ROUTER_LAN.into(),
            peer_mac: r.lan_mac,
            peer_netns: r.netns.clone(),
        },
        LinkOp::Set {
            name: r.host_veth.clone(),
            master: Some(r.bridge.clone()),
            mtu: None,
        },
    ]
}

/// A router's WAN leg: a macvlan on the host's external interface.
fn macvlan_op(r: &RouterPlan, parent: &str) -> LinkOp {
    LinkOp::AddMacvlan {
        name: ROUTER_WAN.into(),
        parent: parent.to_string(),
        mac: r.wan_mac,
        netns: r.netns.clone(),
    }
}

/// What a router's namespace holds, as far as its decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSeen<'a> {
    /// Its links, addresses and routes; `None`: the namespace is new (made
    /// this pass, or just now because it was missing), so it holds nothing.
    pub inner: Option<&'a NsState>,
    /// Its legs were made by this pass's batch (step 2a).
    pub fresh: bool,
    /// `net.ipv4.ip_forward` is on (None: not read; nothing changed it).
    pub forwarding: Option<bool>,
    /// Its `table ip yukumo`.
    pub table: &'a TableSeen,
    /// Its DHCP server.
    pub dhcp: &'a DhcpSeen,
}

/// A router's DHCP server as found: running (in the router's namespace)
/// with these arguments and these leases on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpSeen {
    pub running: bool,
    pub args: Option<Vec<String>>,
    pub hosts: Option<String>,
}

/// Every change a router needs: first inside its namespace (`pre`: legs to
/// remove before new ones are made), then in the host namespace (legs),
/// then inside again (links up, addresses, route), its forwarding, table,
/// DHCP, and the external addresses to announce by gratuitous ARP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterOps {
    pub pre: Vec<LinkOp>,
    pub host: Vec<LinkOp>,
    pub inner: NsOps,
    pub forwarding: bool,
    pub table: Option<TableOp>,
    pub dhcp: Option<DhcpOp>,
    pub announce: Vec<Ipv4Addr>,
}

/// Step 2b: one router, brought to its plan.
pub fn router_ops(
    r: &RouterPlan,
    host: &NsState,
    seen: &RouterSeen,
    dhcp_args: &[String],
) -> RouterOps {
    let mut out = RouterOps::default();
    let empty = NsState::default();
    let inner = seen.inner.unwrap_or(&empty);
    let new = seen.inner.is_none();
    out.forwarding = new || seen.forwarding == Some(false);
    if new {
        out.inner.links.push(LinkOp::up("lo"));
    }
    // The LAN leg.
    if seen.fresh {
        out.inner.links.push(LinkOp::up(ROUTER_LAN));
    } else if !inner.has(ROUTER_LAN) || !host.has(&r.host_veth) {
        if host.has(&r.host_veth) {
            out.host.push(LinkOp::Delete(r.host_veth.clone()));
        }
        if inner.has(ROUTER_LAN) {
            out.pre.push(LinkOp::Delete(ROUTER_LAN.into()));
        }
        out.host.extend(veth_ops(r));
        out.inner.links.push(LinkOp::up(ROUTER_LAN));
    } else {
        let hv = &host.links[&r.host_veth];
        if hv.master.as_deref() != Some(r.bridge.as_str()) || !hv.up {
            out.host.push(LinkOp::Set {
                name: r.host_veth.clone(),
                master: Some(r.bridge.clone()),
                mtu: None,
            });
        }
        let lan = &inner.links[ROUTER_LAN];
        if !lan.up || lan.mtu != r.mtu {
            out.inner.links.push(LinkOp::Set {
                name: ROUTER_LAN.into(),
                master: None,
                mtu: Some(r.mtu),
            });
        }
    }
    // The WAN leg.
    match (&r.wan, inner.link(ROUTER_WAN)) {
        (Some(_), _) if seen.fresh => out.inner.links.push(LinkOp::up(ROUTER_WAN)),
        (Some(w), None) => {
            out.host.push(macvlan_op(r, &w.parent));
            out.inner.links.push(LinkOp::up(ROUTER_WAN));
        }
        (Some(_), Some(l)) if !l.up => out.inner.links.push(LinkOp::up(ROUTER_WAN)),
        (None, Some(_)) => out.pre.push(LinkOp::Delete(ROUTER_WAN.into())),
        _ => {}
    }
    // Addresses and the default route (a recreated leg has lost its
    // addresses: what is there now is compared).
    let mut want: Vec<(&str, BTreeSet<Ipv4Net>)> = vec![(ROUTER_LAN, BTreeSet::from([r.lan]))];
    if let Some(w) = &r.wan {
        want.push((ROUTER_WAN, w.addresses.iter().copied().collect()));
    }
    // Legs made again hold nothing yet.
    let relegged: BTreeSet<String> = out
        .host
        .iter()
        .filter_map(|op| match op {
            LinkOp::AddVeth { peer, .. } => Some(peer.clone()),
            LinkOp::AddMacvlan { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let relegged = |dev: &str| relegged.contains(dev);
    let mut addrs = Vec::new();
    for (dev, wanted) in &want {
        let cur = if relegged(dev) {
            BTreeSet::new()
        } else {
            inner.addrs.get(*dev).cloned().unwrap_or_default()
        };
        for a in cur.difference(wanted) {
            addrs.push(AddrOp::Del {
                dev: dev.to_string(),
                net: *a,
            });
        }
        for a in wanted.difference(&cur) {
            addrs.push(AddrOp::Add {
                dev: dev.to_string(),
                net: *a,
            });
            if *dev == ROUTER_WAN {
                out.announce.push(a.addr());
            }
        }
    }
    out.inner.addrs = addrs;
    if let Some(gw) = r.wan.as_ref().and_then(|w| w.gateway) {
        let current = !relegged(ROUTER_WAN)
            && inner.default_route.as_ref() == Some(&(gw, ROUTER_WAN.to_string()));
        if !current {
            out.inner.route = Some(DefaultRoute {
                via: gw,
                dev: ROUTER_WAN.into(),
            });
        }
    }
    // NAT and firewall.
    if new || !table_current(seen.table, &r.ruleset) {
        out.table = Some(TableOp::Replace {
            family: Family::Ip,
            ruleset: r.ruleset.clone(),
        });
    }
    out.dhcp = dhcp_op(r.dhcp.as_ref(), seen.dhcp, dhcp_args);
    out
}

/// The DHCP server's change: started when it is not running or runs with
/// other arguments, told to reread its leases when only they changed,
/// stopped when the group serves no DHCP.
pub fn dhcp_op(plan: Option<&DhcpPlan>, seen: &DhcpSeen, args: &[String]) -> Option<DhcpOp> {
    let Some(d) = plan else {
        return seen.running.then_some(DhcpOp::Stop);
    };
    let args_same = seen.args.as_deref() == Some(args);
    let hosts_same = seen.hosts.as_deref() == Some(d.hosts.as_str());
    if !seen.running || !args_same {
        Some(DhcpOp::Start {
            args: args.to_vec(),
            hosts: d.hosts.clone(),
        })
    } else if !hosts_same {
        Some(DhcpOp::Reload {
            hosts: d.hosts.clone(),
        })
    } else {
        None
    }
}

/// Step 3: guest taps re-joined to their bridge (after it was recreated).
pub fn tap_ops(plan: &HostPlan, have: &NsState) -> Vec<LinkOp> {
    plan.taps
        .iter()
        .filter(|t| {
            have.link(&t.name)
                .is_some_and(|l| l.master.as_deref() != Some(t.bridge.as_str()))
                && have.has(&t.bridge)
        })
        .map(|t| LinkOp::Set {
            name: t.name.clone(),
            master: Some(t.bridge.clone()),
            mtu: None,
        })
        .collect()
}

/// Step 4: the bridges' forwarding state.
/// - one all-zero FDB entry per remote host of each VXLAN segment
///   (head-end replication, no multicast, no learning on the VTEP);
/// - every guest tap and router veth: a static, sticky entry for its own
///   MAC, learning off and unknown-unicast flooding off. A unicast frame is
///   delivered to a guest only if it is addressed to that guest (never
///   flooded to every guest of the group after an entry aged out), and
///   nothing a guest sends moves another MAC to its port. Sticky: a frame
///   arriving from the VXLAN port with that MAC as its source (a group's
///   router MAC is the same on every host, and a returning host's stale
///   router speaks for a moment before it is removed) would otherwise move
///   even a static entry there, and local guests would lose their gateway.
///   Broadcast and multicast (ARP, DHCP) still reach every port.
pub fn bridge_ops(plan: &HostPlan, have: &NsState) -> (Vec<FdbOp>, Vec<LinkOp>) {
    let want: BTreeSet<(String, Ipv4Addr)> = plan
        .segments
        .values()
        .filter(|s| s.segment.type_ == SegmentType::Vxlan)
        .flat_map(|s| s.remotes.iter().map(|r| (s.link.clone(), *r)))
        .chain(
            plan.segments
                .values()
                .filter_map(|s| s.wan.as_ref())
                .flat_map(|w| w.peers.iter().map(|p| (w.link.clone(), *p))),
        )
        .collect();
    let mut fdb = Vec::new();
    for (dev, dst) in have.remotes.difference(&want) {
        // Entries of a link that is going away go with it.
        if plan
            .segments
            .values()
            .any(|s| &s.link == dev || s.wan.as_ref().is_some_and(|w| &w.link == dev))
        {
            fdb.push(FdbOp::DelRemote {
                dev: dev.clone(),
                dst: *dst,
            });
        }
    }
    for (dev, dst) in want.difference(&have.remotes) {
        fdb.push(FdbOp::AddRemote {
            dev: dev.clone(),
            dst: *dst,
        });
    }
    let own = plan.taps.iter().map(|t| (&t.name, &t.bridge, t.mac)).chain(
        plan.routers
            .values()
            .map(|r| (&r.host_veth, &r.bridge, r.lan_mac)),
    );
    let mut ports = Vec::new();
    for (port, bridge, mac) in own {
        let Some(p) = have
            .link(port)
            .filter(|p| p.master.as_deref() == Some(bridge.as_str()))
        else {
            continue;
        };
        if p.port != Some((false, false)) {
            ports.push(LinkOp::Port {
                name: port.clone(),
                learning: false,
                flood: false,
            });
        }
        if !have.pinned.contains(&(port.clone(), mac)) {
            fdb.push(FdbOp::Pin {
                port: port.clone(),
                mac,
            });
        }
    }
    (fdb, ports)
}

/// How a yukumo table was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableSeen {
    Absent,
    /// Listed: its text.
    Listed(String),
    /// Not listed: the agent wrote the planned ruleset last, and no
    /// nftables change happened in the namespace since.
    Unchanged,
    /// Not listed: the agent wrote another ruleset last, and no nftables
    /// change happened since (the plan changed).
    Outdated,
}

fn table_current(seen: &TableSeen, ruleset: &str) -> bool {
    match seen {
        TableSeen::Listed(l) => listing_is(l, ruleset),
        TableSeen::Unchanged => true,
        TableSeen::Absent | TableSeen::Outdated => false,
    }
}

/// Step 5: the host's anti-spoofing table, present while the host has
/// segments or taps.
pub fn guard_op(plan: &HostPlan, seen: &TableSeen) -> Option<TableOp> {
    if plan.taps.is_empty() && plan.segments.is_empty() {
        return (seen != &TableSeen::Absent).then_some(TableOp::Delete {
            family: Family::Bridge,
        });
    }
    (!table_current(seen, &plan.guard)).then(|| TableOp::Replace {
        family: Family::Bridge,
        ruleset: plan.guard.clone(),
    })
}

#[cfg(test)]
mod tests;
