//! Network helpers of the e2e tests: commands in the environment's
//! namespaces, frames recorded on an interface, a listener in the outside
//! world, and repairs timed against the 5 s bound.

use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Env;

impl Env {
    /// The prefix of the environment's network namespace names (e2e/env.sh
    /// `netns_prefix`: "yk" and 6 hex digits of the directory's md5).
    pub fn netns_prefix(&self) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo '{}' | md5sum | cut -c1-6",
                self.dir.display()
            ))
            .output()
            .expect("md5sum");
        format!("yk{}", String::from_utf8_lossy(&out.stdout).trim())
    }

    /// The network namespace of a simulated host.
    pub fn host_netns(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("hosts/{host}/netns")))
            .unwrap_or_else(|e| panic!("{host} has no network namespace: {e}"))
            .trim()
            .to_string()
    }
}

/// Run a command in a network namespace; (stdout and stderr, success).
pub fn in_ns(ns: &str, cmd: &[&str]) -> (String, bool) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec");
    (
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        out.status.success(),
    )
}

/// Frames crossing one interface of a namespace, recorded for a bounded
/// time by `e2e/lib/sniff.py` (one JSON object per frame).
pub struct Sniffer {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<ChildStdout>>,
}

impl Sniffer {
    pub fn start(ns: &str, ifname: &str, seconds: u32) -> Sniffer {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/lib/sniff.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", script, ifname])
            .arg(seconds.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sniff.py");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(first.contains("ready"), "sniffer on {ns}/{ifname}: {first}");
        Sniffer { child, lines }
    }

    /// Every frame seen, once the sniffer stopped by itself.
    pub fn frames(mut self) -> Vec<Value> {
        let frames = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        let _ = self.child.wait();
        frames
    }
}

/// A TCP listener at `addr:port` in namespace `ns` that prints the address
/// of its first peer and exits (after 30 s at most).
pub fn first_peer_listener(ns: &str, addr: &str, port: u16) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg(format!(
            "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{addr}',{port}));s.listen();s.settimeout(30);c,a=s.accept();print(a[0],flush=True);c.close()"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener")
}

/// Wait (15 s at most) until `check` holds, and assert it took ≤ 5 s (the
/// issue's bound for repairs of hand-made damage).
pub fn wait_repaired(what: &str, check: impl Fn() -> bool) -> Duration {
    wait_repaired_within(what, Duration::from_secs(5), check)
}

/// [`wait_repaired`] with another bound (3 × it at most is waited for).
pub fn wait_repaired_within(what: &str, bound: Duration, check: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < bound * 3 {
        if check() {
            let took = start.elapsed();
            println!("{what}: repaired after {took:?}");
            assert!(took <= bound, "{what}: repair took {took:?} (> {bound:?})");
            return took;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not repaired within {:?}", bound * 3);
}

/// An IPv6 router advertisement as a hostile guest would send it, as hex
/// for the tiny guest's `rawsend`: from `mac` (its link-local address
/// derived from it) to all nodes (ff02::1), hop limit 255, router lifetime
/// 1800 s, advertising `prefix`/64 for autoconfiguration.
pub fn router_advertisement(mac: &str, prefix: [u16; 4]) -> String {
    let m = mac_bytes(mac);
    let mut src = [0u8; 16];
    src[..2].copy_from_slice(&[0xfe, 0x80]);
    src[8..].copy_from_slice(&[m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    let mut dst = [0u8; 16];
    dst[..2].copy_from_slice(&[0xff, 0x02]);
    dst[15] = 1;
    // ICMPv6 type 134, then a prefix information option (type 3, 4 × 8 bytes).
    let mut icmp = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&[3, 4, 64, 0xc0]);
    icmp.extend_from_slice(&86400u32.to_be_bytes());
    icmp.extend_from_slice(&14400u32.to_be_bytes());
    icmp.extend_from_slice(&[0; 4]);
    for w in prefix {
        icmp.extend_from_slice(&w.to_be_bytes());
    }
    icmp.extend_from_slice(&[0; 8]);
    // The checksum covers the pseudo-header: addresses, length, next header.
    let sum = ones_complement_sum(&[
        &src,
        &dst,
        &(icmp.len() as u32).to_be_bytes(),
        &[0, 0, 0, 58],
        &icmp,
    ]);
    icmp[2..4].copy_from_slice(&(!sum).to_be_bytes());
    let mut frame = vec![0x33, 0x33, 0, 0, 0, 1];
    frame.extend_from_slice(&m);
    frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&icmp);
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 16-bit ones'-complement sum of the Internet checksum over `parts`
/// (each padded to whole 16-bit words); a checksum field holds its
/// complement, and data carrying a valid checksum sums to 0xffff.
pub fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for c in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    let m: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("a MAC"))
        .collect();
    assert_eq!(m.len(), 6, "a MAC: {mac}");
    m
}

/// A UDP/IPv4 frame, as hex for `rawsend`: `src` → `dst` by MAC and IP, to
/// port `dport`, with a valid IPv4 header checksum (UDP checksum 0: none).
pub fn udp_frame(
    dst_mac: &str,
    src_mac: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    dport: u16,
) -> String {
    let payload = b"yukumo-unknown-unicast";
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ones_complement_sum(&[&ip]);
    ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
    let mut frame = mac_bytes(dst_mac);
    frame.extend_from_slice(&mac_bytes(src_mac));
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// The checksum of the advertisement verifies: summed with it, the
    /// pseudo-header and message give 0xffff.
    #[test]
    fn a_router_advertisement_is_well_formed() {
        let hex = super::router_advertisement("02:00:00:00:00:09", [0x2001, 0xdb8, 0xbad, 0]);
        let b: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        // These bytes, sent on a veth, gave a Linux receiver with accept_ra
        // an address in 2001:db8:bad::/64 and a default route (checked by hand).
        assert_eq!(
            hex,
            "33330000000102000000000986dd6000000000303afffe80000000000000000000fffe000009ff02000000000000000000000000000186002f13400007080000000000000000030440c000015180000038400000000020010db80bad00000000000000000000"
        );
        assert_eq!(&b[12..14], &[0x86, 0xdd]);
        let (ip, icmp) = (&b[14..54], &b[54..]);
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), icmp.len());
        assert_eq!((ip[6], ip[7], icmp[0]), (58, 255, 134));
        assert_eq!(&ip[8..10], &[0xfe, 0x80]);
        let sum = super::ones_complement_sum(&[
            &ip[8..40],
            &(icmp.len() as u32).to_be_bytes(),
            &[0, 0, 0, 58],
            icmp,
        ]);
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn a_udp_frame_has_a_valid_ipv4_header() {
        let hex = super::udp_frame(
            "02:00:00:99:99:99",
            "02:00:00:00:00:09",
            "10.0.0.9".parse().unwrap(),
            "10.0.0.7".parse().unwrap(),
            9,
        );
        let b: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(&b[..6], &[2, 0, 0, 0x99, 0x99, 0x99]);
        assert_eq!(&b[12..14], &[8, 0]);
        let ip = &b[14..34];
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            b.len() - 14
        );
        assert_eq!(super::ones_complement_sum(&[ip]), 0xffff, "header checksum");
        assert_eq!(
            (&ip[12..16], &ip[16..20]),
            (&[10, 0, 0, 9][..], &[10, 0, 0, 7][..])
        );
    }
}
