//! What a VirtualCluster refers to, checked against the API as a pure
//! function: the NetworkGroup and Volumes of its own namespace (one tenant
//! can never name another's), the Sites, size classes and time zone. What
//! the schema cannot say becomes a `Stalled` verdict naming the field.

use std::collections::HashSet;

use yukumo_api::common::{NodeSize, builtin_size_classes};
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::VirtualClusterSpec;
use yukumo_api::{NetworkGroup, Reason};

use super::super::verdict::Verdict;

/// What the referenced objects look like, fetched once per reconcile.
pub struct Observed {
    pub network_group: Option<NetworkGroup>,
    pub volumes: Vec<(String, bool)>,
    pub sites: Vec<Site>,
    /// The namespace's labels (for Sites that restrict access).
    pub namespace_labels: std::collections::BTreeMap<String, String>,
}

/// Sites the cluster may be placed at, as named by the spec.
fn named_sites(spec: &VirtualClusterSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(s) = &spec.frontend.site {
        out.push(("spec.frontend.site".to_string(), s.clone()));
    }
    for (i, p) in spec.pools.iter().enumerate() {
        for s in &p.sites {
            out.push((format!("spec.pools[{i}].sites"), s.0.clone()));
        }
    }
    out
}

fn size_class_known(size: &NodeSize, sites: &[Site]) -> bool {
    let Some(class) = &size.size_class else {
        return true;
    };
    builtin_size_classes().iter().any(|c| &c.name == class)
        || sites
            .iter()
            .any(|s| s.spec.size_classes.iter().any(|c| &c.name == class))
}

/// Pure validation of a cluster against the objects it refers to.
pub fn validate(vc_ns: &str, spec: &VirtualClusterSpec, obs: &Observed) -> Verdict {
    let Some(ng) = &obs.network_group else {
        return Verdict::stalled(
            Reason::NetworkGroupNotFound,
            format!(
                "spec.networkGroup: NetworkGroup {:?} not found in namespace {vc_ns}",
                spec.network_group
            ),
        );
    };
    let site_names: HashSet<&str> = obs
        .sites
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap_or(""))
        .collect();
    if !site_names.contains(ng.spec.home_site.0.as_str()) {
        return Verdict::stalled(
            Reason::SiteNotFound,
            format!(
                "spec.networkGroup: NetworkGroup {:?} has home site {:?}, which does not exist",
                spec.network_group, ng.spec.home_site.0
            ),
        );
    }
    for (field, site) in named_sites(spec) {
        if !site_names.contains(site.as_str()) {
            return Verdict::stalled(
                Reason::SiteNotFound,
                format!("{field}: Site {site:?} not found"),
            );
        }
    }
    // A node runs only where its group spans: there its segment id is the
    // group's own (a host's bridge is named by the id alone).
    let span = ng.spec.span();
    for (field, site) in named_sites(spec) {
        if !span.contains(&site.as_str()) {
            return Verdict::stalled(
                Reason::SiteNotSpanned,
                format!(
                    "{field}: Site {site:?} is not spanned by NetworkGroup {:?} (homeSite {:?}, sites [{}]): add it to the group's spec.sites",
                    spec.network_group,
                    ng.spec.home_site.0,
                    ng.spec
                        .sites
                        .iter()
                        .map(|s| s.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    // The Sites the cluster would use (its group's home, where nodes go
    // unless the spec names others) must admit its namespace.
    let home = ("spec.networkGroup".to_string(), ng.spec.home_site.0.clone());
    for (field, name) in std::iter::once(home).chain(named_sites(spec)) {
        if let Some(site) = obs
            .sites
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(&name))
            && let Err(why) = site.admits(vc_ns, &obs.namespace_labels)
        {
            return Verdict::stalled(Reason::SiteAccessDenied, format!("{field}: {why}"));
        }
    }
    for (name, found) in &obs.volumes {
        if !found {
            return Verdict::stalled(
                Reason::VolumeNotFound,
                format!("volumes: Volume {name:?} not found in namespace {vc_ns}"),
            );
        }
    }
    let mut seen = HashSet::new();
    let attachments = spec
        .frontend
        .volumes
        .iter()
        .map(|v| ("spec.frontend.volumes", v))
        .chain(
            spec.pools
                .iter()
                .flat_map(|p| p.volumes.iter().map(|v| ("spec.pools[].volumes", v))),
        );
    for (field, v) in attachments {
        if !seen.insert(v.name.as_str()) {
            return Verdict::stalled(
                Reason::VolumeAttachedTwice,
                format!(
                    "{field}: Volume {:?} is attached to more than one node of this cluster",
                    v.name
                ),
            );
        }
    }
    if !size_class_known(&spec.frontend.size, &obs.sites) {
        return Verdict::stalled(
            Reason::UnknownSizeClass,
            format!(
                "spec.frontend.size.sizeClass: {:?} is neither a built-in class nor defined by a Site",
                spec.frontend.size.size_class.as_deref().unwrap_or("")
            ),
        );
    }
    for (i, p) in spec.pools.iter().enumerate() {
        if !size_class_known(&p.size, &obs.sites) {
            return Verdict::stalled(
                Reason::UnknownSizeClass,
                format!(
                    "spec.pools[{i}].size.sizeClass: {:?} is neither a built-in class nor defined by a Site",
                    p.size.size_class.as_deref().unwrap_or("")
                ),
            );
        }
    }
    if let Some(r) = &spec.reservation
        && k8s_openapi::jiff::tz::TimeZone::get(&r.time_zone).is_err()
    {
        return Verdict::stalled(
            Reason::InvalidTimeZone,
            format!(
                "spec.reservation.timeZone: {:?} is not a known IANA time zone",
                r.time_zone
            ),
        );
    }
    Verdict::progressing(
        Reason::ReferencesResolved,
        format!(
            "references resolved; {} nodes to place",
            spec.desired_nodes()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use yukumo_api::common::ImageSource;
    use yukumo_api::networkgroup::{NetworkGroupSpec, SegmentSpec, SegmentType};
    use yukumo_api::site::SiteSpec;
    use yukumo_api::virtualcluster::{FrontendSpec, NodePool, SiteName, VolumeAttachment};

    fn spec() -> VirtualClusterSpec {
        let size = NodeSize {
            cpu: Some(1),
            memory: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "256Mi".into(),
            )),
            size_class: None,
        };
        VirtualClusterSpec {
            network_group: "net".into(),
            frontend: FrontendSpec {
                size: size.clone(),
                image: ImageSource {
                    url: "file:///x".into(),
                    checksum: Some(format!("sha256:{}", "0".repeat(64))),
                    checksum_url: None,
                    format: Default::default(),
                },
                disk_size: None,
                site: None,
                gateway_host: true,
                public_ip: false,
                public_ip_address: None,
                user_data: None,
                root_volume: None,
                volumes: vec![],
            },
            pools: vec![NodePool {
                name: "compute".into(),
                replicas: 3,
                size,
                image: None,
                disk_size: None,
                sites: vec![],
                user_data: None,
                root_volume: None,
                volumes: vec![],
                max_unavailable: 1,
                running: true,
            }],
            ssh_keys: vec![],
            running: true,
            stopped_nodes: vec![],
            reservation: None,
            start_order: Default::default(),
            recovery: Default::default(),
        }
    }

    fn site(name: &str) -> Site {
        let mut s = Site::new(
            name,
            serde_json::from_value::<SiteSpec>(serde_json::json!({})).unwrap(),
        );
        s.metadata.name = Some(name.into());
        s
    }

    fn ng(home: &str) -> NetworkGroup {
        NetworkGroup::new(
            "net",
            NetworkGroupSpec {
                cidr: "10.0.0.0/24".parse().unwrap(),
                gateway: None,
                segment: SegmentSpec {
                    type_: SegmentType::Vxlan,
                    id: None,
                },
                home_site: SiteName(home.into()),
                sites: vec![],
                dhcp: None,
                egress_nat: true,
                public_ips: vec![],
                firewall: vec![],
                mtu: None,
            },
        )
    }

    #[test]
    fn missing_network_group_is_stalled_naming_the_field() {
        let v = validate(
            "t1",
            &spec(),
            &Observed {
                network_group: None,
                volumes: vec![],
                sites: vec![site("a")],
                namespace_labels: Default::default(),
            },
        );
        assert!(v.is_stalled());
        assert_eq!(v.reason(), &Reason::NetworkGroupNotFound);
        assert!(v.message().contains("spec.networkGroup"));
    }

    #[test]
    fn unknown_site_and_size_class() {
        let mut s = spec();
        s.pools[0].sites = vec![SiteName("b".into())];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![],
            sites: vec![site("a")],
            namespace_labels: Default::default(),
        };
        let v = validate("t1", &s, &obs);
        assert_eq!(v.reason(), &Reason::SiteNotFound);
        assert!(v.message().contains("spec.pools[0].sites"));
        let mut s = spec();
        s.frontend.size = NodeSize {
            cpu: None,
            memory: None,
            size_class: Some("huge".into()),
        };
        assert_eq!(validate("t1", &s, &obs).reason(), &Reason::UnknownSizeClass);
        s.frontend.size.size_class = Some("large".into());
        assert_eq!(
            validate("t1", &s, &obs).reason(),
            &Reason::ReferencesResolved
        );
    }

    #[test]
    fn a_site_that_does_not_admit_the_namespace_stalls_the_cluster() {
        let mut lab = site("b");
        lab.spec.access = Some(yukumo_api::site::SiteAccess {
            namespace_selector: yukumo_api::site::NamespaceSelector {
                match_labels: [("lab".to_string(), "yes".to_string())].into(),
                match_expressions: vec![],
            },
        });
        let mut s = spec();
        s.pools[0].sites = vec![SiteName("b".into())];
        let mut obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![],
            sites: vec![site("a"), lab.clone()],
            namespace_labels: Default::default(),
        };
        // Nodes run only where their group spans.
        let v = validate("t1", &s, &obs);
        assert_eq!(v.reason(), &Reason::SiteNotSpanned);
        assert_eq!(
            v.message(),
            "spec.pools[0].sites: Site \"b\" is not spanned by NetworkGroup \"net\" (homeSite \"a\", sites []): add it to the group's spec.sites"
        );
        if let Some(g) = obs.network_group.as_mut() {
            g.spec.sites = vec![SiteName("b".into())];
        }
        let v = validate("t1", &s, &obs);
        assert_eq!(v.reason(), &Reason::SiteAccessDenied);
        assert!(
            v.message()
                .starts_with("spec.pools[0].sites: namespace t1 may not use Site \"b\""),
            "{}",
            v.message()
        );
        obs.namespace_labels = [("lab".to_string(), "yes".to_string())].into();
        assert_eq!(
            validate("t1", &s, &obs).reason(),
            &Reason::ReferencesResolved
        );
        // The group's home Site is used too (nodes go there by default).
        obs.namespace_labels.clear();
        obs.network_group = Some(ng("b"));
        let v = validate("t1", &spec(), &obs);
        assert_eq!(v.reason(), &Reason::SiteAccessDenied);
        assert!(
            v.message().starts_with("spec.networkGroup:"),
            "{}",
            v.message()
        );
    }

    #[test]
    fn volumes_must_exist_and_attach_once() {
        let mut s = spec();
        s.frontend.volumes = vec![VolumeAttachment {
            name: "data".into(),
            read_only: false,
        }];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![("data".into(), false)],
            sites: vec![site("a")],
            namespace_labels: Default::default(),
        };
        assert_eq!(validate("t1", &s, &obs).reason(), &Reason::VolumeNotFound);
        s.pools[0].replicas = 1;
        s.pools[0].volumes = vec![VolumeAttachment {
            name: "data".into(),
            read_only: false,
        }];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![("data".into(), true)],
            sites: vec![site("a")],
            namespace_labels: Default::default(),
        };
        assert_eq!(
            validate("t1", &s, &obs).reason(),
            &Reason::VolumeAttachedTwice
        );
    }
}
