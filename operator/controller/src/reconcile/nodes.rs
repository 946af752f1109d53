//! The VirtualNodes a VirtualCluster asks for, as a pure function of its spec,
//! its NetworkGroup and the Sites.

use yukumo_api::common::{NodeSize, Resources, builtin_size_classes};
use yukumo_api::quantity::{bytes_to_mib, parse_quantity};
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::{NodeEntry, StartOrder, VirtualCluster};
use yukumo_api::virtualnode::{NodeNetwork, NodeRole, VirtualNodeSpec};
use yukumo_api::{NetworkGroup, Reason};

use super::verdict::Verdict;

/// One node the cluster should have.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredNode {
    pub name: String,
    /// Sites it may be placed at.
    pub sites: Vec<String>,
    /// Place on a gateway-capable host.
    pub gateway: bool,
    /// Place on a host with 802.1Q VLANs (a vlan group).
    pub vlan: bool,
    /// Its spec, without placement (`host`, `site`) and power (`running`).
    pub spec: VirtualNodeSpec,
    /// The host its `dir` volumes pin it to, and why.
    pub pinned: Option<(String, String)>,
    /// Not created yet: a volume of it waits (the cluster's condition says which).
    pub hold: bool,
    /// It boots from a Volume (`rootVolume`): its image only seeds that
    /// Volume, once, and is not part of its revision.
    pub boots_from_volume: bool,
    /// How many nodes of its set (the frontend alone, or its pool) may be
    /// unavailable at once while they are rolled to a new revision.
    pub max_unavailable: u32,
    /// Switched off by the user while the cluster runs (its pool's
    /// `running: false` or its `stoppedNodes` entry).
    pub switched_off: bool,
}

impl DesiredNode {
    /// The revision of its template.
    pub fn revision(&self) -> String {
        template_revision(&self.spec, self.boots_from_volume)
    }
}

/// The revision of a node's template: a hash of what cannot change without
/// making the VM again (image and boot disk size, unless it boots from a
/// Volume; size; user data, which cloud-init reads once per instance).
/// Stable across versions of yukumo (sha256 of a fixed encoding).
pub fn template_revision(spec: &VirtualNodeSpec, boots_from_volume: bool) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!(
        "cpu={}\nmemoryMiB={}\n",
        spec.resources.cpu, spec.resources.memory_mib
    ));
    if !boots_from_volume {
        let format = serde_json::to_string(&spec.image.format).unwrap_or_default();
        h.update(format!(
            "image={}\nchecksum={}\nformat={format}\ndiskBytes={}\n",
            spec.image.url,
            spec.image.checksum.as_deref().unwrap_or_default(),
            spec.disk_bytes
        ));
        // (absent for a pinned checksum: those revisions stay as they were)
        if let Some(list) = &spec.image.checksum_url {
            h.update(format!("checksumURL={list}\n"));
        }
    }
    if let Some(u) = &spec.user_data {
        h.update(format!("userData={}\n", u.len()));
        h.update(u.as_bytes());
    }
    hex10(&h.finalize())
}

fn hex10(d: &[u8]) -> String {
    d.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// The cluster's revision: a hash of the revisions of its frontend and of
/// each pool with nodes (the replica counts are not part of it: scaling
/// is not a rollout).
pub fn cluster_revision(desired: &[DesiredNode]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut last: Option<&Option<String>> = None;
    for d in desired {
        if last == Some(&d.spec.pool) {
            continue;
        }
        last = Some(&d.spec.pool);
        h.update(format!(
            "{}={}\n",
            d.spec.pool.as_deref().unwrap_or("(frontend)"),
            d.revision()
        ));
    }
    hex10(&h.finalize())
}

/// Deterministic node name: `<cluster>-frontend` or `<cluster>-<pool>-<index>`.
pub fn node_name(cluster: &str, pool: Option<&str>, index: u32) -> String {
    match pool {
        None => NodeEntry::Frontend,
        Some(pool) => NodeEntry::Worker { pool, index },
    }
    .node_name(cluster)
}

pub fn resolve_size(size: &NodeSize, sites: &[&Site], field: &str) -> Result<Resources, Verdict> {
    let (cpu, memory) = match &size.size_class {
        Some(class) => {
            let found = sites
                .iter()
                .flat_map(|s| s.spec.size_classes.iter())
                .find(|c| &c.name == class)
                .cloned()
                .or_else(|| builtin_size_classes().into_iter().find(|c| &c.name == class))
                .ok_or_else(|| {
                    Verdict::stalled(
                        Reason::UnknownSizeClass,
                        format!("{field}.sizeClass: {class:?} is neither a built-in class nor defined by a Site"),
                    )
                })?;
            (found.cpu, found.memory)
        }
        None => (
            size.cpu.unwrap_or(1),
            size.memory.clone().unwrap_or_else(|| {
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into())
            }),
        ),
    };
    let bytes = parse_quantity(&memory)
        .map_err(|e| Verdict::stalled(Reason::InvalidSize, format!("{field}.memory: {e}")))?;
    Ok(Resources {
        cpu,
        memory_mib: bytes_to_mib(bytes),
    })
}

fn disk_bytes(
    q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    field: &str,
) -> Result<u64, Verdict> {
    match q {
        None => Ok(0),
        Some(q) => parse_quantity(q)
            .map_err(|e| Verdict::stalled(Reason::InvalidSize, format!("{field}: {e}"))),
    }
}

/// A node's identity on its group, once the group has allocated it an
/// address and a segment (`None` until then: the node waits).
pub fn node_network(ng: &NetworkGroup, node: &str) -> Option<NodeNetwork> {
    let status = ng.status.as_ref()?;
    let a = status.allocations.iter().find(|a| a.node == node)?;
    Some(NodeNetwork {
        group: ng.metadata.name.clone()?,
        ip: a.ip,
        prefix: ng.spec.cidr.prefix(),
        gateway: status.gateway?,
        mac: a.mac,
        segment: status.segment?,
        mtu: status.mtu.unwrap_or_else(|| ng.spec.mtu_or_default()),
    })
}

/// Every node the cluster asks for, frontend first, pools in order.
pub fn desired_nodes(
    vc: &VirtualCluster,
    ng: &NetworkGroup,
    sites: &[Site],
) -> Result<Vec<DesiredNode>, Verdict> {
    let cluster = vc.metadata.name.clone().unwrap_or_default();
    let spec = &vc.spec;
    let home = ng.spec.home_site.0.clone();
    let pick = |names: &[String]| -> Vec<&Site> {
        sites
            .iter()
            .filter(|s| {
                names
                    .iter()
                    .any(|n| s.metadata.name.as_deref() == Some(n.as_str()))
            })
            .collect()
    };
    let ssh_keys: Vec<String> = spec.ssh_keys.iter().map(|k| k.0.clone()).collect();
    let mut out = Vec::new();
    let network = |node: &str| node_network(ng, node);
    let vlan = ng.spec.segment.type_ == yukumo_api::SegmentType::Vlan;

    let fe_sites = vec![spec.frontend.site.clone().unwrap_or_else(|| home.clone())];
    let fe_name = node_name(&cluster, None, 0);
    out.push(DesiredNode {
        name: fe_name.clone(),
        gateway: spec.frontend.gateway_host,
        vlan,
        spec: VirtualNodeSpec {
            cluster: cluster.clone(),
            role: NodeRole::Frontend,
            pool: None,
            index: 0,
            hostname: fe_name.clone(),
            host: None,
            site: None,
            resources: resolve_size(&spec.frontend.size, &pick(&fe_sites), "spec.frontend.size")?,
            image: spec.frontend.image.clone(),
            disk_bytes: disk_bytes(&spec.frontend.disk_size, "spec.frontend.diskSize")?,
            running: false,
            ssh_keys: ssh_keys.clone(),
            user_data: spec.frontend.user_data.clone(),
            network: network(&fe_name),
            disks: vec![],
        },
        sites: fe_sites,
        pinned: None,
        hold: false,
        boots_from_volume: spec.frontend.root_volume.is_some(),
        max_unavailable: 1,
        switched_off: spec.node_switched_off(None, 0),
    });
    for (pi, pool) in spec.pools.iter().enumerate() {
        let sites_for_pool: Vec<String> = if pool.sites.is_empty() {
            vec![home.clone()]
        } else {
            pool.sites.iter().map(|s| s.0.clone()).collect()
        };
        let field = format!("spec.pools[{pi}]");
        let resources = resolve_size(&pool.size, &pick(&sites_for_pool), &format!("{field}.size"))?;
        let disk = disk_bytes(&pool.disk_size, &format!("{field}.diskSize"))?;
        for i in 0..pool.replicas.max(0) as u32 {
            let name = node_name(&cluster, Some(&pool.name), i);
            out.push(DesiredNode {
                name: name.clone(),
                sites: sites_for_pool.clone(),
                gateway: false,
                vlan,
                spec: VirtualNodeSpec {
                    cluster: cluster.clone(),
                    role: NodeRole::Worker,
                    pool: Some(pool.name.clone()),
                    index: i,
                    hostname: name.clone(),
                    host: None,
                    site: None,
                    resources,
                    image: pool
                        .image
                        .clone()
                        .unwrap_or_else(|| spec.frontend.image.clone()),
                    disk_bytes: disk,
                    running: false,
                    ssh_keys: ssh_keys.clone(),
                    user_data: pool.user_data.clone(),
                    network: network(&name),
                    disks: vec![],
                },
                pinned: None,
                hold: false,
                boots_from_volume: pool.root_volume.is_some(),
                max_unavailable: pool.max_unavailable.max(1),
                switched_off: spec.node_switched_off(Some(&pool.name), i),
            });
        }
    }
    Ok(out)
}

/// Whether a node should run now: the cluster's power state, and with
/// `FrontendFirst`, workers wait until the frontend runs before they start.
/// The order gates starting only: a worker already told to run keeps
/// running when its frontend stops (its host lost, say) until the cluster
/// itself is stopped.
pub fn should_run(
    cluster_running: bool,
    role: NodeRole,
    order: StartOrder,
    frontend_running: bool,
    already_running: bool,
) -> bool {
    match role {
        NodeRole::Frontend => cluster_running,
        NodeRole::Worker => {
            cluster_running
                && (order == StartOrder::Parallel || frontend_running || already_running)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vc() -> VirtualCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
            "metadata": {"name": "qs", "namespace": "demo"},
            "spec": {
                "networkGroup": "net",
                "frontend": {"size": {"sizeClass": "tiny"},
                             "image": {"url": "file:///i.qcow2", "checksum": format!("sha256:{}", "0".repeat(64))},
                             "diskSize": "1Gi"},
                "pools": [{"name": "worker", "replicas": 3, "size": {"cpu": 2, "memory": "1536Mi"}},
                          {"name": "big", "replicas": 1, "sites": ["b"], "size": {"sizeClass": "large"}}]
            }
        }))
        .unwrap()
    }

    fn ng() -> NetworkGroup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
            "metadata": {"name": "net", "namespace": "demo"},
            "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}
        }))
        .unwrap()
    }

    fn site(name: &str) -> Site {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": name},
            "spec": {"sizeClasses": [{"name": "tiny", "cpu": 1, "memory": "192Mi"}]}
        }))
        .unwrap()
    }

    #[test]
    fn names_sizes_and_sites() {
        let nodes = desired_nodes(&vc(), &ng(), &[site("a"), site("b")]).unwrap();
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "qs-frontend",
                "qs-worker-0",
                "qs-worker-1",
                "qs-worker-2",
                "qs-big-0"
            ]
        );
        assert_eq!(
            nodes[0].spec.resources,
            Resources {
                cpu: 1,
                memory_mib: 192
            }
        );
        assert_eq!(nodes[0].spec.disk_bytes, 1 << 30);
        assert_eq!(nodes[0].sites, ["a"]);
        assert!(nodes[0].gateway);
        assert_eq!(
            nodes[1].spec.resources,
            Resources {
                cpu: 2,
                memory_mib: 1536
            }
        );
        assert_eq!(
            nodes[4].spec.resources,
            Resources {
                cpu: 4,
                memory_mib: 8192
            },
            "built-in large"
        );
        assert_eq!(nodes[4].sites, ["b"]);
        assert_eq!(
            nodes[2].spec.image, nodes[0].spec.image,
            "pools default to the frontend image"
        );
    }

    #[test]
    fn unknown_class_is_stalled() {
        let mut v = vc();
        v.spec.frontend.size.size_class = Some("nope".into());
        let e = desired_nodes(&v, &ng(), &[site("a")]).unwrap_err();
        assert_eq!(e.reason(), &Reason::UnknownSizeClass);
    }

    #[test]
    fn start_order() {
        use NodeRole::*;
        let ff = StartOrder::FrontendFirst;
        assert!(should_run(true, Frontend, ff, false, false));
        assert!(!should_run(true, Worker, ff, false, false));
        assert!(should_run(true, Worker, ff, true, false));
        assert!(should_run(true, Worker, StartOrder::Parallel, false, false));
        assert!(!should_run(
            false,
            Frontend,
            StartOrder::Parallel,
            true,
            true
        ));
        // A running worker is not stopped because its frontend stopped...
        assert!(should_run(true, Worker, ff, false, true));
        // ...but it is when the cluster is.
        assert!(!should_run(false, Worker, ff, true, true));
    }
}
