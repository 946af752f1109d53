//! Fixtures shared by the network tests: one group whose router runs on
//! host `h1`, a worker there, and the Site's external network.

use std::sync::Arc;

use yukumo_api::networkgroup::NetworkGroup;
use yukumo_api::site::ExternalNetwork;
use yukumo_api::virtualnode::VirtualNode;

use super::plan::{HostPlan, Inputs, plan};

pub fn ng(status: serde_json::Value) -> Arc<NetworkGroup> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
            "metadata": {"name": "net", "namespace": "t1", "uid": "g1"},
            "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "local",
                     "firewall": [{"protocol": "tcp", "ports": "22"}, {"protocol": "icmp", "to": "All"}]},
            "status": status
        }))
        .unwrap(),
    )
}

pub fn vn(name: &str, uid: &str, ip: &str, mac: &str) -> Arc<VirtualNode> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": name, "namespace": "t1", "uid": uid},
            "spec": {"cluster": "c", "role": "worker", "hostname": name, "host": "h1",
                     "resources": {"cpu": 1, "memoryMiB": 128},
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                     "network": {"group": "net", "ip": ip, "prefix": 24, "gateway": "10.0.0.1",
                                 "mac": mac, "segment": {"type": "vxlan", "id": 1000}, "mtu": 1450}}
        }))
        .unwrap(),
    )
}

pub fn status() -> serde_json::Value {
    serde_json::json!({
        "segment": {"type": "vxlan", "id": 1000}, "gateway": "10.0.0.1", "mtu": 1450,
        "router": {"host": "h1", "site": "local", "address": "203.0.113.16"},
        "allocations": [
            {"node": "c-frontend", "ip": "10.0.0.7", "mac": "02:00:00:00:00:07", "role": "frontend"},
            {"node": "c-w-0", "ip": "10.0.0.9", "mac": "02:00:00:00:00:09", "role": "worker"}],
        "publicIPs": [{"address": "203.0.113.17", "node": "c-frontend"}],
        "hosts": [{"name": "h1", "underlay": "10.255.0.1"}, {"name": "h2", "underlay": "10.255.0.2"}]
    })
}

/// One group with a router on h1, a worker on h1, the external network.
pub fn fixture() -> (
    Vec<Arc<NetworkGroup>>,
    Vec<Arc<VirtualNode>>,
    ExternalNetwork,
) {
    let nodes = vec![vn(
        "c-w-0",
        "0123abcd-ef45-6789",
        "10.0.0.9",
        "02:00:00:00:00:09",
    )];
    let ext = ExternalNetwork {
        cidr: "203.0.113.0/24".parse().unwrap(),
        gateway: Some("203.0.113.1".parse().unwrap()),
        interface: Some("ext0".into()),
    };
    (vec![ng(status())], nodes, ext)
}

/// The plan of host `h1` for the fixture, router namespaces prefixed
/// with `prefix`, its external interface `ext`.
pub fn plan_for(prefix: &str, ext_if: &str) -> HostPlan {
    plan_with(prefix, ext_if, |_| {})
}

/// [`plan_for`] with the group's status changed by `change`.
pub fn plan_with(
    prefix: &str,
    ext_if: &str,
    change: impl FnOnce(&mut yukumo_api::networkgroup::NetworkGroupStatus),
) -> HostPlan {
    let (mut groups, nodes, mut ext) = fixture();
    let mut g = (*groups[0]).clone();
    change(g.status.as_mut().expect("a status"));
    groups[0] = Arc::new(g);
    ext.interface = Some(ext_if.to_string());
    plan(&Inputs {
        host: "h1",
        netns_prefix: prefix,
        groups: &groups,
        nodes: &nodes,
        external: Some(&ext),
        underlay: Some("10.255.0.1".parse().unwrap()),
        site: "a",
        gateway: None,
    })
}

/// The fixture's group stretched over three Sites' tunnels (`a`, `b`, `c`),
/// its span a host at each of `a` and `b` plus `h1`; planned for `h1` at
/// Site `a` with WAN interface `wan0`, holding the Site's endpoint when
/// `active`.
pub fn plan_gateway(prefix: &str, active: bool) -> HostPlan {
    plan_gateway_lost(prefix, active, &[])
}

/// `plan_gateway`, the Sites `lost` having no host holding their end.
pub fn plan_gateway_lost(prefix: &str, active: bool, lost: &[&str]) -> HostPlan {
    plan_gateway_with(prefix, active, lost, None)
}

/// `plan_gateway_lost` at Sites whose tunnels are WireGuard: each end with
/// its holder's key as `keys` gives it (site → base64 key, or none).
pub fn plan_gateway_with(
    prefix: &str,
    active: bool,
    lost: &[&str],
    keys: Option<&[(&str, Option<&str>)]>,
) -> HostPlan {
    let (mut groups, nodes, ext) = fixture();
    let mut g = (*groups[0]).clone();
    let st = g.status.as_mut().expect("a status");
    let mut ends = serde_json::json!([
        {"site": "a", "address": "100.64.0.101", "port": 4790},
        {"site": "b", "address": "100.64.0.102", "port": 4790, "bandwidthMbps": 200},
        {"site": "c", "address": "100.64.0.103", "port": 4790}]);
    for e in ends.as_array_mut().expect("a list") {
        let site = e["site"].as_str().expect("a site").to_string();
        if !lost.contains(&site.as_str()) {
            e["gateway"] = serde_json::json!(format!("{site}-1"));
        }
        if let Some(keys) = keys {
            e["encryption"] = serde_json::json!("wireguard");
            if let Some((_, Some(k))) = keys.iter().find(|(s, _)| *s == site) {
                e["publicKey"] = serde_json::json!(k);
            }
        }
    }
    st.tunnels = serde_json::from_value(ends).unwrap();
    st.hosts = serde_json::from_value(serde_json::json!([
        {"name": "h1", "underlay": "10.255.0.1", "site": "a"},
        {"name": "h2", "underlay": "10.255.0.2", "site": "a"},
        {"name": "h3", "underlay": "10.255.0.3", "site": "b"},
        {"name": "h4", "underlay": "10.255.0.4"}]))
    .unwrap();
    groups[0] = Arc::new(g);
    let gw = super::plan::GatewayInputs {
        dev: "wan0".into(),
        endpoint: "100.64.0.101:4790".parse().unwrap(),
        bandwidth_mbps: Some(1000),
        active,
        encryption: if keys.is_some() {
            yukumo_api::site::Encryption::Wireguard
        } else {
            Default::default()
        },
        wan_mtu: 1500,
    };
    plan(&Inputs {
        host: "h1",
        netns_prefix: prefix,
        groups: &groups,
        nodes: &nodes,
        external: Some(&ext),
        underlay: Some("10.255.0.1".parse().unwrap()),
        site: "a",
        gateway: Some(&gw),
    })
}
