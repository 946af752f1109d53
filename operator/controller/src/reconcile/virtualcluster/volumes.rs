//! The Volumes of a cluster's nodes: which disk each node gets, which
//! Volume must first be claimed for it, and what waits — as a pure
//! function of the cluster, its nodes and the Volumes.
//!
//! A Volume is held read-write by one node at a time: its
//! `status.attachedTo` names the holder (cluster, node) and the disk
//! target there. Read-only attachments hold it in `status.readers`
//! instead, any number at once but never with a writer. A claim is
//! written with the Volume's resourceVersion as a precondition before any
//! node lists the disk, so of two clusters racing for one Volume exactly
//! one wins; the loser waits with a condition naming the holder. The
//! target is allocated once (from `vdc`: `vda` is the root disk, `vdb`
//! the config disk) and kept in the claim, so a rescheduled node gets the
//! same target and a target is never handed out twice on one node. The
//! claim is released by the Volume reconciler only once neither the
//! cluster asks for it nor the node's agent reports the disk.

use std::collections::BTreeSet;

use kube::ResourceExt;
use yukumo_api::Reason;
use yukumo_api::common::ImageSource;
use yukumo_api::quantity::parse_quantity;
use yukumo_api::site::Site;
use yukumo_api::virtualcluster::{RootVolume, VirtualClusterSpec, VolumeAttachment};
use yukumo_api::virtualnode::{NodeDisk, VirtualNode};
use yukumo_api::volume::{Volume, VolumeAttachmentStatus, VolumeSource, VolumeSpec};

use crate::reconcile::nodes::node_name;

/// The boot Volume of a node whose role has a `rootVolume`.
pub fn root_volume_name(node: &str) -> String {
    format!("{node}-root")
}

/// A boot Volume a cluster asks for.
pub struct Root {
    pub node: String,
    /// The field asking for it.
    pub field: String,
    /// The Volume's name and spec.
    pub name: String,
    pub spec: VolumeSpec,
}

/// The boot Volumes `spec` asks for.
pub fn roots(cluster: &str, spec: &VirtualClusterSpec) -> Vec<Root> {
    let vspec = |r: &RootVolume, image: &ImageSource| VolumeSpec {
        size: r.size.clone(),
        pool: r.pool.clone(),
        site: None,
        source: Some(VolumeSource {
            image: Some(image.clone()),
            snapshot: None,
        }),
        snapshots: vec![],
        restore_from: None,
    };
    let mut out = Vec::new();
    if let Some(r) = &spec.frontend.root_volume {
        let node = node_name(cluster, None, 0);
        out.push(Root {
            name: root_volume_name(&node),
            node,
            field: format!("spec.frontend{ROOT_FIELD}"),
            spec: vspec(r, &spec.frontend.image),
        });
    }
    for (pi, p) in spec.pools.iter().enumerate() {
        let Some(r) = &p.root_volume else { continue };
        let image = p.image.as_ref().unwrap_or(&spec.frontend.image);
        for i in 0..p.replicas.max(0) as u32 {
            let node = node_name(cluster, Some(&p.name), i);
            out.push(Root {
                name: root_volume_name(&node),
                node,
                field: format!("spec.pools[{pi}]{ROOT_FIELD}"),
                spec: vspec(r, image),
            });
        }
    }
    out
}

/// The field naming a node's boot volume (its disk target is `vda`).
const ROOT_FIELD: &str = ".rootVolume";

/// The volumes each node of `spec` asks for: (node, field, attachment).
pub fn wanted(cluster: &str, spec: &VirtualClusterSpec) -> Vec<(String, String, VolumeAttachment)> {
    let mut out = Vec::new();
    for r in roots(cluster, spec) {
        out.push((
            r.node,
            r.field,
            VolumeAttachment {
                name: r.name,
                read_only: false,
            },
        ));
    }
    for (i, v) in spec.frontend.volumes.iter().enumerate() {
        out.push((
            node_name(cluster, None, 0),
            format!("spec.frontend.volumes[{i}]"),
            v.clone(),
        ));
    }
    for (pi, p) in spec.pools.iter().enumerate() {
        if p.replicas < 1 {
            continue;
        }
        for (i, v) in p.volumes.iter().enumerate() {
            out.push((
                node_name(cluster, Some(&p.name), 0),
                format!("spec.pools[{pi}].volumes[{i}]"),
                v.clone(),
            ));
        }
    }
    out
}

/// A claim to write before the node lists the disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub volume: String,
    pub resource_version: Option<String>,
    pub attached_to: VolumeAttachmentStatus,
    /// A read-only claim: the Volume's readers with this one added (or
    /// moved); written instead of `attachedTo`.
    pub readers: Option<Vec<VolumeAttachmentStatus>>,
}

/// Something a node's volume waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub node: String,
    pub reason: Reason,
    pub message: String,
}

/// A node's disks and constraints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeVolumes {
    /// Disks it gets (claimed, or claimed by this plan's `claims`).
    pub disks: Vec<NodeDisk>,
    /// The host its `dir` volumes pin it to, and why.
    pub pinned: Option<(String, String)>,
}

/// The plan for every node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumePlan {
    pub nodes: std::collections::BTreeMap<String, NodeVolumes>,
    pub claims: Vec<Claim>,
    pub waits: Vec<Wait>,
}

impl VolumePlan {
    /// Whether `node` may be created now: nothing of it waits.
    pub fn may_create(&self, node: &str) -> bool {
        !self.waits.iter().any(|w| w.node == node)
    }
}

/// The first free disk target after the root and config disks.
fn free_target(used: &BTreeSet<String>) -> Option<String> {
    (b'c'..=b'z')
        .map(|c| format!("vd{}", c as char))
        .find(|t| !used.contains(t))
}

/// Plan the disks of the cluster `cluster` in `ns`. `nodes`: the cluster's
/// existing VirtualNodes; `volumes`: the namespace's Volumes; `sites`: to
/// tell a `dir` pool (which pins its node to the pool's host).
pub fn plan(
    ns: &str,
    cluster: &str,
    spec: &VirtualClusterSpec,
    nodes: &[&VirtualNode],
    volumes: &[&Volume],
    sites: &[Site],
) -> VolumePlan {
    let mut out = VolumePlan::default();
    let find = |name: &str| {
        volumes
            .iter()
            .copied()
            .find(|v| v.name_any() == name && v.namespace().as_deref() == Some(ns))
    };
    for (node, field, att) in wanted(cluster, spec) {
        let existing = nodes.iter().copied().find(|n| n.name_any() == node);
        let mut wait = |reason: Reason, message: String| {
            out.waits.push(Wait {
                node: node.clone(),
                reason,
                message: format!("{field}: {message}"),
            })
        };
        let Some(vol) = find(&att.name) else {
            wait(
                Reason::VolumeNotFound,
                format!("Volume {:?} not found in namespace {ns}", att.name),
            );
            continue;
        };
        let uid = vol.metadata.uid.clone().unwrap_or_default();
        let status = vol.status.clone().unwrap_or_default();
        let mine = |a: &VolumeAttachmentStatus| a.cluster == cluster && a.node == node;
        // What this node holds already (read-write or read-only), else
        // whether the other holders let it take the Volume.
        let held_rw = status.attached_to.clone().filter(|a| mine(a));
        let held_ro = status.readers.iter().find(|a| mine(a)).cloned();
        let reader = held_ro.is_some() || (held_rw.is_none() && att.read_only);
        let claim = held_rw.or(held_ro);
        if claim.is_none() {
            if let Some(a) = &status.attached_to {
                wait(
                    Reason::VolumeInUse,
                    format!(
                        "Volume {:?} is attached to node {} of cluster {} (single writer): detach it there first",
                        att.name, a.node, a.cluster
                    ),
                );
                continue;
            }
            if !att.read_only && !status.readers.is_empty() {
                let mut by: Vec<String> = status
                    .readers
                    .iter()
                    .map(|a| format!("node {} of cluster {}", a.node, a.cluster))
                    .collect();
                by.sort();
                wait(
                    Reason::VolumeInUse,
                    format!(
                        "Volume {:?} is held read-only by {}: a read-write attachment waits until they detach",
                        att.name,
                        by.join(", ")
                    ),
                );
                continue;
            }
        } else if reader && !att.read_only {
            // Held read-only: it stays so (other readers may hold it too)
            // until this node lets go of it.
            wait(
                Reason::VolumeInUse,
                format!(
                    "Volume {:?} is held read-only by this node: to write it, remove it from the spec, then add it back",
                    att.name
                ),
            );
        }
        let bytes = parse_quantity(&vol.spec.size).unwrap_or(0);
        // A disk the node holds already is kept while its Volume is held by
        // it, whatever else is wrong: data is never pulled from a guest
        // because of a transient report.
        let kept = existing
            .filter(|_| claim.is_some())
            .and_then(|n| n.spec.disks.iter().find(|d| d.serial == uid).cloned());
        let (Some(loc), Some(backing)) = (status.location.clone(), status.backing.clone()) else {
            if let Some(d) = kept {
                out.nodes.entry(node.clone()).or_default().disks.push(d);
                continue;
            }
            if claim.is_none() {
                wait(
                    Reason::VolumeNotReady,
                    format!("Volume {:?} is not provisioned yet", att.name),
                );
                continue;
            }
            // Held already (its storage vanished?): keep the claim, give
            // no disk until it is back.
            wait(
                Reason::VolumeNotReady,
                format!("Volume {:?} has no storage reported", att.name),
            );
            continue;
        };
        if claim.is_none()
            && let Some(r) = crate::reconcile::volume::decide::restore_pending(vol)
        {
            wait(
                Reason::VolumeNotReady,
                format!(
                    "Volume {:?} is being restored from snapshot {r:?}",
                    att.name
                ),
            );
            continue;
        }
        if claim.is_none()
            && (vol.metadata.deletion_timestamp.is_some()
                || backing.path.is_empty()
                || backing.error.is_some())
        {
            wait(
                Reason::VolumeNotReady,
                if vol.metadata.deletion_timestamp.is_some() {
                    format!("Volume {:?} is being deleted", att.name)
                } else {
                    format!(
                        "Volume {:?} is not ready: {}",
                        att.name,
                        backing.error.as_deref().unwrap_or("no storage yet")
                    )
                },
            );
            continue;
        }
        let dir = sites
            .iter()
            .find(|s| s.name_any() == loc.site)
            .and_then(|s| s.spec.storage_pool(&loc.pool))
            .is_none_or(|p| !p.type_.networked());
        // A network volume is reached at its target once exported (an RBD
        // image once it exists); a disk the node holds keeps the source it
        // was attached with.
        let (iscsi, rbd) = match (dir, &kept) {
            (true, _) => (None, None),
            (false, Some(d)) if d.iscsi.is_some() || d.rbd.is_some() => {
                (d.iscsi.clone(), d.rbd.clone())
            }
            (false, _) if backing.iscsi.is_some() || backing.rbd.is_some() => {
                (backing.iscsi.clone(), backing.rbd.clone())
            }
            (false, _) => {
                wait(
                    Reason::VolumeNotReady,
                    format!(
                        "Volume {:?} is not exported by its pool's host yet",
                        att.name
                    ),
                );
                continue;
            }
        };
        let nv = out.nodes.entry(node.clone()).or_default();
        if dir {
            if let Some(n) = existing
                && let Some(h) = &n.spec.host
                && h != &loc.host
                && kept.is_none()
            {
                wait(
                    Reason::VolumeUnusable,
                    format!(
                        "Volume {:?} lives on host {} (dir pool {:?}) but node {node} runs on host {h}",
                        att.name, loc.host, loc.pool
                    ),
                );
                continue;
            }
            match &nv.pinned {
                Some((h, why)) if h != &loc.host => {
                    wait(
                        Reason::VolumeUnusable,
                        format!(
                            "Volume {:?} lives on host {} but the node is pinned to {h} ({why})",
                            att.name, loc.host
                        ),
                    );
                    continue;
                }
                _ => {
                    nv.pinned = Some((
                        loc.host.clone(),
                        format!("Volume {} is in dir pool {}", att.name, loc.pool),
                    ))
                }
            }
        }
        // A new claim at `target`, or the claim moved to the node's host.
        let claim_at = |target: &str, host: Option<String>| {
            let attached_to = VolumeAttachmentStatus {
                cluster: cluster.to_string(),
                node: node.clone(),
                target: target.to_string(),
                host,
            };
            Claim {
                volume: att.name.clone(),
                resource_version: vol.resource_version(),
                readers: reader.then(|| {
                    status
                        .readers
                        .iter()
                        .filter(|a| !mine(a))
                        .cloned()
                        .chain([attached_to.clone()])
                        .collect()
                }),
                attached_to,
            }
        };
        let host = existing.and_then(|n| n.spec.host.clone());
        let target = match &claim {
            Some(a) => a.target.clone(),
            // A boot volume is the node's first disk.
            None if field.ends_with(ROOT_FIELD) => {
                out.claims.push(claim_at("vda", host.clone()));
                "vda".to_string()
            }
            None => {
                // Targets held by this node's other volumes, listed by its
                // spec, or chosen earlier in this plan.
                let mut used: BTreeSet<String> = volumes
                    .iter()
                    .filter_map(|v| v.status.as_ref())
                    .flat_map(|s| s.attached_to.iter().chain(s.readers.iter()))
                    .filter(|a| mine(a))
                    .map(|a| a.target.clone())
                    .collect();
                used.extend(
                    existing
                        .iter()
                        .flat_map(|n| n.spec.disks.iter().map(|d| d.target.clone())),
                );
                used.extend(nv.disks.iter().map(|d| d.target.clone()));
                let Some(t) = free_target(&used) else {
                    wait(
                        Reason::VolumeUnusable,
                        format!(
                            "node {node} has no free disk target for Volume {:?}",
                            att.name
                        ),
                    );
                    continue;
                };
                out.claims.push(claim_at(&t, host.clone()));
                t
            }
        };
        // The claim follows the node to its host (an iSCSI target then
        // admits that host only).
        if let Some(a) = &claim
            && host.is_some()
            && a.host != host
        {
            out.claims.push(claim_at(&a.target, host.clone()));
        }
        nv.disks.push(NodeDisk {
            volume: att.name.clone(),
            target,
            read_only: att.read_only || reader,
            serial: uid,
            path: if dir {
                backing.path.clone()
            } else {
                String::new()
            },
            iscsi,
            rbd,
            // Readers see the size it has (it grows only once they let go).
            bytes: if reader {
                backing.capacity_bytes
            } else {
                bytes
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(vols: &[&str]) -> VirtualClusterSpec {
        serde_json::from_value(json!({
            "networkGroup": "net",
            "frontend": {"size": {"cpu": 1, "memory": "128Mi"},
                         "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                         "volumes": vols.iter().map(|v| json!({"name": v})).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    fn vol(name: &str, uid: &str, attached: Option<(&str, &str, &str)>) -> Volume {
        let mut v: Volume = serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": name, "namespace": "a", "uid": uid, "resourceVersion": "7"},
            "spec": {"size": "64Mi", "pool": "local"},
            "status": {"location": {"site": "s", "pool": "local", "host": "h1"},
                       "backing": {"path": format!("/p/{uid}.qcow2"), "capacityBytes": 67108864}}
        }))
        .unwrap();
        if let Some((c, n, t)) = attached {
            v.status.as_mut().unwrap().attached_to = Some(VolumeAttachmentStatus {
                cluster: c.into(),
                node: n.into(),
                target: t.into(),
                host: None,
            });
        }
        v
    }

    #[test]
    fn claims_a_free_volume_with_the_first_free_target_and_pins_the_node() {
        let (a, b) = (
            vol("data", "u1", None),
            vol("logs", "u2", Some(("vc", "vc-frontend", "vdc"))),
        );
        let p = plan("a", "vc", &spec(&["data", "logs"]), &[], &[&a, &b], &[]);
        assert_eq!(p.claims.len(), 1);
        assert_eq!(p.claims[0].volume, "data");
        assert_eq!(p.claims[0].resource_version.as_deref(), Some("7"));
        // vdc is the claimed target of logs: data gets vdd.
        assert_eq!(p.claims[0].attached_to.target, "vdd");
        let n = &p.nodes["vc-frontend"];
        let targets: Vec<(&str, &str, u64)> = n
            .disks
            .iter()
            .map(|d| (d.target.as_str(), d.serial.as_str(), d.bytes))
            .collect();
        assert_eq!(
            targets,
            vec![("vdd", "u1", 64 << 20), ("vdc", "u2", 64 << 20)]
        );
        assert_eq!(n.pinned.as_ref().map(|p| p.0.as_str()), Some("h1"));
        assert!(p.waits.is_empty());
    }

    #[test]
    fn boot_volumes_are_one_per_node_and_claimed_as_vda() {
        let mut s = spec(&["data"]);
        s.frontend.root_volume =
            Some(serde_json::from_value(json!({"pool": "san", "size": "1Gi"})).unwrap());
        s.pools = vec![
            serde_json::from_value(json!({
                "name": "w", "replicas": 2, "size": {"cpu": 1, "memory": "128Mi"},
                "rootVolume": {"pool": "san", "size": "2Gi"}
            }))
            .unwrap(),
        ];
        let r = roots("vc", &s);
        let names: Vec<(&str, &str, &str)> = r
            .iter()
            .map(|r| (r.node.as_str(), r.name.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (
                    "vc-frontend",
                    "vc-frontend-root",
                    "spec.frontend.rootVolume"
                ),
                ("vc-w-0", "vc-w-0-root", "spec.pools[0].rootVolume"),
                ("vc-w-1", "vc-w-1-root", "spec.pools[0].rootVolume"),
            ]
        );
        // Made from the node's image, at the asked size, in the asked pool.
        assert_eq!(r[1].spec.size.0, "2Gi");
        assert_eq!(r[1].spec.pool, "san");
        assert_eq!(
            r[1].spec.source.as_ref().and_then(|s| s.image.as_ref()),
            Some(&s.frontend.image)
        );
        let (root, data) = (vol("vc-frontend-root", "u0", None), vol("data", "u1", None));
        let p = plan("a", "vc", &s, &[], &[&root, &data], &[]);
        let claims: Vec<(&str, &str)> = p
            .claims
            .iter()
            .map(|c| (c.volume.as_str(), c.attached_to.target.as_str()))
            .collect();
        assert_eq!(claims, vec![("vc-frontend-root", "vda"), ("data", "vdc")]);
        // The workers' boot volumes do not exist yet: they wait.
        assert!(!p.may_create("vc-w-0") && p.may_create("vc-frontend"));
    }

    fn spec_ro(vols: &[&str]) -> VirtualClusterSpec {
        let mut s = spec(vols);
        for v in &mut s.frontend.volumes {
            v.read_only = true;
        }
        s
    }

    fn reader(c: &str, t: &str) -> VolumeAttachmentStatus {
        VolumeAttachmentStatus {
            cluster: c.into(),
            node: format!("{c}-frontend"),
            target: t.into(),
            host: Some("h2".into()),
        }
    }

    #[test]
    fn read_only_attachments_share_a_volume_and_exclude_a_writer() {
        // A reader joins the readers already there, with its own target,
        // a read-only disk, and the others kept in the claim.
        let mut v = vol("ref", "u1", None);
        v.status.as_mut().unwrap().readers = vec![reader("a", "vdc")];
        let p = plan("a", "b", &spec_ro(&["ref"]), &[], &[&v], &[]);
        assert!(p.waits.is_empty(), "{:?}", p.waits);
        assert_eq!(p.claims.len(), 1);
        let readers = p.claims[0].readers.as_ref().unwrap();
        assert_eq!(
            readers.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
            ["a-frontend", "b-frontend"]
        );
        let d = &p.nodes["b-frontend"].disks[0];
        assert!(d.read_only);
        assert_eq!(d.target, "vdc");
        // A writer waits for the readers, naming them, and gets no disk.
        let p = plan("a", "w", &spec(&["ref"]), &[], &[&v], &[]);
        assert!(p.claims.is_empty());
        assert!(!p.nodes.contains_key("w-frontend"));
        assert_eq!(p.waits[0].reason, Reason::VolumeInUse);
        assert!(
            p.waits[0]
                .message
                .contains("is held read-only by node a-frontend of cluster a"),
            "{}",
            p.waits[0].message
        );
        // A reader waits for a writer.
        let w = vol("ref", "u1", Some(("w", "w-frontend", "vdc")));
        let p = plan("a", "b", &spec_ro(&["ref"]), &[], &[&w], &[]);
        assert!(p.claims.is_empty());
        assert!(
            p.waits[0].message.contains("(single writer)"),
            "{:?}",
            p.waits
        );
        // A node holding it read-only keeps a read-only disk even when its
        // spec now asks to write, and is told how to switch.
        let mut held = vol("ref", "u1", None);
        held.status.as_mut().unwrap().readers = vec![reader("b", "vdc")];
        let p = plan("a", "b", &spec(&["ref"]), &[], &[&held], &[]);
        assert!(p.nodes["b-frontend"].disks[0].read_only);
        assert!(
            p.waits[0]
                .message
                .contains("remove it from the spec, then add it back")
        );
    }

    #[test]
    fn a_volume_held_elsewhere_waits_naming_the_holder_and_gives_no_disk() {
        let a = vol("data", "u1", Some(("other", "other-frontend", "vdc")));
        let p = plan("a", "vc", &spec(&["data"]), &[], &[&a], &[]);
        assert!(p.claims.is_empty());
        assert!(
            p.nodes
                .get("vc-frontend")
                .is_none_or(|n| n.disks.is_empty())
        );
        assert_eq!(p.waits.len(), 1);
        assert_eq!(p.waits[0].reason, Reason::VolumeInUse);
        assert!(p.waits[0].message.contains("spec.frontend.volumes[0]"));
        assert!(
            p.waits[0]
                .message
                .contains("node other-frontend of cluster other")
        );
        assert!(!p.may_create("vc-frontend"));
    }

    #[test]
    fn missing_unprovisioned_and_deleting_volumes_wait() {
        let mut pending = vol("data", "u1", None);
        pending.status.as_mut().unwrap().backing = None;
        let mut deleting = vol("logs", "u2", None);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let p = plan(
            "a",
            "vc",
            &spec(&["data", "logs", "gone"]),
            &[],
            &[&pending, &deleting],
            &[],
        );
        let reasons: Vec<(&Reason, bool)> = p
            .waits
            .iter()
            .map(|w| (&w.reason, w.message.contains("being deleted")))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (&Reason::VolumeNotReady, false),
                (&Reason::VolumeNotReady, true),
                (&Reason::VolumeNotFound, false)
            ]
        );
        assert!(p.claims.is_empty());
    }

    #[test]
    fn a_volume_of_another_namespace_is_never_found() {
        let mut other = vol("data", "u1", None);
        other.metadata.namespace = Some("team-a".into());
        let p = plan("team-b", "vc", &spec(&["data"]), &[], &[&other], &[]);
        assert_eq!(p.waits[0].reason, Reason::VolumeNotFound);
        assert!(p.waits[0].message.contains("namespace team-b"));
        assert!(p.claims.is_empty());
    }
}
