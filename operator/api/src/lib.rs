//! The `yukumo.io/v1alpha1` API: every kind yukumo serves, as plain Rust types.
//!
//! This crate holds no runtime and no backends (no tokio, no libvirt, no
//! netlink) so that the controller, the agent, the CRD generator and the tests
//! can all depend on it. The doc comments on fields become `kubectl explain`
//! output; the `x_kube(validation = …)` rules become CEL rules the API server
//! enforces, each naming the field it checks.
#![forbid(unsafe_code)]

pub mod common;
pub mod host;
pub mod net;
pub mod networkgroup;
pub mod quantity;
pub mod reason;
pub mod site;
pub mod virtualcluster;
pub mod virtualnode;
pub mod volume;

pub use common::{Condition, ConditionStatus, Conditions, ImageSource, NodeSize, SizeClass};
pub use host::{Host, HostSpec, HostStatus};
pub use net::{Ipv4Net, MacAddr, Segment, SegmentType};
pub use networkgroup::{NetworkGroup, NetworkGroupSpec, NetworkGroupStatus};
pub use reason::Reason;
pub use site::{Site, SiteSpec, SiteStatus};
pub use virtualcluster::{VirtualCluster, VirtualClusterSpec, VirtualClusterStatus};
pub use virtualnode::{VirtualNode, VirtualNodeSpec, VirtualNodeStatus};
pub use volume::{Volume, VolumeSpec, VolumeStatus};

/// The API group of every yukumo kind.
pub const GROUP: &str = "yukumo.io";
/// The served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// A SubjectAccessReview's `extra` key marking a question asked on purpose
/// (`kubectl yukumo site join` asks whether a site agent's reads are
/// scoped): the authorization webhook logs its answer quietly. The answer
/// itself never depends on it.
pub const SCOPE_PROBE: &str = "yukumo.io/scope-probe";

/// Whether `s` is a DNS label (RFC 1123): 1-63 lower-case letters, digits
/// and '-', neither first nor last — what names of Sites, namespaces and
/// label values yukumo reads must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Labels yukumo sets and selects on.
pub mod labels {
    /// The Host a VirtualNode is placed on; agents select their VirtualNodes by it.
    pub const HOST: &str = "yukumo.io/host";
    /// The Site of a Host or a VirtualNode.
    pub const SITE: &str = "yukumo.io/site";
    /// The VirtualCluster a VirtualNode belongs to.
    pub const CLUSTER: &str = "yukumo.io/cluster";
    /// The role of a VirtualNode: `frontend` or `worker`.
    pub const ROLE: &str = "yukumo.io/role";
    /// The node pool of a worker VirtualNode.
    pub const POOL: &str = "yukumo.io/pool";
    /// The Host holding a Volume's storage; its agent selects its Volumes by it.
    pub const STORAGE_HOST: &str = "yukumo.io/storage-host";
    /// On a boot Volume the controller made: the VirtualCluster it is for.
    pub const ROOT_OF: &str = "yukumo.io/root-of";
    /// The revision of the template a VirtualNode was made from (see
    /// `VirtualClusterStatus::revision`).
    pub const REVISION: &str = "yukumo.io/revision";
    /// Marks objects yukumo itself manages.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "yukumo";
}

/// Field managers for server-side apply: one per component, never shared, so
/// ownership of every field is visible in `managedFields`.
/// Finalizers yukumo sets.
pub mod finalizers {
    /// On every VirtualNode, set by the controller when it creates the node
    /// and removed by the host's agent once the domain, overlay and config
    /// disk are gone (or by the controller when the host is lost: its agent
    /// sweeps the stale domain when it returns).
    pub const HOST_CLEANUP: &str = "yukumo.io/host-cleanup";

    /// On every placed Volume, set by the controller when it places it and
    /// removed by the agent of the pool's host once the storage is gone
    /// (which it deletes only when no node holds the Volume).
    pub const STORAGE_CLEANUP: &str = "yukumo.io/storage-cleanup";

    /// The merge patch that removes `finalizer` from an object with
    /// `current` finalizers at `resource_version` (optimistic concurrency:
    /// a concurrent change makes it fail with a conflict rather than undo
    /// that change); `None` when there is nothing to remove.
    pub fn removal_patch(
        current: &[String],
        finalizer: &str,
        resource_version: Option<String>,
    ) -> Option<serde_json::Value> {
        if !current.iter().any(|f| f == finalizer) {
            return None;
        }
        let keep: Vec<&String> = current.iter().filter(|f| *f != finalizer).collect();
        Some(serde_json::json!({
            "metadata": { "finalizers": keep, "resourceVersion": resource_version }
        }))
    }
}

/// The server-side apply body that sets `status` on an object of kind `K`
/// (for its status subresource): what every yukumo component writes.
pub fn status_apply_patch<K, S>(status: &S) -> serde_json::Value
where
    K: kube::Resource<DynamicType = ()>,
    S: serde::Serialize,
{
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

pub mod managers {
    /// The controller's field manager.
    pub const CONTROLLER: &str = "yukumo-controller";
    /// The agent's field manager.
    pub const AGENT: &str = "yukumo-agent";
    /// The agent's storage reconciler (a Volume's `status.backing`, a
    /// Host's `status.storagePools`: fields the heartbeat never writes).
    pub const AGENT_STORAGE: &str = "yukumo-agent-storage";
}

/// Every kind's CRD, in a stable order (used by the CRD generator and tests).
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        VirtualCluster::crd(),
        NetworkGroup::crd(),
        Volume::crd(),
        Site::crd(),
        VirtualNode::crd(),
        Host::crd(),
    ]
}

#[cfg(test)]
mod tests {
    use super::finalizers::{HOST_CLEANUP, removal_patch};

    #[test]
    fn status_patch_names_the_kind() {
        let p = super::status_apply_patch::<super::Host, _>(&serde_json::json!({"a": 1}));
        assert_eq!(
            p,
            serde_json::json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Host", "status": {"a": 1}})
        );
    }

    #[test]
    fn finalizer_removal_keeps_others_and_pins_the_version() {
        let current = vec![HOST_CLEANUP.to_string(), "example.com/keep".to_string()];
        let p = removal_patch(&current, HOST_CLEANUP, Some("42".into())).unwrap();
        assert_eq!(
            p,
            serde_json::json!({"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "42"}})
        );
        assert_eq!(removal_patch(&current[1..], HOST_CLEANUP, None), None);
    }
}
