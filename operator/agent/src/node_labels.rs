//! Per-node settings from the Kubernetes Node's labels
//! (`--from-node-labels`): one DaemonSet serves hosts of several Sites, with
//! gateway and plain hosts and different uplinks. A label present wins over
//! the flag (the flag is the release-wide default); a label with a value
//! that cannot be right stops the agent with a message naming it.

use std::collections::BTreeMap;

/// The Site of the host.
pub const SITE: &str = yukumo_api::labels::SITE;
/// `"true"`: the host is one of its Site's gateways.
pub const GATEWAY: &str = "yukumo.io/gateway";
/// The interface carrying the segments.
pub const UPLINK: &str = "yukumo.io/uplink";
/// The interface facing the WAN (a gateway's tunnels to other Sites).
pub const WAN_INTERFACE: &str = "yukumo.io/wan-interface";

/// What the labels (else the flags) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub site: String,
    pub gateway: bool,
    pub uplink: Option<String>,
    pub wan_interface: Option<String>,
}

/// Whether `s` can be a Linux interface name: 1-15 bytes, no '/', ':' or
/// whitespace.
fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

/// Node `node`'s `labels` over the flags' `defaults`.
pub fn resolve(
    node: &str,
    labels: &BTreeMap<String, String>,
    defaults: Settings,
) -> Result<Settings, String> {
    let mut s = defaults;
    if let Some(site) = labels.get(SITE) {
        if !yukumo_api::is_dns_label(site) {
            return Err(format!(
                "Node {node}: label {SITE}={site:?} is not a Site name (a DNS label)"
            ));
        }
        s.site = site.clone();
    }
    if let Some(g) = labels.get(GATEWAY) {
        s.gateway = match g.as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(format!(
                    "Node {node}: label {GATEWAY}={other:?} must be \"true\" or \"false\""
                ));
            }
        };
    }
    for (label, field) in [
        (UPLINK, &mut s.uplink),
        (WAN_INTERFACE, &mut s.wan_interface),
    ] {
        if let Some(u) = labels.get(label) {
            if !is_ifname(u) {
                return Err(format!(
                    "Node {node}: label {label}={u:?} is not an interface name"
                ));
            }
            *field = Some(u.clone());
        }
    }
    if s.site.is_empty() {
        return Err(format!(
            "no Site for host {node}: label its Node {SITE}=<site>, or pass --site"
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn flags(site: &str) -> Settings {
        Settings {
            site: site.into(),
            gateway: false,
            uplink: None,
            wan_interface: None,
        }
    }

    #[test]
    fn labels_win_over_the_flags_and_absent_labels_keep_them() {
        let s = resolve(
            "n1",
            &labels(&[
                (SITE, "site-b"),
                (GATEWAY, "true"),
                (UPLINK, "eno2"),
                (WAN_INTERFACE, "eno3"),
            ]),
            flags("default"),
        )
        .unwrap();
        assert_eq!(
            s,
            Settings {
                site: "site-b".into(),
                gateway: true,
                uplink: Some("eno2".into()),
                wan_interface: Some("eno3".into()),
            }
        );
        let kept = Settings {
            site: "a".into(),
            gateway: true,
            uplink: Some("bond0".into()),
            wan_interface: None,
        };
        assert_eq!(resolve("n1", &labels(&[]), kept.clone()).unwrap(), kept);
        // An explicit "false" turns a release-wide gateway flag off.
        let mut g = flags("a");
        g.gateway = true;
        assert!(
            !resolve("n1", &labels(&[(GATEWAY, "false")]), g)
                .unwrap()
                .gateway
        );
    }

    #[test]
    fn wrong_labels_and_no_site_are_refused_naming_the_node_and_label() {
        for (kv, want) in [
            (
                (SITE, "Site_B"),
                "Node n1: label yukumo.io/site=\"Site_B\" is not a Site name",
            ),
            (
                (GATEWAY, "yes"),
                "Node n1: label yukumo.io/gateway=\"yes\" must be \"true\" or \"false\"",
            ),
            (
                (UPLINK, "a/b"),
                "Node n1: label yukumo.io/uplink=\"a/b\" is not an interface name",
            ),
            ((UPLINK, "much-too-long-name"), "is not an interface name"),
        ] {
            let e = resolve("n1", &labels(&[kv]), flags("a")).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let e = resolve("n1", &labels(&[]), flags("")).unwrap_err();
        assert_eq!(
            e,
            "no Site for host n1: label its Node yukumo.io/site=<site>, or pass --site"
        );
    }
}
