//! What a NetworkGroup's status should be, as a pure function of the group
//! (read fresh), the fleet (the caches) and what other reconciles have just
//! claimed: its segment, every node's address and MAC, its public IPs, its
//! router's host, and the hosts its segment spans.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use yukumo_api::net::Segment;
use yukumo_api::networkgroup::{
    NetworkGroup, NetworkGroupStatus, RouterPlacement, SegmentHost, SegmentType,
};
use yukumo_api::site::Site;
use yukumo_api::virtualnode::NodeRole;
use yukumo_api::{Host, Reason, VirtualCluster, VirtualNode};

pub use super::router::{no_vlan_host, offers_vlan, place_router, router_candidates, underlay_of};
pub use super::segment::{choose_segment, validate};
pub use super::tunnels::{Tunnels, gateway_host, tunnels};

use super::super::ipam::{
    Member, PublicWant, allocate_addresses, allocate_public, node_addresses, pool_addresses,
};
use super::super::nodes::node_name;
use super::super::verdict::{Verdict, apply_verdict};

/// A segment or public IP another group has claimed moments ago (the cache
/// may not show it yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// (group `namespace/name`, the Sites it spans, segment).
    pub segments: Vec<(String, Vec<String>, Segment)>,
    /// (address, holder `namespace/name`).
    pub public_ips: Vec<(Ipv4Addr, String)>,
}

/// Everything the decision reads.
pub struct Inputs<'a> {
    /// The group, read fresh from the API server.
    pub group: &'a NetworkGroup,
    pub sites: &'a [Site],
    pub hosts: &'a [Arc<Host>],
    /// Every NetworkGroup (the cache; this one included or not).
    pub groups: &'a [Arc<NetworkGroup>],
    pub clusters: &'a [Arc<VirtualCluster>],
    pub nodes: &'a [Arc<VirtualNode>],
    /// Claims of other groups not yet in the cache.
    pub claims: &'a Claims,
    /// The group's namespace's labels (for Sites that restrict access).
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// The limits of the namespace's ResourceQuotas (public IPs).
    pub limits: &'a super::super::quota::Limits,
}

/// The decision: the status to write, why, what it takes, and when to look
/// again.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: NetworkGroupStatus,
    pub verdict: Verdict,
    /// The segment the status holds (to claim until the cache shows it).
    pub segment: Option<Segment>,
    /// The public IPs the status holds (to claim likewise).
    pub public_ips: Vec<Ipv4Addr>,
    pub requeue: Duration,
}

/// `namespace/name` of an object.
pub fn key_of(g: &NetworkGroup) -> String {
    format!("{}/{}", g.namespace().unwrap_or_default(), g.name_any())
}

/// The nodes of every cluster on this group (by spec, whether created yet or
/// not), and the public IPs their frontends and the group's spec ask for.
fn members(ng: &NetworkGroup, clusters: &[Arc<VirtualCluster>]) -> (Vec<Member>, Vec<PublicWant>) {
    let ns = ng.namespace();
    let name = ng.name_any();
    let mut out = Vec::new();
    let mut wants = Vec::new();
    for vc in clusters {
        if vc.namespace() != ns || vc.spec.network_group != name {
            continue;
        }
        let c = vc.name_any();
        let fe = node_name(&c, None, 0);
        if vc.spec.frontend.public_ip {
            wants.push(PublicWant {
                node: Some(fe.clone()),
                address: vc.spec.frontend.public_ip_address,
                field: format!("VirtualCluster {c} spec.frontend.publicIP"),
                mapping: false,
            });
        }
        out.push(Member {
            node: fe,
            role: NodeRole::Frontend,
        });
        for p in &vc.spec.pools {
            for i in 0..p.replicas.max(0) as u32 {
                out.push(Member {
                    node: node_name(&c, Some(&p.name), i),
                    role: NodeRole::Worker,
                });
            }
        }
    }
    for (i, p) in ng.spec.public_ips.iter().enumerate() {
        wants.push(PublicWant {
            node: Some(p.node.clone()),
            address: p.address,
            field: format!("spec.publicIPs[{i}]"),
            mapping: true,
        });
    }
    (out, wants)
}

/// Reasons that can clear without a change of this group (other groups go,
/// hosts come back): looked at again soon.
fn retry_soon(r: &Reason) -> bool {
    matches!(
        r,
        Reason::SegmentRangeExhausted
            | Reason::QuotaExceeded
            | Reason::PublicIPPoolExhausted
            | Reason::PublicIPConflict
            | Reason::NoGatewayHost
    )
}

/// Keep the public IPs the group holds and grant new ones only within the
/// namespace's quota (what its other groups hold, or have just claimed,
/// counts); each one refused is a problem naming the limit.
fn hold_to_quota(
    inp: &Inputs,
    old: &NetworkGroupStatus,
    wants: &mut Vec<PublicWant>,
    problems: &mut Vec<(Reason, String)>,
) {
    let ng = inp.group;
    let key = key_of(ng);
    let prefix = format!("{}/", ng.namespace().unwrap_or_default());
    let mut others: BTreeMap<String, u64> = BTreeMap::new();
    for o in inp.groups {
        if o.metadata.uid != ng.metadata.uid && o.namespace() == ng.namespace() {
            others.insert(key_of(o), super::super::quota::public_ips_held(o));
        }
    }
    let mut claimed: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, holder) in &inp.claims.public_ips {
        if holder != &key && holder.starts_with(&prefix) {
            *claimed.entry(holder.as_str()).or_default() += 1;
        }
    }
    for (holder, n) in claimed {
        let e = others.entry(holder.to_string()).or_default();
        *e = (*e).max(n);
    }
    let Some((allowed, why)) =
        super::super::quota::public_ip_allowance(inp.limits, others.values().sum())
    else {
        return;
    };
    let holds = |w: &PublicWant| match &w.node {
        None => old.router.as_ref().is_some_and(|r| r.address.is_some()),
        Some(n) => old.public_ips.iter().any(|p| &p.node == n),
    };
    let mut room = allowed.saturating_sub(wants.iter().filter(|w| holds(w)).count() as u64);
    wants.retain(|w| {
        if holds(w) {
            true
        } else if room > 0 {
            room -= 1;
            true
        } else {
            problems.push((
                Reason::QuotaExceeded,
                format!("{}: no public IP granted: {why}", w.field),
            ));
            false
        }
    });
}

/// The decision for `inp.group`.
pub fn decide(inp: &Inputs) -> Decision {
    let ng = inp.group;
    let key = key_of(ng);
    let old = ng.status.clone().unwrap_or_default();
    let spec = &ng.spec;
    let home_name = &spec.home_site.0;
    let mut verdict = validate(spec, inp.sites);
    let home = inp
        .sites
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(home_name.as_str()));
    // Its segment id and public IPs come from the home Site, its nodes may
    // run at the others: each must admit the group's namespace.
    if !verdict.is_stalled() {
        let ns = ng.metadata.namespace.as_deref().unwrap_or("");
        let named = std::iter::once(("spec.homeSite", home_name))
            .chain(spec.sites.iter().map(|s| ("spec.sites", &s.0)));
        for (field, name) in named {
            if let Some(site) = inp
                .sites
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                && let Err(why) = site.admits(ns, inp.namespace_labels)
            {
                verdict = Verdict::stalled(Reason::SiteAccessDenied, format!("{field}: {why}"));
                break;
            }
        }
    }
    let mut status = NetworkGroupStatus {
        observed_generation: ng.metadata.generation,
        gateway: Some(spec.gateway_address()),
        mtu: Some(spec.mtu_or_default()),
        ..old.clone()
    };
    let kind = spec.segment.type_;
    let same_uid = |o: &NetworkGroup| o.metadata.uid == ng.metadata.uid;
    if !verdict.is_stalled() {
        // Segment ids are unique per Site and type at every Site the group
        // spans (a host's bridge is named by the id alone): what other
        // groups present at one of those Sites hold (their status, not
        // what their spec asks and was refused), plus claims not yet in
        // the cache.
        let span = spec.span();
        let meet = |theirs: &[&str]| {
            span.iter()
                .find(|s| theirs.contains(s))
                .map(|s| s.to_string())
        };
        let mut taken: BTreeMap<u32, (String, String)> = BTreeMap::new();
        for o in inp.groups {
            if same_uid(o) || o.spec.segment.type_ != kind {
                continue;
            }
            if let (Some(seg), Some(at)) = (
                o.status.as_ref().and_then(|s| s.segment),
                meet(&o.spec.span()),
            ) {
                taken.insert(seg.id, (key_of(o), at));
            }
        }
        for (other, sites, seg) in &inp.claims.segments {
            let theirs: Vec<&str> = sites.iter().map(String::as_str).collect();
            if other != &key
                && seg.type_ == kind
                && let Some(at) = meet(&theirs)
            {
                taken.insert(seg.id, (other.clone(), at));
            }
        }
        let range = home.and_then(|h| h.spec.segment_range(kind));
        let previous = old.segment.filter(|s| s.type_ == kind).map(|s| s.id);
        match choose_segment(spec, previous, range, &taken) {
            Ok(id) => status.segment = Some(Segment { type_: kind, id }),
            Err(v) => {
                verdict = v;
                status.segment = None;
            }
        }
    }
    let site_hosts: Vec<&Arc<Host>> = inp
        .hosts
        .iter()
        .filter(|h| &h.spec.site == home_name)
        .collect();
    if !verdict.is_stalled()
        && kind == SegmentType::Vlan
        && !site_hosts.iter().any(|h| offers_vlan(h))
    {
        verdict = no_vlan_host(home_name, &site_hosts);
    }
    let mut granted_public = Vec::new();
    if !verdict.is_stalled() {
        let mut problems: Vec<(Reason, String)> = Vec::new();
        // Addresses: one per node of every cluster on the group, kept while
        // the node's VirtualNode exists.
        let (wanted, public_wants) = members(ng, inp.clusters);
        let ns = ng.namespace();
        let group_nodes: Vec<&Arc<VirtualNode>> = inp
            .nodes
            .iter()
            .filter(|n| {
                n.namespace() == ns
                    && n.spec
                        .network
                        .as_ref()
                        .is_some_and(|net| net.group == ng.name_any())
            })
            .collect();
        let present: BTreeSet<String> = group_nodes.iter().map(|n| n.name_any()).collect();
        let usable = node_addresses(spec.cidr, spec.gateway_address(), spec.dhcp_range());
        let addrs = allocate_addresses(
            &ns.clone().unwrap_or_default(),
            &ng.name_any(),
            &usable,
            &old.allocations,
            &wanted,
            &present,
        );
        if !addrs.unallocated.is_empty() {
            problems.push((
                Reason::AddressesExhausted,
                format!(
                    "spec.cidr: {} has {} addresses for nodes and all are in use; no address for {}",
                    spec.cidr,
                    usable.len(),
                    addrs.unallocated.join(", ")
                ),
            ));
        }
        status.allocations = addrs.allocations;
        // Public IPs: unique per Site.
        let mut taken_public: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        for o in inp.groups {
            if same_uid(o) || o.spec.home_site != spec.home_site {
                continue;
            }
            let holder = format!("NetworkGroup {}", key_of(o));
            if let Some(s) = &o.status {
                for p in &s.public_ips {
                    taken_public.insert(p.address, holder.clone());
                }
                if let Some(a) = s.router.as_ref().and_then(|r| r.address) {
                    taken_public.insert(a, holder.clone());
                }
            }
        }
        for (addr, holder) in &inp.claims.public_ips {
            if holder != &key {
                taken_public.insert(*addr, format!("NetworkGroup {holder}"));
            }
        }
        let external = home.and_then(|h| h.spec.external_network.as_ref());
        let pool = home
            .map(|h| {
                pool_addresses(
                    &h.spec.public_ip_pool,
                    external.and_then(|e| e.gateway),
                    1 << 20,
                )
            })
            .unwrap_or_default();
        let mut wants = Vec::new();
        if external.is_some() {
            wants.push(PublicWant {
                node: None,
                address: None,
                field: "router".into(),
                mapping: false,
            });
        }
        // Only nodes that have an address on the group can be mapped.
        for w in public_wants {
            let n = w.node.clone().unwrap_or_default();
            if status.allocations.iter().any(|a| a.node == n) {
                wants.push(w);
            } else if w.mapping {
                problems.push((
                    Reason::PublicIPNodeUnknown,
                    format!("{}.node: {n} is not a node on this NetworkGroup", w.field),
                ));
            }
        }
        hold_to_quota(inp, &old, &mut wants, &mut problems);
        let grant = allocate_public(
            &wants,
            old.router.as_ref().and_then(|r| r.address),
            &old.public_ips,
            &pool,
            &taken_public,
        );
        for r in &grant.refused {
            problems.push((r.reason.clone(), format!("{}: {}", r.field, r.message)));
        }
        granted_public = grant
            .nodes
            .iter()
            .map(|p| p.address)
            .chain(grant.router)
            .collect();
        status.public_ips = grant.nodes;
        // The router: a Ready gateway host of the home Site.
        let candidates = router_candidates(&site_hosts, kind);
        let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
        for o in inp.groups {
            if same_uid(o) {
                continue;
            }
            if let Some(r) = o.status.as_ref().and_then(|s| s.router.as_ref()) {
                *per_host.entry(r.host.clone()).or_default() += 1;
            }
        }
        let current = old.router.as_ref().map(|r| r.host.as_str());
        match place_router(current, &candidates, &per_host) {
            Some(h) => {
                status.router = Some(RouterPlacement {
                    host: h,
                    site: home_name.clone(),
                    address: grant.router,
                });
            }
            None => {
                problems.push((
                    Reason::NoGatewayHost,
                    format!(
                        "spec.homeSite: Site {home_name:?} has no Ready gateway host{} for the router",
                        if kind == SegmentType::Vlan {
                            " with 802.1Q"
                        } else {
                            ""
                        }
                    ),
                ));
                if let Some(r) = status.router.as_mut() {
                    r.address = grant.router;
                }
            }
        }
        // Across Sites: the tunnel ends and the MTU they carry.
        let tun = tunnels(spec, inp.sites, inp.hosts).unwrap_or_else(|p| {
            problems.push(p);
            Tunnels::default()
        });
        if let Some(m) = tun.mtu {
            status.mtu = Some(spec.mtu.unwrap_or(m.min(spec.mtu_or_default())));
        }
        // The hosts the segment spans: members' hosts, the router's, and
        // the hosts holding the tunnel ends.
        let mut span: BTreeSet<String> = group_nodes
            .iter()
            .filter_map(|n| n.spec.host.clone())
            .collect();
        if let Some(r) = &status.router {
            span.insert(r.host.clone());
        }
        for e in &tun.ends {
            if let Some(h) = gateway_host(inp.sites, inp.hosts, &e.site) {
                span.insert(h.name_any());
            }
        }
        status.tunnels = tun.ends;
        status.hosts = span
            .into_iter()
            .filter_map(|name| {
                let h = inp.hosts.iter().find(|h| h.name_any() == name)?;
                Some(SegmentHost {
                    underlay: underlay_of(h)?,
                    site: Some(h.spec.site.clone()),
                    name,
                })
            })
            .collect();
        verdict = match problems.first() {
            Some((reason, _)) => Verdict::stalled(
                reason.clone(),
                problems
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            None => Verdict::ready(
                Reason::Allocated,
                format!(
                    "segment {}, {} node addresses, {} public IPs, router on {}",
                    status
                        .segment
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    status.allocations.len(),
                    status.public_ips.len(),
                    status
                        .router
                        .as_ref()
                        .map(|r| r.host.as_str())
                        .unwrap_or("-")
                ),
            ),
        };
    }
    status.conditions = apply_verdict(&old.conditions, ng.metadata.generation, &verdict);
    let requeue = Duration::from_secs(if retry_soon(verdict.reason()) {
        10
    } else {
        300
    });
    Decision {
        segment: status.segment,
        public_ips: granted_public,
        status,
        verdict,
        requeue,
    }
}

#[cfg(test)]
mod tests;
