//! Site: a location with hypervisor hosts, public IPs and WAN tunnels.

use std::net::Ipv4Addr;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Resources, SecretReference, SizeClass};
use crate::net::{AddressRange, Ipv4Net, SegmentType};

/// A location with hypervisor hosts: its public IP pool, segment id ranges,
/// its gateway's WAN endpoint and the settings of tunnels to other Sites.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "Site",
    status = "SiteStatus",
    shortname = "ysite",
    category = "yukumo",
    doc = "A location with hypervisor hosts, a public IP pool, segment ranges and WAN tunnel settings.",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".status.hostsReady","description":"ready/registered hosts"}"#,
    printcolumn = r#"{"name":"CPU","type":"integer","jsonPath":".status.allocatable.cpu","description":"allocatable CPUs"}"#,
    printcolumn = r#"{"name":"Memory MiB","type":"integer","jsonPath":".status.allocatable.memoryMiB","description":"allocatable memory"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63").message("metadata.name must be at most 63 characters (a DNS label)")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.sizeClasses) || self.sizeClasses.all(c, self.sizeClasses.exists_one(d, d.name == c.name))"
).message("sizeClasses[].name must be unique").field_path(".sizeClasses"))]
pub struct SiteSpec {
    /// Free-form description, e.g. the location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub description: Option<String>,
    /// Public addresses the Site may hand out: CIDRs (`203.0.113.0/28`) or
    /// ranges (`203.0.113.10-203.0.113.20`).
    #[serde(
        default,
        rename = "publicIPPool",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 31}))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(r, (isCIDR(r) && cidr(r).ip().family() == 4) || (size(r.split('-')) == 2 && isIP(r.split('-')[0]) && ip(r.split('-')[0]).family() == 4 && isIP(r.split('-')[1]) && ip(r.split('-')[1]).family() == 4))"
    ).message("publicIPPool entries must be IPv4 CIDRs (203.0.113.0/28) or address ranges (203.0.113.10-203.0.113.20)"))]
    pub public_ip_pool: Vec<AddressRange>,
    /// The external network the public IPs live on (where routers attach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_network: Option<ExternalNetwork>,
    /// VLAN ids this Site allocates to NetworkGroups (within 1-4094).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.end <= 4094")
        .message("vlanRange.end must be at most 4094").field_path(".end"))]
    pub vlan_range: Option<IdRange>,
    /// VXLAN VNIs this Site allocates to NetworkGroups (default
    /// 1000-999999, see `DEFAULT_VNI_RANGE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.end <= 16777215")
        .message("vniRange.end must be at most 16777215").field_path(".end"))]
    pub vni_range: Option<IdRange>,
    /// The Site gateway's WAN endpoint for tunnels, `address` or `address:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SiteGateway>,
    /// Settings of the WAN tunnels to other Sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSettings>,
    /// Secret holding the Site's credentials (e.g. tunnel keys), read only by agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
    /// Named VM sizes; these override the built-in classes of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub size_classes: Vec<SizeClass>,
    /// Seconds without a heartbeat after which a Host of this Site is NotReady
    /// (5-3600, default 40).
    #[serde(default = "default_grace")]
    #[schemars(range(min = 5, max = 3600))]
    pub host_grace_seconds: u32,
    /// Storage pools at this Site, declared by the fleet's operator; a
    /// Volume names one (`spec.pool`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(p, self.exists_one(q, q.name == p.name))")
        .message("storagePools[].name must be unique"))]
    pub storage_pools: Vec<StoragePool>,
    /// Which namespaces may use the Site: place nodes there, take its
    /// public IPs and segment ids (a NetworkGroup homed there) and keep
    /// Volumes in its pools. Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<SiteAccess>,
}

/// Who may use a Site.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteAccess {
    /// The namespaces whose labels match (`{}` matches every namespace).
    pub namespace_selector: NamespaceSelector,
}

/// A label selector over namespaces, as Kubernetes' LabelSelector: every
/// `matchLabels` pair and every expression must hold.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub match_labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelRequirement>,
}

/// One requirement of a [`NamespaceSelector`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)"
).message("values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist").field_path(".values"))]
pub struct LabelRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: LabelOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub values: Vec<String>,
}

/// How a [`LabelRequirement`] compares.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl NamespaceSelector {
    /// Whether a namespace with `labels` matches.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    LabelOperator::In => v.is_some_and(|v| r.values.contains(v)),
                    LabelOperator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    LabelOperator::Exists => v.is_some(),
                    LabelOperator::DoesNotExist => v.is_none(),
                }
            })
    }
}

impl Site {
    /// Whether namespace `ns` (with `labels`) may use this Site; else the
    /// reason, naming the Site and its selector.
    pub fn admits(
        &self,
        ns: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        match &self.spec.access {
            Some(a) if !a.namespace_selector.matches(labels) => Err(format!(
                "namespace {ns} may not use Site {:?}: its labels do not match the Site's spec.access.namespaceSelector {}",
                self.metadata.name.as_deref().unwrap_or(""),
                serde_json::to_string(&a.namespace_selector).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }
}

/// A storage pool: where a Site's Volumes live.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(self.type == 'rbd') == has(self.ceph)"
).message("ceph is required with type rbd, and only allowed with it").field_path(".ceph"))]
#[x_kube(validation = kube::core::Rule::new(
    "self.type != 'rbd' || !has(self.path)"
).message("path is a folder of dir and iscsi pools; an rbd pool's images live in its Ceph pool").field_path(".path"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.lvm) || self.type == 'iscsi'"
).message("lvm backs an iscsi pool's volumes with logical volumes; it is only allowed with type iscsi").field_path(".lvm"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.lvm) || !has(self.path)"
).message("path is the folder of a file-backed pool; an lvm-backed pool's volumes are logical volumes of its volume group").field_path(".path"))]
pub struct StoragePool {
    /// Pool name (DNS label), e.g. `default`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Backend: `dir` (qcow2 files in a folder of one host; a VM using a
    /// volume of it runs on that host), `iscsi` (raw files in a folder of
    /// one host, or logical volumes of its volume group with `lvm`, each
    /// exported by that host's iSCSI target and attached by QEMU's own
    /// initiator on any host of the Site) or `rbd` (images in a
    /// Ceph pool, attached by QEMU's librbd on any host of the Site).
    #[serde(rename = "type")]
    pub type_: PoolType,
    /// The Host holding the pool's storage (`rbd`: the Host whose agent
    /// creates, grows, copies and deletes the pool's images).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub host: String,
    /// Folder holding the pool's files (absolute); default `<agent state
    /// dir>/pools/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1024), regex(pattern = "^/"))]
    pub path: Option<String>,
    /// The Ceph pool of an `rbd` pool (required with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephPool>,
    /// An `iscsi` pool backed by LVM instead of files: each volume (and
    /// snapshot) is a logical volume of this volume group on the pool's
    /// host, exported by its iSCSI target as a block device. The volume
    /// group is the fleet operator's (it may hold other logical volumes:
    /// yukumo touches only those tagged `yukumo`); the pool's capacity and
    /// free space are the group's. Volume sizes must be multiples of the
    /// group's extent size (refused with a condition otherwise), so that a
    /// guest sees exactly the size asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<LvmPool>,
}

/// The LVM volume group holding an `iscsi` pool's volumes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LvmPool {
    /// The volume group's name on the pool's host (e.g. `yukumo`).
    #[schemars(
        length(min = 1, max = 127),
        regex(pattern = "^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
    )]
    pub volume_group: String,
}

/// A Ceph pool holding an `rbd` pool's images. Every agent of the Site
/// that runs a VM with one of its volumes needs the user's key
/// (`--ceph-keyring`, a Ceph keyring file); one Ceph pool per yukumo pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CephPool {
    /// Monitor addresses, `address:port` (v1 protocol, e.g. `10.0.0.5:6789`).
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = "^[^\\s:,/]+:[0-9]{1,5}$"))
    )]
    pub monitors: Vec<String>,
    /// The Ceph pool's name.
    #[schemars(length(min = 1, max = 128), regex(pattern = "^[A-Za-z0-9_.-]+$"))]
    pub pool: String,
    /// The Ceph user (without `client.`), e.g. `yukumo`; its capabilities
    /// should be `profile rbd` on the pool and the monitors.
    #[schemars(length(min = 1, max = 128), regex(pattern = "^[A-Za-z0-9_.-]+$"))]
    pub user: String,
}

impl CephPool {
    /// The name of the libvirt secret (usage type `ceph`) holding the
    /// user's key on every host.
    pub fn secret_usage(&self) -> String {
        ceph_secret_usage(&self.user)
    }
}

/// The usage name of the libvirt secret holding Ceph user `user`'s key.
pub fn ceph_secret_usage(user: &str) -> String {
    format!("yukumo-ceph-client.{user}")
}

/// A storage pool's backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    /// qcow2 files in a folder of one host, through libvirt's `dir` pool.
    Dir,
    /// Raw files in a folder of one host (libvirt's `dir` pool), each
    /// exported as an iSCSI target (one LUN) by that host's userspace
    /// target (tgt); VMs on any host of the Site attach it with QEMU's
    /// iSCSI initiator. The host's agent needs `--iscsi-portal`.
    Iscsi,
    /// Images in a Ceph pool (`ceph`), reached by QEMU's librbd from any
    /// host of the Site; the pool's host's agent manages them.
    Rbd,
}

impl PoolType {
    /// Whether a VM on any host of the Site can use the pool's volumes
    /// (else only on the pool's host).
    pub fn networked(self) -> bool {
        matches!(self, PoolType::Iscsi | PoolType::Rbd)
    }
}

impl SiteSpec {
    /// The pool named `name`.
    pub fn storage_pool(&self, name: &str) -> Option<&StoragePool> {
        self.storage_pools.iter().find(|p| p.name == name)
    }
}

/// A storage pool as its host's agent last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Host holding it.
    pub host: String,
    /// Size of the file system or device holding it, in bytes.
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Free space, in bytes.
    #[serde(default)]
    pub available_bytes: u64,
    /// Capacity promised to the pool's volumes (their sizes), in bytes.
    #[serde(default)]
    pub provisioned_bytes: u64,
    /// yukumo volumes in it.
    #[serde(default)]
    pub volumes: u32,
    /// Why the pool cannot be used, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn default_grace() -> u32 {
    40
}

/// The VNIs a Site without a `vniRange` allocates from.
pub const DEFAULT_VNI_RANGE: IdRange = IdRange {
    start: 1000,
    end: 999_999,
};

impl SiteSpec {
    /// The ids this Site allocates for `kind`: its `vlanRange` (VLAN ids
    /// must match the trunks, so there is no default), or its `vniRange`,
    /// else [`DEFAULT_VNI_RANGE`].
    pub fn segment_range(&self, kind: SegmentType) -> Option<IdRange> {
        match kind {
            SegmentType::Vlan => self.vlan_range,
            SegmentType::Vxlan => Some(self.vni_range.unwrap_or(DEFAULT_VNI_RANGE)),
        }
    }

    /// Whether `ip` is in the Site's public pool.
    pub fn in_public_pool(&self, ip: Ipv4Addr) -> bool {
        self.public_ip_pool.iter().any(|r| r.contains(ip))
    }
}

/// The network public IPs are routed on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.gateway) || (isIP(self.gateway) && isCIDR(self.cidr) && cidr(self.cidr).containsIP(self.gateway))"
).message("externalNetwork.gateway must be an address inside externalNetwork.cidr").field_path(".gateway"))]
pub struct ExternalNetwork {
    /// IPv4 CIDR of the external network.
    #[x_kube(validation = kube::core::Rule::new("isCIDR(self) && cidr(self).ip().family() == 4").message("externalNetwork.cidr must be an IPv4 CIDR"))]
    #[schemars(length(max = 18))]
    pub cidr: Ipv4Net,
    /// Upstream gateway on that network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub gateway: Option<Ipv4Addr>,
    /// Host interface (or bridge) attached to the external network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub interface: Option<String>,
}

/// An inclusive range of segment ids.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.end >= self.start")
    .message("end must not be below start").field_path(".end"))]
pub struct IdRange {
    /// First id.
    #[schemars(range(min = 1, max = 16777215))]
    pub start: u32,
    /// Last id (inclusive).
    #[schemars(range(min = 1, max = 16777215))]
    pub end: u32,
}

/// A Site's WAN gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteGateway {
    /// WAN endpoint: an IPv4 address, optionally with `:port` (default
    /// 4790, [`WAN_PORT`]). The Site's active gateway host holds the
    /// address on its WAN interface (it moves to another gateway host when
    /// that one is lost) and the tunnels to other Sites' gateways use it.
    #[x_kube(validation = kube::core::Rule::new(
        "(isIP(self) && ip(self).family() == 4) || (size(self.split(':')) == 2 && isIP(self.split(':')[0]) && ip(self.split(':')[0]).family() == 4 && self.split(':')[1].matches('^[0-9]{1,5}$') && int(self.split(':')[1]) > 0 && int(self.split(':')[1]) <= 65535)"
    ).message("gateway.wanEndpoint must be an IPv4 address, optionally with :port"))]
    #[x_kube(validation = kube::core::Rule::new(
        "size(self.split(':')) != 2 || self.split(':')[1] != '4789'"
    ).message("gateway.wanEndpoint: port 4789 carries the segments between a Site's own hosts; give the WAN tunnels another (default 4790)"))]
    #[schemars(length(max = 64), regex(pattern = "^[0-9a-fA-F.:]+$"))]
    pub wan_endpoint: String,
}

/// The UDP port of the WAN tunnels when `gateway.wanEndpoint` gives none.
pub const WAN_PORT: u16 = 4790;

impl SiteGateway {
    /// The endpoint's address and port (the default port when none is
    /// given); `None` when it is not an IPv4 address with a port 1-65535
    /// (the schema refuses such endpoints).
    pub fn endpoint(&self) -> Option<std::net::SocketAddrV4> {
        let s = self.wan_endpoint.trim();
        match s.split_once(':') {
            None => Some(std::net::SocketAddrV4::new(s.parse().ok()?, WAN_PORT)),
            Some((a, p)) => {
                let port: u16 = p.parse().ok().filter(|p| *p != 0)?;
                Some(std::net::SocketAddrV4::new(a.parse().ok()?, port))
            }
        }
    }
}

/// Tunnel encryption.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// Plain VXLAN over the WAN (trusted links only).
    #[default]
    None,
    /// WireGuard between the gateways (needs kernel support on the gateway
    /// hosts): the group's VXLAN runs inside it, and the endpoint's port is
    /// WireGuard's.
    Wireguard,
}

impl Encryption {
    pub fn is_none(&self) -> bool {
        *self == Encryption::None
    }
}

/// Settings of a Site's WAN tunnels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSettings {
    /// Bandwidth cap per tunnel in Mbit/s (1-100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub bandwidth_mbps: Option<u32>,
    /// MTU of the tunnel underlay (1280-9000, default 1500).
    #[serde(default = "default_mtu")]
    #[schemars(range(min = 1280, max = 9000))]
    pub mtu: u32,
    /// `none` (default) or `wireguard`.
    #[serde(default)]
    pub encryption: Encryption,
}

fn default_mtu() -> u32 {
    1500
}

/// Observed state of a Site.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (at least one Host ready), `Reconciling`, `Stalled`.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Registered Hosts.
    #[serde(default)]
    pub hosts: i32,
    /// Ready Hosts.
    #[serde(default)]
    pub ready_hosts: i32,
    /// Ready over registered hosts, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts_ready: Option<String>,
    /// Names of the registered Hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_names: Vec<String>,
    /// Total capacity of ready Hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// Total allocatable resources of ready Hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Resources>,
    /// The gateway host holding `spec.gateway.wanEndpoint` (the Site's end
    /// of every WAN tunnel): a Ready gateway host with a WAN interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_gateway: Option<String>,
    /// State of the tunnel to each peer Site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
    /// Each storage pool as its host reports it (capacity and free space).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_pools: Vec<PoolStatus>,
}

/// A tunnel to a peer Site.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Peer Site name.
    pub site: String,
    pub state: TunnelState,
    /// The gateway host measuring it (this Site's endpoint holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The peer's WAN endpoint address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// Round trip to the peer's endpoint (ICMP echo), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Tunnel bytes received from the peer (outer packets).
    #[serde(default)]
    pub rx_bytes: u64,
    /// Tunnel bytes sent to the peer.
    #[serde(default)]
    pub tx_bytes: u64,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Detail, e.g. why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The state of a tunnel to a peer Site.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TunnelState {
    /// Its endpoint answers.
    Up,
    /// Its endpoint does not answer.
    Down,
    /// Not measured yet.
    #[default]
    Pending,
}

/// A tunnel as the gateway host holding its Site's endpoint measures it
/// (in `Host.status.tunnels`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    /// The peer Site.
    pub site: String,
    /// Its endpoint address.
    pub address: std::net::Ipv4Addr,
    pub state: TunnelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    /// When `state` last changed.
    pub last_change: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: LabelOperator, values: &[&str]) -> LabelRequirement {
        LabelRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn namespace_selectors_match_like_label_selectors() {
        let any = NamespaceSelector::default();
        assert!(any.matches(&labels(&[])));
        let lab = NamespaceSelector {
            match_labels: labels(&[("team", "lab")]),
            match_expressions: vec![
                req("tier", LabelOperator::In, &["gold", "silver"]),
                req("banned", LabelOperator::DoesNotExist, &[]),
                req("env", LabelOperator::NotIn, &["prod"]),
                req("owner", LabelOperator::Exists, &[]),
            ],
        };
        let ok = labels(&[("team", "lab"), ("tier", "gold"), ("owner", "x")]);
        assert!(lab.matches(&ok));
        let mut no = ok.clone();
        no.insert("team".into(), "other".into());
        assert!(!lab.matches(&no));
        let mut no = ok.clone();
        no.insert("tier".into(), "bronze".into());
        assert!(!lab.matches(&no));
        let mut no = ok.clone();
        no.insert("banned".into(), "".into());
        assert!(!lab.matches(&no));
        let mut no = ok.clone();
        no.insert("env".into(), "prod".into());
        assert!(!lab.matches(&no));
        let mut no = ok.clone();
        no.remove("owner");
        assert!(!lab.matches(&no));
    }

    #[test]
    fn a_site_without_access_admits_every_namespace() {
        let mut site = Site::new(
            "lab",
            serde_json::from_value(serde_json::json!({})).unwrap(),
        );
        assert!(site.admits("a", &labels(&[])).is_ok());
        site.spec.access = Some(SiteAccess {
            namespace_selector: NamespaceSelector {
                match_labels: labels(&[("yukumo.io/site-lab", "true")]),
                match_expressions: vec![],
            },
        });
        let e = site.admits("team-b", &labels(&[])).unwrap_err();
        assert!(
            e.contains("namespace team-b") && e.contains("\"lab\""),
            "{e}"
        );
        assert!(
            site.admits("team-a", &labels(&[("yukumo.io/site-lab", "true")]))
                .is_ok()
        );
    }
}
