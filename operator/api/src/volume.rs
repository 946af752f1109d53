//! Volume: a persistent block volume that outlives the VMs it is attached to.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, ImageSource};

/// A persistent block volume in a Site's storage pool, attached by one node
/// of a VirtualCluster in the same namespace at a time. Deleting a cluster
/// never deletes its Volumes; deleting a Volume waits until no node holds it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    shortname = "vol",
    category = "yukumo",
    doc = "A persistent block volume with snapshots, restore and resize.",
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Attached","type":"string","jsonPath":".status.attachedTo.node"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.pool == oldSelf.pool")
    .message("pool is immutable: move data with a snapshot and a new volume").field_path(".pool"))]
#[x_kube(validation = kube::core::Rule::new(
    "!isQuantity(string(self.size)) || !isQuantity(string(oldSelf.size)) || quantity(string(self.size)).compareTo(quantity(string(oldSelf.size))) >= 0"
).message("size may grow but never shrink").field_path(".size"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.source) || !has(oldSelf.source) || self.source == oldSelf.source"
).message("source is immutable: it only seeds a new volume").field_path(".source"))]
pub struct VolumeSpec {
    /// Capacity, e.g. `20Gi`; may be increased later (online resize), never decreased.
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("size must be a positive quantity such as 20Gi"))]
    pub size: Quantity,
    /// Storage pool the volume lives in (immutable), e.g. `default`: one of
    /// the `storagePools` of its Site.
    #[serde(default = "default_pool")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pool: String,
    /// Site the volume is placed at; default: the one Site that declares
    /// `pool` (naming the Site is required when several do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub site: Option<String>,
    /// Initial content: blank (default), a copy of an image (fetched and
    /// checked against its checksum by the pool's host), or a copy of
    /// another volume's snapshot (same namespace and pool); grown to `size`
    /// (an image bigger than `size` is refused, never truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// Snapshots to keep (retention is this list). Adding a name takes a
    /// snapshot — a full copy, taken while no running guest writes the
    /// volume (detached, or its node stopped); removing it deletes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.all(s, self.exists_one(t, t.name == s.name))")
        .message("snapshots[].name must be unique"))]
    pub snapshots: Vec<SnapshotSpec>,
    /// Roll the volume back to this snapshot (of this volume), in place,
    /// while no node holds it (a cluster does not attach it meanwhile).
    /// Done once per name: `status.restoredFrom` records it, so the field
    /// may stay in a GitOps repository; to restore the same snapshot again,
    /// name another snapshot first or remove and re-add the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub restore_from: Option<String>,
}

fn default_pool() -> String {
    "default".into()
}

/// Where a new volume's content comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.image) != has(self.snapshot)")
    .message("source needs exactly one of image or snapshot"))]
pub struct VolumeSource {
    /// Copy this image into the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// Copy another volume's snapshot (same namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReference>,
}

/// A snapshot of a volume in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotReference {
    /// The Volume name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub volume: String,
    /// The snapshot name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// A snapshot to keep.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Snapshot name (DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Lifecycle phase of a volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    /// Waiting for placement or creation.
    #[default]
    Pending,
    /// Created, not attached.
    Available,
    /// Attached to a node.
    Attached,
    /// Cannot be created or used; see conditions.
    Failed,
}

/// Observed state of a Volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled`.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: VolumePhase,
    /// Provisioned capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    /// The size granted within the namespace's quota (written by the
    /// controller with the placement, and again on each granted growth):
    /// the pool's agent makes the volume this size, never more than
    /// `spec.size`. A growth the quota refuses leaves it as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<Quantity>,
    /// Host and pool holding the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<VolumeLocation>,
    /// The node it is attached to read-write (single writer) and the disk
    /// target there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<VolumeAttachmentStatus>,
    /// The nodes holding it read-only (`readOnly: true` attachments), each
    /// with its disk target: any number at once, never together with a
    /// read-write holder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readers: Vec<VolumeAttachmentStatus>,
    /// Snapshots that exist (written by the pool's agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotStatus>,
    /// The snapshot last restored in place (`spec.restoreFrom`), once done
    /// (written by the pool's agent). A restore runs when `restoreFrom`
    /// names another snapshot than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The storage as the agent of the pool's host last saw it (written by
    /// that agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<VolumeBacking>,
}

/// A volume's storage as found on its pool's host.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBacking {
    /// Where the data is on the pool's host (a file of a `dir` pool).
    pub path: String,
    /// Size the guest sees, in bytes.
    pub capacity_bytes: u64,
    /// Space it takes in the pool, in bytes.
    #[serde(default)]
    pub allocation_bytes: u64,
    /// Why the storage cannot be made as asked, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The reason of `error` (e.g. `InsufficientPoolSpace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<crate::Reason>,
    /// The iSCSI target exporting it (`iscsi` pools), once exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<IscsiTarget>,
    /// The Ceph RBD image holding it (`rbd` pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdImage>,
}

/// A Ceph RBD image a volume is reached at.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RbdImage {
    /// Monitor addresses, `address:port`.
    pub monitors: Vec<String>,
    /// Ceph pool.
    pub pool: String,
    /// Image name, `<volume uid>.raw`.
    pub image: String,
    /// The Ceph user QEMU authenticates as (its key: the host's libvirt
    /// secret of usage `yukumo-ceph-client.<user>`).
    pub user: String,
}

/// An iSCSI logical unit a volume is reached at.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IscsiTarget {
    /// Portal address of the pool host's target, e.g. `10.255.0.1:3260`.
    pub portal: String,
    /// Target name (IQN), `iqn.2026-12.io.yukumo:<pool>.<volume uid>`.
    pub iqn: String,
    /// Logical unit number.
    pub lun: u32,
}

/// Where a volume's data lives.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeLocation {
    /// Site.
    pub site: String,
    /// Storage pool (of that Site).
    #[serde(default)]
    pub pool: String,
    /// Host serving the volume.
    pub host: String,
}

/// A volume's current attachment; the disk target is persisted here before use
/// so it is never handed out twice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentStatus {
    /// VirtualCluster name.
    pub cluster: String,
    /// VirtualNode name.
    pub node: String,
    /// Disk target in the guest, e.g. `vdb`.
    pub target: String,
    /// The host the node runs on, once placed: an `iscsi` pool's target
    /// admits only this host (and ends other hosts' sessions), so a node
    /// restarted elsewhere fences the host it left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A snapshot that exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Snapshot name.
    pub name: String,
    /// When it was taken.
    pub created: Time,
    /// Size of the volume when it was taken.
    pub size: Quantity,
}
