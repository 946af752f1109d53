//! Tunnel status: what the gateway holding its Site's WAN endpoint measures
//! of each tunnel — whether the peer Site's endpoint answers an ICMP echo
//! sent from ours (up or down, and the round trip), and the tunnel bytes
//! each way, read from the filter table's per-peer counters (they restart
//! from zero when the table is rewritten, e.g. when a peer comes or goes).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use socket2::{Domain, Protocol, Socket, Type};
use yukumo_api::site::{TunnelState, TunnelStatus};

/// What to measure: from `endpoint` (the Site's, held here), each peer
/// endpoint (address → Site) but the closed ones (their Site lost), which
/// are down without a measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub endpoint: Ipv4Addr,
    pub peers: BTreeMap<Ipv4Addr, String>,
    pub closed: std::collections::BTreeSet<Ipv4Addr>,
}

/// An ICMP echo request (type 8) with identifier `id`, sequence `seq`.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"yukumo-tunnel-rtt");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum of `b`.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether `packet` (an IPv4 packet as a raw socket reads it) is the echo
/// reply from `from` to request (`id`, `seq`).
pub fn is_reply(packet: &[u8], from: Ipv4Addr, id: u16, seq: u16) -> bool {
    if packet.len() < 20 {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[ihl.min(packet.len())..];
    src == from
        && icmp.len() >= 8
        && icmp[0] == 0
        && u16::from_be_bytes([icmp[4], icmp[5]]) == id
        && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
}

/// One ICMP echo from `src` to `dst` on the calling thread's namespace:
/// the round trip, or None when no reply came within `timeout`.
pub fn echo(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    timeout: Duration,
) -> std::io::Result<Option<Duration>> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.bind(&SocketAddrV4::new(src, 0).into())?;
    let started = Instant::now();
    sock.send_to(&echo_request(id, seq), &SocketAddrV4::new(dst, 0).into())?;
    let mut buf = [0u8; 1500];
    loop {
        let Some(left) = timeout.checked_sub(started.elapsed()) else {
            return Ok(None);
        };
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match (&sock).read(&mut buf) {
            Ok(n) if is_reply(&buf[..n], dst, id, seq) => return Ok(Some(started.elapsed())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Up to `tries` echoes (each within `timeout`) until one is answered.
pub fn rtt(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tries: u16,
    timeout: Duration,
) -> std::io::Result<Option<Duration>> {
    let id = (std::process::id() as u16) ^ u16::from_be_bytes([dst.octets()[2], dst.octets()[3]]);
    for seq in 0..tries {
        if let Some(d) = echo(src, dst, id, seq, timeout)? {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// One tunnel measured: the peer's address and Site, the round trip
/// (None: no answer) and its bytes (received, sent).
pub type Measured = (Ipv4Addr, String, Option<Duration>, (u64, u64));

/// The tunnels' statuses over time: each keeps the time its state last
/// changed.
#[derive(Debug, Default)]
pub struct Tracker {
    last: BTreeMap<String, TunnelStatus>,
}

impl Tracker {
    /// The statuses after a measurement: per peer (address, Site), its
    /// round trip (None: no answer, or `error`) and its bytes (received,
    /// sent). Peers not measured any more are forgotten.
    pub fn update(&mut self, measured: Vec<Measured>, now: Timestamp) -> Vec<TunnelStatus> {
        let mut next = BTreeMap::new();
        for (address, site, rtt, (rx, tx)) in measured {
            let state = if rtt.is_some() {
                TunnelState::Up
            } else {
                TunnelState::Down
            };
            let last_change = match self.last.get(&site) {
                Some(p) if p.state == state && p.address == address => p.last_change.clone(),
                _ => Time(now),
            };
            next.insert(
                site.clone(),
                TunnelStatus {
                    site,
                    address,
                    state,
                    rtt_ms: rtt.map(|d| (d.as_secs_f64() * 1e5).round() / 100.0),
                    rx_bytes: rx,
                    tx_bytes: tx,
                    last_change,
                },
            );
        }
        self.last = next;
        self.last.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_request_checksums_to_zero_and_its_reply_is_recognised() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to 0");
        // The reply as a raw socket reads it: a 20-byte IPv4 header, then
        // type 0 with the same identifier and sequence.
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 100, 64, 0, 102, 100, 64, 0, 101,
        ];
        let mut reply = p.clone();
        reply[0] = 0;
        ip.extend_from_slice(&reply);
        let peer: Ipv4Addr = "100.64.0.102".parse().unwrap();
        assert!(is_reply(&ip, peer, 0x1234, 7));
        assert!(!is_reply(&ip, peer, 0x1234, 8));
        assert!(!is_reply(&ip, "100.64.0.103".parse().unwrap(), 0x1234, 7));
        ip[20] = 8;
        assert!(!is_reply(&ip, peer, 0x1234, 7), "a request is no reply");
    }

    #[test]
    fn a_tunnels_last_change_moves_only_with_its_state() {
        let mut t = Tracker::default();
        let a: Ipv4Addr = "100.64.0.102".parse().unwrap();
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:00:10Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T00:00:20Z".parse().unwrap();
        let s = t.update(
            vec![(a, "b".into(), Some(Duration::from_micros(1234)), (10, 20))],
            t0,
        );
        assert_eq!(
            (s[0].state, s[0].rtt_ms, s[0].last_change.0),
            (TunnelState::Up, Some(1.23), t0)
        );
        let s = t.update(
            vec![(a, "b".into(), Some(Duration::from_millis(2)), (30, 40))],
            t1,
        );
        assert_eq!((s[0].last_change.0, s[0].rx_bytes), (t0, 30));
        let s = t.update(vec![(a, "b".into(), None, (30, 40))], t2);
        assert_eq!(
            (s[0].state, s[0].rtt_ms, s[0].last_change.0),
            (TunnelState::Down, None, t2)
        );
        assert!(t.update(vec![], t2).is_empty());
    }
}
