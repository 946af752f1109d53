//! A node's disks on this host, written in-process: the qcow2 overlay
//! ([`qcow2`]) and the NoCloud config disk ([`cidata`]). The [`Disks`]
//! trait is the seam: [`Files`] writes them, [`MemDisks`] keeps them in
//! memory for tests.

pub mod cidata;
pub mod qcow2;

#[cfg(test)]
use std::collections::HashMap;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
#[cfg(test)]
use std::sync::Mutex;

use super::decide::{NodeSeen, config_stamp};
use super::domain::NodePaths;
use super::ops::DiskOp;

/// The disks of the nodes of this host.
pub trait Disks: Send + Sync + 'static {
    /// What the host holds of a node's disks (`root_disk`, `config_stamp`).
    fn observe(&self, paths: &NodePaths, seen: &mut NodeSeen);
    /// The size the guest sees of an image.
    fn image_size(&self, image: &Path) -> std::io::Result<u64>;
    /// Carry out one operation (blocking: called off the runtime).
    fn apply(&self, op: &DiskOp) -> std::io::Result<()>;
}

/// The disks as files under the agent's state directory.
pub struct Files;

impl Disks for Files {
    fn observe(&self, paths: &NodePaths, seen: &mut NodeSeen) {
        // A root disk whose header cannot be read (a crash while it was
        // being made) holds no data yet: it is made again.
        seen.root_disk = qcow2::info(&paths.root_disk).is_ok_and(|i| i.qcow2);
        seen.config_stamp = if paths.config_iso.exists() {
            std::fs::read_to_string(paths.dir.join("cidata.content")).ok()
        } else {
            None
        };
    }

    fn image_size(&self, image: &Path) -> std::io::Result<u64> {
        qcow2::info(image).map(|i| i.virtual_size)
    }

    fn apply(&self, op: &DiskOp) -> std::io::Result<()> {
        match op {
            DiskOp::CreateOverlay {
                path,
                backing,
                format,
                size,
            } => {
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                qcow2::create_overlay(path, backing, *format, *size)
            }
            DiskOp::WriteConfig {
                path,
                stamp,
                config,
            } => {
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                cidata::write(config, path)?;
                std::fs::write(stamp, config_stamp(config))
            }
        }
    }
}

/// Disks in memory: what was written, by path.
#[cfg(test)]
#[derive(Default)]
pub struct MemDisks {
    pub files: Mutex<HashMap<PathBuf, String>>,
    /// Image sizes to report, by path.
    pub images: Mutex<HashMap<PathBuf, u64>>,
}

#[cfg(test)]
impl Disks for MemDisks {
    fn observe(&self, paths: &NodePaths, seen: &mut NodeSeen) {
        let f = self.files.lock().expect("poisoned");
        seen.root_disk = f.contains_key(&paths.root_disk);
        seen.config_stamp = f.get(&paths.config_iso).cloned();
    }

    fn image_size(&self, image: &Path) -> std::io::Result<u64> {
        self.images
            .lock()
            .expect("poisoned")
            .get(image)
            .copied()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn apply(&self, op: &DiskOp) -> std::io::Result<()> {
        let mut f = self.files.lock().expect("poisoned");
        match op {
            DiskOp::CreateOverlay { path, backing, .. } => {
                f.insert(path.clone(), backing.display().to_string());
            }
            DiskOp::WriteConfig { path, config, .. } => {
                f.insert(path.clone(), config_stamp(config));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::decide::disk_ops;

    fn vn() -> yukumo_api::VirtualNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": "n", "namespace": "t", "uid": "u-7"},
            "spec": {"cluster": "c", "role": "worker", "hostname": "n",
                     "resources": {"cpu": 1, "memoryMiB": 128},
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64)), "format": "raw"}}
        }))
        .unwrap()
    }

    /// The files written in-process converge: a second look finds nothing
    /// to do; a crash's half-made overlay is made again.
    #[test]
    fn written_disks_converge() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
        let paths = NodePaths::new(dir.path(), "u-7");
        let disks = Files;
        for _ in 0..2 {
            let mut seen = NodeSeen::default();
            disks.observe(&paths, &mut seen);
            let size = disks.image_size(&image).unwrap();
            assert_eq!(size, 4 << 20);
            for op in disk_ops(&vn(), &paths, &seen, Some((&image, size))).unwrap() {
                disks.apply(&op).unwrap();
            }
        }
        let mut seen = NodeSeen::default();
        disks.observe(&paths, &mut seen);
        assert!(
            disk_ops(&vn(), &paths, &seen, Some((&image, 4 << 20)))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            qcow2::info(&paths.root_disk).unwrap().backing.as_deref(),
            Some(image.as_path())
        );
        std::fs::write(&paths.root_disk, b"half").unwrap();
        let mut seen = NodeSeen::default();
        disks.observe(&paths, &mut seen);
        assert!(!seen.root_disk);
        let m = MemDisks::default();
        m.images.lock().unwrap().insert(image.clone(), 1);
        let mut seen = NodeSeen::default();
        m.observe(&paths, &mut seen);
        for op in disk_ops(&vn(), &paths, &seen, Some((&image, 1))).unwrap() {
            m.apply(&op).unwrap();
        }
        m.observe(&paths, &mut seen);
        assert!(
            disk_ops(&vn(), &paths, &seen, Some((&image, 1)))
                .unwrap()
                .is_empty()
        );
    }
}
