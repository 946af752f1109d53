//! Where a NetworkGroup's router runs, as pure functions: a Ready gateway
//! host of its home Site (with 802.1Q for a VLAN group), kept while it
//! stays Ready.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::ResourceExt;
use yukumo_api::common::{Conditions, condition_types};
use yukumo_api::networkgroup::SegmentType;
use yukumo_api::{Host, Reason};

use super::super::verdict::Verdict;

/// Whether a Host offers 802.1Q VLAN segments (kernel and uplink).
pub fn offers_vlan(h: &Host) -> bool {
    h.status
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .is_some_and(|c| c.vlan_8021q)
}

/// The first address a Host reports: its underlay (tunnel endpoint).
pub fn underlay_of(h: &Host) -> Option<Ipv4Addr> {
    h.status.as_ref().and_then(|s| s.addresses.first().copied())
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

/// Why no host of the Site offers 802.1Q, from each host's probe notes.
pub fn no_vlan_host(site: &str, site_hosts: &[&Arc<Host>]) -> Verdict {
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
    Verdict::stalled(
        Reason::NoCapableHost,
        format!(
            "spec.segment.type: vlan needs hosts whose kernel has 802.1Q VLANs; no host of Site {site:?} has ({})",
            if notes.is_empty() {
                "no hosts".to_string()
            } else {
                notes.join("; ")
            }
        ),
    )
}
