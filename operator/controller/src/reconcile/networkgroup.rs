//! NetworkGroup: check the Sites it names and that a given segment id and
//! public IPs fall inside the home Site's ranges.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use yukumo_api::networkgroup::{NetworkGroup, NetworkGroupSpec, NetworkGroupStatus, SegmentType};
use yukumo_api::site::Site;

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
    let verdict = validate(&ng.spec, &sites);
    let old = ng.status.clone().unwrap_or_default();
    let gateway = ng
        .spec
        .gateway
        .clone()
        .or_else(|| default_gateway(&ng.spec.cidr).map(|g| g.to_string()));
    let segment_id = ng.spec.segment.id.or(old.segment_id);
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
    ctx.announce(ng.as_ref(), &old.conditions, &verdict).await;
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
