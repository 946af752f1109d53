//! What a network namespace holds, by name: the observed side of every
//! decision. A kernel backend fills it (from netlink dumps, or the fake's
//! model); decisions only read it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use yukumo_api::net::{Ipv4Net, MacAddr};

/// The type of a link, as far as yukumo cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan {
        vni: u32,
        local: Option<Ipv4Addr>,
        /// Its UDP port.
        port: u16,
    },
    /// An 802.1Q sub-interface (an 802.1ad one has no id here).
    Vlan {
        id: Option<u16>,
    },
    Veth,
    Macvlan,
    Other(String),
}

/// One link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub kind: LinkKind,
    pub up: bool,
    pub mtu: u32,
    pub master: Option<String>,
    /// The parent of a VLAN sub-interface or macvlan, in this namespace.
    pub parent: Option<String>,
    /// Learning and unicast flooding, for a bridge port.
    pub port: Option<(bool, bool)>,
    /// Its MAC address.
    pub mac: Option<MacAddr>,
}

/// Which parts of a namespace to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want {
    pub fdb: bool,
    pub addrs: bool,
    pub routes: bool,
}

impl Want {
    /// Links, the bridge FDB and addresses (a host namespace: its WAN
    /// interface may hold the Site's endpoint).
    pub const HOST: Want = Want {
        fdb: true,
        addrs: true,
        routes: false,
    };
    /// Links, addresses and routes (a router namespace).
    pub const ROUTER: Want = Want {
        fdb: false,
        addrs: true,
        routes: true,
    };
}

/// What one namespace holds (the parts asked for; the others empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NsState {
    pub links: BTreeMap<String, LinkState>,
    /// All-zero FDB entries of VXLAN devices: (device, remote).
    pub remotes: BTreeSet<(String, Ipv4Addr)>,
    /// Static entries of bridges: (port, MAC).
    pub pinned: BTreeSet<(String, MacAddr)>,
    /// IPv4 addresses, by link.
    pub addrs: BTreeMap<String, BTreeSet<Ipv4Net>>,
    /// The default route: (gateway, device).
    pub default_route: Option<(Ipv4Addr, String)>,
}

impl NsState {
    pub fn link(&self, name: &str) -> Option<&LinkState> {
        self.links.get(name)
    }
    pub fn has(&self, name: &str) -> bool {
        self.links.contains_key(name)
    }
}

/// Build a namespace's state from netlink dumps (indices resolved to names).
pub fn from_netlink(
    links: Vec<crate::netlink::Link>,
    fdb: Vec<crate::netlink::Fdb>,
    addrs: Vec<crate::netlink::Addr>,
    routes: Vec<crate::netlink::Route>,
) -> NsState {
    let names: BTreeMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
    let name_of = |i: Option<u32>| i.and_then(|i| names.get(&i).cloned());
    let mut out = NsState::default();
    for l in links {
        let kind = match l.kind.as_deref() {
            Some("bridge") => LinkKind::Bridge,
            Some("vxlan") => {
                let (vni, local, port) = l.vxlan.unwrap_or((0, None, 0));
                LinkKind::Vxlan { vni, local, port }
            }
            Some("vlan") => LinkKind::Vlan { id: l.vlan },
            Some("veth") => LinkKind::Veth,
            Some("macvlan") => LinkKind::Macvlan,
            Some(other) => LinkKind::Other(other.to_string()),
            None => LinkKind::Other(String::new()),
        };
        out.links.insert(
            l.name.clone(),
            LinkState {
                kind,
                up: l.up,
                mtu: l.mtu,
                master: name_of(l.master),
                parent: name_of(l.parent),
                port: l.port,
                mac: l.mac,
                name: l.name,
            },
        );
    }
    for e in fdb {
        let Some(dev) = names.get(&e.ifindex) else {
            continue;
        };
        match e.dst {
            Some(dst) if e.mac == MacAddr::default() && !e.master => {
                out.remotes.insert((dev.clone(), dst));
            }
            // Pinned: static and sticky (a pin from before sticky entries
            // is pinned again, as sticky).
            None if e.master && e.is_static && e.sticky => {
                out.pinned.insert((dev.clone(), e.mac));
            }
            _ => {}
        }
    }
    for a in addrs {
        if let Some(dev) = names.get(&a.ifindex) {
            out.addrs.entry(dev.clone()).or_default().insert(a.net);
        }
    }
    out.default_route = routes
        .into_iter()
        .filter(|r| r.dst.prefix() == 0)
        .find_map(|r| Some((r.gateway?, names.get(&r.oif?)?.clone())));
    out
}
