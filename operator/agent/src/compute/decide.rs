//! What a VirtualNode placed on this host needs, as pure functions of the
//! node and what the host holds: disk operations, domain operations, and
//! the status that reports the result.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use yukumo_api::Reason;
use yukumo_api::common::{
    Condition, ConditionStatus, Conditions, ImageFormat, condition_types as ct,
};
use yukumo_api::virtualnode::{AttachedDisk, NodeDisk, NodePhase, VirtualNode, VirtualNodeStatus};

use super::disks::qcow2::BackingFormat;
use super::domain::{NodePaths, disk_xml, volume_disk_xml};
use super::guestconfig::{self, GuestConfig};
use super::ops::{DiskOp, DomainOp};

/// A node's domain as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSeen {
    pub active: bool,
    /// The hash in its yukumo marker (None: no marker).
    pub hash: Option<String>,
    /// Its volume disks: live while it runs, else as defined.
    pub disks: Vec<super::domain::DiskSeen>,
}

/// What the host holds of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSeen {
    /// Its domain (by UUID = the node's uid).
    pub domain: Option<DomainSeen>,
    /// A domain of another node holds this node's name.
    pub stale_name: bool,
    /// Its root disk is a readable qcow2 overlay.
    pub root_disk: bool,
    /// What its config disk holds (the stamp written with it).
    pub config_stamp: Option<String>,
}

/// The content stamp of a config disk: what it was written from.
pub fn config_stamp(cfg: &GuestConfig) -> String {
    format!(
        "{}\0{}\0{}",
        cfg.meta_data, cfg.user_data, cfg.network_config
    )
}

/// The backing format of a node's image.
pub fn backing_format(f: ImageFormat) -> BackingFormat {
    match f {
        ImageFormat::Qcow2 => BackingFormat::Qcow2,
        ImageFormat::Raw => BackingFormat::Raw,
    }
}

/// A node's disks cannot be made as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DiskRefused(pub String);

/// The disk operations a node needs: its overlay on the cached `image`
/// (once: it holds the guest's writes) and its config disk (whenever what
/// it should hold changed). The overlay has the node's `diskBytes`, or the
/// image's size; a size smaller than the image is refused (the guest would
/// see a truncated disk).
pub fn disk_ops(
    vn: &VirtualNode,
    paths: &NodePaths,
    seen: &NodeSeen,
    image: Option<(&Path, u64)>,
) -> Result<Vec<DiskOp>, DiskRefused> {
    let mut ops = Vec::new();
    // `None`: the node boots from a Volume.
    if let Some((image, image_size)) = image
        && !seen.root_disk
    {
        let want = vn.spec.disk_bytes;
        if want != 0 && want < image_size {
            return Err(DiskRefused(format!(
                "spec.diskBytes: {want} bytes is smaller than the image's {image_size}"
            )));
        }
        ops.push(DiskOp::CreateOverlay {
            path: paths.root_disk.clone(),
            backing: image.to_path_buf(),
            format: backing_format(vn.spec.image.format),
            size: want.max(image_size),
        });
    }
    let cfg = guestconfig::render(vn);
    if seen.config_stamp.as_deref() != Some(config_stamp(&cfg).as_str()) {
        ops.push(DiskOp::WriteConfig {
            path: paths.config_iso.clone(),
            stamp: paths.dir.join("cidata.content"),
            config: cfg,
        });
    }
    Ok(ops)
}

/// The domain operations that bring a node's domain to its rendered XML
/// (`hash`) and power state.
pub fn domain_ops(
    seen: &NodeSeen,
    name: &str,
    xml: &str,
    hash: &str,
    running: bool,
) -> Vec<DomainOp> {
    let mut ops = Vec::new();
    let active = match &seen.domain {
        Some(d) => {
            if d.hash.as_deref() != Some(hash) {
                ops.push(DomainOp::Define {
                    xml: xml.to_string(),
                });
            }
            d.active
        }
        None => {
            if seen.stale_name {
                ops.push(DomainOp::RemoveStale {
                    name: name.to_string(),
                });
            }
            ops.push(DomainOp::Define {
                xml: xml.to_string(),
            });
            false
        }
    };
    if running && !active {
        ops.push(DomainOp::Start);
    } else if !running && active {
        ops.push(DomainOp::Destroy);
    }
    ops
}

/// The hot-plug operations that bring a running guest's volume disks to
/// `wanted` (the definition is brought there by `domain_ops`): attach
/// what is missing, detach what is no longer wanted (or sits at another
/// target), grow what is smaller than asked.
pub fn live_disk_ops(seen: &NodeSeen, wanted: &[NodeDisk]) -> Vec<DomainOp> {
    let Some(d) = seen.domain.as_ref().filter(|d| d.active) else {
        return vec![];
    };
    let mut ops = Vec::new();
    // The boot disk is never plugged or unplugged live: a guest keeps the
    // disk it booted from until it is restarted.
    let root = super::domain::ROOT_TARGET;
    let wanted: Vec<&NodeDisk> = wanted.iter().filter(|w| w.target != root).collect();
    for x in d.disks.iter().filter(|x| x.target != root) {
        if !wanted
            .iter()
            .any(|w| w.serial == x.serial && w.target == x.target)
        {
            ops.push(DomainOp::DetachDisk {
                xml: disk_xml(
                    &x.path,
                    x.iscsi.as_ref(),
                    x.rbd.as_ref(),
                    &x.target,
                    &x.serial,
                    false,
                ),
            });
        }
    }
    for w in wanted {
        match d.disks.iter().find(|x| x.serial == w.serial) {
            // Wait for the old target to go before plugging it anew.
            Some(x) if x.target != w.target => {}
            Some(x) => {
                if x.bytes > 0 && x.bytes < w.bytes {
                    ops.push(DomainOp::ResizeDisk {
                        target: w.target.clone(),
                        bytes: w.bytes,
                    });
                }
            }
            None => {
                if d.disks.iter().any(|x| x.target == w.target) {
                    continue; // its target is still being released
                }
                ops.push(DomainOp::AttachDisk {
                    xml: volume_disk_xml(w),
                })
            }
        }
    }
    ops
}

/// The volume disks the node's domain holds once `ops` are done: the live
/// set plus what was attached (a detach completes when the guest lets go,
/// so a detached disk is still reported until it is gone), or the
/// definition's for a domain that does not run.
pub fn disks_after(seen: &NodeSeen, active: bool, wanted: &[NodeDisk]) -> Vec<AttachedDisk> {
    let live = seen.domain.as_ref().filter(|d| d.active && active);
    let mut out: Vec<AttachedDisk> = match live {
        Some(d) => {
            let mut v: Vec<AttachedDisk> = d
                .disks
                .iter()
                .map(|x| AttachedDisk {
                    serial: x.serial.clone(),
                    target: x.target.clone(),
                    bytes: wanted
                        .iter()
                        .find(|w| w.serial == x.serial && w.target == x.target)
                        .map_or(x.bytes, |w| w.bytes.max(x.bytes)),
                })
                .collect();
            for w in wanted {
                if !v.iter().any(|x| x.serial == w.serial)
                    && !d.disks.iter().any(|x| x.target == w.target)
                {
                    v.push(AttachedDisk {
                        serial: w.serial.clone(),
                        target: w.target.clone(),
                        bytes: w.bytes,
                    });
                }
            }
            v
        }
        None if seen.domain.is_some() || active => wanted
            .iter()
            .map(|w| AttachedDisk {
                serial: w.serial.clone(),
                target: w.target.clone(),
                bytes: 0,
            })
            .collect(),
        None => vec![],
    };
    out.sort();
    out
}

/// Whether the domain runs after `ops` were carried out on what was seen.
pub fn active_after(seen: &NodeSeen, ops: &[DomainOp]) -> bool {
    let before = seen.domain.as_ref().is_some_and(|d| d.active);
    if ops.contains(&DomainOp::Start) {
        true
    } else if ops.contains(&DomainOp::Destroy) {
        false
    } else {
        before
    }
}

/// The node's status with `phase` and its `Ready` condition (others kept).
pub fn status_with(
    vn: &VirtualNode,
    phase: NodePhase,
    ready: bool,
    reason: Reason,
    message: String,
) -> VirtualNodeStatus {
    let old = vn.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    conditions.set_condition(Condition::new(
        ct::READY,
        ConditionStatus::from_bool(ready),
        reason,
        message,
        vn.metadata.generation,
    ));
    VirtualNodeStatus {
        observed_generation: vn.metadata.generation,
        conditions,
        phase,
        host: vn.spec.host.clone(),
        ..old
    }
}

/// The status after the domain step: running or stopped, its boot time.
pub fn settled_status(
    vn: &VirtualNode,
    host: &str,
    active: bool,
    boot_time: Option<Time>,
) -> VirtualNodeStatus {
    let (phase, ready, reason, msg) = if active {
        (
            NodePhase::Running,
            true,
            Reason::Running,
            format!("running on {host}"),
        )
    } else {
        (
            NodePhase::Stopped,
            false,
            Reason::Stopped,
            "powered off as requested".to_string(),
        )
    };
    VirtualNodeStatus {
        domain_uuid: vn.metadata.uid.clone(),
        boot_time,
        last_error: None,
        ..status_with(vn, phase, ready, reason, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vn(disk: u64, running: bool) -> VirtualNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": "qs-w-0", "namespace": "demo", "uid": "u-1", "generation": 2},
            "spec": {"cluster": "qs", "role": "worker", "hostname": "qs-w-0", "host": "h1",
                     "resources": {"cpu": 1, "memoryMiB": 128}, "diskBytes": disk, "running": running,
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}}
        }))
        .unwrap()
    }

    #[test]
    fn a_new_node_gets_both_disks_and_a_running_domain() {
        let paths = NodePaths::new(Path::new("/s"), "u-1");
        let seen = NodeSeen::default();
        let ops = disk_ops(
            &vn(0, true),
            &paths,
            &seen,
            Some((Path::new("/s/images/x"), 1 << 30)),
        )
        .unwrap();
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[0], DiskOp::CreateOverlay { size, format: BackingFormat::Qcow2, .. } if *size == 1 << 30)
        );
        let ops = domain_ops(&seen, "d", "<domain/>", "h", true);
        assert_eq!(
            ops,
            [
                DomainOp::Define {
                    xml: "<domain/>".into()
                },
                DomainOp::Start
            ]
        );
        assert!(active_after(&seen, &ops));
        // A bigger disk is honoured; a smaller one refused, naming the field.
        let big = disk_ops(
            &vn(2 << 30, true),
            &paths,
            &seen,
            Some((Path::new("/i"), 1 << 30)),
        )
        .unwrap();
        assert!(matches!(&big[0], DiskOp::CreateOverlay { size, .. } if *size == 2 << 30));
        let small = disk_ops(
            &vn(1 << 20, true),
            &paths,
            &seen,
            Some((Path::new("/i"), 1 << 30)),
        );
        assert!(small.unwrap_err().0.starts_with("spec.diskBytes"));
    }

    fn disk(serial: &str, target: &str, bytes: u64) -> NodeDisk {
        NodeDisk {
            volume: serial.into(),
            target: target.into(),
            read_only: false,
            serial: serial.into(),
            path: format!("/p/{serial}.qcow2"),
            iscsi: None,
            rbd: None,
            bytes,
        }
    }

    fn running_with(disks: &[(&str, &str, u64)]) -> NodeSeen {
        NodeSeen {
            domain: Some(DomainSeen {
                active: true,
                hash: Some("h".into()),
                disks: disks
                    .iter()
                    .map(|(s, t, b)| super::super::domain::DiskSeen {
                        serial: s.to_string(),
                        target: t.to_string(),
                        path: format!("/p/{s}.qcow2"),
                        iscsi: None,
                        rbd: None,
                        bytes: *b,
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_boot_volume_is_never_plugged_live_and_needs_no_overlay() {
        // Running from its boot volume: nothing to plug, unplug or grow
        // there, whether the spec lists it or not.
        let seen = running_with(&[("root", "vda", 10)]);
        assert_eq!(live_disk_ops(&seen, &[disk("root", "vda", 20)]), vec![]);
        assert_eq!(live_disk_ops(&seen, &[]), vec![]);
        let fresh = running_with(&[]);
        assert_eq!(live_disk_ops(&fresh, &[disk("root", "vda", 10)]), vec![]);
        // No image: only the config disk is written.
        let paths = NodePaths::new(Path::new("/s"), "u-1");
        let ops = disk_ops(&vn(0, true), &paths, &NodeSeen::default(), None).unwrap();
        assert_eq!(ops.len(), 1);
        assert!(matches!(ops[0], DiskOp::WriteConfig { .. }));
    }

    #[test]
    fn a_running_guest_gets_volumes_plugged_unplugged_and_grown() {
        let seen = running_with(&[("old", "vdc", 10), ("grow", "vdd", 10)]);
        let want = [disk("grow", "vdd", 20), disk("new", "vde", 5)];
        let ops = live_disk_ops(&seen, &want);
        let labels: Vec<&str> = ops.iter().map(|o| o.label()).collect();
        assert_eq!(labels, ["detach", "resize", "attach"]);
        assert!(
            matches!(&ops[0], DomainOp::DetachDisk { xml } if xml.contains("<target dev='vdc'"))
        );
        assert_eq!(
            ops[1],
            DomainOp::ResizeDisk {
                target: "vdd".into(),
                bytes: 20
            }
        );
        assert!(
            matches!(&ops[2], DomainOp::AttachDisk { xml } if xml.contains("<serial>new</serial>"))
        );
        // The old disk is reported until the guest lets go of it.
        let after = disks_after(&seen, true, &want);
        let serials: Vec<&str> = after.iter().map(|d| d.serial.as_str()).collect();
        assert_eq!(serials, ["grow", "new", "old"]);
        // A new volume whose target is still being released waits for it.
        let ops = live_disk_ops(
            &running_with(&[("old", "vdc", 10)]),
            &[disk("new", "vdc", 5)],
        );
        assert_eq!(
            ops.iter().map(|o| o.label()).collect::<Vec<_>>(),
            ["detach"]
        );
        // Converged: nothing; a stopped domain is changed by its definition only.
        assert!(
            live_disk_ops(
                &running_with(&[("grow", "vdd", 20)]),
                &[disk("grow", "vdd", 20)]
            )
            .is_empty()
        );
        assert!(live_disk_ops(&NodeSeen::default(), &want).is_empty());
        assert_eq!(disks_after(&NodeSeen::default(), false, &want), vec![]);
    }

    #[test]
    fn a_converged_node_needs_nothing_and_power_follows_the_spec() {
        let paths = NodePaths::new(Path::new("/s"), "u-1");
        let node = vn(0, true);
        let seen = NodeSeen {
            domain: Some(DomainSeen {
                active: true,
                hash: Some("h".into()),
                disks: vec![],
            }),
            stale_name: false,
            root_disk: true,
            config_stamp: Some(config_stamp(&guestconfig::render(&node))),
        };
        assert!(
            disk_ops(&node, &paths, &seen, Some((Path::new("/i"), 1)))
                .unwrap()
                .is_empty()
        );
        assert!(domain_ops(&seen, "d", "x", "h", true).is_empty());
        assert_eq!(domain_ops(&seen, "d", "x", "h", false), [DomainOp::Destroy]);
        // A changed spec redefines the domain; a running one keeps running.
        let ops = domain_ops(&seen, "d", "y", "h2", true);
        assert_eq!(ops, [DomainOp::Define { xml: "y".into() }]);
        assert!(active_after(&seen, &ops));
        // A stale domain under the node's name is removed first.
        let stale = NodeSeen {
            stale_name: true,
            ..NodeSeen::default()
        };
        assert!(matches!(
            domain_ops(&stale, "d", "x", "h", false)[0],
            DomainOp::RemoveStale { .. }
        ));
        let st = settled_status(&node, "h1", true, None);
        assert_eq!(st.phase, NodePhase::Running);
        assert!(st.conditions.is_true("Ready"));
        assert_eq!(st.observed_generation, Some(2));
    }
}
