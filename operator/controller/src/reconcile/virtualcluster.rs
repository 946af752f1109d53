//! VirtualCluster: validate what the spec refers to, and report it.
//!
//! References are checked against the API (same namespace for namespaced
//! kinds, so one tenant can never name another tenant's NetworkGroup or
//! Volume). What the schema cannot say becomes a `Stalled` condition naming
//! the field, and an Event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use yukumo_api::common::{NodeSize, builtin_size_classes};
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::{VirtualCluster, VirtualClusterSpec, VirtualClusterStatus};
use yukumo_api::{NetworkGroup, Volume};

use super::verdict::{Verdict, apply_verdict, reason_changed};
use crate::context::{Ctx, Error, Result};

/// What the referenced objects look like, fetched once per reconcile.
pub struct Observed {
    pub network_group: Option<NetworkGroup>,
    pub volumes: Vec<(String, bool)>,
    pub sites: Vec<Site>,
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
            "NetworkGroupNotFound",
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
            "SiteNotFound",
            format!(
                "spec.networkGroup: NetworkGroup {:?} has home site {:?}, which does not exist",
                spec.network_group, ng.spec.home_site.0
            ),
        );
    }
    for (field, site) in named_sites(spec) {
        if !site_names.contains(site.as_str()) {
            return Verdict::stalled("SiteNotFound", format!("{field}: Site {site:?} not found"));
        }
    }
    for (name, found) in &obs.volumes {
        if !found {
            return Verdict::stalled(
                "VolumeNotFound",
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
                "VolumeAttachedTwice",
                format!(
                    "{field}: Volume {:?} is attached to more than one node of this cluster",
                    v.name
                ),
            );
        }
    }
    if !size_class_known(&spec.frontend.size, &obs.sites) {
        return Verdict::stalled(
            "UnknownSizeClass",
            format!(
                "spec.frontend.size.sizeClass: {:?} is neither a built-in class nor defined by a Site",
                spec.frontend.size.size_class.as_deref().unwrap_or("")
            ),
        );
    }
    for (i, p) in spec.pools.iter().enumerate() {
        if !size_class_known(&p.size, &obs.sites) {
            return Verdict::stalled(
                "UnknownSizeClass",
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
            "InvalidTimeZone",
            format!(
                "spec.reservation.timeZone: {:?} is not a known IANA time zone",
                r.time_zone
            ),
        );
    }
    Verdict::progressing(
        "ReferencesResolved",
        format!(
            "references resolved; 0/{} nodes ready (nodes are created by the scheduler)",
            spec.desired_nodes()
        ),
    )
}

pub async fn reconcile(vc: Arc<VirtualCluster>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("VirtualCluster");
    let ns = vc
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let ngs: Api<NetworkGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let vols: Api<Volume> = Api::namespaced(ctx.client.clone(), &ns);
    let sites: Api<Site> = Api::all(ctx.client.clone());
    let mut volumes = Vec::new();
    for v in vc
        .spec
        .frontend
        .volumes
        .iter()
        .chain(vc.spec.pools.iter().flat_map(|p| p.volumes.iter()))
    {
        volumes.push((v.name.clone(), vols.get_opt(&v.name).await?.is_some()));
    }
    let observed = Observed {
        network_group: ngs.get_opt(&vc.spec.network_group).await?,
        volumes,
        sites: sites.list(&Default::default()).await?.items,
    };
    let verdict = validate(&ns, &vc.spec, &observed);
    let old = vc.status.clone().unwrap_or_default();
    let status = VirtualClusterStatus {
        observed_generation: vc.metadata.generation,
        conditions: apply_verdict(&old.conditions, vc.metadata.generation, &verdict),
        desired_nodes: vc.spec.desired_nodes(),
        ready_nodes: old.ready_nodes,
        ready: Some(format!("{}/{}", old.ready_nodes, vc.spec.desired_nodes())),
        ..old.clone()
    };
    if status != old {
        ctx.apply_status(
            &Api::<VirtualCluster>::namespaced(ctx.client.clone(), &ns),
            vc.as_ref(),
            &status,
        )
        .await?;
    }
    if reason_changed(&old.conditions, &verdict) {
        let type_ = if verdict.is_stalled() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.event(
            vc.as_ref(),
            type_,
            verdict.reason(),
            verdict.message().to_string(),
        )
        .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
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
                    checksum: format!("sha256:{}", "0".repeat(64)),
                    format: Default::default(),
                },
                disk_size: None,
                site: None,
                gateway_host: true,
                public_ip: false,
                public_ip_address: None,
                user_data: None,
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
                volumes: vec![],
            }],
            ssh_keys: vec![],
            running: true,
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
                cidr: "10.0.0.0/24".into(),
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
            },
        );
        assert!(v.is_stalled());
        assert_eq!(v.reason(), "NetworkGroupNotFound");
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
        };
        let v = validate("t1", &s, &obs);
        assert_eq!(v.reason(), "SiteNotFound");
        assert!(v.message().contains("spec.pools[0].sites"));
        let mut s = spec();
        s.frontend.size = NodeSize {
            cpu: None,
            memory: None,
            size_class: Some("huge".into()),
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "UnknownSizeClass");
        s.frontend.size.size_class = Some("large".into());
        assert_eq!(validate("t1", &s, &obs).reason(), "ReferencesResolved");
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
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "VolumeNotFound");
        s.pools[0].replicas = 1;
        s.pools[0].volumes = vec![VolumeAttachment {
            name: "data".into(),
            read_only: false,
        }];
        let obs = Observed {
            network_group: Some(ng("a")),
            volumes: vec![("data".into(), true)],
            sites: vec![site("a")],
        };
        assert_eq!(validate("t1", &s, &obs).reason(), "VolumeAttachedTwice");
    }
}
