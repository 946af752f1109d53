//! Fleet gauges for Prometheus, computed from the leader's caches at each
//! scrape: objects by state, Hosts by readiness, each Host's capacity and
//! what its nodes take, each Site's free public IPs and segment ids, the
//! objects whose latest spec is not yet acted on. A
//! follower reports none of them (one controller speaks for the fleet, so
//! sums over controllers never count twice).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use yukumo_api::common::Resources;
use yukumo_api::{Condition, ConditionStatus, SegmentType};

use crate::context::{Ctx, Stores};

/// One gauge family: label sets and values.
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub series: Vec<(Vec<(&'static str, String)>, i64)>,
}

/// `ready`, `stalled` or `reconciling`, and the reason of the condition
/// that says so (kstatus' reading of the conditions).
fn state(conditions: &[Condition]) -> (&'static str, String) {
    let find = |t: &str| conditions.iter().find(|c| c.type_ == t);
    match (find("Ready"), find("Stalled")) {
        (Some(r), _) if r.status == ConditionStatus::True => ("ready", r.reason.to_string()),
        (_, Some(s)) if s.status == ConditionStatus::True => ("stalled", s.reason.to_string()),
        (Some(r), _) => ("reconciling", r.reason.to_string()),
        (None, _) => ("reconciling", "NoStatus".to_string()),
    }
}

fn by_state<'a>(
    name: &'static str,
    help: &'static str,
    objects: impl Iterator<Item = Option<&'a [Condition]>>,
) -> Gauge {
    let mut counts: BTreeMap<(&'static str, String), i64> = BTreeMap::new();
    for c in objects {
        *counts.entry(state(c.unwrap_or(&[]))).or_default() += 1;
    }
    Gauge {
        name,
        help,
        series: counts
            .into_iter()
            .map(|((s, r), n)| (vec![("state", s.to_string()), ("reason", r)], n))
            .collect(),
    }
}

/// Every gauge, from the caches.
pub fn gauges(stores: &Stores) -> Vec<Gauge> {
    let clusters = stores.clusters.state();
    let volumes = stores.volumes.state();
    let hosts = stores.hosts.state();
    let nodes = stores.nodes.state();
    let sites = stores.sites.state();
    let groups = stores.network_groups.state();
    let mut out = vec![
        by_state(
            "yukumo_virtualclusters",
            "VirtualClusters by state (ready, reconciling, stalled) and the reason",
            clusters
                .iter()
                .map(|c| c.status.as_ref().map(|s| s.conditions.as_slice())),
        ),
        by_state(
            "yukumo_volumes",
            "Volumes by state (ready, reconciling, stalled) and the reason",
            volumes
                .iter()
                .map(|v| v.status.as_ref().map(|s| s.conditions.as_slice())),
        ),
    ];

    let mut ready: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    let mut taken: BTreeMap<&str, Resources> = BTreeMap::new();
    for n in nodes.iter() {
        if let Some(h) = n.spec.host.as_deref() {
            let t = taken.entry(h).or_default();
            *t = t.plus(n.spec.resources);
        }
    }
    let mut res = Vec::new();
    for h in hosts.iter() {
        let name = h.metadata.name.clone().unwrap_or_default();
        let status = h.status.as_ref();
        let is_ready = status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
        });
        *ready
            .entry((h.spec.site.clone(), if is_ready { "true" } else { "false" }))
            .or_default() += 1;
        let cap = status.and_then(|s| s.capacity).unwrap_or_default();
        let alloc = status.and_then(|s| s.allocatable).unwrap_or_default();
        let used = taken.get(name.as_str()).copied().unwrap_or_default();
        for (kind, r) in [
            ("capacity", cap),
            ("allocatable", alloc),
            ("allocated", used),
        ] {
            for (resource, v) in [
                ("cpu", i64::from(r.cpu)),
                (
                    "memory_bytes",
                    (r.memory_mib as i64).saturating_mul(1 << 20),
                ),
            ] {
                res.push((
                    vec![
                        ("host", name.clone()),
                        ("site", h.spec.site.clone()),
                        ("kind", kind.to_string()),
                        ("resource", resource.to_string()),
                    ],
                    v,
                ));
            }
        }
    }
    out.push(Gauge {
        name: "yukumo_hosts",
        help: "Hosts by Site and readiness",
        series: ready
            .into_iter()
            .map(|((site, r), n)| (vec![("site", site), ("ready", r.to_string())], n))
            .collect(),
    });
    out.push(Gauge {
        name: "yukumo_host_resources",
        help: "Each Host's capacity, allocatable (capacity less its reserve) and allocated (its VirtualNodes' sizes), in CPUs and memory bytes",
        series: res,
    });

    let mut ips = Vec::new();
    let mut segs = Vec::new();
    for s in sites.iter() {
        let site = s.metadata.name.clone().unwrap_or_default();
        let gateway = s.spec.external_network.as_ref().and_then(|e| e.gateway);
        let pool: BTreeSet<std::net::Ipv4Addr> = s
            .spec
            .public_ip_pool
            .iter()
            .flat_map(|r| r.addresses())
            .filter(|ip| Some(*ip) != gateway)
            .collect();
        let mut held = BTreeSet::new();
        let mut ids: Vec<(SegmentType, u32)> = Vec::new();
        for g in groups.iter() {
            let spans = g.spec.home_site.0 == site || g.spec.sites.iter().any(|x| x.0 == site);
            let Some(st) = g.status.as_ref() else {
                continue;
            };
            if let Some(seg) = st.segment
                && spans
            {
                ids.push((seg.type_, seg.id));
            }
            if g.spec.home_site.0 == site {
                held.extend(st.public_ips.iter().map(|p| p.address));
                if let Some(a) = st.router.as_ref().and_then(|r| r.address) {
                    held.insert(a);
                }
            }
        }
        let free = pool.iter().filter(|ip| !held.contains(ip)).count();
        ips.push((
            vec![("site", site.clone()), ("kind", "total".into())],
            pool.len() as i64,
        ));
        ips.push((
            vec![("site", site.clone()), ("kind", "free".into())],
            free as i64,
        ));
        for kind in [SegmentType::Vxlan, SegmentType::Vlan] {
            let Some(r) = s.spec.segment_range(kind) else {
                continue;
            };
            let total = i64::from(r.end.saturating_sub(r.start)) + 1;
            let used = ids
                .iter()
                .filter(|(t, id)| *t == kind && (r.start..=r.end).contains(id))
                .map(|(_, id)| id)
                .collect::<BTreeSet<_>>()
                .len() as i64;
            let t = match kind {
                SegmentType::Vxlan => "vxlan",
                SegmentType::Vlan => "vlan",
            };
            for (k, v) in [("total", total), ("free", total - used)] {
                segs.push((
                    vec![
                        ("site", site.clone()),
                        ("type", t.to_string()),
                        ("kind", k.to_string()),
                    ],
                    v,
                ));
            }
        }
    }
    // The backlog: objects whose latest spec is not yet acted on (kube-rs
    // exposes no work-queue depth; this is what a deep queue would show).
    let backlog = [
        ("virtualclusters", backlog(&clusters)),
        ("networkgroups", backlog(&groups)),
        ("volumes", backlog(&volumes)),
        ("sites", backlog(&sites)),
        ("virtualnodes", backlog(&nodes)),
    ];
    out.push(Gauge {
        name: "yukumo_unobserved_objects",
        help: "Objects whose latest spec (metadata.generation) their status does not yet say was acted on (observedGeneration): the reconcile backlog, by kind (VirtualNodes: their agents')",
        series: backlog
            .into_iter()
            .map(|(k, n)| (vec![("kind", k.to_string())], n))
            .collect(),
    });
    out.push(Gauge {
        name: "yukumo_site_public_ips",
        help: "Each Site's public IP pool: total and free (not held by a group's router or mapping)",
        series: ips,
    });
    out.push(Gauge {
        name: "yukumo_site_segment_ids",
        help: "Each Site's segment id range by type: total and free (not held by a group present there)",
        series: segs,
    });
    out
}

/// The collector: the leader's caches, or nothing while following.
pub struct Fleet(pub Arc<Mutex<Option<Arc<Ctx>>>>);

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fleet")
    }
}

impl Collector for Fleet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ctx = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(ctx) = ctx else {
            return Ok(());
        };
        for g in gauges(&ctx.stores) {
            let mut m = encoder.encode_descriptor(g.name, g.help, None, MetricType::Gauge)?;
            for (labels, v) in &g.series {
                m.encode_family(labels)?.encode_gauge(v)?;
            }
        }
        Ok(())
    }
}

/// A kind whose status says which generation it acted on.
trait Observed: kube::Resource {
    fn observed_generation(&self) -> Option<i64>;
}

macro_rules! observed {
    ($($kind:ty),*) => {$(
        impl Observed for $kind {
            fn observed_generation(&self) -> Option<i64> {
                self.status.as_ref().and_then(|s| s.observed_generation)
            }
        }
    )*};
}
observed!(
    yukumo_api::VirtualCluster,
    yukumo_api::NetworkGroup,
    yukumo_api::Volume,
    yukumo_api::Site,
    yukumo_api::VirtualNode
);

/// How many objects have a generation their status has not observed yet.
fn backlog<K: Observed>(objects: &[Arc<K>]) -> i64 {
    objects
        .iter()
        .filter(|o| {
            o.meta()
                .generation
                .is_some_and(|g| o.observed_generation().is_none_or(|seen| seen < g))
        })
        .count() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ApiMock, Fleet as Objects, ctx, obj};
    use serde_json::json;

    fn cond(t: &str, s: &str, r: &str) -> serde_json::Value {
        json!({"type": t, "status": s, "reason": r, "message": "",
               "lastTransitionTime": "2026-12-04T00:00:00Z"})
    }

    /// The gauges as Prometheus reads them: states, hosts, resources, free
    /// public IPs and segment ids, from the caches; nothing from a follower.
    #[tokio::test]
    async fn the_leader_reports_the_fleet_from_its_caches() {
        let (client, _mock) = ApiMock::new();
        let vc = |name: &str, conds: Vec<serde_json::Value>| {
            obj(
                json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
                "metadata": {"name": name, "namespace": "a"},
                "spec": {"networkGroup": "g", "frontend": {"size": {"cpu": 1, "memory": "256Mi"},
                    "image": {"url": "file:///x", "checksum": format!("sha256:{}", "e".repeat(64))}}},
                "status": {"conditions": conds}}),
            )
        };
        let objects = Objects {
            clusters: vec![
                vc("ok", vec![cond("Ready", "True", "Ready")]),
                vc("ok2", vec![cond("Ready", "True", "Ready")]),
                vc("full", vec![cond("Ready", "False", "InsufficientCapacity")]),
                vc(
                    "bad",
                    vec![
                        cond("Ready", "False", "ImagePullFailed"),
                        cond("Stalled", "True", "ImagePullFailed"),
                    ],
                ),
            ],
            hosts: vec![obj(
                json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Host",
                "metadata": {"name": "h1"}, "spec": {"site": "s"},
                "status": {"conditions": [cond("Ready", "True", "Ready")],
                    "capacity": {"cpu": 8, "memoryMiB": 4096},
                    "allocatable": {"cpu": 8, "memoryMiB": 3840}}}),
            )],
            nodes: vec![obj(
                json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
                "metadata": {"name": "n1", "namespace": "a", "generation": 2},
                "spec": {"cluster": "ok", "role": "frontend", "hostname": "n1", "host": "h1",
                    "resources": {"cpu": 2, "memoryMiB": 512},
                    "image": {"url": "file:///x", "checksum": format!("sha256:{}", "e".repeat(64))}}}),
            )],
            sites: vec![obj(
                json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Site",
                "metadata": {"name": "s"},
                "spec": {"publicIPPool": ["203.0.113.0/29"], "vniRange": {"start": 1000, "end": 1009},
                    "externalNetwork": {"cidr": "203.0.113.0/24", "gateway": "203.0.113.1"}}}),
            )],
            groups: vec![obj(
                json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
                "metadata": {"name": "g", "namespace": "a"},
                "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "s"},
                "status": {"segment": {"type": "vxlan", "id": 1003},
                    "router": {"host": "h1", "site": "s", "address": "203.0.113.2"},
                    "publicIPs": [{"address": "203.0.113.3", "node": "n1"}]}}),
            )],
            ..Default::default()
        };
        let leading = Arc::new(Mutex::new(None));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Fleet(leading.clone())));
        let text = |r: &prometheus_client::registry::Registry| {
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, r).unwrap();
            s
        };
        assert!(
            !text(&registry).contains("yukumo_hosts"),
            "a follower reports nothing"
        );
        *leading.lock().unwrap() = Some(ctx(client, objects));
        let t = text(&registry);
        for line in [
            r#"yukumo_virtualclusters{state="ready",reason="Ready"} 2"#,
            r#"yukumo_virtualclusters{state="reconciling",reason="InsufficientCapacity"} 1"#,
            r#"yukumo_virtualclusters{state="stalled",reason="ImagePullFailed"} 1"#,
            r#"yukumo_hosts{site="s",ready="true"} 1"#,
            r#"yukumo_host_resources{host="h1",site="s",kind="capacity",resource="cpu"} 8"#,
            r#"yukumo_host_resources{host="h1",site="s",kind="allocatable",resource="memory_bytes"} 4026531840"#,
            r#"yukumo_host_resources{host="h1",site="s",kind="allocated",resource="cpu"} 2"#,
            // 203.0.113.0/29 is 8 addresses less the gateway; 2 held.
            r#"yukumo_site_public_ips{site="s",kind="total"} 7"#,
            r#"yukumo_site_public_ips{site="s",kind="free"} 5"#,
            r#"yukumo_site_segment_ids{site="s",type="vxlan",kind="total"} 10"#,
            r#"yukumo_site_segment_ids{site="s",type="vxlan",kind="free"} 9"#,
            // The node has a generation and no status yet; the others have
            // none (the API server sets it).
            r#"yukumo_unobserved_objects{kind="virtualnodes"} 1"#,
            r#"yukumo_unobserved_objects{kind="virtualclusters"} 0"#,
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
    }
}
