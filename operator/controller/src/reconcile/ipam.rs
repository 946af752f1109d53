//! Address management of a NetworkGroup, as pure functions: one IPv4 address
//! and one MAC per node, public IPs from the home Site's pool, and the router's
//! placement.
//!
//! Stability is the point: a node keeps what it was given for as long as the
//! allocation exists, and a node recreated under the same name gets the same
//! address and MAC again whenever they are free, because both are derived
//! from a hash of its name (probing forward on collision) rather than handed
//! out in arrival order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};
use yukumo_api::Reason;
use yukumo_api::net::{AddressRange, Ipv4Net, MacAddr};
use yukumo_api::networkgroup::{AddressAllocation, PublicIpStatus};
use yukumo_api::virtualnode::NodeRole;

/// One node that should have an address on the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub role: NodeRole,
}

fn hash64(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A locally administered, unicast MAC derived from the group and node;
/// `attempt` > 0 only on a collision.
pub fn mac_for(namespace: &str, group: &str, node: &str, attempt: u32) -> MacAddr {
    let h = hash64(&[namespace, group, node, &attempt.to_string()]).to_be_bytes();
    MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
}

/// The addresses of `cidr` that nodes may get: every host address but the
/// gateway and the dynamic DHCP range.
pub fn node_addresses(
    cidr: Ipv4Net,
    gateway: Ipv4Addr,
    dynamic: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Vec<Ipv4Addr> {
    cidr.hosts()
        .filter(|a| *a != gateway)
        .filter(|a| dynamic.is_none_or(|(s, e)| !(s..=e).contains(a)))
        .collect()
}

/// The result of address allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Addresses {
    /// Every allocation, sorted by node.
    pub allocations: Vec<AddressAllocation>,
    /// Members left without an address (the CIDR is exhausted).
    pub unallocated: Vec<String>,
}

/// Allocate an address and MAC to every member. `previous` allocations are
/// kept for members and for `still_present` nodes (a node's address is freed
/// only once its VirtualNode is gone); new members get the address their name
/// hashes to, or the next free one after it.
pub fn allocate_addresses(
    namespace: &str,
    group: &str,
    usable: &[Ipv4Addr],
    previous: &[AddressAllocation],
    members: &[Member],
    still_present: &BTreeSet<String>,
) -> Addresses {
    let wanted: BTreeMap<&str, &Member> = members.iter().map(|m| (m.node.as_str(), m)).collect();
    let mut out: BTreeMap<String, AddressAllocation> = BTreeMap::new();
    let mut used_ip: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut used_mac: BTreeSet<MacAddr> = BTreeSet::new();
    for a in previous {
        if (wanted.contains_key(a.node.as_str()) || still_present.contains(&a.node))
            && !used_ip.contains(&a.ip)
            && !used_mac.contains(&a.mac)
        {
            let mut a = a.clone();
            if let Some(m) = wanted.get(a.node.as_str()) {
                a.role = Some(m.role);
            }
            used_ip.insert(a.ip);
            used_mac.insert(a.mac);
            out.insert(a.node.clone(), a);
        }
    }
    let mut unallocated = Vec::new();
    for m in members {
        if out.contains_key(&m.node) {
            continue;
        }
        if usable.is_empty() {
            unallocated.push(m.node.clone());
            continue;
        }
        let start = (hash64(&[namespace, group, &m.node]) % usable.len() as u64) as usize;
        let ip = (0..usable.len())
            .map(|i| usable[(start + i) % usable.len()])
            .find(|ip| !used_ip.contains(ip));
        let Some(ip) = ip else {
            unallocated.push(m.node.clone());
            continue;
        };
        let mac = (0..)
            .map(|attempt| mac_for(namespace, group, &m.node, attempt))
            .find(|mac| !used_mac.contains(mac))
            .expect("an unbounded search over 2^40 MACs finds a free one");
        used_ip.insert(ip);
        used_mac.insert(mac);
        out.insert(
            m.node.clone(),
            AddressAllocation {
                node: m.node.clone(),
                ip,
                mac,
                role: Some(m.role),
            },
        );
    }
    Addresses {
        allocations: out.into_values().collect(),
        unallocated,
    }
}

/// Every address of a Site's public pool, in order, without the external
/// network's gateway. At most `limit`.
pub fn pool_addresses(
    pool: &[AddressRange],
    exclude: Option<Ipv4Addr>,
    limit: usize,
) -> Vec<Ipv4Addr> {
    pool.iter()
        .flat_map(|r| r.addresses())
        .filter(|ip| Some(*ip) != exclude)
        .take(limit)
        .collect()
}

/// One public IP the group wants: for `node` (None: the router's own egress
/// address), a given address or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicWant {
    pub node: Option<String>,
    pub address: Option<Ipv4Addr>,
    /// The field that asked, for messages.
    pub field: String,
    /// Asked by the group's own `spec.publicIPs` (its node must be a
    /// member), rather than by a cluster's frontend.
    pub mapping: bool,
}

/// A public IP that could not be granted: the field that asked, why
/// (`PublicIPConflict` or `PublicIPPoolExhausted`), and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

/// Public IPs granted, and the refusals.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublicGrant {
    pub router: Option<Ipv4Addr>,
    pub nodes: Vec<PublicIpStatus>,
    pub refused: Vec<Refusal>,
}

/// Grant public IPs: what the group held before is kept; a requested address
/// must not be held by another group (`taken` maps address → holder); the
/// rest get the lowest free pool addresses.
pub fn allocate_public(
    wants: &[PublicWant],
    previous_router: Option<Ipv4Addr>,
    previous: &[PublicIpStatus],
    pool: &[Ipv4Addr],
    taken: &BTreeMap<Ipv4Addr, String>,
) -> PublicGrant {
    let mut grant = PublicGrant::default();
    let mut mine: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let refuse = |grant: &mut PublicGrant, w: &PublicWant, reason: Reason, message: String| {
        grant.refused.push(Refusal {
            field: w.field.clone(),
            reason,
            message,
        })
    };
    let assign = |grant: &mut PublicGrant, w: &PublicWant, addr: Ipv4Addr| match &w.node {
        None => grant.router = Some(addr),
        Some(n) => grant.nodes.push(PublicIpStatus {
            address: addr,
            node: n.clone(),
        }),
    };
    let mut open = Vec::new();
    // First the explicit requests, then what was held, then new ones.
    for w in wants {
        if let Some(a) = w.address {
            if let Some(holder) = taken.get(&a) {
                let m = format!("{a} is already used by {holder}");
                refuse(&mut grant, w, Reason::PublicIPConflict, m);
            } else if !mine.insert(a) {
                let m = format!("{a} is requested twice");
                refuse(&mut grant, w, Reason::PublicIPConflict, m);
            } else {
                assign(&mut grant, w, a);
            }
        } else {
            open.push(w);
        }
    }
    let mut rest = Vec::new();
    for w in open {
        let held = match &w.node {
            None => previous_router,
            Some(n) => previous.iter().find(|p| &p.node == n).map(|p| p.address),
        };
        match held {
            Some(a) if !taken.contains_key(&a) && !mine.contains(&a) => {
                mine.insert(a);
                assign(&mut grant, w, a);
            }
            _ => rest.push(w),
        }
    }
    let mut free = pool
        .iter()
        .copied()
        .filter(|a| !taken.contains_key(a) && !mine.contains(a));
    for w in rest {
        match free.next() {
            Some(a) => assign(&mut grant, w, a),
            None => refuse(
                &mut grant,
                w,
                Reason::PublicIPPoolExhausted,
                "the Site's publicIPPool has no free address".to_string(),
            ),
        }
    }
    grant.nodes.sort_by(|a, b| a.node.cmp(&b.node));
    grant
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: &str) -> Member {
        Member {
            node: n.into(),
            role: NodeRole::Worker,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_stable_unique_and_freed_only_when_gone() {
        let gw: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let usable = node_addresses(net("10.0.0.0/24"), gw, None);
        assert_eq!(usable.len(), 253);
        assert!(!usable.contains(&gw));
        let members: Vec<Member> = (0..20).map(|i| m(&format!("c-w-{i}"))).collect();
        let a = allocate_addresses("t", "net", &usable, &[], &members, &BTreeSet::new());
        assert!(a.unallocated.is_empty());
        let ips: BTreeSet<_> = a.allocations.iter().map(|x| x.ip).collect();
        let macs: BTreeSet<_> = a.allocations.iter().map(|x| x.mac).collect();
        assert_eq!((ips.len(), macs.len()), (20, 20));
        assert!(macs.iter().all(|m| m.is_local_unicast()));
        // Same inputs, same answer; previous allocations are kept as they are.
        let b = allocate_addresses(
            "t",
            "net",
            &usable,
            &a.allocations,
            &members,
            &BTreeSet::new(),
        );
        assert_eq!(a, b);
        // A node removed from the spec keeps its address while its
        // VirtualNode exists, and loses it after.
        let fewer = &members[1..];
        let present: BTreeSet<String> = ["c-w-0".to_string()].into();
        let c = allocate_addresses("t", "net", &usable, &a.allocations, fewer, &present);
        assert_eq!(c.allocations.len(), 20);
        let d = allocate_addresses("t", "net", &usable, &c.allocations, fewer, &BTreeSet::new());
        assert_eq!(d.allocations.len(), 19);
        // Recreated under the same name: the same address and MAC again.
        let e = allocate_addresses(
            "t",
            "net",
            &usable,
            &d.allocations,
            &members,
            &BTreeSet::new(),
        );
        assert_eq!(e, a);
    }

    #[test]
    fn exhausted_cidr_leaves_members_unallocated() {
        let gw: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let usable = node_addresses(net("10.0.0.0/29"), gw, None);
        assert_eq!(usable.len(), 5);
        let members: Vec<Member> = (0..7).map(|i| m(&format!("n{i}"))).collect();
        let a = allocate_addresses("t", "net", &usable, &[], &members, &BTreeSet::new());
        assert_eq!(a.allocations.len(), 5);
        assert_eq!(a.unallocated.len(), 2);
        let dynamic = Some(("10.0.0.2".parse().unwrap(), "10.0.0.4".parse().unwrap()));
        assert_eq!(node_addresses(net("10.0.0.0/29"), gw, dynamic).len(), 2);
    }

    #[test]
    fn public_ips_are_unique_per_site_and_kept() {
        let pool = pool_addresses(
            &["203.0.113.16/30".parse().unwrap()],
            Some("203.0.113.17".parse().unwrap()),
            100,
        );
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(pool.len(), 3);
        let wants = vec![
            PublicWant {
                node: None,
                address: None,
                field: "router".into(),
                mapping: false,
            },
            PublicWant {
                node: Some("fe".into()),
                address: None,
                field: "fe".into(),
                mapping: false,
            },
        ];
        let mut taken = BTreeMap::new();
        taken.insert(ip("203.0.113.16"), "t1/net".to_string());
        let g = allocate_public(&wants, None, &[], &pool, &taken);
        assert_eq!(g.router, Some(ip("203.0.113.18")));
        assert_eq!(g.nodes[0].address, ip("203.0.113.19"));
        assert!(g.refused.is_empty());
        // Kept on the next pass even if lower addresses free up.
        let g2 = allocate_public(&wants, g.router, &g.nodes, &pool, &BTreeMap::new());
        assert_eq!(g2, g);
        // An explicit address another group holds is refused, naming it.
        let w = vec![PublicWant {
            node: Some("x".into()),
            address: Some(ip("203.0.113.16")),
            field: "spec.publicIPs[0].address".into(),
            mapping: true,
        }];
        let g3 = allocate_public(&w, None, &[], &pool, &taken);
        assert_eq!(g3.refused.len(), 1);
        assert_eq!(g3.refused[0].reason, Reason::PublicIPConflict);
        assert!(g3.refused[0].message.contains("already used by t1/net"));
        // An empty pool is refused too.
        let g4 = allocate_public(&wants, None, &[], &[], &BTreeMap::new());
        assert_eq!(g4.refused.len(), 2);
        assert!(
            g4.refused
                .iter()
                .all(|r| r.reason == Reason::PublicIPPoolExhausted)
        );
    }
}
