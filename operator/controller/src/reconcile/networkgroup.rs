//! NetworkGroup: check the Sites it names and that a given segment id and
//! public IPs fall inside the home Site's ranges.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use yukumo_api::common::{Conditions, condition_types};
use yukumo_api::managers;
use yukumo_api::networkgroup::{
    NetworkGroup, NetworkGroupSpec, NetworkGroupStatus, RouterPlacement, SegmentHost, SegmentType,
};
use yukumo_api::site::{IdRange, Site};
use yukumo_api::{Host, VirtualCluster, VirtualNode};

use super::ipam::{
    Member, PublicWant, allocate_addresses, allocate_public, node_addresses, pool_addresses,
};
use super::nodes::node_name;

use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Result};

/// Parse `a.b.c.d/p` into (network, prefix).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, p) = s.split_once('/')?;
    Some((ip.parse().ok()?, p.parse().ok().filter(|p: &u8| *p <= 32)?))
}

/// The default gateway: the first host address of the CIDR.
pub fn default_gateway(cidr: &str) -> Option<Ipv4Addr> {
    let (net, _) = parse_cidr(cidr)?;
    Some(Ipv4Addr::from(u32::from(net) + 1))
}

/// Whether `ip` lies in one entry of a Site's public pool (CIDR or a-b range).
pub fn in_pool(pool: &[String], ip: Ipv4Addr) -> bool {
    pool.iter().any(|entry| {
        if let Some((net, p)) = parse_cidr(entry) {
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            (u32::from(ip) & mask) == (u32::from(net) & mask)
        } else if let Some((a, b)) = entry.split_once('-') {
            match (a.parse::<Ipv4Addr>(), b.parse::<Ipv4Addr>()) {
                (Ok(a), Ok(b)) => (u32::from(a)..=u32::from(b)).contains(&u32::from(ip)),
                _ => false,
            }
        } else {
            false
        }
    })
}

/// The segment id of a NetworkGroup: the spec's (if no other group of the
/// same Site and type holds it), else the one allocated before, else the
/// lowest free id of the home Site's range. `taken` maps the ids other groups
/// of that Site and type hold to their `namespace/name`. Errors name the field
/// or the range.
pub fn choose_segment(
    spec: &NetworkGroupSpec,
    previous: Option<u32>,
    range: Option<IdRange>,
    taken: &BTreeMap<u32, String>,
) -> Result<u32, Verdict> {
    let what = match spec.segment.type_ {
        SegmentType::Vlan => "vlanRange",
        SegmentType::Vxlan => "vniRange",
    };
    let site = &spec.home_site.0;
    if let Some(id) = spec.segment.id {
        return match taken.get(&id) {
            Some(other) => Err(Verdict::stalled(
                "SegmentIdInUse",
                format!(
                    "spec.segment.id: {id} is already used by NetworkGroup {other} at Site {site:?}"
                ),
            )),
            None => Ok(id),
        };
    }
    let Some(r) = range else {
        return Err(Verdict::stalled(
            "NoSegmentRange",
            format!(
                "spec.segment: Site {site:?} defines no {what}; give it one or set spec.segment.id"
            ),
        ));
    };
    if let Some(id) = previous
        && (r.start..=r.end).contains(&id)
        && !taken.contains_key(&id)
    {
        return Ok(id);
    }
    (r.start..=r.end)
        .find(|id| !taken.contains_key(id))
        .ok_or_else(|| {
            Verdict::stalled(
                "SegmentRangeExhausted",
                format!(
                    "spec.segment: all {} ids of Site {site:?} {what} {}-{} are in use",
                    r.end - r.start + 1,
                    r.start,
                    r.end
                ),
            )
        })
}

/// Pure validation of a NetworkGroup against the Sites.
pub fn validate(spec: &NetworkGroupSpec, sites: &[Site]) -> Verdict {
    let find = |n: &str| sites.iter().find(|s| s.metadata.name.as_deref() == Some(n));
    let Some(home) = find(&spec.home_site.0) else {
        return Verdict::stalled(
            "SiteNotFound",
            format!("spec.homeSite: Site {:?} not found", spec.home_site.0),
        );
    };
    for s in &spec.sites {
        if find(&s.0).is_none() {
            return Verdict::stalled(
                "SiteNotFound",
                format!("spec.sites: Site {:?} not found", s.0),
            );
        }
    }
    if let Some(id) = spec.segment.id {
        let (range, what) = match spec.segment.type_ {
            SegmentType::Vlan => (home.spec.vlan_range, "vlanRange"),
            SegmentType::Vxlan => (home.spec.vni_range, "vniRange"),
        };
        match range {
            Some(r) if (r.start..=r.end).contains(&id) => {}
            Some(r) => {
                return Verdict::stalled(
                    "SegmentOutOfRange",
                    format!(
                        "spec.segment.id: {id} is outside Site {:?} {what} {}-{}",
                        spec.home_site.0, r.start, r.end
                    ),
                );
            }
            None => {
                return Verdict::stalled(
                    "SegmentOutOfRange",
                    format!(
                        "spec.segment.id: Site {:?} defines no {what}",
                        spec.home_site.0
                    ),
                );
            }
        }
    }
    for (i, p) in spec.public_ips.iter().enumerate() {
        if let Some(addr) = &p.address {
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                continue;
            };
            if !in_pool(&home.spec.public_ip_pool, ip) {
                return Verdict::stalled(
                    "PublicIPOutsidePool",
                    format!(
                        "spec.publicIPs[{i}].address: {addr} is not in Site {:?} publicIPPool",
                        spec.home_site.0
                    ),
                );
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in spec.public_ips.iter().enumerate() {
        if let Some(a) = &p.address
            && !seen.insert(a)
        {
            return Verdict::stalled(
                "PublicIPConflict",
                format!("spec.publicIPs[{i}].address: {a} is requested twice"),
            );
        }
    }
    Verdict::progressing(
        "ReferencesResolved",
        "sites resolved; waiting for segment allocation and router placement",
    )
}

/// The MTU guests get when the spec gives none: on VXLAN a 1500-byte
/// underlay minus the 50 bytes of encapsulation; on a VLAN the tag travels
/// in the uplink's own frame, so the full 1500.
pub fn default_mtu(kind: SegmentType) -> u32 {
    match kind {
        SegmentType::Vxlan => 1450,
        SegmentType::Vlan => 1500,
    }
}

/// Whether a Host offers 802.1Q VLAN segments (kernel and uplink).
fn offers_vlan(h: &Host) -> bool {
    h.status
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .is_some_and(|c| c.vlan_8021q)
}

/// The first IPv4 address a Host reports: its underlay (tunnel endpoint).
fn underlay_of(h: &Host) -> Option<String> {
    h.status.as_ref().and_then(|s| {
        s.addresses
            .iter()
            .find(|a| a.parse::<Ipv4Addr>().is_ok())
            .cloned()
    })
}

fn host_ready(h: &Host) -> bool {
    h.status
        .as_ref()
        .is_some_and(|s| s.conditions.is_true(condition_types::READY))
}

/// Hosts that may run a group's router, with their readiness: the gateway
/// hosts of its home Site (`site_hosts`), for a VLAN group only those that
/// offer 802.1Q (the router joins the segment too).
pub fn router_candidates(site_hosts: &[&Arc<Host>], kind: SegmentType) -> Vec<(String, bool)> {
    site_hosts
        .iter()
        .filter(|h| h.spec.gateway && (kind != SegmentType::Vlan || offers_vlan(h)))
        .map(|h| (h.name_any(), host_ready(h)))
        .collect()
}

/// The router's host: the current one while it is a Ready gateway host of the
/// home Site, else the Ready gateway host there with the fewest routers.
pub fn place_router(
    current: Option<&str>,
    candidates: &[(String, bool)],
    routers_per_host: &BTreeMap<String, usize>,
) -> Option<String> {
    if let Some(c) = current
        && candidates.iter().any(|(h, ready)| h == c && *ready)
    {
        return Some(c.to_string());
    }
    candidates
        .iter()
        .filter(|(_, ready)| *ready)
        .min_by_key(|(h, _)| (routers_per_host.get(h).copied().unwrap_or(0), h.clone()))
        .map(|(h, _)| h.clone())
}

/// The nodes of every cluster on this group (by spec, whether created yet or
/// not), and the public IPs their frontends ask for.
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
                address: vc.spec.frontend.public_ip_address.clone(),
                field: format!("VirtualCluster {c} spec.frontend.publicIP"),
            });
        }
        out.push(Member {
            node: fe,
            role: "frontend".into(),
        });
        for p in &vc.spec.pools {
            for i in 0..p.replicas.max(0) as u32 {
                out.push(Member {
                    node: node_name(&c, Some(&p.name), i),
                    role: "worker".into(),
                });
            }
        }
    }
    for (i, p) in ng.spec.public_ips.iter().enumerate() {
        wants.push(PublicWant {
            node: Some(p.node.clone()),
            address: p.address.clone(),
            field: format!("spec.publicIPs[{i}]"),
        });
    }
    (out, wants)
}

pub async fn reconcile(ng: Arc<NetworkGroup>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("NetworkGroup");
    let ns = ng.namespace().unwrap_or_default();
    let api = Api::<NetworkGroup>::namespaced(ctx.client.clone(), &ns);
    // Allocations are read fresh from the API server (not the cache) and
    // written back with that resourceVersion as a precondition: two passes
    // can never hand out the same address from a stale view.
    let Some(fresh) = api.get_opt(&ng.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if fresh.metadata.uid != ng.metadata.uid || fresh.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ng = Arc::new(fresh);
    let sites = ctx.stores.all_sites();
    let mut verdict = validate(&ng.spec, &sites);
    let old = ng.status.clone().unwrap_or_default();
    let gateway = ng
        .spec
        .gateway
        .clone()
        .or_else(|| default_gateway(&ng.spec.cidr).map(|g| g.to_string()));
    let home = sites
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(ng.spec.home_site.0.as_str()))
        .cloned();
    let key = format!("{ns}/{}", ng.name_any());
    let mut status = NetworkGroupStatus {
        observed_generation: ng.metadata.generation,
        gateway: gateway.clone(),
        mtu: Some(
            ng.spec
                .mtu
                .unwrap_or_else(|| default_mtu(ng.spec.segment.type_)),
        ),
        ..old.clone()
    };
    let mut problems: Vec<(&str, String)> = Vec::new();
    let mut pending = ctx.placements.lock().await;
    let all_groups = ctx.stores.network_groups.state();
    if !verdict.is_stalled() {
        pending.prune(&ctx.stores);
        let uid = ng.metadata.uid.clone().unwrap_or_default();
        let same = |o: &NetworkGroup| {
            o.spec.home_site == ng.spec.home_site && o.spec.segment.type_ == ng.spec.segment.type_
        };
        // Segment ids are unique per Site and type: chosen under the placement
        // lock against the cache plus choices not yet in it, and persisted in
        // the status before any host uses them.
        let mut taken: BTreeMap<u32, String> = BTreeMap::new();
        for o in &all_groups {
            if o.metadata.uid.as_deref() == Some(uid.as_str()) || !same(o) {
                continue;
            }
            // What a group holds is what was allocated to it (its status),
            // not an id its spec asks for and was refused.
            if let Some(id) = o.status.as_ref().and_then(|s| s.segment_id) {
                taken.insert(
                    id,
                    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
                );
            }
        }
        let kind_key = format!("{}/{:?}", ng.spec.home_site.0, ng.spec.segment.type_);
        for (other, (k, id, _)) in &pending.segments {
            if other != &key && k == &kind_key {
                taken.insert(*id, other.clone());
            }
        }
        let range = home.as_ref().and_then(|h| match ng.spec.segment.type_ {
            SegmentType::Vlan => h.spec.vlan_range,
            SegmentType::Vxlan => h.spec.vni_range,
        });
        match choose_segment(&ng.spec, old.segment_id, range, &taken) {
            Ok(id) => {
                status.segment_id = Some(id);
                pending
                    .segments
                    .insert(key.clone(), (kind_key, id, std::time::Instant::now()));
            }
            Err(v) => {
                verdict = v;
                status.segment_id = None;
            }
        }
    }
    let hosts = ctx.stores.hosts.state();
    let site_hosts: Vec<&Arc<Host>> = hosts
        .iter()
        .filter(|h| h.spec.site == ng.spec.home_site.0)
        .collect();
    if !verdict.is_stalled() && ng.spec.segment.type_ == SegmentType::Vlan {
        let capable = site_hosts.iter().any(|h| offers_vlan(h));
        if !capable {
            let notes: Vec<String> = site_hosts
                .iter()
                .map(|h| {
                    let note = h
                        .status
                        .as_ref()
                        .and_then(|s| s.capabilities.as_ref())
                        .and_then(|c| c.notes.iter().find(|n| n.starts_with("vlan")).cloned())
                        .unwrap_or_else(|| "not probed".into());
                    format!("{}: {note}", h.name_any())
                })
                .collect();
            verdict = Verdict::stalled(
                "NoCapableHost",
                format!(
                    "spec.segment.type: vlan needs hosts whose kernel has 802.1Q VLANs; no host of Site {:?} has ({})",
                    ng.spec.home_site.0,
                    if notes.is_empty() {
                        "no hosts".to_string()
                    } else {
                        notes.join("; ")
                    }
                ),
            );
        }
    }
    if !verdict.is_stalled() {
        // Addresses: one per node of every cluster on the group, kept while
        // the node's VirtualNode exists.
        let clusters = ctx.stores.clusters.state();
        let (wanted, public_wants) = members(&ng, &clusters);
        let nodes = ctx.stores.nodes.state();
        let group_nodes: Vec<&Arc<VirtualNode>> = nodes
            .iter()
            .filter(|n| {
                n.namespace().as_deref() == Some(ns.as_str())
                    && n.spec
                        .network
                        .as_ref()
                        .is_some_and(|net| net.group == ng.name_any())
            })
            .collect();
        let present: BTreeSet<String> = group_nodes.iter().map(|n| n.name_any()).collect();
        let gw: Ipv4Addr = gateway
            .as_deref()
            .and_then(|g| g.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let dynamic = ng.spec.dhcp.as_ref().and_then(|d| {
            Some((
                d.range_start.as_deref()?.parse().ok()?,
                d.range_end.as_deref()?.parse().ok()?,
            ))
        });
        let usable = node_addresses(&ng.spec.cidr, gw, dynamic);
        let addrs = allocate_addresses(
            &ns,
            &ng.name_any(),
            &usable,
            &old.allocations,
            &wanted,
            &present,
        );
        if !addrs.unallocated.is_empty() {
            problems.push((
                "AddressesExhausted",
                format!(
                    "spec.cidr: {} has {} addresses for nodes and all are in use; no address for {}",
                    ng.spec.cidr,
                    usable.len(),
                    addrs.unallocated.join(", ")
                ),
            ));
        }
        status.allocations = addrs.allocations;
        // Public IPs: unique per Site, under the placement lock.
        let mut taken_public: BTreeMap<String, String> = BTreeMap::new();
        for o in &all_groups {
            if o.metadata.uid == ng.metadata.uid || o.spec.home_site != ng.spec.home_site {
                continue;
            }
            let holder = format!(
                "NetworkGroup {}/{}",
                o.namespace().unwrap_or_default(),
                o.name_any()
            );
            if let Some(s) = &o.status {
                for p in &s.public_ips {
                    taken_public.insert(p.address.clone(), holder.clone());
                }
                if let Some(a) = s.router.as_ref().and_then(|r| r.address.clone()) {
                    taken_public.insert(a, holder.clone());
                }
            }
        }
        for (addr, (holder, _)) in &pending.public_ips {
            if holder != &key {
                taken_public.insert(addr.clone(), format!("NetworkGroup {holder}"));
            }
        }
        let external = home.as_ref().and_then(|h| h.spec.external_network.clone());
        let ext_gw = external
            .as_ref()
            .and_then(|e| e.gateway.as_deref())
            .and_then(|g| g.parse().ok());
        let pool = home
            .as_ref()
            .map(|h| pool_addresses(&h.spec.public_ip_pool, ext_gw, 1 << 20))
            .unwrap_or_default();
        let mut wants = Vec::new();
        if external.is_some() {
            wants.push(PublicWant {
                node: None,
                address: None,
                field: "router".into(),
            });
        }
        // Only nodes that exist on the group can be mapped.
        for w in public_wants {
            let n = w.node.clone().unwrap_or_default();
            if status.allocations.iter().any(|a| a.node == n) {
                wants.push(w);
            } else if w.field.starts_with("spec.publicIPs") {
                problems.push((
                    "PublicIPNodeUnknown",
                    format!("{}.node: {n} is not a node on this NetworkGroup", w.field),
                ));
            }
        }
        let grant = allocate_public(
            &wants,
            old.router.as_ref().and_then(|r| r.address.as_deref()),
            &old.public_ips,
            &pool,
            &taken_public,
        );
        for (field, why) in &grant.refused {
            let reason = if why.contains("no free address") {
                "PublicIPPoolExhausted"
            } else {
                "PublicIPConflict"
            };
            problems.push((reason, format!("{field}: {why}")));
        }
        let now = std::time::Instant::now();
        for a in grant
            .nodes
            .iter()
            .map(|p| p.address.clone())
            .chain(grant.router.clone())
        {
            pending.public_ips.insert(a, (key.clone(), now));
        }
        status.public_ips = grant.nodes;
        // The router: a Ready gateway host of the home Site.
        let vlan = ng.spec.segment.type_ == SegmentType::Vlan;
        let candidates = router_candidates(&site_hosts, ng.spec.segment.type_);
        let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
        for o in &all_groups {
            if o.metadata.uid == ng.metadata.uid {
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
                    site: ng.spec.home_site.0.clone(),
                    address: grant.router.clone(),
                });
            }
            None => {
                problems.push((
                    "NoGatewayHost",
                    format!(
                        "spec.homeSite: Site {:?} has no Ready gateway host{} for the router",
                        ng.spec.home_site.0,
                        if vlan { " with 802.1Q" } else { "" }
                    ),
                ));
                if let Some(r) = status.router.as_mut() {
                    r.address = grant.router.clone();
                }
            }
        }
        // The hosts the segment spans: members' hosts and the router's.
        let mut span: BTreeSet<String> = group_nodes
            .iter()
            .filter_map(|n| n.spec.host.clone())
            .collect();
        if let Some(r) = &status.router {
            span.insert(r.host.clone());
        }
        status.hosts = span
            .into_iter()
            .filter_map(|name| {
                let h = hosts.iter().find(|h| h.name_any() == name)?;
                Some(SegmentHost {
                    underlay: underlay_of(h)?,
                    name,
                })
            })
            .collect();
        verdict = match problems.first() {
            Some((reason, _)) => Verdict::stalled(
                reason,
                problems
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            None => Verdict::ready(
                "Allocated",
                format!(
                    "segment {}, {} node addresses, {} public IPs, router on {}",
                    segment_name(&ng, status.segment_id),
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
    status.segment = status.segment_id.map(|id| segment_name(&ng, Some(id)));
    status.conditions = apply_verdict(&old.conditions, ng.metadata.generation, &verdict);
    if status != old {
        let mut patch = yukumo_api::status_apply_patch::<NetworkGroup, _>(&status);
        patch["metadata"] = serde_json::json!({
            "resourceVersion": ng.metadata.resource_version,
        });
        api.patch_status(
            &ng.name_any(),
            &PatchParams::apply(managers::CONTROLLER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    drop(pending);
    ctx.announce(ng.as_ref(), &old.conditions, &verdict).await;
    // Exhausted ranges and pools free up when other groups go.
    let retry = matches!(
        verdict.reason(),
        "SegmentRangeExhausted" | "PublicIPPoolExhausted" | "PublicIPConflict" | "NoGatewayHost"
    );
    Ok(Action::requeue(Duration::from_secs(if retry {
        10
    } else {
        300
    })))
}

fn segment_name(ng: &NetworkGroup, id: Option<u32>) -> String {
    let kind = match ng.spec.segment.type_ {
        SegmentType::Vlan => "vlan",
        SegmentType::Vxlan => "vxlan",
    };
    format!("{kind}:{}", id.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_ids_are_unique_per_site_and_named_when_not() {
        let mut spec: NetworkGroupSpec = serde_json::from_value(serde_json::json!({
            "cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"
        }))
        .unwrap();
        let range = Some(IdRange {
            start: 1000,
            end: 1002,
        });
        let mut taken = BTreeMap::new();
        assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1000));
        taken.insert(1000, "t1/net".to_string());
        assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1001));
        // What was allocated before is kept.
        assert_eq!(choose_segment(&spec, Some(1002), range, &taken), Ok(1002));
        taken.insert(1001, "t2/net".to_string());
        taken.insert(1002, "t3/net".to_string());
        let v = choose_segment(&spec, None, range, &taken).unwrap_err();
        assert_eq!(v.reason(), "SegmentRangeExhausted");
        assert!(
            v.message()
                .contains("all 3 ids of Site \"a\" vniRange 1000-1002"),
            "{}",
            v.message()
        );
        let v = choose_segment(&spec, None, None, &taken).unwrap_err();
        assert_eq!(v.reason(), "NoSegmentRange");
        spec.segment.id = Some(1001);
        let v = choose_segment(&spec, None, range, &taken).unwrap_err();
        assert_eq!(v.reason(), "SegmentIdInUse");
        assert!(
            v.message()
                .contains("spec.segment.id: 1001 is already used by NetworkGroup t2/net")
        );
        spec.segment.id = Some(1500);
        assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1500));
    }

    #[test]
    fn a_vlan_router_goes_only_to_a_gateway_host_that_offers_8021q() {
        let host = |name: &str, gateway: bool, vlan: bool| {
            Arc::new(
                serde_json::from_value::<Host>(serde_json::json!({
                    "apiVersion": "yukumo.io/v1alpha1", "kind": "Host", "metadata": {"name": name},
                    "spec": {"site": "a", "gateway": gateway},
                    "status": {"capabilities": {"vlan8021q": vlan, "vxlan": true, "bridge": true},
                               "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat",
                                               "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
                }))
                .unwrap(),
            )
        };
        let hosts = [
            host("plain", true, false),
            host("vlan-worker", false, true),
            host("vlan-gw", true, true),
        ];
        let refs: Vec<&Arc<Host>> = hosts.iter().collect();
        let names = |kind| {
            router_candidates(&refs, kind)
                .into_iter()
                .map(|(h, ready)| {
                    assert!(ready);
                    h
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(names(SegmentType::Vxlan), vec!["plain", "vlan-gw"]);
        assert_eq!(names(SegmentType::Vlan), vec!["vlan-gw"]);
        assert_eq!(
            place_router(
                Some("plain"),
                &router_candidates(&refs, SegmentType::Vlan),
                &BTreeMap::new()
            ),
            Some("vlan-gw".to_string()),
            "a VLAN router on a host without 802.1Q moves"
        );
        assert_eq!(default_mtu(SegmentType::Vxlan), 1450);
        assert_eq!(default_mtu(SegmentType::Vlan), 1500);
    }

    #[test]
    fn pools_and_gateways() {
        let pool = vec![
            "203.0.113.0/28".to_string(),
            "198.51.100.10-198.51.100.20".to_string(),
        ];
        assert!(in_pool(&pool, "203.0.113.5".parse().unwrap()));
        assert!(!in_pool(&pool, "203.0.113.16".parse().unwrap()));
        assert!(in_pool(&pool, "198.51.100.20".parse().unwrap()));
        assert!(!in_pool(&pool, "198.51.100.21".parse().unwrap()));
        assert_eq!(
            default_gateway("10.0.0.0/24"),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn segment_range_checked_against_home_site() {
        let site: Site = serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": "a"},
            "spec": {"vniRange": {"start": 1000, "end": 1999}, "publicIPPool": ["203.0.113.0/28"]}
        }))
        .unwrap();
        let mut spec: NetworkGroupSpec = serde_json::from_value(serde_json::json!({
            "cidr": "10.0.0.0/24", "segment": {"type": "vxlan", "id": 5000}, "homeSite": "a"
        }))
        .unwrap();
        let v = validate(&spec, std::slice::from_ref(&site));
        assert_eq!(v.reason(), "SegmentOutOfRange");
        assert!(v.message().contains("spec.segment.id"));
        spec.segment.id = Some(1500);
        assert_eq!(
            validate(&spec, std::slice::from_ref(&site)).reason(),
            "ReferencesResolved"
        );
        spec.segment.type_ = SegmentType::Vlan;
        assert_eq!(
            validate(&spec, std::slice::from_ref(&site)).reason(),
            "SegmentOutOfRange"
        );
    }
}
