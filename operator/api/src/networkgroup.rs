//! NetworkGroup: an isolated L2 network for one tenant or team.

use std::net::Ipv4Addr;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
pub use crate::net::{Ipv4Net, MacAddr, Segment, SegmentType};
use crate::virtualcluster::SiteName;
use crate::virtualnode::NodeRole;

/// An isolated layer-2 network with its own router: DHCP, egress NAT, public
/// IPs and an inbound firewall. Tenants may reuse the same CIDR.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "NetworkGroup",
    namespaced,
    status = "NetworkGroupStatus",
    shortname = "ng",
    category = "yukumo",
    doc = "An isolated L2 network (VLAN or VXLAN segment) with DHCP, NAT, public IPs and a firewall.",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.segment.type"}"#,
    printcolumn = r#"{"name":"Segment","type":"integer","jsonPath":".status.segment.id","description":"VLAN id or VNI in use"}"#,
    printcolumn = r#"{"name":"Site","type":"string","jsonPath":".spec.homeSite"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.gateway) || (isIP(self.gateway) && isCIDR(self.cidr) && cidr(self.cidr).containsIP(self.gateway) && self.gateway != string(cidr(self.cidr).ip()))"
).message("gateway must be an address inside cidr, other than the network address").field_path(".gateway"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.dhcp) || !has(self.dhcp.rangeStart) || (isIP(self.dhcp.rangeStart) && isCIDR(self.cidr) && cidr(self.cidr).containsIP(self.dhcp.rangeStart))"
).message("dhcp.rangeStart must be an address inside cidr").field_path(".dhcp.rangeStart"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.dhcp) || !has(self.dhcp.rangeEnd) || (isIP(self.dhcp.rangeEnd) && isCIDR(self.cidr) && cidr(self.cidr).containsIP(self.dhcp.rangeEnd))"
).message("dhcp.rangeEnd must be an address inside cidr").field_path(".dhcp.rangeEnd"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.dhcp) || !has(self.dhcp.rangeStart) || !has(self.dhcp.rangeEnd) || !isIP(self.dhcp.rangeStart) || !isIP(self.dhcp.rangeEnd) || ip(self.dhcp.rangeStart).family() != 4 || ip(self.dhcp.rangeEnd).family() != 4 || int(self.dhcp.rangeStart.split('.')[0]) * 16777216 + int(self.dhcp.rangeStart.split('.')[1]) * 65536 + int(self.dhcp.rangeStart.split('.')[2]) * 256 + int(self.dhcp.rangeStart.split('.')[3]) * 1 <= int(self.dhcp.rangeEnd.split('.')[0]) * 16777216 + int(self.dhcp.rangeEnd.split('.')[1]) * 65536 + int(self.dhcp.rangeEnd.split('.')[2]) * 256 + int(self.dhcp.rangeEnd.split('.')[3]) * 1"
).message("dhcp.rangeStart must not come after dhcp.rangeEnd").field_path(".dhcp.rangeStart"))]
#[x_kube(validation = kube::core::Rule::new("self.cidr == oldSelf.cidr")
    .message("cidr is immutable: addresses are already handed out from it").field_path(".cidr"))]
pub struct NetworkGroupSpec {
    /// IPv4 network of the group, e.g. `10.0.0.0/24` (prefix /8 to /29).
    #[x_kube(validation = kube::core::Rule::new(
        "isCIDR(self) && cidr(self).ip().family() == 4 && cidr(self).prefixLength() >= 8 && cidr(self).prefixLength() <= 29"
    ).message("cidr must be an IPv4 network with a prefix length between /8 and /29, e.g. 10.0.0.0/24"))]
    #[x_kube(validation = kube::core::Rule::new("!isCIDR(self) || cidr(self).masked() == cidr(self)")
        .message("cidr must be a network address (host bits zero), e.g. 10.0.0.0/24 not 10.0.0.1/24"))]
    #[schemars(length(min = 9, max = 18))]
    pub cidr: Ipv4Net,
    /// Router address inside `cidr`; defaults to the first host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub gateway: Option<Ipv4Addr>,
    /// The L2 segment that carries the group between hosts.
    pub segment: SegmentSpec,
    /// The Site whose gateway host runs the group's router.
    pub home_site: SiteName,
    /// Further Sites the group spans (joined by WAN tunnels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub sites: Vec<SiteName>,
    /// DHCP service for the group (enabled by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSpec>,
    /// Masquerade egress traffic to the Site's external network (default `true`).
    #[serde(default = "default_true")]
    pub egress_nat: bool,
    /// Explicit public IP mappings (1:1 NAT) to nodes of the group.
    #[serde(default, rename = "publicIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub public_ips: Vec<PublicIpMapping>,
    /// Inbound firewall: traffic from outside is dropped unless a rule allows it
    /// (replies to established connections are always allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub firewall: Vec<FirewallRule>,
    /// MTU of the guests' interfaces (576-9000); defaults to 1450 on VXLAN
    /// (a 1500-byte underlay minus the 50 bytes of encapsulation) and 1500 on
    /// a VLAN (the tag travels in the uplink's frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 9000))]
    pub mtu: Option<u32>,
}

fn default_true() -> bool {
    true
}

impl NetworkGroupSpec {
    /// The Sites the group spans: its home Site, then `sites`. Its
    /// segment id is its own at every one of them, and its nodes run only
    /// there.
    pub fn span(&self) -> Vec<&str> {
        let mut out = vec![self.home_site.0.as_str()];
        for s in &self.sites {
            if !out.contains(&s.0.as_str()) {
                out.push(s.0.as_str());
            }
        }
        out
    }

    /// The router's address on the group: `gateway`, or the first host
    /// address of `cidr`.
    pub fn gateway_address(&self) -> Ipv4Addr {
        self.gateway.unwrap_or_else(|| self.cidr.first_host())
    }

    /// The guests' MTU: `mtu`, or the segment type's default.
    pub fn mtu_or_default(&self) -> u32 {
        self.mtu.unwrap_or_else(|| default_mtu(self.segment.type_))
    }

    /// The dynamic DHCP pool, when both ends are given.
    pub fn dhcp_range(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        let d = self.dhcp.as_ref()?;
        Some((d.range_start?, d.range_end?))
    }
}

/// The MTU guests get when the spec gives none: on VXLAN a 1500-byte
/// underlay minus the 50 bytes of encapsulation; on a VLAN the tag travels
/// in the uplink's own frame, so the full 1500.
pub fn default_mtu(kind: SegmentType) -> u32 {
    match kind {
        SegmentType::Vxlan => 1450,
        SegmentType::Vlan => 1500,
    }
}

/// The segment of a NetworkGroup; `id` is allocated from the Site's range when omitted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "self.type != 'vlan' || !has(self.id) || (self.id >= 1 && self.id <= 4094)"
).message("segment.id must be a VLAN id between 1 and 4094").field_path(".id"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.type != 'vxlan' || !has(self.id) || (self.id >= 1 && self.id <= 16777215)"
).message("segment.id must be a VXLAN VNI between 1 and 16777215").field_path(".id"))]
#[x_kube(validation = kube::core::Rule::new("self.type == oldSelf.type")
    .message("segment.type is immutable").field_path(".type"))]
#[x_kube(validation = kube::core::Rule::new("!has(oldSelf.id) || (has(self.id) && self.id == oldSelf.id)")
    .message("segment.id cannot change once set").field_path(".id"))]
pub struct SegmentSpec {
    /// `vlan` or `vxlan`.
    #[serde(rename = "type")]
    pub type_: SegmentType,
    /// VLAN id (1-4094) or VNI (1-16777215); allocated from the home Site's range when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

/// DHCP settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DhcpSpec {
    /// Serve DHCP on the group (default `true`). Nodes always get static leases
    /// for their allocated addresses.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// First address of the dynamic pool (inside cidr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub range_start: Option<Ipv4Addr>,
    /// Last address of the dynamic pool (inside cidr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub range_end: Option<Ipv4Addr>,
    /// Lease time in seconds (60-604800, default 3600).
    #[serde(default = "default_lease")]
    #[schemars(range(min = 60, max = 604800))]
    pub lease_seconds: u32,
    /// IPv4 DNS servers announced to guests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 15}))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, isIP(a) && ip(a).family() == 4)").message("dhcp.dnsServers must be IPv4 addresses"))]
    pub dns_servers: Vec<Ipv4Addr>,
}

fn default_lease() -> u32 {
    3600
}

/// A public IP mapped 1:1 to a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicIpMapping {
    /// The public address (inside the home Site's pool); allocated when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    #[x_kube(validation = kube::core::Rule::new("isIP(self) && ip(self).family() == 4")
        .message("publicIPs[].address must be an IPv4 address"))]
    pub address: Option<Ipv4Addr>,
    /// The VirtualNode (same namespace) it maps to.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub node: String,
}

/// Protocol of a firewall rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

/// Which nodes a firewall rule opens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FirewallTarget {
    /// Only frontends.
    #[default]
    Frontend,
    /// Every node with a public IP.
    All,
}

/// Allow inbound traffic from outside to nodes with public IPs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.protocol != 'icmp' || !has(self.ports)")
    .message("firewall[].ports cannot be given for icmp").field_path(".ports"))]
pub struct FirewallRule {
    /// `tcp`, `udp` or `icmp`.
    pub protocol: Protocol,
    /// A port (`22`) or range (`8000-8080`), for tcp and udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 11),
        regex(pattern = "^([1-9][0-9]{0,4})(-[1-9][0-9]{0,4})?$")
    )]
    #[x_kube(validation = kube::core::Rule::new(
        "self.split('-').all(p, int(p) <= 65535) && (size(self.split('-')) == 1 || int(self.split('-')[0]) <= int(self.split('-')[1]))"
    ).message("firewall[].ports must be a port 1-65535 or an ascending range such as 8000-8080"))]
    pub ports: Option<String>,
    /// Source networks allowed (IPv4 CIDRs); default anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 18}))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, isCIDR(c) && cidr(c).ip().family() == 4)").message("firewall[].from must be IPv4 CIDRs such as 192.0.2.0/24"))]
    pub from: Vec<Ipv4Net>,
    /// `Frontend` (default) or `All` nodes with public IPs.
    #[serde(default)]
    pub to: FirewallTarget,
}

/// Observed state of a NetworkGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkGroupStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled`.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The segment in use (given or allocated): its type and id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    /// The gateway address in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Where the group's router runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterPlacement>,
    /// Address and MAC allocated to each node; persisted before use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["node".into()]))]
    pub allocations: Vec<AddressAllocation>,
    /// Public IPs in use and the node each maps to.
    #[serde(default, rename = "publicIPs", skip_serializing_if = "Vec::is_empty")]
    pub public_ips: Vec<PublicIpStatus>,
    /// Hosts the segment spans (those with members or the router) and their
    /// underlay addresses: each host's VXLAN device floods to the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<SegmentHost>,
    /// MTU of the guests' interfaces on this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The WAN tunnel ends of the Sites the group spans (each Site's
    /// `gateway.wanEndpoint`), when it spans more than one: the active
    /// gateway host of each of these Sites stretches the segment to the
    /// others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<TunnelEnd>,
}

/// One Site's end of a group's WAN tunnels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelEnd {
    /// The Site.
    pub site: String,
    /// Its `gateway.wanEndpoint` address.
    pub address: Ipv4Addr,
    /// Its UDP port.
    pub port: u16,
    /// The Site's `tunnel.bandwidthMbps`: a tunnel between two Sites is
    /// capped at the smaller of theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u32>,
    /// The host holding the end (the Site's `status.activeGateway`). None
    /// while the Site has no Ready gateway host (the Site lost): the other
    /// Sites close their tunnels to it — nothing sent to the end, nothing
    /// from it accepted — until one is Ready again. A returning host is
    /// Ready only after it removed the domains of nodes that restarted
    /// elsewhere, so nothing runs twice on the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The Site's `tunnel.encryption` (the same at every end of a group).
    #[serde(default, skip_serializing_if = "crate::site::Encryption::is_none")]
    pub encryption: crate::site::Encryption,
    /// With `encryption: wireguard`: the holder's WireGuard public key (its
    /// Host's `status.wireguardPublicKey`). An encrypted end without one (the
    /// holder's kernel has no WireGuard) is closed like an end without a
    /// holder: never a plaintext tunnel instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// A host the segment spans.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentHost {
    /// Host name.
    pub name: String,
    /// Its underlay address (VXLAN tunnel endpoint).
    pub underlay: Ipv4Addr,
    /// Its Site: hosts flood only to the hosts of their own Site; the
    /// Sites' gateways carry the segment between Sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Where a group's router runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterPlacement {
    /// Host running the router namespace.
    pub host: String,
    /// Site of that host.
    pub site: String,
    /// The router's own address on the Site's external network (from the
    /// Site's public pool): egress traffic is masqueraded to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
}

/// One node's address on the group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressAllocation {
    /// VirtualNode name.
    pub node: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its MAC address.
    pub mac: MacAddr,
    /// `frontend` or `worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
}

/// A public IP in use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicIpStatus {
    /// The public address.
    pub address: Ipv4Addr,
    /// The VirtualNode it maps to.
    pub node: String,
}
