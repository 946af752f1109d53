//! VirtualCluster: the unit users ask for — a frontend and named node pools.

use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, ImageSource, NodeSize};
use crate::virtualnode::{NodePhase, NodeRole};

/// A virtual cluster: a frontend VM (gateway role, optional public IP, ssh
/// entry point) and named pools of worker VMs, on one NetworkGroup, placed on
/// the hypervisor hosts of one or more Sites.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "VirtualCluster",
    namespaced,
    status = "VirtualClusterStatus",
    shortname = "vc",
    category = "yukumo",
    doc = "A virtual cluster: a frontend VM and pools of worker VMs on a private network.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","jsonPath":".status.ready","description":"ready/desired nodes"}"#,
    printcolumn = r#"{"name":"Running","type":"boolean","jsonPath":".spec.running"}"#,
    printcolumn = r#"{"name":"Frontend","type":"string","jsonPath":".status.frontend.address"}"#,
    printcolumn = r#"{"name":"Public IP","type":"string","jsonPath":".status.frontend.publicIP"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","priority":1,"jsonPath":".status.revision","description":"the revision the spec asks for"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","priority":1,"jsonPath":".status.updatedNodes","description":"nodes at that revision"}"#,
    printcolumn = r#"{"name":"Guarantee","type":"string","priority":1,"jsonPath":".status.guarantee.basis","description":"how its capacity is guaranteed"}"#,
    printcolumn = r#"{"name":"Until","type":"string","format":"date-time","priority":1,"jsonPath":".status.guarantee.until","description":"end of the guarantee (empty: while the cluster exists)"}"#,
    validation = kube::core::Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: node names and hostnames are derived from it")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.pools) || self.pools.all(p, self.pools.exists_one(q, q.name == p.name))"
).message("spec.pools: pool names must be unique").field_path(".pools"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.pools) || self.pools.all(p, p.name != 'frontend')"
).message("spec.pools: a pool may not be named 'frontend'").field_path(".pools"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.stoppedNodes) || self.stoppedNodes.all(n, n == 'frontend' || (has(self.pools) && self.pools.exists(p, n.startsWith(p.name + '-') && n.substring(size(p.name) + 1).matches('^[0-9]+$') && int(n.substring(size(p.name) + 1)) < p.replicas)))"
).message("spec.stoppedNodes: each entry must name a node of this cluster, 'frontend' or POOL-INDEX with INDEX below that pool's replicas (scaling a pool down drops its stopped entries in the same change)").field_path(".stoppedNodes"))]
pub struct VirtualClusterSpec {
    /// Name of the NetworkGroup (same namespace) the cluster's nodes attach to.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub network_group: String,
    /// The frontend node: gateway role, ssh entry point, optional public IP.
    pub frontend: FrontendSpec,
    /// Named pools of worker nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub pools: Vec<NodePool>,
    /// SSH public keys installed for the default user on every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ssh_keys: Vec<SshKey>,
    /// Power state: `true` (default) runs every node, `false` stops them all
    /// and keeps their disks. A reservation overrides this outside its window.
    /// Without a reservation, stopped nodes hold no capacity: started
    /// again, each starts on its host if there is room there (else it waits,
    /// `Unschedulable`; one booting from a network Volume is placed again
    /// elsewhere).
    #[serde(default = "default_true")]
    pub running: bool,
    /// Nodes stopped one by one while the rest of the cluster runs (their
    /// disks kept, their room given back like any stopped node's): each is
    /// `frontend` or `POOL-INDEX` (e.g. `worker-2`, the node
    /// `<cluster>-worker-2`) of a node the spec has, so a pool scaled below
    /// a listed index must drop it in the same change. Removing an entry
    /// starts that node again. With the frontend listed, workers start
    /// without waiting for it (`startOrder` orders a frontend that runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub stopped_nodes: Vec<StoppedNode>,
    /// Optional reservation: a start/end time and/or recurring weekly windows
    /// during which the cluster runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
    /// Start order of roles: `FrontendFirst` (default; workers start once the
    /// frontend is running) or `Parallel`.
    #[serde(default)]
    pub start_order: StartOrder,
    /// What happens to nodes on a host that is lost: `RestartElsewhere`
    /// (default; volatile nodes are recreated on another host) or `Wait` for
    /// the host to come back.
    #[serde(default)]
    pub recovery: RecoveryPolicy,
}

fn default_true() -> bool {
    true
}

/// A node of a VirtualCluster by its place in the spec: `frontend` or
/// `POOL-INDEX`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct StoppedNode(
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^(frontend|[a-z0-9]([-a-z0-9]*[a-z0-9])?-(0|[1-9][0-9]{0,3}))$")
    )]
    pub String,
);

/// An SSH public key in OpenSSH format, e.g. `ssh-ed25519 AAAA… user@host`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct SshKey(
    #[schemars(
        length(min = 16, max = 16384),
        regex(
            pattern = r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$"
        )
    )]
    pub String,
);

/// The frontend node of a VirtualCluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.publicIPAddress) || self.publicIP"
).message("frontend.publicIPAddress requires frontend.publicIP: true").field_path(".publicIPAddress"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.rootVolume) || !has(self.diskSize)"
).message("diskSize sizes the local boot disk; a rootVolume has its own size").field_path(".diskSize"))]
pub struct FrontendSpec {
    /// Size: cpu and memory, or a named size class.
    pub size: NodeSize,
    /// Boot disk image.
    pub image: ImageSource,
    /// Size of the boot disk (a copy-on-write overlay on the image); defaults to the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("diskSize must be a positive quantity such as 20Gi"))]
    pub disk_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// Site to place the frontend at; defaults to the NetworkGroup's home site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub site: Option<String>,
    /// Place the frontend on a gateway-capable host (default `true`).
    #[serde(default = "default_true")]
    pub gateway_host: bool,
    /// Give the frontend a public IP from the Site's pool.
    #[serde(default, rename = "publicIP")]
    pub public_ip: bool,
    /// A specific public IP to request (must be inside the Site's pool).
    #[serde(
        default,
        rename = "publicIPAddress",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 15))]
    #[x_kube(validation = kube::core::Rule::new("isIP(self) && ip(self).family() == 4")
        .message("publicIPAddress must be an IPv4 address"))]
    pub public_ip_address: Option<Ipv4Addr>,
    /// cloud-init user data for the frontend (at most 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// Boot from a Volume of its own instead of a local overlay (see
    /// `RootVolume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// Volumes (same namespace) attached to the frontend. Each gets a disk
    /// target from `vdc` on (allocated once, kept in the Volume's
    /// `status.attachedTo`) and the Volume's uid as serial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub volumes: Vec<VolumeAttachment>,
}

/// A named pool of identical worker nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.volumes) || size(self.volumes) == 0 || self.replicas <= 1"
).message("pools[].volumes: a volume attaches read-write to one node, so a pool with volumes may have at most 1 replica").field_path(".volumes"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.rootVolume) || !has(self.diskSize)"
).message("diskSize sizes the local boot disk; a rootVolume has its own size").field_path(".diskSize"))]
pub struct NodePool {
    /// Pool name (DNS label); nodes are named `<cluster>-<pool>-<index>`.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Number of nodes (0-1000). Scaling down removes the highest indexes first.
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Size: cpu and memory, or a named size class.
    pub size: NodeSize,
    /// Boot disk image; defaults to the frontend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Size of each node's boot disk overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("diskSize must be a positive quantity such as 20Gi"))]
    pub disk_size: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// Sites this pool may be placed at, in order of preference (empty: the
    /// NetworkGroup's home site). Nodes go to the first Site that can take
    /// them; a later one takes a node only when no host of the earlier ones
    /// can (full, cordoned, or the Site lost — with `recovery:
    /// RestartElsewhere`, the nodes of a lost Site restart at the next one).
    /// A running node is not moved back when an earlier Site returns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub sites: Vec<SiteName>,
    /// cloud-init user data for the pool's nodes (at most 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// Boot each node from a Volume of its own instead of a local overlay
    /// (see `RootVolume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// Volumes attached to the pool's node (only for pools of one replica).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub volumes: Vec<VolumeAttachment>,
    /// How many of the pool's nodes may be unavailable at once while it is
    /// rolled to a new revision (a change of `image`, `size`, `diskSize` or
    /// `userData`): outdated nodes are replaced one budget at a time — each
    /// deleted and made again under its name, address and hostname from the
    /// new revision — and the next only once the replacement runs and is
    /// ready. Nodes already unavailable are replaced first, without using
    /// the budget. Default 1. (No surge: a node's identity is its name and
    /// address, which its replacement takes over, so there is no spare
    /// node to start first.)
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_unavailable: u32,
    /// Power state of the pool's nodes: `false` stops them (disks kept,
    /// their room given back) while the rest of the cluster runs. The
    /// cluster's `running: false` stops every pool whatever this says.
    #[serde(default = "default_true")]
    pub running: bool,
}

fn default_max_unavailable() -> u32 {
    1
}

/// A node's boot disk as a Volume: `<node>-root` in the cluster's
/// namespace, made by the controller from the node's image (checksum
/// verified by the pool's host) and attached as `vda`. It outlives the VM:
/// with a network pool (`iscsi`, `rbd`), a node restarted elsewhere after a
/// host loss boots with its root file system as it was; with a `dir` pool the node is
/// pinned to the pool's host. Deleted with the cluster, or when its node is
/// removed (scaling down). Without it the boot disk is a copy-on-write
/// overlay on the node's host, lost with that host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootVolume {
    /// Storage pool of the boot volumes (one of the Site's `storagePools`).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pool: String,
    /// Size of each boot volume, at least the image's (grows online like
    /// any Volume's: edit the Volume).
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("rootVolume.size must be a positive quantity such as 20Gi"))]
    pub size: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
}

/// A Site name (cluster-scoped object, DNS label).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(transparent)]
pub struct SiteName(
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub String,
);

/// A Volume attached to a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachment {
    /// Name of a Volume in the same namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Attach read-only (the guest cannot write it). Any number of nodes,
    /// of any cluster of the namespace, may hold a Volume read-only at
    /// once, never while a node holds it read-write (either waits for the
    /// other, with a condition naming the holders). A `dir` pool's readers
    /// all run on its host; `iscsi` and `rbd` readers on any host.
    #[serde(default)]
    pub read_only: bool,
}

/// Order in which roles are started.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StartOrder {
    /// Start workers once the frontend runs (as the Rocks-style seeds did).
    #[default]
    FrontendFirst,
    /// Start every node at once.
    Parallel,
}

/// Handling of nodes whose host is lost.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RecoveryPolicy {
    /// Recreate the node on another host. Its root disk (an overlay on the
    /// host that was lost) is lost; Volumes of network pools (`iscsi`,
    /// `rbd`) and a `rootVolume` in one follow it. A
    /// node with a Volume of a `dir` pool is pinned to that pool's host: it
    /// waits for that host (Unschedulable, naming it) rather than starting
    /// elsewhere without its data.
    #[default]
    RestartElsewhere,
    /// Wait for the host to return.
    Wait,
}

/// When a reservation ends: stop the nodes (keeping disks) or delete the cluster's nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum EndAction {
    /// Power the nodes off, keep their disks.
    #[default]
    Stop,
    /// Delete the nodes and their disks (volumes are kept).
    Delete,
}

/// A reserved period, and/or weekly windows, during which the cluster runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.start) || !has(self.end) || timestamp(self.end) > timestamp(self.start)"
).message("reservation.end must be after reservation.start").field_path(".end"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.start) || has(self.end) || (has(self.weekly) && size(self.weekly) > 0)"
).message("a reservation needs a start, an end, or at least one weekly window"))]
pub struct Reservation {
    /// When the reservation begins (RFC 3339); nodes are created then. Capacity
    /// is guaranteed from here to `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Time>,
    /// When the reservation ends (RFC 3339); then `endAction` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
    /// What happens at `end`: `Stop` (default) or `Delete`.
    #[serde(default)]
    pub end_action: EndAction,
    /// Recurring weekly windows during which the cluster runs (e.g. a class
    /// on Mondays 09:00-12:00). Outside them the cluster is stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub weekly: Vec<WeeklyWindow>,
    /// IANA time zone of the weekly windows, e.g. `Europe/Berlin` (default `UTC`).
    #[serde(default = "default_tz")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = "^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
    )]
    pub time_zone: String,
}

fn default_tz() -> String {
    "UTC".into()
}

/// Day of the week.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A weekly window, e.g. `days: [Mon]`, `start: "09:00"`, `end: "12:00"`.
/// An end earlier than the start runs past midnight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.start != self.end")
    .message("weekly[].end must differ from weekly[].start").field_path(".end"))]
pub struct WeeklyWindow {
    /// Days on which the window starts.
    #[schemars(length(min = 1, max = 7))]
    #[x_kube(validation = kube::core::Rule::new("self.all(d, self.exists_one(e, e == d))")
        .message("weekly[].days must not repeat a day"))]
    pub days: Vec<Weekday>,
    /// Start time of day, `HH:MM` (24 h).
    #[schemars(regex(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// End time of day, `HH:MM` (24 h).
    #[schemars(regex(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
}

/// Observed state of a VirtualCluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualClusterStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled`, and kind-specific conditions.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Ready nodes over desired nodes, e.g. `3/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Number of nodes that are running and ready.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Number of nodes the spec asks for (frontend included).
    #[serde(default)]
    pub desired_nodes: i32,
    /// Per-node placement and state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSummary>,
    /// How to reach the frontend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendEndpoint>,
    /// The next scheduled power transition from the reservation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_transition: Option<Transition>,
    /// When the reservation's capacity (dated or weekly) was admitted:
    /// checked host by host against every placed node and the reservations
    /// admitted before it, at every instant its windows could peak. Once
    /// set, the guarantee holds: later reservations that would overbook are
    /// refused (`Ready=False`, `InsufficientCapacity`), and no node placed
    /// later may take what its windows need (`Unschedulable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_admitted_at: Option<Time>,
    /// The capacity the calendar guarantees the cluster, and until when
    /// (absent while nothing is guaranteed: a reservation not admitted, or
    /// a cluster with no node placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<Guarantee>,
    /// The revision the spec asks for: a hash of every node's template
    /// (image, size, boot disk size, user data). Nodes are rolled to it
    /// pool by pool within `maxUnavailable`; applying an earlier spec
    /// rolls back to its revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Nodes made from `revision` (the others are outdated, or being
    /// replaced).
    #[serde(default)]
    pub updated_nodes: i32,
    /// What the namespace's ResourceQuota granted the cluster (its spec's
    /// total when last granted; absent when no quota limits yukumo
    /// resources there). A growth the quota refuses keeps this grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<QuotaGrant>,
}

/// Amounts granted by a namespace's quota.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaGrant {
    pub cpu: u64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub nodes: u64,
}

/// One node of a cluster, as seen in the cluster's status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    /// VirtualNode name.
    pub name: String,
    /// `frontend` or `worker`.
    pub role: NodeRole,
    /// Host it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Site of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Private IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Where the node is: its VM's phase, or why it has no VirtualNode yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<NodeState>,
}

impl NodeSummary {
    /// A node of `role` that has no VirtualNode yet, and why.
    pub fn waiting(name: String, role: NodeRole, why: NodeState) -> NodeSummary {
        NodeSummary {
            name,
            role,
            host: None,
            site: None,
            ip: None,
            phase: Some(why),
        }
    }
}

/// A node's state as its cluster reports it: the phase of its VM, or why
/// its VirtualNode does not exist yet.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeState {
    /// Not yet placed on a host.
    Pending,
    /// Placed; the agent is preparing disks and the domain.
    Provisioning,
    /// The domain runs.
    Running,
    /// The domain is defined but shut off.
    Stopped,
    /// The agent could not realise the node.
    Failed,
    /// Being removed from its host.
    Terminating,
    /// A worker waiting for the frontend to run (`startOrder: FrontendFirst`).
    WaitingForFrontend,
    /// Waiting for its NetworkGroup to allocate it an address.
    WaitingForAddress,
    /// Waiting for a Volume of it (see the cluster's conditions).
    WaitingForVolume,
}

impl From<NodePhase> for NodeState {
    fn from(p: NodePhase) -> NodeState {
        match p {
            NodePhase::Pending => NodeState::Pending,
            NodePhase::Provisioning => NodeState::Provisioning,
            NodePhase::Running => NodeState::Running,
            NodePhase::Stopped => NodeState::Stopped,
            NodePhase::Failed => NodeState::Failed,
            NodePhase::Terminating => NodeState::Terminating,
        }
    }
}

/// How to reach a cluster's frontend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendEndpoint {
    /// Private address on the NetworkGroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// Public address, when one is assigned.
    #[serde(default, rename = "publicIP", skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// An ssh command line that reaches the frontend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
}

/// The capacity guaranteed to a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Guarantee {
    /// How it is held: `Placed` (no reservation: its placed nodes hold their
    /// hosts), `Reservation` (a dated reservation admitted for its window),
    /// `Weekly` (admitted at each weekly window; outside them its stopped
    /// nodes hold nothing, and their hosts are held for them at the next).
    pub basis: GuaranteeBasis,
    /// Nodes held (frontend included).
    pub nodes: u32,
    /// vCPUs held.
    pub cpu: u32,
    /// Memory held, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// When the guarantee ends (the reservation's end); absent: for as long
    /// as the cluster exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// The window the capacity is held in now, or the next one (absent: it
    /// is held without interruption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<HeldWindow>,
}

/// How a cluster's capacity is guaranteed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GuaranteeBasis {
    Placed,
    Reservation,
    Weekly,
}

/// A window of held capacity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldWindow {
    pub start: Time,
    /// Absent: open-ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
}

/// A scheduled power transition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// When it happens.
    pub time: Time,
    /// `Create`, `Start`, `Stop` or `Delete`.
    pub action: TransitionAction,
}

/// What a reservation's next boundary does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TransitionAction {
    /// The reservation begins: its nodes are created.
    Create,
    /// A window opens: the nodes start.
    Start,
    /// A window closes or the reservation ends: the nodes stop.
    Stop,
    /// The reservation ends with `endAction: Delete`: the nodes are deleted.
    Delete,
}

impl VirtualClusterSpec {
    /// Number of nodes the spec asks for, frontend included.
    pub fn desired_nodes(&self) -> i32 {
        1 + self.pools.iter().map(|p| p.replicas.max(0)).sum::<i32>()
    }

    /// Every node of the spec as its `stoppedNodes` entry: `frontend`,
    /// then each pool's `POOL-INDEX`.
    pub fn node_entries(&self) -> Vec<String> {
        std::iter::once(NodeEntry::Frontend.to_string())
            .chain(self.pools.iter().flat_map(|p| {
                (0..p.replicas.max(0) as u32).map(|index| {
                    NodeEntry::Worker {
                        pool: &p.name,
                        index,
                    }
                    .to_string()
                })
            }))
            .collect()
    }

    /// Whether the user asked for this node to be off while the cluster
    /// runs: its pool's `running: false`, or its entry in `stoppedNodes`
    /// (`frontend`, `POOL-INDEX`). The cluster's own power is not part of it.
    pub fn node_switched_off(&self, pool: Option<&str>, index: u32) -> bool {
        let entry = match pool {
            None => NodeEntry::Frontend,
            Some(p) => {
                if self.pools.iter().any(|q| q.name == p && !q.running) {
                    return true;
                }
                NodeEntry::Worker { pool: p, index }
            }
        };
        self.stopped_nodes
            .iter()
            .any(|n| NodeEntry::parse(&n.0) == Some(entry))
    }
}

/// A node of a cluster as `spec.stoppedNodes` (and the plugin) name it:
/// `frontend` or `POOL-INDEX` (decimal, no leading zero). Pool names may
/// hold `-`: the index is what follows the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEntry<'a> {
    Frontend,
    Worker { pool: &'a str, index: u32 },
}

impl<'a> NodeEntry<'a> {
    /// Reads an entry; `None` when it is neither form.
    pub fn parse(entry: &'a str) -> Option<Self> {
        if entry == "frontend" {
            return Some(NodeEntry::Frontend);
        }
        let (pool, index) = entry.rsplit_once('-')?;
        let canonical = !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && (index == "0" || !index.starts_with('0'));
        if pool.is_empty() || !canonical {
            return None;
        }
        Some(NodeEntry::Worker {
            pool,
            index: index.parse().ok()?,
        })
    }

    /// The VirtualNode's name for this entry of `cluster`:
    /// `<cluster>-frontend` or `<cluster>-<pool>-<index>` — the one place
    /// the controller and the plugin get it from.
    pub fn node_name(&self, cluster: &str) -> String {
        format!("{cluster}-{self}")
    }

    /// The pool it belongs to (`None`: the frontend).
    pub fn pool(&self) -> Option<&'a str> {
        match self {
            NodeEntry::Frontend => None,
            NodeEntry::Worker { pool, .. } => Some(pool),
        }
    }
}

impl std::fmt::Display for NodeEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeEntry::Frontend => f.write_str("frontend"),
            NodeEntry::Worker { pool, index } => write!(f, "{pool}-{index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::NodeEntry;

    #[test]
    fn entries_read_back_as_written_and_only_canonical_ones() {
        for (s, want) in [
            ("frontend", Some(NodeEntry::Frontend)),
            (
                "worker-0",
                Some(NodeEntry::Worker {
                    pool: "worker",
                    index: 0,
                }),
            ),
            (
                "big-gpu-12",
                Some(NodeEntry::Worker {
                    pool: "big-gpu",
                    index: 12,
                }),
            ),
            ("worker-01", None),
            ("worker-", None),
            ("-3", None),
            ("worker", None),
            ("worker-x", None),
            ("worker-99999999999", None),
        ] {
            assert_eq!(NodeEntry::parse(s), want, "{s}");
            if let Some(e) = want {
                assert_eq!(e.to_string(), s);
            }
        }
    }
}
