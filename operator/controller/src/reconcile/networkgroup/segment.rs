//! A NetworkGroup's segment and the checks of its spec against the Sites,
//! as pure functions.

use std::collections::BTreeMap;

use yukumo_api::Reason;
use yukumo_api::networkgroup::{NetworkGroupSpec, SegmentType};
use yukumo_api::site::{IdRange, Site};

use super::super::verdict::Verdict;

/// The segment of a NetworkGroup: the spec's (if no other group of the
/// same type holds it at a Site this one spans), else the one allocated
/// before, else the lowest free id of the home Site's range. `taken` maps
/// the ids other groups of that type hold at the Sites this one spans to
/// their `namespace/name` and the first such Site. Errors name the field,
/// the other group and the Site, or the range.
pub fn choose_segment(
    spec: &NetworkGroupSpec,
    previous: Option<u32>,
    range: Option<IdRange>,
    taken: &BTreeMap<u32, (String, String)>,
) -> Result<u32, Verdict> {
    let what = range_field(spec.segment.type_);
    let site = &spec.home_site.0;
    if let Some(id) = spec.segment.id {
        return match taken.get(&id) {
            Some((other, at)) => Err(Verdict::stalled(
                Reason::SegmentIdInUse,
                format!(
                    "spec.segment.id: {id} is already used by NetworkGroup {other} at Site {at:?}"
                ),
            )),
            None => Ok(id),
        };
    }
    let Some(r) = range else {
        return Err(Verdict::stalled(
            Reason::NoSegmentRange,
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
                Reason::SegmentRangeExhausted,
                format!(
                    "spec.segment: all {} ids of Site {site:?} {what} {}-{} are in use",
                    r.end - r.start + 1,
                    r.start,
                    r.end
                ),
            )
        })
}

fn range_field(kind: SegmentType) -> &'static str {
    match kind {
        SegmentType::Vlan => "vlanRange",
        SegmentType::Vxlan => "vniRange",
    }
}

/// Pure validation of a NetworkGroup against the Sites.
pub fn validate(spec: &NetworkGroupSpec, sites: &[Site]) -> Verdict {
    let find = |n: &str| sites.iter().find(|s| s.metadata.name.as_deref() == Some(n));
    let Some(home) = find(&spec.home_site.0) else {
        return Verdict::stalled(
            Reason::SiteNotFound,
            format!("spec.homeSite: Site {:?} not found", spec.home_site.0),
        );
    };
    for s in &spec.sites {
        if find(&s.0).is_none() {
            return Verdict::stalled(
                Reason::SiteNotFound,
                format!("spec.sites: Site {:?} not found", s.0),
            );
        }
    }
    if let Some(id) = spec.segment.id {
        let what = range_field(spec.segment.type_);
        let explicit = match spec.segment.type_ {
            SegmentType::Vlan => home.spec.vlan_range,
            SegmentType::Vxlan => home.spec.vni_range,
        };
        match home.spec.segment_range(spec.segment.type_) {
            Some(r) if (r.start..=r.end).contains(&id) => {}
            Some(r) => {
                let default = if explicit.is_none() {
                    " (the default)"
                } else {
                    ""
                };
                return Verdict::stalled(
                    Reason::SegmentOutOfRange,
                    format!(
                        "spec.segment.id: {id} is outside Site {:?} {what} {}-{}{default}",
                        spec.home_site.0, r.start, r.end
                    ),
                );
            }
            None => {
                return Verdict::stalled(
                    Reason::SegmentOutOfRange,
                    format!(
                        "spec.segment.id: Site {:?} defines no {what}",
                        spec.home_site.0
                    ),
                );
            }
        }
    }
    for (i, p) in spec.public_ips.iter().enumerate() {
        if let Some(addr) = p.address
            && !home.spec.in_public_pool(addr)
        {
            return Verdict::stalled(
                Reason::PublicIPOutsidePool,
                format!(
                    "spec.publicIPs[{i}].address: {addr} is not in Site {:?} publicIPPool",
                    spec.home_site.0
                ),
            );
        }
    }
    // The schema refuses it too; an API server without the rule must not
    // make it a Ready group with an empty pool.
    if let Some((start, end)) = spec.dhcp_range()
        && start > end
    {
        return Verdict::stalled(
            Reason::InvalidDhcpRange,
            format!("spec.dhcp.rangeStart: {start} comes after spec.dhcp.rangeEnd {end}"),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in spec.public_ips.iter().enumerate() {
        if let Some(a) = p.address
            && !seen.insert(a)
        {
            return Verdict::stalled(
                Reason::PublicIPConflict,
                format!("spec.publicIPs[{i}].address: {a} is requested twice"),
            );
        }
    }
    Verdict::progressing(
        Reason::ReferencesResolved,
        "sites resolved; waiting for segment allocation and router placement",
    )
}
