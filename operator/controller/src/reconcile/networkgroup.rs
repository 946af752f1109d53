//! NetworkGroup: check the Sites it names and that a given segment id and
//! public IPs fall inside the home Site's ranges.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use yukumo_api::networkgroup::{NetworkGroup, NetworkGroupSpec, NetworkGroupStatus, SegmentType};
use yukumo_api::site::{IdRange, Site};

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

pub async fn reconcile(ng: Arc<NetworkGroup>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("NetworkGroup");
    let sites = ctx.stores.all_sites();
    let mut verdict = validate(&ng.spec, &sites);
    let old = ng.status.clone().unwrap_or_default();
    let gateway = ng
        .spec
        .gateway
        .clone()
        .or_else(|| default_gateway(&ng.spec.cidr).map(|g| g.to_string()));
    // Segment ids are unique per Site and type: chosen under the placement
    // lock against the cache plus choices not yet in it, and persisted in the
    // status before any host uses them.
    let mut segment_id = old.segment_id.filter(|_| verdict.is_stalled());
    let mut pending = ctx.placements.lock().await;
    if !verdict.is_stalled() {
        pending.prune(&ctx.stores);
        let key = format!("{}/{}", ng.namespace().unwrap_or_default(), ng.name_any());
        let uid = ng.metadata.uid.clone().unwrap_or_default();
        let same = |o: &NetworkGroup| {
            o.spec.home_site == ng.spec.home_site && o.spec.segment.type_ == ng.spec.segment.type_
        };
        let mut taken: BTreeMap<u32, String> = BTreeMap::new();
        for o in ctx.stores.network_groups.state() {
            if o.metadata.uid.as_deref() == Some(uid.as_str()) || !same(&o) {
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
        let home = sites
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(ng.spec.home_site.0.as_str()));
        let range = home.and_then(|h| match ng.spec.segment.type_ {
            SegmentType::Vlan => h.spec.vlan_range,
            SegmentType::Vxlan => h.spec.vni_range,
        });
        match choose_segment(&ng.spec, old.segment_id, range, &taken) {
            Ok(id) => {
                segment_id = Some(id);
                verdict = Verdict::progressing(
                    "SegmentAllocated",
                    format!(
                        "segment {}:{id} allocated; address allocation, router placement and the dataplane are not implemented yet",
                        match ng.spec.segment.type_ {
                            SegmentType::Vlan => "vlan",
                            SegmentType::Vxlan => "vxlan",
                        }
                    ),
                );
                pending
                    .segments
                    .insert(key, (kind_key, id, std::time::Instant::now()));
            }
            Err(v) => {
                verdict = v;
                segment_id = None;
            }
        }
    }
    let kind = match ng.spec.segment.type_ {
        SegmentType::Vlan => "vlan",
        SegmentType::Vxlan => "vxlan",
    };
    let status = NetworkGroupStatus {
        observed_generation: ng.metadata.generation,
        conditions: apply_verdict(&old.conditions, ng.metadata.generation, &verdict),
        gateway,
        segment_id,
        segment: segment_id.map(|id| format!("{kind}:{id}")),
        ..old.clone()
    };
    if status != old {
        ctx.apply_status(
            &Api::<NetworkGroup>::namespaced(
                ctx.client.clone(),
                &ng.namespace().unwrap_or_default(),
            ),
            ng.as_ref(),
            &status,
        )
        .await?;
    }
    drop(pending);
    ctx.announce(ng.as_ref(), &old.conditions, &verdict).await;
    // An exhausted range frees up when another group goes.
    Ok(Action::requeue(Duration::from_secs(
        if verdict.reason() == "SegmentRangeExhausted" {
            10
        } else {
            300
        },
    )))
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
