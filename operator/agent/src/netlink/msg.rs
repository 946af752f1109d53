//! The netlink requests yukumo sends, built from typed values: links by
//! name, bridge FDB entries, IPv4 addresses and the default route.

use std::net::Ipv4Addr;

use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use yukumo_api::net::{Ipv4Net, MacAddr};

/// One netlink request: the message, its flags (besides request and ack),
/// and what it does, for errors.
#[derive(Debug, Clone)]
pub struct Request {
    pub msg: RouteNetlinkMessage,
    pub flags: u16,
    pub what: String,
}

/// Flags of a request that creates what must not exist yet.
pub const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;
/// Flags of a request that creates or replaces.
pub const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;
/// Flags of a request that appends (an FDB entry beside others of its MAC).
pub const APPEND: u16 = NLM_F_CREATE | NLM_F_APPEND;

impl Request {
    pub fn new(msg: RouteNetlinkMessage, flags: u16, what: impl Into<String>) -> Request {
        Request {
            msg,
            flags,
            what: what.into(),
        }
    }
}

/// A link message naming `name` (by name: the kernel resolves it).
pub fn link_named(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m
}

/// A link message of `kind` with its data.
pub fn link_of_kind(name: &str, kind: InfoKind, data: Option<InfoData>) -> LinkMessage {
    let mut m = link_named(name);
    let mut info = vec![LinkInfo::Kind(kind)];
    if let Some(d) = data {
        info.push(LinkInfo::Data(d));
    }
    m.attributes.push(LinkAttribute::LinkInfo(info));
    m
}

/// Set a link administratively up in the message.
pub fn set_up(m: &mut LinkMessage) {
    m.header.flags |= LinkFlags::Up;
    m.header.change_mask |= LinkFlags::Up;
}

/// The bridge-port settings of a port (`learning`, `flood`), as a change of
/// its slave data.
pub fn port_settings(name: &str, learning: bool, flood: bool) -> LinkMessage {
    let mut m = link_named(name);
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(netlink_packet_route::link::InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![
            InfoBridgePort::Learning(learning),
            InfoBridgePort::UnicastFlood(flood),
        ])),
    ]));
    m
}

/// An FDB entry message: on `ifindex`, for `mac`, `self` (the device's own
/// table, VXLAN remotes) or `master` (the bridge's); a `sticky` bridge
/// entry never moves to another port (a frame with `mac` as its source
/// arriving on a learning port would move even a static entry).
pub fn fdb_entry(
    ifindex: u32,
    mac: MacAddr,
    dst: Option<Ipv4Addr>,
    master: bool,
    sticky: bool,
    state: NeighbourState,
) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = ifindex;
    n.header.state = state;
    n.header.flags = if master {
        NeighbourFlags::Controller
    } else {
        NeighbourFlags::Own
    };
    if sticky {
        n.header.flags |= NeighbourFlags::Sticky;
    }
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    if let Some(d) = dst {
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(d)));
    }
    n
}

/// An IPv4 address message.
pub fn address(ifindex: u32, net: Ipv4Net) -> AddressMessage {
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    a.header.prefix_len = net.prefix();
    a.header.index = ifindex;
    let ip = std::net::IpAddr::V4(net.addr());
    a.attributes.push(AddressAttribute::Local(ip));
    a.attributes.push(AddressAttribute::Address(ip));
    if net.prefix() < 31 {
        a.attributes
            .push(AddressAttribute::Broadcast(net.broadcast()));
    }
    a
}

/// The default route via `gateway` on `oif` (main table).
pub fn default_route(gateway: Ipv4Addr, oif: u32) -> RouteMessage {
    use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
    let mut r = RouteMessage::default();
    r.header.address_family = AddressFamily::Inet;
    r.header.table = 254;
    r.header.protocol = RouteProtocol::Boot;
    r.header.scope = RouteScope::Universe;
    r.header.kind = RouteType::Unicast;
    r.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    r.attributes.push(RouteAttribute::Oif(oif));
    r
}

/// A route to `dst` (a /32) into link `oif`, in routing table `table`.
pub fn table_route(dst: Ipv4Addr, table: u32, oif: u32) -> RouteMessage {
    use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
    let mut r = RouteMessage::default();
    r.header.address_family = AddressFamily::Inet;
    r.header.destination_prefix_length = 32;
    r.header.table = if table < 256 { table as u8 } else { 252 };
    r.header.protocol = RouteProtocol::Boot;
    r.header.scope = RouteScope::Link;
    r.header.kind = RouteType::Unicast;
    r.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    r.attributes.push(RouteAttribute::Table(table));
    r.attributes.push(RouteAttribute::Oif(oif));
    r
}

/// The IPv4 rule "every packet *not* marked `mark` looks up `table`", at
/// `priority`.
pub fn unmarked_rule(
    mark: u32,
    table: u32,
    priority: u32,
) -> netlink_packet_route::rule::RuleMessage {
    use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
    let mut r = RuleMessage::default();
    r.header.family = AddressFamily::Inet;
    r.header.table = if table < 256 { table as u8 } else { 252 };
    r.header.action = RuleAction::ToTable;
    r.header.flags = RuleFlags::Invert;
    r.attributes.push(RuleAttribute::FwMark(mark));
    r.attributes.push(RuleAttribute::FwMask(0xffff_ffff));
    r.attributes.push(RuleAttribute::Table(table));
    r.attributes.push(RuleAttribute::Priority(priority));
    r
}
