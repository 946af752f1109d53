//! Kernel capability probes, run in a throwaway network namespace so they
//! never touch the host's own links.
//!
//! Each probe really creates the link type (bridge, 802.1Q VLAN,
//! VXLAN, WireGuard) with rtnetlink in a fresh namespace of a dedicated
//! thread; the namespace dies with the thread. What fails is reported with the
//! kernel's error, so an operator reads *why* a feature is missing.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::{LinkBridge, LinkVlan, LinkVxlan, LinkWireguard};
use yukumo_api::host::HostCapabilities;

async fn probe_links() -> anyhow::Result<HostCapabilities> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let mut caps = HostCapabilities::default();
    let note = |what: &str, r: &Result<(), rtnetlink::Error>| match r {
        Ok(()) => format!("{what}: ok"),
        Err(e) => format!("{what}: unavailable ({e})"),
    };
    let bridge = handle
        .link()
        .add(LinkBridge::new("ykprobebr").build())
        .execute()
        .await;
    caps.bridge = bridge.is_ok();
    caps.notes.push(note("bridge", &bridge));
    // The VLAN probe needs a parent link: the bridge (dummy may be missing).
    let base = handle
        .link()
        .get()
        .match_name("ykprobebr")
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index);
    let vlan = match base {
        Some(idx) => {
            handle
                .link()
                .add(LinkVlan::new("ykprobebr.10", idx, 10).build())
                .execute()
                .await
        }
        None => Err(rtnetlink::Error::RequestFailed),
    };
    caps.vlan_8021q = vlan.is_ok();
    caps.notes.push(note("vlan 802.1q", &vlan));
    let vxlan = handle
        .link()
        .add(LinkVxlan::new("ykprobevx", 42).port(4789).build())
        .execute()
        .await;
    caps.vxlan = vxlan.is_ok();
    caps.notes.push(note("vxlan", &vxlan));
    let wg = handle
        .link()
        .add(LinkWireguard::new("ykprobewg").build())
        .execute()
        .await;
    caps.wireguard = wg.is_ok();
    caps.notes.push(note("wireguard", &wg));
    Ok(caps)
}

/// Probe the running kernel's link types in a fresh network namespace.
pub fn capabilities() -> anyhow::Result<HostCapabilities> {
    std::thread::spawn(|| -> anyhow::Result<HostCapabilities> {
        // unshare(CLONE_NEWNET) moves only this thread into a new namespace.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(probe_links())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("capability probe thread panicked"))?
}

/// Non-loopback, non-link-local IPv4 addresses in the network namespace
/// `netns` (a name under /run/netns), or in the agent's own namespace when
/// `None`: the host's underlay (tunnel endpoint) addresses. With `uplink`,
/// only that interface's (a host also has pod bridges, service addresses on
/// `lo`, ...: none of them is a tunnel endpoint); an uplink that does not
/// exist is an error naming it.
pub fn underlay_addresses(
    netns: Option<String>,
    uplink: Option<String>,
) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    std::thread::spawn(move || -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
        if let Some(ns) = netns {
            let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(addresses_here(uplink.as_deref()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("address discovery thread panicked"))?
}

async fn addresses_here(uplink: Option<&str>) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let index = match uplink {
        None => None,
        Some(name) => Some(
            link_index(&handle, name)
                .await
                .map_err(|e| anyhow::anyhow!("uplink {e}"))?,
        ),
    };
    let mut out = Vec::new();
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await? {
        if index.is_some_and(|i| i != msg.header.index) {
            continue;
        }
        for attr in msg.attributes {
            if let netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) = attr
                && usable(&IpAddr::V4(ip))
            {
                out.push(ip);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The index of the interface `name` ("NAME: no such interface" when
/// there is none).
async fn link_index(handle: &rtnetlink::Handle, name: &str) -> anyhow::Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("{name}: no such interface"))?;
    Ok(link.header.index)
}

fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_filter() {
        assert!(!usable(&"127.0.0.1".parse().unwrap()));
        assert!(!usable(&"169.254.1.1".parse().unwrap()));
        assert!(!usable(&"fe80::1".parse().unwrap()));
        assert!(usable(&"10.0.0.1".parse().unwrap()));
    }

    /// With an uplink, only its addresses count: a lower address elsewhere
    /// (a pod bridge, a service address on lo) is no tunnel endpoint.
    /// Needs root (a private network namespace); skipped, saying so, otherwise.
    #[test]
    fn underlay_addresses_are_the_uplinks() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection().unwrap();
                tokio::spawn(conn);
                // (bridges: this kernel has no dummy links)
                for (name, addr) in [("up0", [10, 255, 0, 7]), ("pods0", [10, 244, 1, 1])] {
                    handle
                        .link()
                        .add(LinkBridge::new(name).up().build())
                        .execute()
                        .await
                        .unwrap();
                    let index = link_index(&handle, name).await.unwrap();
                    handle
                        .address()
                        .add(index, IpAddr::from(addr), 24)
                        .execute()
                        .await
                        .unwrap();
                }
                assert_eq!(
                    addresses_here(Some("up0")).await.unwrap(),
                    vec![std::net::Ipv4Addr::new(10, 255, 0, 7)]
                );
                assert_eq!(addresses_here(None).await.unwrap().len(), 2);
                let e = addresses_here(Some("eth9")).await.unwrap_err().to_string();
                assert!(e.contains("uplink eth9"), "{e}");
            });
        })
        .join()
        .unwrap();
    }

    /// Needs root (CAP_SYS_ADMIN for unshare); skipped, saying so, otherwise.
    #[test]
    fn probe_runs_in_a_private_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let caps = capabilities().expect("probe");
        assert!(caps.bridge, "a Linux bridge is required: {:?}", caps.notes);
        assert_eq!(caps.notes.len(), 4, "{:?}", caps.notes);
        // The probe links must not exist in our own namespace.
        let ours = std::fs::read_dir("/sys/class/net").unwrap();
        assert!(
            ours.flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("ykprobe"))
        );
    }
}
