//! A group across Sites: which Sites' gateways stretch its segment over the
//! WAN (their tunnel ends), the MTU those tunnels carry, and which hosts of
//! its span flood to each other directly.

use std::collections::BTreeSet;

use yukumo_api::networkgroup::{NetworkGroupSpec, SegmentType, TunnelEnd};
use yukumo_api::site::{Encryption, Site};
use yukumo_api::{Host, Reason};

/// Bytes VXLAN over IPv4 adds to a frame (outer IPv4 20, UDP 8, VXLAN 8,
/// inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes WireGuard over IPv4 adds to what it carries (outer IPv4 20, UDP 8,
/// WireGuard header 16 and authentication tag 16).
pub const WIREGUARD_OVERHEAD: u32 = 60;

/// The tunnels of a group: the ends, the largest guest MTU they carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnels {
    pub ends: Vec<TunnelEnd>,
    /// `None`: no tunnel, the Sites' own MTU rules.
    pub mtu: Option<u32>,
}

fn site<'a>(sites: &'a [Site], name: &str) -> Option<&'a Site> {
    sites
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
}

/// The Sites of the group's span whose gateways make tunnels: those with a
/// WAN endpoint. Tunnels exist when two or more Sites have an end; they
/// carry VXLAN groups only. An end of a Site asking for WireGuard carries
/// its holder's public key (`hosts`' status); without one (no holder, or
/// its kernel has no WireGuard) it is closed, never a plaintext tunnel.
/// Refused, naming the fields: ends with different UDP ports (one tunnel
/// port per group) or encryptions, a VLAN group stretched over them, a
/// `spec.mtu` larger than they carry.
pub fn tunnels(
    spec: &NetworkGroupSpec,
    sites: &[Site],
    hosts: &[std::sync::Arc<Host>],
) -> Result<Tunnels, (Reason, String)> {
    let mut ends = Vec::new();
    let mut mtu: Option<(u32, String)> = None;
    for name in spec.span() {
        let Some(s) = site(sites, name) else { continue };
        let Some(ep) = s.spec.gateway.as_ref().and_then(|g| g.endpoint()) else {
            continue;
        };
        let tunnel = s.spec.tunnel.as_ref();
        let encryption = tunnel.map(|t| t.encryption).unwrap_or_default();
        let wan = tunnel.map(|t| t.mtu).unwrap_or(1500);
        if mtu.as_ref().is_none_or(|(m, _)| wan < *m) {
            mtu = Some((wan, name.to_string()));
        }
        let public_key = match encryption {
            Encryption::None => None,
            Encryption::Wireguard => gateway_host(sites, hosts, name)
                .and_then(|h| h.status.as_ref()?.wireguard_public_key.clone()),
        };
        ends.push(TunnelEnd {
            site: name.to_string(),
            address: *ep.ip(),
            port: ep.port(),
            bandwidth_mbps: tunnel.and_then(|t| t.bandwidth_mbps),
            gateway: s.status.as_ref().and_then(|st| st.active_gateway.clone()),
            encryption,
            public_key,
        });
    }
    if ends.len() < 2 {
        return Ok(Tunnels::default());
    }
    if spec.segment.type_ == SegmentType::Vlan {
        return Err((
            Reason::VlanNotStretched,
            format!(
                "spec.sites: a VLAN group is not stretched over the WAN tunnels between Sites {}; use segment type vxlan",
                names(&ends)
            ),
        ));
    }
    let ports: BTreeSet<u16> = ends.iter().map(|e| e.port).collect();
    if ports.len() > 1 {
        return Err((
            Reason::TunnelPortsDiffer,
            format!(
                "spec.sites: the Sites' gateway.wanEndpoint ports differ ({}); the tunnels of one group use one UDP port",
                ends.iter()
                    .map(|e| format!("{} {}", e.site, e.port))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let encryptions: BTreeSet<Encryption> = ends.iter().map(|e| e.encryption).collect();
    if encryptions.len() > 1 {
        return Err((
            Reason::TunnelEncryptionDiffers,
            format!(
                "spec.sites: the Sites' tunnel.encryption differ ({}); the tunnels of one group are all encrypted or all plain",
                ends.iter()
                    .map(|e| format!("{} {}", e.site, encryption_name(e.encryption)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let wireguard = ends[0].encryption == Encryption::Wireguard;
    if wireguard && ends[0].port == u16::MAX {
        return Err((
            Reason::TunnelPortsDiffer,
            format!(
                "spec.sites: the Sites' gateway.wanEndpoint port is {}: with WireGuard the VXLAN inside it uses the next port, and there is none",
                u16::MAX
            ),
        ));
    }
    let (wan, at) = mtu.expect("two or more ends");
    let (overhead, what) = if wireguard {
        (
            VXLAN_OVERHEAD + WIREGUARD_OVERHEAD,
            format!("{VXLAN_OVERHEAD} bytes of VXLAN and {WIREGUARD_OVERHEAD} of WireGuard"),
        )
    } else {
        (VXLAN_OVERHEAD, format!("{VXLAN_OVERHEAD} bytes of VXLAN"))
    };
    let carried = wan - overhead;
    if let Some(asked) = spec.mtu
        && asked > carried
    {
        return Err((
            Reason::MtuTooLarge,
            format!(
                "spec.mtu {asked} is larger than the WAN tunnels between Sites {} carry: {carried} (Site {at}'s tunnel.mtu {wan} less {what})",
                names(&ends)
            ),
        ));
    }
    Ok(Tunnels {
        ends,
        mtu: Some(carried),
    })
}

fn encryption_name(e: Encryption) -> &'static str {
    match e {
        Encryption::None => "none",
        Encryption::Wireguard => "wireguard",
    }
}

fn names(ends: &[TunnelEnd]) -> String {
    ends.iter()
        .map(|e| e.site.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The host holding a tunnel end's Site's WAN endpoint (the Site's status),
/// when it is known and registered.
pub fn gateway_host<'a>(
    sites: &[Site],
    hosts: &'a [std::sync::Arc<Host>],
    site_name: &str,
) -> Option<&'a std::sync::Arc<Host>> {
    let name = site(sites, site_name)?
        .status
        .as_ref()?
        .active_gateway
        .as_deref()?;
    hosts
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some(name) && h.spec.site == site_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, gateway: Option<&str>, tunnel: serde_json::Value) -> Site {
        let mut spec = serde_json::json!({});
        if let Some(g) = gateway {
            spec["gateway"] = serde_json::json!({"wanEndpoint": g});
        }
        if !tunnel.is_null() {
            spec["tunnel"] = tunnel;
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    }

    fn group(extra: serde_json::Value) -> NetworkGroupSpec {
        let mut v = serde_json::json!({"cidr": "10.30.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a", "sites": ["b", "c"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_sites_with_a_gateway_are_the_ends_and_the_smallest_wan_mtu_sets_the_groups() {
        let mut a = site("a", Some("100.64.0.101"), serde_json::json!({"mtu": 1500}));
        a.status = Some(yukumo_api::site::SiteStatus {
            active_gateway: Some("a-1".into()),
            ..Default::default()
        });
        // b has no active gateway (lost): still an end (the MTU and who
        // floods directly stay as they were), without a holder.
        let sites = [
            a,
            site(
                "b",
                Some("100.64.0.102:4790"),
                serde_json::json!({"mtu": 1400, "bandwidthMbps": 100}),
            ),
            site("c", None, serde_json::Value::Null),
        ];
        let t = tunnels(&group(serde_json::json!({})), &sites, &[]).unwrap();
        assert_eq!(
            t.ends,
            vec![
                TunnelEnd {
                    site: "a".into(),
                    address: "100.64.0.101".parse().unwrap(),
                    port: 4790,
                    bandwidth_mbps: None,
                    gateway: Some("a-1".into()),
                    encryption: Encryption::None,
                    public_key: None,
                },
                TunnelEnd {
                    site: "b".into(),
                    address: "100.64.0.102".parse().unwrap(),
                    port: 4790,
                    bandwidth_mbps: Some(100),
                    gateway: None,
                    encryption: Encryption::None,
                    public_key: None,
                },
            ]
        );
        assert_eq!(t.mtu, Some(1350));
        // spec.mtu above it: refused, naming the field and the Site.
        let (reason, msg) =
            tunnels(&group(serde_json::json!({"mtu": 1400})), &sites, &[]).unwrap_err();
        assert_eq!(reason, Reason::MtuTooLarge);
        assert_eq!(
            msg,
            "spec.mtu 1400 is larger than the WAN tunnels between Sites a, b carry: 1350 (Site b's tunnel.mtu 1400 less 50 bytes of VXLAN)"
        );
        assert!(tunnels(&group(serde_json::json!({"mtu": 1300})), &sites, &[]).is_ok());
    }

    #[test]
    fn one_end_is_no_tunnel_and_encrypted_ends_carry_their_holders_key_or_none() {
        let one = [site("a", Some("100.64.0.101"), serde_json::Value::Null)];
        assert_eq!(
            tunnels(&group(serde_json::json!({})), &one, &[]).unwrap(),
            Tunnels::default()
        );
        // WireGuard at both: each end carries its holder's key, and the MTU
        // leaves room for WireGuard too.
        let wg = serde_json::json!({"encryption": "wireguard"});
        let mut a = site("a", Some("100.64.0.101"), wg.clone());
        a.status = Some(yukumo_api::site::SiteStatus {
            active_gateway: Some("a-1".into()),
            ..Default::default()
        });
        let mut b = site("b", Some("100.64.0.102"), wg.clone());
        b.status = Some(yukumo_api::site::SiteStatus {
            active_gateway: Some("b-1".into()),
            ..Default::default()
        });
        let host = |name: &str, site: &str, key: Option<&str>| {
            let mut h: Host = serde_json::from_value(serde_json::json!({
                "apiVersion": "yukumo.io/v1alpha1", "kind": "Host",
                "metadata": {"name": name}, "spec": {"site": site},
            }))
            .unwrap();
            h.status = Some(yukumo_api::host::HostStatus {
                wireguard_public_key: key.map(Into::into),
                ..Default::default()
            });
            std::sync::Arc::new(h)
        };
        // b-1's kernel has no WireGuard: no key, its end is closed.
        let hosts = [host("a-1", "a", Some("a-key")), host("b-1", "b", None)];
        let t = tunnels(
            &group(serde_json::json!({})),
            &[a.clone(), b.clone()],
            &hosts,
        )
        .unwrap();
        let keys: Vec<(Encryption, Option<&str>)> = t
            .ends
            .iter()
            .map(|e| (e.encryption, e.public_key.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                (Encryption::Wireguard, Some("a-key")),
                (Encryption::Wireguard, None)
            ]
        );
        assert_eq!(t.mtu, Some(1390));
        let (reason, msg) = tunnels(
            &group(serde_json::json!({"mtu": 1400})),
            &[a.clone(), b],
            &hosts,
        )
        .unwrap_err();
        assert_eq!(reason, Reason::MtuTooLarge);
        assert!(
            msg.ends_with(
                "1390 (Site a's tunnel.mtu 1500 less 50 bytes of VXLAN and 60 of WireGuard)"
            ),
            "{msg}"
        );
        // One Site encrypted, another not: refused, naming both.
        let plain = site("b", Some("100.64.0.102"), serde_json::Value::Null);
        let (reason, msg) =
            tunnels(&group(serde_json::json!({})), &[a.clone(), plain], &hosts).unwrap_err();
        assert_eq!(reason, Reason::TunnelEncryptionDiffers);
        assert_eq!(
            msg,
            "spec.sites: the Sites' tunnel.encryption differ (a wireguard, b none); the tunnels of one group are all encrypted or all plain"
        );
        // The VXLAN inside WireGuard takes the port after the endpoint's.
        let last = site("b", Some("100.64.0.102:65535"), wg.clone());
        let a_last = site("a", Some("100.64.0.101:65535"), wg);
        let (reason, _) =
            tunnels(&group(serde_json::json!({})), &[a_last, last], &hosts).unwrap_err();
        assert_eq!(reason, Reason::TunnelPortsDiffer);
    }

    #[test]
    fn different_ports_and_vlan_groups_are_refused_naming_the_field() {
        let sites = [
            site("a", Some("100.64.0.101:4790"), serde_json::Value::Null),
            site("b", Some("100.64.0.102:4791"), serde_json::Value::Null),
        ];
        let (reason, msg) = tunnels(&group(serde_json::json!({})), &sites, &[]).unwrap_err();
        assert_eq!(reason, Reason::TunnelPortsDiffer);
        assert!(
            msg.starts_with(
                "spec.sites: the Sites' gateway.wanEndpoint ports differ (a 4790, b 4791)"
            ),
            "{msg}"
        );
        let sites = [
            site("a", Some("100.64.0.101"), serde_json::Value::Null),
            site("b", Some("100.64.0.102"), serde_json::Value::Null),
        ];
        let (_, msg) = tunnels(
            &group(serde_json::json!({"segment": {"type": "vlan"}})),
            &sites,
            &[],
        )
        .unwrap_err();
        assert!(
            msg.starts_with("spec.sites: a VLAN group is not stretched"),
            "{msg}"
        );
    }
}
