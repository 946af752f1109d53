//! WireGuard's generic netlink family, spoken synchronously on a socket
//! opened in the namespace that holds the device: read a device's
//! configuration and traffic, and set it (key, port, mark, peers).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_GENERIC};

use crate::network::wireguard::{Key, WgPeerSeen};

/// A device's configuration as read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    pub port: u16,
    pub fwmark: u32,
    pub public: Option<Key>,
    pub peers: BTreeMap<Key, WgPeerSeen>,
}

/// A peer to set: its key, endpoint and the one source it may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConf {
    pub key: Key,
    pub endpoint: SocketAddrV4,
    pub keepalive: u16,
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_GENERIC)?;
    s.bind_auto()?;
    s.connect(&NlAddr::new(0, 0))?;
    Ok(s)
}

/// Send `payload` and collect the replies until the kernel says done (a
/// dump) or acknowledges (a change).
fn exchange<F>(sock: &Socket, family: u16, payload: F, dump: bool) -> io::Result<Vec<F>>
where
    F: netlink_packet_generic::GenlFamily
        + netlink_packet_core::Emitable
        + netlink_packet_core::ParseableParametrized<[u8], netlink_packet_generic::GenlHeader>
        + std::fmt::Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family);
    send_recv(sock, genl, dump)
}

fn send_recv<F>(sock: &Socket, genl: GenlMessage<F>, dump: bool) -> io::Result<Vec<F>>
where
    F: netlink_packet_generic::GenlFamily
        + netlink_packet_core::Emitable
        + netlink_packet_core::ParseableParametrized<[u8], netlink_packet_generic::GenlHeader>
        + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | if dump { NLM_F_DUMP } else { 0 };
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n {
            let b = NetlinkBuffer::new_checked(&rx[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = b.length() as usize;
            if len == 0 {
                return Ok(out);
            }
            let m = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[off..off + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            off += (len + 3) & !3;
            match m.payload {
                NetlinkPayload::InnerMessage(g) => out.push(g.payload),
                NetlinkPayload::Error(e) => match e.code {
                    Some(c) => return Err(io::Error::from_raw_os_error(-c.get())),
                    // The acknowledgement of a change.
                    None if !dump => return Ok(out),
                    None => {}
                },
                NetlinkPayload::Done(_) => return Ok(out),
                _ => {}
            }
        }
    }
}

/// The id of the `wireguard` family (ENOENT: the kernel has no WireGuard).
fn family(sock: &Socket) -> io::Result<u16> {
    let replies = send_recv(
        sock,
        GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
        }),
        false,
    )?;
    replies
        .iter()
        .flat_map(|r| &r.nlas)
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("no id of the wireguard family"))
}

/// The device `name` (None: no such device).
pub fn get(name: &str) -> io::Result<Option<Device>> {
    let sock = socket()?;
    let fam = family(&sock)?;
    let replies = match exchange(
        &sock,
        fam,
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(name.into())],
        },
        true,
    ) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc_enodev()) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut d = Device::default();
    // A device with many peers comes in several messages.
    for m in replies {
        for a in m.attributes {
            match a {
                WireguardAttribute::ListenPort(p) => d.port = p,
                WireguardAttribute::Fwmark(f) => d.fwmark = f,
                WireguardAttribute::PublicKey(k) if k != [0u8; 32] => d.public = Some(k),
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        let mut key = None;
                        let mut seen = WgPeerSeen::default();
                        for pa in p.0 {
                            match pa {
                                WireguardPeerAttribute::PublicKey(k) => key = Some(k),
                                WireguardPeerAttribute::Endpoint(SocketAddr::V4(e)) => {
                                    seen.endpoint = Some(e)
                                }
                                WireguardPeerAttribute::RxBytes(b) => seen.rx_bytes = b,
                                WireguardPeerAttribute::TxBytes(b) => seen.tx_bytes = b,
                                WireguardPeerAttribute::AllowedIps(ips) => {
                                    for ip in ips {
                                        let (mut addr, mut cidr) = (None, 0);
                                        for x in ip.0 {
                                            match x {
                                                WireguardAllowedIpAttr::IpAddr(IpAddr::V4(a)) => {
                                                    addr = Some(a)
                                                }
                                                WireguardAllowedIpAttr::Cidr(c) => cidr = c,
                                                _ => {}
                                            }
                                        }
                                        if let Some(a) = addr {
                                            seen.allowed.push((a, cidr));
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                        if let Some(k) = key {
                            let e = d.peers.entry(k).or_default();
                            e.endpoint = seen.endpoint.or(e.endpoint);
                            e.rx_bytes = seen.rx_bytes.max(e.rx_bytes);
                            e.tx_bytes = seen.tx_bytes.max(e.tx_bytes);
                            e.allowed.extend(seen.allowed);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Some(d))
}

fn libc_enodev() -> i32 {
    19
}

/// Set device `name` exactly: its private key, port and mark, and these
/// peers only (each with its endpoint's address as its one source).
pub fn set(
    name: &str,
    private: &Key,
    port: u16,
    fwmark: u32,
    peers: &[PeerConf],
) -> io::Result<()> {
    let sock = socket()?;
    let fam = family(&sock)?;
    let peers: Vec<WireguardPeer> = peers
        .iter()
        .map(|p| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(p.key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                WireguardPeerAttribute::Endpoint(SocketAddr::V4(p.endpoint)),
                WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
                WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr(IpAddr::V4(*p.endpoint.ip())),
                    WireguardAllowedIpAttr::Cidr(32),
                ])]),
            ])
        })
        .collect();
    exchange(
        &sock,
        fam,
        WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: vec![
                WireguardAttribute::IfName(name.into()),
                WireguardAttribute::PrivateKey(*private),
                WireguardAttribute::ListenPort(port),
                WireguardAttribute::Fwmark(fwmark),
                WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
                WireguardAttribute::Peers(peers),
            ],
        },
        false,
    )
    .map(|_| ())
}
