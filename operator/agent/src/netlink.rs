//! rtnetlink, in-process: one connection per network namespace (its socket
//! opened by a thread inside that namespace), typed dumps of links,
//! addresses, routes and bridge FDB entries, and pipelined requests.
//!
//! Reads are netlink dumps parsed by `netlink-packet-route` (links without
//! their statistics, `RTEXT_FILTER_SKIP_STATS`, which makes a dump of
//! thousands of links a few milliseconds). Writes are netlink requests sent
//! back to back, up to [`WINDOW`] awaiting their acknowledgements at once:
//! the kernel handles each in the `sendmsg` that carries it, in order, and
//! a window keeps the acknowledgements within the socket's buffer.

use std::net::Ipv4Addr;

use futures::StreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoPortData, InfoVlan, InfoVxlan, LinkAttribute, LinkExtentMask,
    LinkFlags, LinkInfo, LinkMessage, VlanProtocol,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::AsyncSocket;
use yukumo_api::net::{Ipv4Net, MacAddr};

use crate::netns;

/// Requests awaiting their acknowledgement at once.
pub const WINDOW: usize = 64;

/// A failed netlink exchange: what was asked, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NlError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

impl NlError {
    pub fn new(what: impl Into<String>, source: std::io::Error) -> Self {
        NlError {
            what: what.into(),
            source,
        }
    }
    /// The errno the kernel answered, if it did.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T> = std::result::Result<T, NlError>;

/// An rtnetlink connection bound to one namespace; closed on drop.
pub struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
    ns: Option<String>,
    /// The kernel runs one dump per socket at a time (another is EBUSY).
    dumping: tokio::sync::Mutex<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("ns", &self.ns).finish()
    }
}

/// A link as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    /// The bridge it is a port of (ifindex).
    pub master: Option<u32>,
    /// Its parent (VLAN, macvlan, VXLAN `dev`), when in this namespace.
    pub parent: Option<u32>,
    /// `bridge`, `vxlan`, `vlan`, `veth`, `macvlan`, …
    pub kind: Option<String>,
    /// VNI and local address of a VXLAN device.
    pub vxlan: Option<(u32, Option<Ipv4Addr>, u16)>,
    /// Id of an 802.1Q VLAN sub-interface (None for 802.1ad).
    pub vlan: Option<u16>,
    /// Learning and unicast flooding of a bridge port.
    pub port: Option<(bool, bool)>,
}

/// A bridge FDB entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fdb {
    pub ifindex: u32,
    pub mac: MacAddr,
    /// Remote of a VXLAN entry.
    pub dst: Option<Ipv4Addr>,
    /// Held by the bridge (`master`), not the device itself (`self`).
    pub master: bool,
    /// `static` (NUD_NOARP): added by hand, never aged.
    pub is_static: bool,
    /// `sticky`: never moved to another port by a frame from it.
    pub sticky: bool,
    /// `permanent` (NUD_PERMANENT).
    pub permanent: bool,
}

/// An IPv4 address of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub ifindex: u32,
    pub net: Ipv4Net,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

fn io_err(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => std::io::Error::from_raw_os_error(-c.get()),
            None => std::io::Error::other("netlink error without a code"),
        },
        other => std::io::Error::other(other.to_string()),
    }
}

impl Netlink {
    /// A connection in namespace `ns` (a name under /run/netns), or in the
    /// agent's own.
    pub async fn open(ns: Option<&str>) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::current();
        let name = ns.map(str::to_string);
        let what = format!("netlink socket in {}", ns.unwrap_or("own namespace"));
        let (conn, handle) = tokio::task::spawn_blocking(move || {
            netns::in_netns_opt(name.as_deref(), || {
                let _rt = rt.enter();
                let (mut conn, handle, _) = rtnetlink::new_connection()?;
                // Room for a window of acknowledgements and large dumps.
                conn.socket_mut().socket_mut().set_rx_buf_sz(4 << 20)?;
                Ok((conn, handle))
            })
        })
        .await
        .map_err(|e| NlError::new(&what, std::io::Error::other(e)))?
        .map_err(|e| NlError::new(&what, e))?;
        Ok(Netlink {
            handle,
            task: tokio::spawn(conn),
            ns: ns.map(str::to_string),
            dumping: tokio::sync::Mutex::new(()),
        })
    }

    fn message(msg: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut m = NetlinkMessage::from(msg);
        m.header.flags = NLM_F_REQUEST | flags;
        m
    }

    /// Send one request and collect its answers (the messages of a dump, or
    /// nothing for an acknowledged change).
    async fn exchange(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        let mut stream = self
            .handle
            .clone()
            .request(Self::message(msg, flags))
            .map_err(io_err)?;
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                NetlinkPayload::Error(e) => {
                    if let Some(c) = e.code {
                        return Err(std::io::Error::from_raw_os_error(-c.get()));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    async fn dump(&self, msg: RouteNetlinkMessage, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let _one = self.dumping.lock().await;
        self.exchange(msg, NLM_F_DUMP)
            .await
            .map_err(|e| NlError::new(what, e))
    }

    /// Send `requests` (each with its flags and a description for errors)
    /// pipelined, in order; every one is awaited, the first failure is
    /// returned.
    pub async fn apply(&self, requests: Vec<Request>) -> Result<()> {
        self.apply_each(requests).await.into_iter().collect()
    }

    /// Send `requests` pipelined, in order, and return each one's result.
    pub async fn apply_each(&self, requests: Vec<Request>) -> Vec<Result<()>> {
        futures::stream::iter(requests.into_iter().map(|r| async move {
            self.exchange(r.msg, r.flags | NLM_F_ACK)
                .await
                .map(|_| ())
                .map_err(|e| NlError::new(r.what, e))
        }))
        .buffered(WINDOW)
        .collect()
        .await
    }

    /// Every link, without statistics.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut req = LinkMessage::default();
        req.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let msgs = self
            .dump(RouteNetlinkMessage::GetLink(req), "dump links")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    /// Every IPv4 address.
    pub async fn addresses(&self) -> Result<Vec<Addr>> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(req), "dump addresses")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })?;
                    Some(Addr {
                        ifindex: a.header.index,
                        net: Ipv4Net::new(ip, a.header.prefix_len)?,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<Route>> {
        self.routes_of(254).await
    }

    /// The IPv4 routes of routing table `table`.
    pub async fn routes_of(&self, table: u32) -> Result<Vec<Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(req), "dump routes")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => {
                    let mut t = u32::from(r.header.table);
                    let mut dst = Ipv4Addr::UNSPECIFIED;
                    let mut gateway = None;
                    let mut oif = None;
                    for a in &r.attributes {
                        match a {
                            RouteAttribute::Table(x) => t = *x,
                            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                            RouteAttribute::Oif(i) => oif = Some(*i),
                            _ => {}
                        }
                    }
                    (t == table).then_some(())?;
                    Some(Route {
                        dst: Ipv4Net::new(dst, r.header.destination_prefix_length)?,
                        gateway,
                        oif,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The IPv4 policy rules that look up `table`: (priority, fwmark,
    /// inverted).
    pub async fn rules_to(&self, table: u32) -> Result<Vec<(u32, Option<u32>, bool)>> {
        use netlink_packet_route::rule::{RuleAttribute, RuleFlags, RuleMessage};
        let mut req = RuleMessage::default();
        req.header.family = AddressFamily::Inet;
        let msgs = self
            .dump(RouteNetlinkMessage::GetRule(req), "dump rules")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => {
                    let mut t = u32::from(r.header.table);
                    let (mut prio, mut mark) = (0, None);
                    for a in &r.attributes {
                        match a {
                            RuleAttribute::Table(x) => t = *x,
                            RuleAttribute::Priority(p) => prio = *p,
                            RuleAttribute::FwMark(m) => mark = Some(*m),
                            _ => {}
                        }
                    }
                    (t == table).then_some((prio, mark, r.header.flags.contains(RuleFlags::Invert)))
                }
                _ => None,
            })
            .collect())
    }

    /// Every bridge FDB entry (of bridges and of VXLAN devices).
    pub async fn fdb(&self) -> Result<Vec<Fdb>> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(req), "dump fdb")
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => {
                    let mut mac = None;
                    let mut dst = None;
                    // The bridge says whose entry it is by NDA_MASTER.
                    let mut master = n.header.flags.contains(NeighbourFlags::Controller);
                    for a in &n.attributes {
                        match a {
                            NeighbourAttribute::LinkLayerAddress(b) => {
                                mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr)
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                                dst = Some(*ip)
                            }
                            // An AF_BRIDGE entry's IPv4 remote is not parsed
                            // as an address by the crate.
                            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                                dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                            }
                            NeighbourAttribute::Controller(_) => master = true,
                            _ => {}
                        }
                    }
                    Some(Fdb {
                        ifindex: n.header.ifindex,
                        mac: mac?,
                        dst,
                        master,
                        is_static: n.header.state == NeighbourState::Noarp,
                        sticky: n.header.flags.contains(NeighbourFlags::Sticky),
                        permanent: n.header.state == NeighbourState::Permanent,
                    })
                }
                _ => None,
            })
            .collect())
    }
}

fn parse_link(l: LinkMessage) -> Link {
    let mut out = Link {
        index: l.header.index,
        up: l.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n,
            LinkAttribute::Mtu(m) => out.mtu = m,
            LinkAttribute::Controller(m) => out.master = Some(m),
            LinkAttribute::Link(p) => out.parent = Some(p),
            LinkAttribute::Address(b) => {
                out.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr)
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => out.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut vni = 0;
                            let mut local = None;
                            let mut port = 0;
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => vni = id,
                                    InfoVxlan::Local(ip) => local = Some(ip),
                                    InfoVxlan::Port(p) => port = p,
                                    _ => {}
                                }
                            }
                            out.vxlan = Some((vni, local, port));
                        }
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            let mut id = None;
                            let mut dot1q = true;
                            for x in v {
                                match x {
                                    InfoVlan::Id(i) => id = Some(i),
                                    InfoVlan::Protocol(p) => dot1q = p == VlanProtocol::Ieee8021Q,
                                    _ => {}
                                }
                            }
                            out.vlan = id.filter(|_| dot1q);
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(p)) => {
                            let (mut learning, mut flood) = (true, true);
                            for x in p {
                                match x {
                                    InfoBridgePort::Learning(b) => learning = b,
                                    InfoBridgePort::UnicastFlood(b) => flood = b,
                                    _ => {}
                                }
                            }
                            out.port = Some((learning, flood));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // A VXLAN device's `dev` is IFLA_VXLAN_LINK, not IFLA_LINK.
    if out.kind.as_deref() == Some("vxlan") {
        out.parent = None;
    }
    out
}

mod msg;
pub use msg::*;
pub mod wg;
