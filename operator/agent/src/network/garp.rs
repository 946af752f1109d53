//! Gratuitous ARP: a router that takes an address on the Site's external
//! network announces it at once, so the upstream gateway's neighbour cache
//! and the external switch's forwarding table follow a public IP that moved
//! (to another group, or with its router to another host) without waiting
//! seconds for a stale entry to time out. One broadcast ARP request per
//! address (sender = target = the address, from the router's MAC), as
//! `arping -U` sends it, from a packet socket on the host's interface the
//! router's external leg hangs on: no process is spawned, and the other
//! routers' macvlans on that interface do not each receive it.
//!
//! The packet socket address (`sockaddr_ll`) has no safe constructor in
//! `nix`, so this module alone in the library uses `libc` directly.
#![allow(unsafe_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The 60-byte frame (Ethernet minimum, zero-padded) announcing `ip` at `mac`.
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address: zero; target protocol address: the same IP
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    v.try_into().ok()
}

/// Send one gratuitous ARP per address on interface `ifname` of the
/// calling thread's network namespace; returns how many were sent.
pub fn announce(ifname: &str, mac: [u8; 6], addrs: &[Ipv4Addr]) -> std::io::Result<usize> {
    if addrs.is_empty() {
        return Ok(0);
    }
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(std::io::Error::from)?;
    // SAFETY: plain socket(2); the descriptor is owned (closed on drop).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = 0x0806u16.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut sent = 0;
    for ip in addrs {
        let f = frame(mac, *ip);
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        sent += 1;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_an_arp_request_for_the_address_itself() {
        let mac = parse_mac("02:aa:bb:cc:dd:ee").unwrap();
        let f = frame(mac, "203.0.113.17".parse().unwrap());
        assert_eq!(&f[..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "a request, as arping -U sends");
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &[203, 0, 113, 17], "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC unknown");
        assert_eq!(&f[38..42], &[203, 0, 113, 17], "target IP = sender IP");
        assert_eq!(parse_mac("02:aa:bb:cc:dd"), None);
        assert_eq!(parse_mac("zz:aa:bb:cc:dd:ee"), None);
    }
}
