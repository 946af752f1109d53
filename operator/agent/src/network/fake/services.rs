//! The fake's tables, DHCP servers and announcements.

use std::net::Ipv4Addr;

use yukumo_api::net::MacAddr;

use super::{FakeKernel, errno};
use crate::network::decide::DhcpSeen;
use crate::network::kernel::{Announce, Dhcp, Firewall, Result, Shaper};
use crate::network::ops::{DhcpOp, Family, ShapeOp, TableOp};

impl Shaper for FakeKernel {
    async fn shaping(&self, dev: &str) -> Result<Option<Vec<(u16, u32)>>> {
        self.with(|m| Ok(m.host.shaping.get(dev).cloned()))
    }
    async fn apply_shaping(&self, op: &ShapeOp) -> Result<()> {
        self.with(|m| {
            m.log.push(format!("{op:?}"));
            match op {
                ShapeOp::Set { dev, classes } => {
                    if !m.host.state.links.contains_key(dev) {
                        return Err(errno(format!("tc on {dev}"), libc::ENODEV));
                    }
                    m.host.shaping.insert(dev.clone(), classes.clone());
                }
                ShapeOp::Clear { dev } => {
                    m.host.shaping.remove(dev);
                }
            }
            Ok(())
        })
    }
}

impl crate::network::kernel::Wireguard for FakeKernel {
    fn wireguard_key(&self) -> Option<crate::network::wireguard::Key> {
        self.wireguard_key
    }
    async fn wireguard(&self) -> Result<Option<crate::network::wireguard::WgSeen>> {
        // The device is a link of the host namespace: gone with it.
        self.with(|m| {
            let link = m.host.state.links.get(crate::network::wireguard::LINK);
            Ok(match (&m.host.wireguard, link) {
                (Some(w), Some(l)) => Some(crate::network::wireguard::WgSeen {
                    up: l.up,
                    mtu: l.mtu,
                    ..w.clone()
                }),
                (Some(w), None) if w.rule => Some(crate::network::wireguard::WgSeen {
                    rule: true,
                    ..Default::default()
                }),
                _ => None,
            })
        })
    }
    async fn apply_wireguard(&self, op: &crate::network::wireguard::WgOp) -> Result<()> {
        use crate::network::wireguard::{FWMARK, WgOp, WgPeerSeen, WgSeen};
        let own = self.wireguard_key;
        self.with(|m| {
            m.log.push(format!("{op:?}"));
            let link = crate::network::wireguard::LINK;
            match op {
                WgOp::Remove => {
                    m.host.wireguard = None;
                    m.host.state.links.remove(link);
                }
                WgOp::Set(p) => {
                    let Some(own) = own else {
                        return Err(errno("WireGuard".into(), libc::EOPNOTSUPP));
                    };
                    m.host.state.links.insert(
                        link.to_string(),
                        crate::network::observe::LinkState {
                            mac: None,
                            name: link.to_string(),
                            kind: crate::network::observe::LinkKind::Other("wireguard".into()),
                            up: true,
                            mtu: p.mtu,
                            master: None,
                            parent: None,
                            port: None,
                        },
                    );
                    m.host.wireguard = Some(WgSeen {
                        up: true,
                        mtu: p.mtu,
                        port: p.port,
                        fwmark: FWMARK,
                        public: Some(own),
                        peers: p
                            .peers
                            .iter()
                            .map(|(a, k)| {
                                (
                                    *k,
                                    WgPeerSeen {
                                        endpoint: Some(std::net::SocketAddrV4::new(*a, p.port)),
                                        allowed: vec![(*a, 32)],
                                        ..Default::default()
                                    },
                                )
                            })
                            .collect(),
                        routes: p.peers.keys().copied().collect(),
                        rule: true,
                    });
                }
            }
            Ok(())
        })
    }
}

impl Firewall for FakeKernel {
    async fn table(&self, ns: Option<&str>, family: Family) -> Result<Option<String>> {
        self.with(|m| Ok(m.ns(ns)?.tables.get(family.as_str()).cloned()))
    }
    async fn apply_table(&self, ns: Option<&str>, op: &TableOp) -> Result<()> {
        self.with(|m| {
            m.log.push(format!("{ns:?} {op:?}"));
            let n = m.ns(ns)?;
            match op {
                TableOp::Replace { family, ruleset } => {
                    // What `nft list` shows: a listing with the same hash
                    // and rules (tabs, one level per block).
                    n.tables.insert(family.as_str(), listing_of(ruleset));
                }
                TableOp::Delete { family } => {
                    if n.tables.remove(family.as_str()).is_none() {
                        return Err(errno("delete table".into(), libc::ENOENT));
                    }
                }
            }
            Ok(())
        })
    }
}

/// A rendered ruleset as `nft list` prints it (two-space indents become
/// tabs).
pub fn listing_of(ruleset: &str) -> String {
    ruleset
        .lines()
        .map(|l| {
            let spaces = l.len() - l.trim_start_matches(' ').len();
            format!("{}{}\n", "\t".repeat(spaces / 2), l.trim_start())
        })
        .collect()
}

impl Dhcp for FakeKernel {
    fn args(&self, router: &str, plan_args: &[String]) -> Vec<String> {
        let mut a = vec![format!("--pid-file=/fake/{router}/dnsmasq.pid")];
        a.extend(plan_args.iter().cloned());
        a
    }
    fn seen(&self, router: &str) -> DhcpSeen {
        self.with(|m| {
            let files = m.dhcp_files.get(router).cloned();
            DhcpSeen {
                running: m.named.get(router).is_some_and(|n| n.dhcp.is_some()),
                args: files.as_ref().map(|f| f.0.clone()),
                hosts: files.map(|f| f.1),
            }
        })
    }
    async fn stop_stale(&self, _router: &str) -> bool {
        false
    }
    async fn apply_dhcp(&self, router: &str, op: &DhcpOp) -> Result<()> {
        self.with(|m| {
            m.log.push(format!("dhcp {router} {op:?}"));
            let files = m.dhcp_files.entry(router.to_string()).or_default();
            match op {
                DhcpOp::Start { args, hosts } => {
                    *files = (args.clone(), hosts.clone());
                    m.ns(Some(router))?.dhcp = Some(args.clone());
                }
                DhcpOp::Reload { hosts } => files.1 = hosts.clone(),
                DhcpOp::Stop => {
                    if let Ok(n) = m.ns(Some(router)) {
                        n.dhcp = None;
                    }
                }
            }
            Ok(())
        })
    }
    async fn remove(&self, router: &str) {
        self.with(|m| {
            m.dhcp_files.remove(router);
            if let Ok(n) = m.ns(Some(router)) {
                n.dhcp = None;
            }
        })
    }
}

impl Announce for FakeKernel {
    async fn announce(&self, router: &str, _parent: &str, _mac: MacAddr, addrs: Vec<Ipv4Addr>) {
        self.with(|m| m.announced.push((router.to_string(), addrs)))
    }
}
