//! VirtualCluster: validate what the spec refers to, place its nodes, and
//! report it.
//!
//! References are checked against the API (same namespace for namespaced
//! kinds, so one tenant can never name another tenant's NetworkGroup or
//! Volume). What the schema cannot say becomes a `Stalled` condition naming
//! the field, and an Event.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use yukumo_api::common::{Conditions, NodeSize, Resources, builtin_size_classes, condition_types};
use yukumo_api::host::Host;
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::{
    FrontendEndpoint, NodeSummary, RecoveryPolicy, Transition, VirtualCluster, VirtualClusterSpec,
    VirtualClusterStatus,
};
use yukumo_api::virtualnode::{NodePhase, NodeRole, VirtualNode};
use yukumo_api::{NetworkGroup, Volume, labels, managers};

use super::nodes::{DesiredNode, desired_nodes, should_run};
use super::reservation;
use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Error, Result};
use crate::scheduler::{HostView, Placement, Request, place};

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
            "references resolved; {} nodes to place",
            spec.desired_nodes()
        ),
    )
}

/// What converging a cluster's VirtualNodes found.
struct NodesOutcome {
    nodes: Vec<VirtualNode>,
    unschedulable: Vec<String>,
    recovering: Vec<String>,
}

fn node_labels(vc_name: &str, d: &DesiredNode, host: &str, site: &str) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (labels::CLUSTER.to_string(), vc_name.to_string()),
        (labels::ROLE.to_string(), d.spec.role.as_str().to_string()),
        (labels::HOST.to_string(), host.to_string()),
        (labels::SITE.to_string(), site.to_string()),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    if let Some(p) = &d.spec.pool {
        l.insert(labels::POOL.to_string(), p.clone());
    }
    l
}

fn host_views(hosts: &[Host], all_nodes: &[VirtualNode]) -> Vec<HostView> {
    hosts
        .iter()
        .map(|h| {
            let name = h.name_any();
            let used = all_nodes
                .iter()
                .filter(|n| n.spec.host.as_deref() == Some(name.as_str()))
                .map(|n| n.spec.resources)
                .fold(Resources::default(), Resources::plus);
            let status = h.status.clone().unwrap_or_default();
            let lost = status
                .conditions
                .get_condition(condition_types::READY)
                .is_some_and(|c| c.reason == "HeartbeatLost");
            HostView {
                site: h.spec.site.clone(),
                gateway: h.spec.gateway,
                ready: status.conditions.is_true(condition_types::READY),
                lost,
                schedulable: h.spec.schedulable,
                allocatable: status.allocatable.unwrap_or_default(),
                used,
                name,
            }
        })
        .collect()
}

/// Create, update and delete the cluster's VirtualNodes. Placement is
/// persisted in the VirtualNode (spec.host and its label) when it is created,
/// and never changes while the host exists.
async fn converge_nodes(
    ctx: &Ctx,
    vc: &VirtualCluster,
    ns: &str,
    desired: Vec<DesiredNode>,
    mine: Vec<VirtualNode>,
    cluster_running: bool,
) -> Result<NodesOutcome> {
    let api: Api<VirtualNode> = Api::namespaced(ctx.client.clone(), ns);
    let all_nodes = Api::<VirtualNode>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items;
    let hosts = Api::<Host>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items;
    let mut views = host_views(&hosts, &all_nodes);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for n in &mine {
        if let Some(h) = &n.spec.host {
            *counts.entry(h.clone()).or_default() += 1;
        }
    }
    let vc_name = vc.name_any();
    let owner = vc
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let frontend_running = mine.iter().any(|n| {
        n.spec.role == NodeRole::Frontend
            && n.status
                .as_ref()
                .is_some_and(|s| s.phase == NodePhase::Running)
    });
    let pp = PatchParams::apply(managers::CONTROLLER).force();
    let mut nodes = Vec::new();
    let mut unschedulable = Vec::new();
    let mut recovering = Vec::new();
    for d in &desired {
        let mut existing = mine.iter().find(|n| n.name_any() == d.name);
        // Host loss: with RestartElsewhere, a node on a lost (or vanished)
        // host is deleted and placed anew; the lost host's agent removes the
        // stale domain when it returns (its VirtualNode uid is gone).
        if let Some(n) = existing
            && let Some(h) = &n.spec.host
            && vc.spec.recovery == RecoveryPolicy::RestartElsewhere
            && views.iter().find(|v| &v.name == h).is_none_or(|v| v.lost)
        {
            if n.metadata.deletion_timestamp.is_none() {
                api.delete(&n.name_any(), &Default::default()).await?;
                ctx.event(
                    vc,
                    EventType::Warning,
                    "NodeRecovering",
                    format!(
                        "{} was on lost host {h}; placing it again elsewhere",
                        n.name_any()
                    ),
                )
                .await;
            }
            recovering.push(n.name_any());
            existing = None;
        }
        if recovering.contains(&d.name) {
            continue;
        }
        let placement = match existing.and_then(|n| n.spec.host.clone().zip(n.spec.site.clone())) {
            Some((host, site)) => Placement::Host { host, site },
            None => place(
                &Request {
                    node: d.name.clone(),
                    sites: d.sites.clone(),
                    need: d.spec.resources,
                    gateway: d.gateway,
                },
                &mut views,
                &mut counts,
            ),
        };
        let (host, site) = match placement {
            Placement::Host { host, site } => (host, site),
            Placement::Unschedulable(msg) => {
                unschedulable.push(msg);
                continue;
            }
        };
        let mut spec = d.spec.clone();
        spec.host = Some(host.clone());
        spec.site = Some(site.clone());
        spec.running = should_run(
            cluster_running,
            spec.role,
            vc.spec.start_order,
            frontend_running,
        );
        if let Some(n) = existing {
            // Keep what the controller allocated earlier (network identity, disks).
            spec.network = n.spec.network.clone();
            spec.disks = n.spec.disks.clone();
        }
        let labels = node_labels(&vc_name, d, &host, &site);
        let unchanged = existing.is_some_and(|n| {
            n.spec == spec
                && labels.iter().all(|(k, v)| n.labels().get(k) == Some(v))
                && n.owner_references().iter().any(|o| o.uid == owner.uid)
        });
        if unchanged {
            nodes.push(existing.cloned().expect("existing"));
            continue;
        }
        let vn = VirtualNode {
            metadata: ObjectMeta {
                name: Some(d.name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(labels),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            spec,
            status: None,
        };
        let applied = api.patch(&d.name, &pp, &Patch::Apply(&vn)).await?;
        if existing.is_none() {
            ctx.event(
                vc,
                EventType::Normal,
                "NodeScheduled",
                format!("{} placed on host {host} (site {site})", d.name),
            )
            .await;
        }
        nodes.push(applied);
    }
    // Scale down: remove nodes no longer desired (the highest indexes).
    for n in &mine {
        if !desired.iter().any(|d| d.name == n.name_any())
            && n.metadata.deletion_timestamp.is_none()
        {
            api.delete(&n.name_any(), &Default::default()).await?;
            ctx.event(
                vc,
                EventType::Normal,
                "NodeRemoved",
                format!("{} removed (scaled down)", n.name_any()),
            )
            .await;
        }
    }
    Ok(NodesOutcome {
        nodes,
        unschedulable,
        recovering,
    })
}

fn summary(n: &VirtualNode) -> NodeSummary {
    NodeSummary {
        name: n.name_any(),
        role: n.spec.role.as_str().to_string(),
        host: n.spec.host.clone(),
        site: n.spec.site.clone(),
        ip: n.spec.network.as_ref().map(|net| net.ip.clone()),
        phase: Some(format!(
            "{:?}",
            n.status.as_ref().map(|s| s.phase).unwrap_or_default()
        )),
    }
}

fn node_ready(n: &VirtualNode) -> bool {
    n.status
        .as_ref()
        .is_some_and(|s| s.conditions.is_true(condition_types::READY))
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
    let mut verdict = validate(&ns, &vc.spec, &observed);
    let old = vc.status.clone().unwrap_or_default();
    let desired_count = vc.spec.desired_nodes();
    let mut nodes_status = old.nodes.clone();
    let mut ready_nodes = old.ready_nodes;
    let mut requeue = Duration::from_secs(300);
    let now = k8s_openapi::jiff::Timestamp::now();
    let power =
        reservation::plan(vc.spec.reservation.as_ref(), now).unwrap_or(reservation::PowerPlan {
            exists: false,
            run: false,
            next: None,
            why: "invalid reservation",
        });
    let running_now = vc.spec.running && power.run;
    let mut desired_count = if power.exists { desired_count } else { 0 };
    let next_transition = power.next.map(|(t, action)| Transition {
        time: Time(t),
        action: action.to_string(),
    });
    if let Some((t, _)) = power.next {
        // Requeue exactly at the next boundary of the reservation.
        let wait = Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
        requeue = requeue.min(wait + Duration::from_millis(200));
    }
    if let (false, Some(ng)) = (verdict.is_stalled(), observed.network_group.as_ref()) {
        match desired_nodes(&vc, ng, &observed.sites).map(|d| if power.exists { d } else { vec![] })
        {
            Err(v) => verdict = v,
            Ok(desired) => {
                let mine = Api::<VirtualNode>::namespaced(ctx.client.clone(), &ns)
                    .list(&ListParams::default().labels(&format!(
                        "{}={}",
                        labels::CLUSTER,
                        vc.name_any()
                    )))
                    .await?
                    .items
                    .into_iter()
                    // Only nodes this cluster object owns: a cluster recreated
                    // under the same name never adopts its predecessor's nodes.
                    .filter(|n| {
                        n.owner_references()
                            .iter()
                            .any(|o| Some(&o.uid) == vc.metadata.uid.as_ref())
                    })
                    .collect();
                let outcome = converge_nodes(&ctx, &vc, &ns, desired, mine, running_now).await?;
                nodes_status = outcome.nodes.iter().map(summary).collect();
                let stopped = outcome
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .is_some_and(|s| s.phase == NodePhase::Stopped)
                    })
                    .count() as i32;
                ready_nodes = outcome.nodes.iter().filter(|n| node_ready(n)).count() as i32;
                verdict = if !outcome.recovering.is_empty() {
                    requeue = Duration::from_secs(1);
                    Verdict::progressing(
                        "RecoveringNodes",
                        format!(
                            "placing again after host loss: {}",
                            outcome.recovering.join(", ")
                        ),
                    )
                } else if !outcome.unschedulable.is_empty() {
                    requeue = Duration::from_secs(10);
                    Verdict::stalled("Unschedulable", outcome.unschedulable.join("; "))
                } else if !power.exists {
                    desired_count = 0;
                    match power.next {
                        Some((t, _)) => Verdict::progressing(
                            "ReservationPending",
                            format!("nodes are created at {t}"),
                        ),
                        None => Verdict::ready(
                            "ReservationEnded",
                            "the reservation ended; its nodes were deleted",
                        ),
                    }
                } else if !running_now {
                    if stopped == desired_count {
                        Verdict::ready(
                            "Stopped",
                            format!(
                                "all {desired_count} nodes stopped ({})",
                                if vc.spec.running {
                                    power.why
                                } else {
                                    "spec.running is false"
                                }
                            ),
                        )
                    } else {
                        Verdict::progressing(
                            "Stopping",
                            format!("{stopped}/{desired_count} nodes stopped"),
                        )
                    }
                } else if ready_nodes == desired_count {
                    Verdict::ready(
                        "AllNodesReady",
                        format!("{ready_nodes}/{desired_count} nodes ready"),
                    )
                } else {
                    Verdict::progressing(
                        "NodesStarting",
                        format!("{ready_nodes}/{desired_count} nodes ready"),
                    )
                };
            }
        }
    }
    let frontend = nodes_status
        .iter()
        .find(|n| n.role == "frontend")
        .and_then(|n| n.ip.clone())
        .map(|ip| FrontendEndpoint {
            ssh: Some(format!("ssh root@{ip}")),
            address: Some(ip),
            public_ip: None,
        });
    let status = VirtualClusterStatus {
        observed_generation: vc.metadata.generation,
        conditions: apply_verdict(&old.conditions, vc.metadata.generation, &verdict),
        desired_nodes: desired_count,
        ready_nodes,
        ready: Some(format!("{ready_nodes}/{desired_count}")),
        nodes: nodes_status,
        frontend: frontend.or(old.frontend.clone()),
        next_transition,
    };
    if status != old {
        ctx.apply_status(
            &Api::<VirtualCluster>::namespaced(ctx.client.clone(), &ns),
            vc.as_ref(),
            &status,
        )
        .await?;
    }
    ctx.announce(vc.as_ref(), &old.conditions, &verdict).await;
    Ok(Action::requeue(requeue))
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
