//! Placement of VirtualNodes on Hosts, as pure functions.
//!
//! A node goes to a Ready, schedulable Host of one of its allowed Sites whose
//! free allocatable resources (allocatable minus what placed VirtualNodes
//! use) fit it; the allowed Sites are in order of preference (a later one
//! takes the node only when no host of an earlier one can: full, cordoned
//! or lost); among those, the host with the fewest nodes of the same
//! cluster (spread), then the most free memory, then the name (determinism).
//! Frontends that ask for a gateway host only go to gateway-capable hosts.

use std::collections::BTreeMap;

use yukumo_api::common::Resources;

/// What the scheduler knows about one Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub site: String,
    pub gateway: bool,
    pub ready: bool,
    /// The host stopped heartbeating for longer than its grace: its nodes are
    /// candidates for recovery elsewhere.
    pub lost: bool,
    pub schedulable: bool,
    /// The kernel has 802.1Q VLAN sub-interfaces.
    pub vlan: bool,
    pub allocatable: Resources,
    pub used: Resources,
}

impl HostView {
    /// Allocatable less what its placed nodes use, never below zero.
    pub fn free(&self) -> Resources {
        self.allocatable.minus(self.used)
    }
}

/// One node to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub node: String,
    /// The Sites it may go to, the preferred first.
    pub sites: Vec<String>,
    pub need: Resources,
    pub gateway: bool,
    /// Needs a kernel with 802.1Q VLANs (the node's group is a VLAN segment).
    pub vlan: bool,
    /// Must run on this host (it holds a `dir` volume of the node), and why.
    pub pinned: Option<(String, String)>,
    /// Holds its host from now on (false: a weekly cluster's node placed
    /// outside its windows; it uses nothing now, and `ahead` judges it at
    /// its windows).
    pub holds_now: bool,
    /// Among the hosts with as few of the cluster's nodes, the tightest
    /// fit rather than the roomiest: a scheduled cluster's nodes go closer
    /// to where the capacity calendar's packing (best fit, largest first)
    /// put them when it admitted the reservation.
    pub pack: bool,
}

/// The capacity calendar's say on a candidate host (all hosts, the
/// candidate, the need): `Err` with the reason refuses it.
pub type Ahead<'a> = dyn Fn(&[HostView], &HostView, Resources) -> Result<(), String> + 'a;

/// The outcome for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Host { host: String, site: String },
    Unschedulable(String),
}

/// Place `req` on one of `hosts`, charging the chosen host. `cluster_nodes`
/// counts this cluster's nodes per host (updated on success) for spreading.
/// `ahead` may refuse a host that fits now (the capacity calendar: what
/// admitted reservations need later), with the reason.
pub fn place(
    req: &Request,
    hosts: &mut [HostView],
    cluster_nodes: &mut BTreeMap<String, u32>,
    ahead: &Ahead,
) -> Placement {
    let mut why: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut best: Option<usize> = None;
    for (i, h) in hosts.iter().enumerate() {
        // Hosts of other sites, and other hosts than a pinned node's, are
        // not candidates (and not listed in the refusal).
        let elsewhere =
            !req.sites.contains(&h.site) || req.pinned.as_ref().is_some_and(|(p, _)| p != &h.name);
        let reason = if elsewhere {
            Some("other site")
        } else if !h.ready {
            Some("not Ready")
        } else if !h.schedulable {
            Some("cordoned")
        } else if req.gateway && !h.gateway {
            Some("not a gateway host")
        } else if req.vlan && !h.vlan {
            Some("no 802.1Q VLAN support (the NetworkGroup is a vlan segment)")
        } else if req.holds_now && !h.free().fits(req.need) {
            Some("insufficient free cpu or memory")
        } else {
            None
        };
        if let Some(r) = reason {
            if r != "other site" {
                why.entry(r.to_string()).or_default().push(h.name.clone());
            }
            continue;
        }
        if let Err(r) = ahead(hosts, h, req.need) {
            why.entry(r).or_default().push(h.name.clone());
            continue;
        }
        let key = |h: &HostView| {
            let free = h.free();
            let preference = req.sites.iter().position(|s| s == &h.site);
            if req.pack {
                (
                    preference,
                    cluster_nodes.get(&h.name).copied().unwrap_or(0),
                    free.memory_mib as i64,
                    free.cpu as i64,
                    h.name.clone(),
                )
            } else {
                (
                    preference,
                    cluster_nodes.get(&h.name).copied().unwrap_or(0),
                    -(free.memory_mib as i64),
                    0,
                    h.name.clone(),
                )
            }
        };
        if best.is_none_or(|b| key(h) < key(&hosts[b])) {
            best = Some(i);
        }
    }
    match best {
        Some(i) => {
            let h = &mut hosts[i];
            if req.holds_now {
                h.used = h.used.plus(req.need);
            }
            *cluster_nodes.entry(h.name.clone()).or_default() += 1;
            Placement::Host {
                host: h.name.clone(),
                site: h.site.clone(),
            }
        }
        None => {
            let mut detail: Vec<String> = why
                .iter()
                .map(|(r, hs)| format!("{}: {r}", hs.join(", ")))
                .collect();
            if detail.is_empty() {
                detail.push("no hosts registered".into());
            }
            Placement::Unschedulable(format!(
                "{} needs {} cpu and {} MiB{} at site {}{}; {}",
                req.node,
                req.need.cpu,
                req.need.memory_mib,
                if req.gateway {
                    " on a gateway host"
                } else {
                    ""
                },
                req.sites.join("/"),
                match &req.pinned {
                    Some((h, why)) => format!(" on host {h} ({why})"),
                    None => String::new(),
                },
                detail.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &[HostView], _: &HostView, _: Resources) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn the_calendar_may_refuse_a_host_that_fits_now_and_says_why() {
        let mut hosts = vec![host("a", 4, 4096), host("b", 4, 4096)];
        let mut counts = BTreeMap::new();
        let ahead = |_: &[HostView], h: &HostView, _: Resources| {
            if h.name == "a" {
                Err("capacity reserved for ns/course from T".to_string())
            } else {
                Ok(())
            }
        };
        match place(&req("n0", 1, 512), &mut hosts, &mut counts, &ahead) {
            Placement::Host { host, .. } => assert_eq!(host, "b"),
            other => panic!("{other:?}"),
        }
        let refuse = |_: &[HostView], _: &HostView, _: Resources| {
            Err("capacity reserved for ns/course from T".to_string())
        };
        match place(&req("n1", 1, 512), &mut hosts, &mut counts, &refuse) {
            Placement::Unschedulable(m) => {
                assert!(
                    m.contains("a, b: capacity reserved for ns/course from T"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    fn host(name: &str, cpu: u32, mem: u64) -> HostView {
        HostView {
            name: name.into(),
            site: "a".into(),
            gateway: false,
            ready: true,
            vlan: false,
            lost: false,
            schedulable: true,
            allocatable: Resources {
                cpu,
                memory_mib: mem,
            },
            used: Resources::default(),
        }
    }

    fn req(node: &str, cpu: u32, mem: u64) -> Request {
        Request {
            node: node.into(),
            sites: vec!["a".into()],
            need: Resources {
                cpu,
                memory_mib: mem,
            },
            gateway: false,
            vlan: false,
            pinned: None,
            holds_now: true,
            pack: false,
        }
    }

    #[test]
    fn a_pinned_node_goes_to_its_host_or_nowhere() {
        let mut hosts = vec![host("h1", 8, 8192), host("h2", 8, 8192)];
        let mut counts = BTreeMap::new();
        let mut r = req("n", 1, 128);
        r.pinned = Some(("h2".into(), "Volume data is in dir pool local".into()));
        assert_eq!(
            place(&r, &mut hosts, &mut counts, &none),
            Placement::Host {
                host: "h2".into(),
                site: "a".into()
            }
        );
        hosts[1].ready = false;
        let Placement::Unschedulable(msg) = place(&r, &mut hosts, &mut counts, &none) else {
            panic!("placed on a host it is not pinned to");
        };
        assert!(
            msg.contains("on host h2 (Volume data is in dir pool local)")
                && msg.contains("h2: not Ready"),
            "{msg}"
        );
    }

    #[test]
    fn spreads_a_cluster_over_hosts() {
        let mut hosts = vec![
            host("h1", 8, 8192),
            host("h2", 8, 8192),
            host("h3", 8, 8192),
        ];
        let mut counts = BTreeMap::new();
        let placed: Vec<String> = (0..6)
            .map(|i| {
                match place(
                    &req(&format!("n{i}"), 1, 256),
                    &mut hosts,
                    &mut counts,
                    &none,
                ) {
                    Placement::Host { host, .. } => host,
                    p => panic!("{p:?}"),
                }
            })
            .collect();
        for h in ["h1", "h2", "h3"] {
            assert_eq!(placed.iter().filter(|p| *p == h).count(), 2, "{placed:?}");
        }
    }

    #[test]
    fn respects_capacity_and_says_why_not() {
        let mut hosts = vec![host("h1", 2, 1024), host("h2", 2, 1024)];
        hosts[1].ready = false;
        let mut counts = BTreeMap::new();
        assert!(matches!(
            place(&req("n0", 2, 1024), &mut hosts, &mut counts, &none),
            Placement::Host { .. }
        ));
        match place(&req("n1", 1, 512), &mut hosts, &mut counts, &none) {
            Placement::Unschedulable(msg) => {
                assert!(
                    msg.contains("n1 needs 1 cpu and 512 MiB at site a"),
                    "{msg}"
                );
                assert!(msg.contains("h1: insufficient free cpu or memory"), "{msg}");
                assert!(msg.contains("h2: not Ready"), "{msg}");
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn gateway_and_site_constraints() {
        let mut hosts = vec![host("h1", 8, 8192), host("h2", 8, 8192)];
        hosts[1].gateway = true;
        let mut counts = BTreeMap::new();
        let mut r = req("fe", 1, 256);
        r.gateway = true;
        assert_eq!(
            place(&r, &mut hosts, &mut counts, &none),
            Placement::Host {
                host: "h2".into(),
                site: "a".into()
            }
        );
        let mut r = req("w", 1, 256);
        r.sites = vec!["b".into()];
        assert!(
            matches!(place(&r, &mut hosts, &mut counts, &none), Placement::Unschedulable(m) if m.contains("no hosts registered"))
        );
    }

    #[test]
    fn a_pools_first_site_is_preferred_and_a_later_one_takes_what_it_cannot() {
        let mut b1 = host("b1", 8, 8192);
        b1.site = "b".into();
        let mut b2 = host("b2", 8, 8192);
        b2.site = "b".into();
        // Site a's host is roomier and has none of the cluster: b still wins.
        let mut hosts = vec![host("a1", 64, 65536), b1, b2];
        let mut counts = BTreeMap::new();
        let mut r = req("w", 1, 256);
        r.sites = vec!["b".into(), "a".into()];
        for _ in 0..2 {
            match place(&r, &mut hosts, &mut counts, &none) {
                Placement::Host { site, .. } => assert_eq!(site, "b"),
                p => panic!("{p:?}"),
            }
        }
        // Site b lost: its nodes go to a.
        for h in hosts.iter_mut().filter(|h| h.site == "b") {
            h.ready = false;
        }
        assert_eq!(
            place(&r, &mut hosts, &mut counts, &none),
            Placement::Host {
                host: "a1".into(),
                site: "a".into()
            }
        );
        // Nothing allowed is left: the refusal names both Sites.
        hosts[0].ready = false;
        match place(&r, &mut hosts, &mut counts, &none) {
            Placement::Unschedulable(m) => assert!(m.contains("at site b/a"), "{m}"),
            p => panic!("{p:?}"),
        }
    }
}
