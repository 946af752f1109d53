//! VirtualNode: one VM, written by the controller, realised by its host's agent.

use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, ImageSource, Resources};
use crate::net::{MacAddr, Segment};

/// One VM of a VirtualCluster. Internal: the controller writes the spec (with
/// every allocation it made), the agent of the host in `spec.host` writes the
/// status. Owned by its VirtualCluster.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "yukumo.io",
    version = "v1alpha1",
    kind = "VirtualNode",
    namespaced,
    status = "VirtualNodeStatus",
    shortname = "vn",
    category = "yukumo",
    doc = "One VM of a VirtualCluster (internal: written by yukumo, readable by users).",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".spec.network.ip"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.host"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.cluster == oldSelf.cluster")
    .message("cluster is immutable").field_path(".cluster"))]
#[x_kube(validation = kube::core::Rule::new("!has(oldSelf.network) || (has(self.network) && self.network.mac == oldSelf.network.mac)")
    .message("network.mac is immutable once allocated").field_path(".network.mac"))]
pub struct VirtualNodeSpec {
    /// The owning VirtualCluster.
    #[schemars(length(min = 1, max = 63))]
    pub cluster: String,
    /// `frontend` or `worker`.
    pub role: NodeRole,
    /// Node pool name (workers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Index within the pool.
    #[serde(default)]
    pub index: u32,
    /// Guest hostname.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub hostname: String,
    /// Host the VM is placed on (also the `yukumo.io/host` label); empty until scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Site of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Resolved size.
    pub resources: Resources,
    /// Boot image.
    pub image: ImageSource,
    /// Boot disk size in bytes (0 means the image's size).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Whether the VM should run.
    #[serde(default)]
    pub running: bool,
    /// SSH public keys for the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// cloud-init user data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// The node's allocated network identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NodeNetwork>,
    /// Volumes attached, with their persisted disk targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<NodeDisk>,
}

/// Role of a node in its cluster.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Gateway and ssh entry point.
    Frontend,
    /// A compute node.
    Worker,
}

impl NodeRole {
    /// The role as used in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Frontend => "frontend",
            NodeRole::Worker => "worker",
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's identity on its NetworkGroup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetwork {
    /// NetworkGroup name.
    pub group: String,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the group's CIDR.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Ipv4Addr,
    /// MAC address.
    pub mac: MacAddr,
    /// The group's segment (type and id).
    pub segment: Segment,
    /// Interface MTU.
    pub mtu: u32,
}

/// A volume attached to a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDisk {
    /// Volume name.
    pub volume: String,
    /// Disk target, e.g. `vdc` (allocated once, persisted in the Volume's
    /// `status.attachedTo`; `vda` and `vdb` are the root and config disks).
    pub target: String,
    /// Read-only attachment.
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest sees: the Volume's uid.
    pub serial: String,
    /// The volume's file on the node's host (`dir` pools; empty for a
    /// volume reached over the network).
    #[serde(default)]
    pub path: String,
    /// The iSCSI logical unit of the volume (`iscsi` pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<crate::volume::IscsiTarget>,
    /// The Ceph RBD image of the volume (`rbd` pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<crate::volume::RbdImage>,
    /// The volume's size in bytes (the agent grows a live disk to it).
    pub bytes: u64,
}

/// A volume disk as the node's domain holds it.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AttachedDisk {
    /// The disk's serial (the Volume's uid).
    pub serial: String,
    /// Disk target.
    pub target: String,
    /// Size the guest sees, in bytes (running domains only; 0 when unknown).
    #[serde(default)]
    pub bytes: u64,
}

/// Lifecycle phase of a VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodePhase {
    /// Not yet placed on a host.
    #[default]
    Pending,
    /// Placed; the agent is preparing disks and the domain.
    Provisioning,
    /// The domain runs.
    Running,
    /// The domain is defined but shut off.
    Stopped,
    /// The agent could not realise the node; see conditions and `lastError`.
    Failed,
    /// Being removed from its host.
    Terminating,
}

/// Observed state of a VirtualNode (written by its host's agent).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeStatus {
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, set by the node's agent; its reason says where the node is
    /// (`Running`, `Stopped`) or why it is not running (`ImagePullFailed`,
    /// `ImageCacheError`, `DiskFailed`, `DomainFailed`, …). The VirtualCluster
    /// carries the kstatus conditions.
    #[serde(default)]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: NodePhase,
    /// Host the domain exists on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// libvirt domain UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_uuid: Option<String>,
    /// When the domain last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time: Option<Time>,
    /// The last error the agent met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Volume disks the domain holds (live while it runs, else its
    /// definition): a Volume is released only when no node lists it here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<AttachedDisk>,
    /// Where its serial console is served (running nodes on hosts whose
    /// agent serves consoles): `kubectl yukumo console` connects there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleEndpoint>,
}

/// A host agent's console endpoint. Each caller is authenticated by its
/// bearer token (TokenReview) and must itself be allowed `get` on the
/// node's `virtualnodes/console` (SubjectAccessReview).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleEndpoint {
    /// The endpoint's base URL, e.g. `https://192.0.2.10:9443`; a node's
    /// console is at `/v1/console/<namespace>/<name>`.
    pub url: String,
    /// PEM of the CA that signed the endpoint's certificate (the agent's
    /// own), so clients trust the endpoint through the API server.
    pub ca_certificate: String,
}

impl ConsoleEndpoint {
    /// Host and port of an `https://HOST[:PORT][/]` URL (port 443 when
    /// absent; an IPv6 host in brackets, returned without them). The agent
    /// checks `--console-url` with it; the plugin dials what it returns.
    pub fn host_port(url: &str) -> Result<(String, u16), String> {
        let bad = || format!("{url:?}: not https://HOST[:PORT]");
        let hp = url
            .strip_prefix("https://")
            .map(|r| r.strip_suffix('/').unwrap_or(r))
            .filter(|hp| !hp.is_empty() && !hp.contains('/'))
            .ok_or_else(bad)?;
        let (host, port) = if let Some(r) = hp.strip_prefix('[') {
            let (h, rest) = r.split_once(']').ok_or_else(bad)?;
            match rest {
                "" => (h, None),
                _ => (h, Some(rest.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match hp.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hp, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok((host.to_string(), port))
    }
}

#[cfg(test)]
mod tests {
    use super::ConsoleEndpoint;

    #[test]
    fn console_urls_give_host_and_port() {
        let hp = |u| ConsoleEndpoint::host_port(u);
        assert_eq!(hp("https://10.0.0.1:9443"), Ok(("10.0.0.1".into(), 9443)));
        assert_eq!(hp("https://h.example/"), Ok(("h.example".into(), 443)));
        assert_eq!(hp("https://[fd00::1]:9443"), Ok(("fd00::1".into(), 9443)));
        assert_eq!(hp("https://[fd00::1]"), Ok(("fd00::1".into(), 443)));
        for bad in [
            "http://x",
            "https://",
            "https://:9443",
            "https://h:0",
            "https://h:x",
            "https://h/path",
            "https://[fd00::1",
            "https://fd00::1:9443",
        ] {
            assert!(hp(bad).is_err(), "{bad}");
        }
    }
}
