//! Host: one hypervisor host, registered and kept alive by its agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Resources};

/// A hypervisor host, registered by its agent. The controller marks it
/// NotReady when its heartbeat stops for the Site's grace period.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "Host",
    status = "HostStatus",
    shortname = "yhost",
    category = "yukumo",
    doc = "A hypervisor host (internal: registered by its agent).",
    printcolumn = r#"{"name":"Site","type":"string","jsonPath":".spec.site"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"CPU","type":"integer","jsonPath":".status.allocatable.cpu"}"#,
    printcolumn = r#"{"name":"Memory MiB","type":"integer","jsonPath":".status.allocatable.memoryMiB"}"#,
    printcolumn = r#"{"name":"Gateway","type":"boolean","jsonPath":".spec.gateway","priority":1}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.lastHeartbeatTime"}"#,
    selectable = ".spec.site"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.site == oldSelf.site")
    .message("site of a Host is immutable: re-register the host under a new name").field_path(".site"))]
pub struct HostSpec {
    /// The Site this host belongs to (immutable).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub site: String,
    /// Whether the host can run routers and frontends with public IPs (it is
    /// attached to the Site's external network).
    #[serde(default)]
    pub gateway: bool,
    /// New VMs are placed here only when `true` (default); set `false` to cordon.
    #[serde(default = "default_true")]
    pub schedulable: bool,
    /// Interface carrying the segments (VLAN trunk / VXLAN underlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub uplink: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Network features the host's kernel offers, probed by its agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostCapabilities {
    /// 802.1Q VLAN sub-interfaces.
    #[serde(default, rename = "vlan8021q")]
    pub vlan_8021q: bool,
    /// VXLAN devices.
    #[serde(default)]
    pub vxlan: bool,
    /// WireGuard devices.
    #[serde(default)]
    pub wireguard: bool,
    /// Linux bridges.
    #[serde(default)]
    pub bridge: bool,
    /// libvirt advertises KVM domains and /dev/kvm exists. (Whether QEMU can
    /// really use KVM is only known when a guest starts; without it guests run
    /// under TCG software emulation.)
    #[serde(default)]
    pub kvm: bool,
    /// What each probe found, for operators reading why a feature is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Observed state of a Host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (controller: heartbeat fresh and agent healthy) and the agent's
    /// own `HypervisorReady`.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Physical capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Resources>,
    /// What VMs may use (capacity minus the host's reserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Resources>,
    /// Underlay addresses (VXLAN/tunnel endpoints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::Ipv4Addr>,
    /// The interface facing the WAN (agent `--wan-interface`): a gateway
    /// host with one may hold its Site's `gateway.wanEndpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan_interface: Option<String>,
    /// The WireGuard public key (base64) of a gateway host whose kernel has
    /// WireGuard: the key of its tunnel device, which the peers of its
    /// Site's encrypted tunnels authenticate it by while it holds the
    /// endpoint. Its private key stays in the agent's state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// While it holds its Site's WAN endpoint: the tunnel to each peer
    /// Site's endpoint, as this host measures it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<crate::site::TunnelStatus>,
    /// Kernel networking capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<HostCapabilities>,
    /// Last time the agent reported in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// libvirt version and hypervisor driver, e.g. `libvirt 9.0.0 / QEMU (tcg)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    /// Kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The storage pools this host holds, as last seen (written by the agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_pools: Vec<crate::site::PoolStatus>,
}
