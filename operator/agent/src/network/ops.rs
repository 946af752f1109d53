//! The typed operations a decision returns and an executor carries out:
//! what to change in one network namespace's links, bridge FDB, addresses
//! and routes, its nftables tables, and its DHCP server. Nothing here is
//! text to be parsed again; the kernel backends turn each into a netlink
//! request (or an `nft` transaction, or a signal to dnsmasq).

use std::net::Ipv4Addr;

use yukumo_api::net::{Ipv4Net, MacAddr};

/// A change of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOp {
    /// Delete a link (a veth takes its peer along).
    Delete(String),
    AddBridge {
        name: String,
        mtu: u32,
    },
    /// A VXLAN device: no learning, head-end replication to static FDB
    /// entries, `local` the underlay address, `dev` the uplink.
    AddVxlan {
        name: String,
        vni: u32,
        local: Option<Ipv4Addr>,
        dev: Option<String>,
        port: u16,
        mtu: u32,
    },
    /// An 802.1Q sub-interface of `parent`.
    AddVlan {
        name: String,
        parent: String,
        id: u16,
        mtu: u32,
    },
    /// A veth pair: `name` here, `peer` (with `peer_mac`) in namespace
    /// `peer_netns`.
    AddVeth {
        name: String,
        mtu: u32,
        peer: String,
        peer_mac: MacAddr,
        peer_netns: String,
    },
    /// A macvlan (bridge mode) on `parent`, born in namespace `netns` as `name`.
    AddMacvlan {
        name: String,
        parent: String,
        mac: MacAddr,
        netns: String,
    },
    /// Set a link up, with a master and an MTU when given.
    Set {
        name: String,
        master: Option<String>,
        mtu: Option<u32>,
    },
    /// A bridge port's learning and unicast flooding.
    Port {
        name: String,
        learning: bool,
        flood: bool,
    },
}

impl LinkOp {
    /// `ip link set NAME up`.
    pub fn up(name: &str) -> LinkOp {
        LinkOp::Set {
            name: name.to_string(),
            master: None,
            mtu: None,
        }
    }

    /// The phase the op runs in: links are deleted first, then created,
    /// then configured (masters exist by then), then their ports set.
    pub fn phase(&self) -> u8 {
        match self {
            LinkOp::Delete(_) => 0,
            LinkOp::AddBridge { .. }
            | LinkOp::AddVxlan { .. }
            | LinkOp::AddVlan { .. }
            | LinkOp::AddVeth { .. }
            | LinkOp::AddMacvlan { .. } => 1,
            LinkOp::Set { .. } => 2,
            LinkOp::Port { .. } => 3,
        }
    }
}

/// A change of a bridge FDB.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum FdbOp {
    /// An all-zero entry on a VXLAN device: flood to this remote.
    AddRemote {
        dev: String,
        dst: Ipv4Addr,
    },
    DelRemote {
        dev: String,
        dst: Ipv4Addr,
    },
    /// A static entry of the bridge: `mac` lives behind `port`.
    Pin {
        port: String,
        mac: MacAddr,
    },
}

/// A change of an IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AddrOp {
    Add { dev: String, net: Ipv4Net },
    Del { dev: String, net: Ipv4Net },
}

/// The default route of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    pub via: Ipv4Addr,
    pub dev: String,
}

/// The family of a yukumo nftables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `table bridge yukumo`: the host's anti-spoofing.
    Bridge,
    /// `table ip yukumo`: a router's NAT and firewall.
    Ip,
    /// `table inet yukumo`: the WAN tunnels' source filter of a gateway.
    Inet,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Bridge => "bridge",
            Family::Ip => "ip",
            Family::Inet => "inet",
        }
    }
}

/// A change of a yukumo nftables table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableOp {
    /// Replace the table in one transaction with this ruleset.
    Replace {
        family: Family,
        ruleset: String,
    },
    Delete {
        family: Family,
    },
}

/// The shaper of a gateway's WAN interface: an HTB root qdisc
/// (`SHAPE_HANDLE:`) with one class per capped tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeOp {
    /// Make it exactly these classes: (minor, Mbit/s).
    Set {
        dev: String,
        classes: Vec<(u16, u32)>,
    },
    /// Remove the agent's root qdisc.
    Clear { dev: String },
}

/// What the DHCP server of a router must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpOp {
    /// Start it (stopping one that runs with other arguments first).
    Start {
        args: Vec<String>,
        hosts: String,
    },
    /// Write its leases and have it reread them.
    Reload {
        hosts: String,
    },
    Stop,
}

/// Every change to one namespace, in the order an executor applies them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsOps {
    pub links: Vec<LinkOp>,
    pub fdb: Vec<FdbOp>,
    pub addrs: Vec<AddrOp>,
    pub route: Option<DefaultRoute>,
}

impl NsOps {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
            && self.fdb.is_empty()
            && self.addrs.is_empty()
            && self.route.is_none()
    }
}
