//! Condition and Event reasons: one enum that controller, agent and tests
//! share. A reason is written as its CamelCase name and read back into the
//! same variant, so no decision ever matches a reason's (or a message's)
//! text. A reason this version does not know (written by a newer one) is
//! kept verbatim as [`Reason::Other`].

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Why a condition has its status, or what an Event reports.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[doc = $doc])* $name,)*
            /// A reason this version of yukumo does not know.
            Other(String),
        }

        impl Reason {
            /// Every known reason (for documentation and tests).
            pub const ALL: &'static [Reason] = &[$(Reason::$name),*];

            /// The CamelCase name written into conditions and Events.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                    Reason::Other(s) => s,
                }
            }

            /// The reason a name stands for.
            pub fn from_name(s: &str) -> Reason {
                match s {
                    $(stringify!($name) => Reason::$name,)*
                    other => Reason::Other(other.to_string()),
                }
            }
        }
    };
}

reasons! {
    // --- every kind
    /// The object has reached its desired state (the idle reason of
    /// `Reconciling` and `Stalled`).
    Ready,
    /// References resolved; allocation or placement follows.
    ReferencesResolved,
    /// A Site the spec names does not exist.
    SiteNotFound,
    /// The namespace may not use a Site the object needs (the Site's
    /// `spec.access.namespaceSelector` does not match it).
    SiteAccessDenied,
    /// Growing the object would pass a limit of a ResourceQuota of its
    /// namespace (`yukumo.io/vcpus`, `memory`, `nodes`, `public-ips`,
    /// `storage`); the message names the limit, the use and its holders.
    QuotaExceeded,
    /// A node would run at a Site its NetworkGroup does not span (its
    /// `homeSite` and `sites`).
    SiteNotSpanned,
    /// The DHCP range starts after it ends.
    InvalidDhcpRange,
    // --- VirtualCluster
    /// The NetworkGroup the cluster names does not exist in its namespace.
    NetworkGroupNotFound,
    /// A Volume the cluster names does not exist in its namespace.
    VolumeNotFound,
    /// One Volume is attached to two nodes of the cluster.
    VolumeAttachedTwice,
    /// A size class that neither the Sites nor the built-ins define.
    UnknownSizeClass,
    /// A size that cannot be read.
    InvalidSize,
    /// The reservation's time zone is unknown.
    InvalidTimeZone,
    /// The reservation cannot be admitted: its sites lack capacity.
    InsufficientCapacity,
    /// Nodes that cannot be placed.
    Unschedulable,
    /// Nodes were on a lost host and are placed again.
    RecoveringNodes,
    /// The NetworkGroup has no address yet for some nodes.
    WaitingForNetwork,
    /// The reservation's window has not begun.
    ReservationPending,
    /// The reservation ended and its nodes were deleted.
    ReservationEnded,
    /// Every node is stopped, as asked.
    Stopped,
    /// Nodes are being stopped.
    Stopping,
    /// Every node is running and ready.
    AllNodesReady,
    /// Nodes are starting.
    NodesStarting,
    /// Event: nodes were placed on hosts.
    NodesScheduled,
    /// Event: nodes were removed (scale down).
    NodesRemoved,
    /// Event: nodes of a lost host are placed again.
    NodesRecovering,
    /// Outdated nodes are being replaced by nodes of the spec's revision.
    RollingOut,
    /// Event: outdated nodes were deleted, to be made again from the
    /// spec's revision.
    NodesReplaced,
    // --- NetworkGroup
    /// Segment, addresses, public IPs and router are allocated.
    Allocated,
    /// The home Site defines no range for the segment type.
    NoSegmentRange,
    /// Every id of the home Site's range is in use.
    SegmentRangeExhausted,
    /// The id the spec asks for is held by another group.
    SegmentIdInUse,
    /// The id the spec asks for is outside the home Site's range.
    SegmentOutOfRange,
    /// The CIDR has no address left for a node.
    AddressesExhausted,
    /// A public IP is held by another group, or requested twice.
    PublicIPConflict,
    /// The Site's public pool has no free address.
    PublicIPPoolExhausted,
    /// A public IP the spec asks for is outside the Site's pool.
    PublicIPOutsidePool,
    /// A public IP mapping names a node that is not on the group.
    PublicIPNodeUnknown,
    /// No Ready gateway host can run the group's router.
    NoGatewayHost,
    /// The Sites a group spans give their WAN endpoints different UDP
    /// ports (one tunnel port per group).
    TunnelPortsDiffer,
    /// The Sites a group spans differ in `tunnel.encryption` (a group's
    /// tunnels are all encrypted or all plain).
    TunnelEncryptionDiffers,
    /// A Site asks for WireGuard and the host holding its WAN endpoint has
    /// no WireGuard in its kernel: no tunnel is made to or from the Site.
    WireguardUnavailable,
    /// A VLAN group spans Sites joined by WAN tunnels, which carry VXLAN
    /// groups only.
    VlanNotStretched,
    /// `spec.mtu` is larger than the WAN tunnels between the group's
    /// Sites carry.
    MtuTooLarge,
    /// No host of the Site offers what the segment needs (802.1Q).
    NoCapableHost,
    // --- VirtualNode (agent)
    /// The domain runs.
    Running,
    /// The agent prepares disks and the domain.
    Provisioning,
    /// The node's image cannot be fetched or does not match its checksum.
    ImagePullFailed,
    /// The host's image cache cannot be written.
    ImageCacheError,
    /// The node's disks cannot be prepared.
    DiskFailed,
    /// libvirt refused to define, start or stop the domain.
    DomainFailed,
    /// Event: a domain that had run before was started again.
    Started,
    // --- Host
    /// The agent heartbeats and its hypervisor is healthy.
    AgentHeartbeating,
    /// The agent has not reported yet.
    AwaitingHeartbeat,
    /// No heartbeat within the Site's grace period.
    HeartbeatLost,
    /// The agent reports its hypervisor as not usable.
    HypervisorNotReady,
    /// Agent condition `HypervisorReady`: libvirt answers.
    Connected,
    /// Agent condition `HypervisorReady`: libvirt does not answer.
    LibvirtUnreachable,
    /// Agent condition `HypervisorReady`: the agent has not yet removed the
    /// domains here whose nodes are no longer this host's (a host returning
    /// after it was lost is Ready only after that sweep).
    StaleDomainsNotSwept,
    // --- Site
    /// At least one Host of the Site is Ready.
    HostsReady,
    /// No Host of the Site is Ready.
    NoReadyHosts,
    /// Some of the Site's WAN settings (`credentialsSecretRef`) are not
    /// acted on by this version.
    WanTunnelsNotBuilt,
    /// A gateway host holds the Site's WAN endpoint.
    GatewayActive,
    /// No Ready gateway host with a WAN interface can hold the Site's WAN
    /// endpoint.
    NoWanGateway,
    /// Every tunnel to a peer Site answers.
    TunnelsUp,
    /// A tunnel to a peer Site does not answer.
    TunnelDown,
    // --- Volume
    /// A snapshot source does not exist.
    SourceNotFound,
    /// `restoreFrom` names a snapshot the volume does not have.
    SnapshotNotFound,
    /// The volume waits for placement on a storage pool.
    WaitingForPool,
    /// The pool the volume names is not at its Site (or at no Site).
    PoolNotFound,
    /// The pool has not enough free space for the volume.
    InsufficientPoolSpace,
    /// The pool's host agent could not create, grow or delete the storage.
    StorageFailed,
    /// The volume exists at its size and is attached to no node.
    Available,
    /// The volume exists at its size and is attached to a node.
    Attached,
    /// The volume is being deleted but a node still holds it.
    DetachPending,
    /// A spec field this version does not implement yet.
    NotImplemented,
    /// A snapshot waits for the running guest using the volume to let go.
    SnapshotPending,
    /// A restore in place waits for the volume to be detached, or runs.
    RestorePending,
    /// Event: storage that carries yukumo's marker but has no Volume.
    OrphanedStorage,
    // --- VirtualCluster, volumes
    /// A volume the cluster names is attached to another node.
    VolumeInUse,
    /// A volume the cluster names is not ready yet (or being deleted).
    VolumeNotReady,
    /// A volume the cluster names cannot be used by the node it is for.
    VolumeUnusable,
    /// Event: a Volume was claimed for a node (its disk target allocated).
    VolumeClaimed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Reason::from_name(&s))
    }
}

impl JsonSchema for Reason {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Reason".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 1024,
            "description": "Machine-readable reason in CamelCase, e.g. NetworkGroupNotFound.",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/TROUBLESHOOTING.md explains every reason (and what to do).
    #[test]
    fn every_reason_is_in_the_troubleshooting_guide() {
        let guide = include_str!("../../../docs/TROUBLESHOOTING.md");
        let missing: Vec<&str> = Reason::ALL
            .iter()
            .map(Reason::as_str)
            .filter(|name| !guide.contains(&format!("| `{name}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/TROUBLESHOOTING.md has no row for {missing:?}"
        );
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for r in Reason::ALL {
            let name = r.as_str();
            assert!(name.chars().next().unwrap().is_ascii_uppercase(), "{name}");
            assert_eq!(&Reason::from_name(name), r);
            let json = serde_json::to_value(r).unwrap();
            assert_eq!(json, serde_json::json!(name));
            assert_eq!(&serde_json::from_value::<Reason>(json).unwrap(), r);
        }
        let future: Reason = serde_json::from_value(serde_json::json!("SomethingNew")).unwrap();
        assert_eq!(future, Reason::Other("SomethingNew".into()));
        assert_eq!(future.to_string(), "SomethingNew");
    }
}
