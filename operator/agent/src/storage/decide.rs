//! What a Volume needs of its pool, as a pure function of the Volume and of
//! what the pool holds.

use std::collections::BTreeMap;

use yukumo_api::volume::VolumeBacking;

/// A pool as the host holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSeen {
    /// The libvirt pool exists and runs.
    pub active: bool,
    /// Its folder, as libvirt has it defined.
    pub path: String,
    /// Size of the file system holding it.
    pub capacity: u64,
    /// Free space there.
    pub available: u64,
    /// Its volumes, by file name.
    pub volumes: BTreeMap<String, VolSeen>,
}

/// A volume file as the pool holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolSeen {
    pub path: String,
    /// The size the guest sees.
    pub capacity: u64,
    /// What it takes on disk.
    pub allocation: u64,
}

/// A change of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageOp {
    /// Define, build (mkdir) and start the pool at `path`, autostarted.
    EnsurePool { path: String },
    /// A blank qcow2 volume of exactly `bytes`.
    Create { name: String, bytes: u64 },
    /// Grow a volume to `bytes` (offline: a running guest's disk is grown
    /// by its node's agent, through QEMU).
    Grow { name: String, bytes: u64 },
    /// Delete a volume's (or a snapshot's) storage.
    Delete { name: String },
    /// A full, independent copy of a volume file (libvirt clones it with
    /// qemu-img): a snapshot taken, restored, or seeding a new volume.
    Clone { from: String, name: String },
    /// A new volume as a copy of a verified image of the host's image
    /// cache (`bytes`: the image's virtual size).
    CopyImage {
        image: std::path::PathBuf,
        bytes: u64,
        name: String,
    },
}

/// The format of a pool's files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (`dir` pools: QEMU opens the file).
    #[default]
    Qcow2,
    /// Raw (`iscsi` pools: the target serves the file's bytes).
    Raw,
}

impl Format {
    pub fn of(pool: yukumo_api::site::PoolType) -> Format {
        match pool {
            yukumo_api::site::PoolType::Dir => Format::Qcow2,
            yukumo_api::site::PoolType::Iscsi | yukumo_api::site::PoolType::Rbd => Format::Raw,
        }
    }

    /// The file name extension, and libvirt's name of the format.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// The format of a file, by its name.
    pub fn of_file(name: &str) -> Format {
        if name.ends_with(".raw") {
            Format::Raw
        } else {
            Format::Qcow2
        }
    }
}

fn strip_ext(name: &str) -> Option<&str> {
    name.strip_suffix(".qcow2")
        .or_else(|| name.strip_suffix(".raw"))
}

/// The file name of a Volume's storage: its uid (the marker that says
/// yukumo made it, and whose it is).
pub fn volume_file(uid: &str, fmt: Format) -> String {
    format!("{uid}.{}", fmt.ext())
}

/// The file name of a Volume's snapshot: `<uid>@<snapshot>.<ext>`.
pub fn snapshot_file(uid: &str, snapshot: &str, fmt: Format) -> String {
    format!("{uid}@{snapshot}.{}", fmt.ext())
}

/// The snapshots of `uid` the pool holds: (snapshot name, file name).
pub fn snapshots_of<'a>(seen: &'a PoolSeen, uid: &str) -> Vec<(&'a str, &'a str)> {
    let prefix = format!("{uid}@");
    seen.volumes
        .keys()
        .filter_map(|n| {
            let snap = strip_ext(n.strip_prefix(&prefix)?)?;
            Some((snap, n.as_str()))
        })
        .collect()
}

/// The uid a yukumo volume or snapshot file belongs to; `None` for any
/// other file.
pub fn file_uid(name: &str) -> Option<&str> {
    let base = strip_ext(name)?;
    let uid = base.split_once('@').map_or(base, |(u, _)| u);
    let ok = uid.len() == 36
        && uid.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        });
    ok.then_some(uid)
}

/// What a Volume asks of its pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeWant {
    pub uid: String,
    pub bytes: u64,
    /// Deleted and held by no node: its storage (and its snapshots) go.
    pub delete: bool,
    /// Snapshots to keep, by name (one missing is taken; one not listed is
    /// deleted).
    pub snapshots: Vec<String>,
    /// Restore in place from this snapshot (pending: not yet done).
    pub restore: Option<String>,
    /// A node holds the volume (a restore waits for it to let go).
    pub attached: bool,
    /// A new volume's content: this snapshot file (of another volume) in
    /// the same pool.
    pub seed: Option<String>,
    /// A new volume's content: this verified image (path in the image
    /// cache, virtual size).
    pub image: Option<(std::path::PathBuf, u64)>,
    /// The pool's file format.
    pub format: Format,
    /// A running guest uses the volume through its iSCSI target (a
    /// consistent snapshot waits for it to let go).
    pub in_use: bool,
}

/// Why a Volume's storage cannot be made as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("pool {pool:?} has {available} bytes free for {wanted} more: short by {short} bytes")]
    NoSpace {
        pool: String,
        available: u64,
        wanted: u64,
        short: u64,
    },
    #[error(
        "the storage holds {held} bytes, more than spec.size ({wanted}): a volume is never shrunk"
    )]
    Shrink { held: u64, wanted: u64 },
    #[error("spec.restoreFrom: restoring from snapshot {0:?} waits until no node holds the volume")]
    RestoreWhileAttached(String),
    #[error(
        "spec.snapshots: snapshot {0:?} waits while a running guest uses the volume; it is taken once the volume is detached or its node is stopped"
    )]
    SnapshotInUse(String),
    #[error("{field}: snapshot file {file} does not exist in the pool")]
    NoSnapshot { field: &'static str, file: String },
    #[error("spec.size: the image holds {image} bytes, more than spec.size ({wanted})")]
    ImageTooBig { image: u64, wanted: u64 },
}

impl Refused {
    /// The condition reason this refusal is reported with.
    pub fn reason(&self) -> yukumo_api::Reason {
        match self {
            Refused::NoSpace { .. } => yukumo_api::Reason::InsufficientPoolSpace,
            Refused::Shrink { .. } => yukumo_api::Reason::StorageFailed,
            Refused::RestoreWhileAttached(_) => yukumo_api::Reason::RestorePending,
            Refused::SnapshotInUse(_) => yukumo_api::Reason::SnapshotPending,
            Refused::NoSnapshot { .. } => yukumo_api::Reason::SnapshotNotFound,
            Refused::ImageTooBig { .. } => yukumo_api::Reason::InvalidSize,
        }
    }
}

/// The operations that bring the pool to what `want` asks, given the
/// sizes promised to the pool's other volumes (`promised`, bytes; the
/// pool is never overcommitted: thin files, but every promise fits).
pub fn volume_ops(
    pool: &str,
    path: &str,
    seen: &PoolSeen,
    want: &VolumeWant,
    promised: u64,
) -> Result<Vec<StorageOp>, Refused> {
    let mut ops = Vec::new();
    if !seen.active || seen.path != path {
        ops.push(StorageOp::EnsurePool {
            path: path.to_string(),
        });
    }
    let name = volume_file(&want.uid, want.format);
    let held = seen.volumes.get(&name);
    if want.delete {
        if held.is_some() {
            ops.push(StorageOp::Delete { name });
        }
        for (_, file) in snapshots_of(seen, &want.uid) {
            ops.push(StorageOp::Delete {
                name: file.to_string(),
            });
        }
        return Ok(ops);
    }
    let fits = |more: u64| -> Result<(), Refused> {
        // The pool's file system: what it holds already is in `available`;
        // what is promised but not yet written still has to fit.
        let room = seen.capacity.saturating_sub(promised);
        if seen.active && more > room {
            return Err(Refused::NoSpace {
                pool: pool.to_string(),
                available: room,
                wanted: more,
                short: more - room,
            });
        }
        Ok(())
    };
    // A copy of `from` as the volume, grown to its size.
    let copy = |from: &str, field: &'static str, ops: &mut Vec<StorageOp>| -> Result<(), Refused> {
        let src = seen.volumes.get(from).ok_or_else(|| Refused::NoSnapshot {
            field,
            file: from.to_string(),
        })?;
        if src.capacity > want.bytes {
            return Err(Refused::Shrink {
                held: src.capacity,
                wanted: want.bytes,
            });
        }
        ops.push(StorageOp::Clone {
            from: from.to_string(),
            name: name.clone(),
        });
        if src.capacity < want.bytes {
            ops.push(StorageOp::Grow {
                name: name.clone(),
                bytes: want.bytes,
            });
        }
        Ok(())
    };
    if let Some(snap) = &want.restore {
        // In place, only while no node holds it; the old content goes.
        if want.attached {
            return Err(Refused::RestoreWhileAttached(snap.clone()));
        }
        if held.is_some() {
            ops.push(StorageOp::Delete { name: name.clone() });
        }
        copy(
            &snapshot_file(&want.uid, snap, want.format),
            "spec.restoreFrom",
            &mut ops,
        )?;
        return Ok(ops);
    }
    match held {
        None => match (&want.seed, &want.image) {
            (Some(from), _) => {
                fits(want.bytes)?;
                copy(from, "spec.source.snapshot", &mut ops)?;
            }
            (None, Some((image, size))) => {
                fits(want.bytes)?;
                if *size > want.bytes {
                    return Err(Refused::ImageTooBig {
                        image: *size,
                        wanted: want.bytes,
                    });
                }
                ops.push(StorageOp::CopyImage {
                    image: image.clone(),
                    bytes: *size,
                    name: name.clone(),
                });
                if *size < want.bytes {
                    ops.push(StorageOp::Grow {
                        name: name.clone(),
                        bytes: want.bytes,
                    });
                }
            }
            (None, None) => {
                fits(want.bytes)?;
                ops.push(StorageOp::Create {
                    name: name.clone(),
                    bytes: want.bytes,
                });
            }
        },
        Some(v) if v.capacity < want.bytes => {
            fits(want.bytes - v.capacity)?;
            ops.push(StorageOp::Grow {
                name: name.clone(),
                bytes: want.bytes,
            });
        }
        Some(v) if v.capacity > want.bytes => {
            return Err(Refused::Shrink {
                held: v.capacity,
                wanted: want.bytes,
            });
        }
        Some(_) => {}
    }
    // Snapshots: retention is the list.
    let have = snapshots_of(seen, &want.uid);
    let mut waiting = None;
    for s in &want.snapshots {
        if !have.iter().any(|(n, _)| n == s) {
            if want.in_use {
                waiting.get_or_insert(s.clone());
                continue;
            }
            fits(want.bytes)?;
            ops.push(StorageOp::Clone {
                from: name.clone(),
                name: snapshot_file(&want.uid, s, want.format),
            });
        }
    }
    for (n, file) in have {
        if !want.snapshots.iter().any(|s| s == n) {
            ops.push(StorageOp::Delete {
                name: file.to_string(),
            });
        }
    }
    match waiting {
        Some(s) if ops.is_empty() => Err(Refused::SnapshotInUse(s)),
        _ => Ok(ops),
    }
}

/// The backing to report once the ops are done (from a fresh observation).
pub fn backing(
    seen: &PoolSeen,
    uid: &str,
    fmt: Format,
    error: Option<(yukumo_api::Reason, String)>,
) -> Option<VolumeBacking> {
    let v = seen.volumes.get(&volume_file(uid, fmt));
    if v.is_none() && error.is_none() {
        return None;
    }
    Some(VolumeBacking {
        path: v.map(|v| v.path.clone()).unwrap_or_default(),
        capacity_bytes: v.map_or(0, |v| v.capacity),
        allocation_bytes: v.map_or(0, |v| v.allocation),
        reason: error.as_ref().map(|e| e.0.clone()),
        error: error.map(|e| e.1),
        iscsi: None,
        rbd: None,
    })
}

/// Files of the pool that carry yukumo's marker but whose Volume is not
/// among `known` uids: reported, never deleted.
pub fn orphans<'a>(seen: &'a PoolSeen, known: &std::collections::HashSet<String>) -> Vec<&'a str> {
    seen.volumes
        .keys()
        .filter(|n| file_uid(n).is_some_and(|u| !known.contains(u)))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c7e4a-0000-4000-8000-000000000001";

    fn pool(cap: u64, vols: &[(&str, u64)]) -> PoolSeen {
        PoolSeen {
            active: true,
            path: "/p".into(),
            capacity: cap,
            available: cap,
            volumes: vols
                .iter()
                .map(|(n, c)| {
                    (
                        n.to_string(),
                        VolSeen {
                            path: format!("/p/{n}"),
                            capacity: *c,
                            allocation: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    fn want(bytes: u64) -> VolumeWant {
        VolumeWant {
            uid: UID.into(),
            bytes,
            ..Default::default()
        }
    }

    #[test]
    fn creates_grows_and_never_shrinks() {
        let f = volume_file(UID, Format::Qcow2);
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[]), &want(10), 0).unwrap(),
            vec![StorageOp::Create {
                name: f.clone(),
                bytes: 10
            }]
        );
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 10)]), &want(20), 10).unwrap(),
            vec![StorageOp::Grow {
                name: f.clone(),
                bytes: 20
            }]
        );
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 20)]), &want(20), 20).unwrap(),
            vec![]
        );
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 30)]), &want(20), 30),
            Err(Refused::Shrink {
                held: 30,
                wanted: 20
            })
        );
    }

    #[test]
    fn a_volume_that_does_not_fit_names_the_pool_and_the_shortfall() {
        let e = volume_ops("fast", "/p", &pool(100, &[]), &want(80), 50).unwrap_err();
        assert_eq!(
            e,
            Refused::NoSpace {
                pool: "fast".into(),
                available: 50,
                wanted: 80,
                short: 30
            }
        );
        assert!(e.to_string().contains("\"fast\"") && e.to_string().contains("short by 30"));
    }

    #[test]
    fn an_inactive_pool_is_made_first_and_delete_removes_only_what_exists() {
        let seen = PoolSeen::default();
        assert_eq!(
            volume_ops("d", "/p", &seen, &want(10), 0).unwrap(),
            vec![
                StorageOp::EnsurePool { path: "/p".into() },
                StorageOp::Create {
                    name: volume_file(UID, Format::Qcow2),
                    bytes: 10
                }
            ]
        );
        let del = VolumeWant {
            delete: true,
            ..want(10)
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[]), &del, 0).unwrap(),
            vec![]
        );
        assert_eq!(
            volume_ops(
                "d",
                "/p",
                &pool(100, &[(&volume_file(UID, Format::Qcow2), 10)]),
                &del,
                0
            )
            .unwrap(),
            vec![StorageOp::Delete {
                name: volume_file(UID, Format::Qcow2)
            }]
        );
    }

    #[test]
    fn snapshots_follow_the_list_and_restore_waits_for_detach() {
        let f = volume_file(UID, Format::Qcow2);
        let s1 = snapshot_file(UID, "s1", Format::Qcow2);
        let w = VolumeWant {
            snapshots: vec!["s1".into(), "s2".into()],
            ..want(10)
        };
        let seen = pool(
            100,
            &[
                (&f, 10),
                (&s1, 10),
                (&snapshot_file(UID, "old", Format::Qcow2), 10),
            ],
        );
        assert_eq!(
            volume_ops("d", "/p", &seen, &w, 30).unwrap(),
            vec![
                StorageOp::Clone {
                    from: f.clone(),
                    name: snapshot_file(UID, "s2", Format::Qcow2)
                },
                StorageOp::Delete {
                    name: snapshot_file(UID, "old", Format::Qcow2)
                }
            ]
        );
        // Restore in place: the volume replaced by a copy of the snapshot,
        // grown to the volume's size; never while a node holds it.
        let r = VolumeWant {
            restore: Some("s1".into()),
            ..want(20)
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 20), (&s1, 10)]), &r, 30).unwrap(),
            vec![
                StorageOp::Delete { name: f.clone() },
                StorageOp::Clone {
                    from: s1.clone(),
                    name: f.clone()
                },
                StorageOp::Grow {
                    name: f.clone(),
                    bytes: 20
                }
            ]
        );
        let held = VolumeWant {
            attached: true,
            ..r.clone()
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 20), (&s1, 10)]), &held, 30),
            Err(Refused::RestoreWhileAttached("s1".into()))
        );
        // A crash between the delete and the copy: the copy is made again.
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&s1, 10)]), &r, 10).unwrap()[0],
            StorageOp::Clone {
                from: s1.clone(),
                name: f.clone()
            }
        );
        // A new volume seeded from another volume's snapshot.
        let other = "6f1c7e4a-0000-4000-8000-000000000002";
        let seeded = VolumeWant {
            uid: other.into(),
            seed: Some(s1.clone()),
            ..want(10)
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&s1, 10)]), &seeded, 10).unwrap(),
            vec![StorageOp::Clone {
                from: s1.clone(),
                name: volume_file(other, Format::Qcow2)
            }]
        );
        let missing = VolumeWant {
            seed: Some(snapshot_file(UID, "nope", Format::Qcow2)),
            ..seeded
        };
        assert!(matches!(
            volume_ops("d", "/p", &pool(100, &[]), &missing, 0),
            Err(Refused::NoSnapshot {
                field: "spec.source.snapshot",
                ..
            })
        ));
        // A new volume from an image, grown to its size; never truncated.
        let from_image = VolumeWant {
            uid: other.into(),
            image: Some(("/img/sha256-x".into(), 4)),
            ..want(10)
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[]), &from_image, 0).unwrap(),
            vec![
                StorageOp::CopyImage {
                    image: "/img/sha256-x".into(),
                    bytes: 4,
                    name: volume_file(other, Format::Qcow2)
                },
                StorageOp::Grow {
                    name: volume_file(other, Format::Qcow2),
                    bytes: 10
                }
            ]
        );
        let small = VolumeWant {
            bytes: 2,
            ..from_image
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[]), &small, 0),
            Err(Refused::ImageTooBig {
                image: 4,
                wanted: 2
            })
        );
        // Deleting the volume deletes its snapshots.
        let del = VolumeWant {
            delete: true,
            ..want(10)
        };
        assert_eq!(
            volume_ops("d", "/p", &pool(100, &[(&f, 10), (&s1, 10)]), &del, 0)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(file_uid(&s1), Some(UID));
    }

    #[test]
    fn raw_volumes_of_an_iscsi_pool_snapshot_only_while_no_guest_uses_them() {
        let raw = |snaps: &[&str], in_use: bool| VolumeWant {
            format: Format::Raw,
            in_use,
            snapshots: snaps.iter().map(|s| s.to_string()).collect(),
            ..want(10)
        };
        let f = volume_file(UID, Format::Raw);
        assert!(f.ends_with(".raw"));
        assert_eq!(file_uid(&f), Some(UID));
        assert_eq!(
            volume_ops("san", "/p", &pool(100, &[]), &raw(&[], false), 0).unwrap(),
            vec![StorageOp::Create {
                name: f.clone(),
                bytes: 10
            }]
        );
        let seen = pool(100, &[(&f, 10)]);
        // In use: the snapshot waits, with a reason saying why.
        let e = volume_ops("san", "/p", &seen, &raw(&["s1"], true), 10).unwrap_err();
        assert_eq!(e.reason(), yukumo_api::Reason::SnapshotPending);
        // ...but a grow asked meanwhile is not held back by it.
        let mut grow = raw(&["s1"], true);
        grow.bytes = 20;
        assert_eq!(
            volume_ops("san", "/p", &seen, &grow, 10).unwrap(),
            vec![StorageOp::Grow {
                name: f.clone(),
                bytes: 20
            }]
        );
        assert_eq!(
            volume_ops("san", "/p", &seen, &raw(&["s1"], false), 10).unwrap(),
            vec![StorageOp::Clone {
                from: f,
                name: snapshot_file(UID, "s1", Format::Raw)
            }]
        );
    }

    #[test]
    fn orphans_are_marked_files_without_a_volume() {
        let other = "6f1c7e4a-0000-4000-8000-000000000002";
        let seen = pool(
            100,
            &[
                (&volume_file(UID, Format::Qcow2), 1),
                (&volume_file(other, Format::Qcow2), 1),
                ("notes.txt", 1),
                ("x.qcow2", 1),
            ],
        );
        let known = [UID.to_string()].into_iter().collect();
        assert_eq!(
            orphans(&seen, &known),
            vec![volume_file(other, Format::Qcow2)]
        );
        assert_eq!(file_uid("6F1C7E4A-0000-4000-8000-00000000000.qcow2"), None);
    }
}
