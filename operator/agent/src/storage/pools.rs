//! The seam between a Volume's decision and its pool: the [`Pools`] trait,
//! carried out through libvirt's storage API on the agent's libvirt thread
//! ([`Hypervisor`]: libvirtd creates and resizes the qcow2 files itself),
//! or kept in memory by [`FakePools`] for tests.

use std::future::Future;

use crate::libvirt::StoragePool;
use crate::libvirt::StorageVol;

use yukumo_api::site::{PoolType, StoragePool as PoolSpec};

use super::ceph::Ceph;
use super::decide::{PoolSeen, StorageOp, VolSeen};
use super::lvm::Lvm;
use crate::hypervisor::{Hypervisor, HypervisorError};

/// The libvirt pool of a yukumo pool.
pub fn libvirt_pool(name: &str) -> String {
    format!("yk-{name}")
}

/// The storage pools of this host.
pub trait Pools: Send + Sync + Clone + 'static {
    /// The pool and its volumes (an absent pool is inactive and empty).
    fn observe(
        &self,
        pool: &PoolSpec,
    ) -> impl Future<Output = Result<PoolSeen, HypervisorError>> + Send;
    /// Carry out `op` on the pool.
    fn apply(
        &self,
        pool: &PoolSpec,
        op: StorageOp,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;
}

/// A host's pools by backend: `dir` and `iscsi` pools through libvirt
/// (`P`), `rbd` pools through Ceph's tools, LVM-backed `iscsi` pools
/// through LVM's.
#[derive(Clone)]
pub struct HostPools<P: Pools> {
    pub libvirt: P,
    pub ceph: Ceph,
    pub lvm: Lvm,
}

impl<P: Pools> Pools for HostPools<P> {
    async fn observe(&self, pool: &PoolSpec) -> Result<PoolSeen, HypervisorError> {
        match pool.type_ {
            PoolType::Rbd => self.ceph.observe(pool).await,
            PoolType::Iscsi if pool.lvm.is_some() => self.lvm.observe(pool).await,
            PoolType::Dir | PoolType::Iscsi => self.libvirt.observe(pool).await,
        }
    }

    async fn apply(&self, pool: &PoolSpec, op: StorageOp) -> Result<(), HypervisorError> {
        match pool.type_ {
            PoolType::Rbd => self.ceph.apply(pool, op).await,
            PoolType::Iscsi if pool.lvm.is_some() => self.lvm.apply(pool, op).await,
            PoolType::Dir | PoolType::Iscsi => self.libvirt.apply(pool, op).await,
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
}

/// The pool's folder as libvirt has it defined.
fn pool_path(xml: &str) -> String {
    let Some(i) = xml.find("<path>") else {
        return String::new();
    };
    let rest = &xml[i + 6..];
    rest[..rest.find("</path>").unwrap_or(0)].to_string()
}

impl Pools for Hypervisor {
    async fn observe(&self, pool: &PoolSpec) -> Result<PoolSeen, HypervisorError> {
        let lname = libvirt_pool(&pool.name);
        self.call(move |c| {
            let Ok(p) = StoragePool::lookup_by_name(c, &lname) else {
                return Ok(PoolSeen::default());
            };
            let path = pool_path(&p.get_xml_desc(0)?);
            if !p.is_active()? {
                return Ok(PoolSeen {
                    path,
                    ..Default::default()
                });
            }
            // Files written behind libvirt's back (or by QEMU growing a
            // live disk) are seen only after a refresh.
            p.refresh(0)?;
            let info = p.get_info()?;
            let mut volumes = std::collections::BTreeMap::new();
            for v in p.list_all_volumes(0)? {
                let vi = v.get_info()?;
                volumes.insert(
                    v.get_name()?,
                    VolSeen {
                        path: v.get_path()?,
                        capacity: vi.capacity,
                        allocation: vi.allocation,
                    },
                );
            }
            Ok(PoolSeen {
                active: true,
                path,
                capacity: info.capacity,
                available: info.available,
                volumes,
            })
        })
        .await
    }

    async fn apply(&self, pool: &PoolSpec, op: StorageOp) -> Result<(), HypervisorError> {
        let lname = libvirt_pool(&pool.name);
        self.call(move |c| {
            match op {
                StorageOp::EnsurePool { path } => {
                    if let Ok(old) = StoragePool::lookup_by_name(c, &lname) {
                        if pool_path(&old.get_xml_desc(0)?) == path {
                            if !old.is_active()? {
                                old.build(0)?;
                                old.create(0)?;
                            }
                            return Ok(());
                        }
                        // Moved by the operator: redefine at the new path
                        // (the old folder and its files stay).
                        if old.is_active()? {
                            old.destroy()?;
                        }
                        old.undefine()?;
                    }
                    let xml = format!(
                        "<pool type='dir'><name>{}</name><target><path>{}</path><permissions><mode>0700</mode></permissions></target></pool>",
                        esc(&lname),
                        esc(&path)
                    );
                    let p = StoragePool::define_xml(c, &xml, 0)?;
                    p.build(0)?;
                    p.create(0)?;
                    p.set_autostart(true)?;
                }
                StorageOp::Create { name, bytes } => {
                    let p = StoragePool::lookup_by_name(c, &lname)?;
                    let xml = format!(
                        "<volume><name>{}</name><capacity unit='bytes'>{bytes}</capacity><allocation unit='bytes'>0</allocation><target>{}<permissions><mode>0600</mode></permissions></target></volume>",
                        esc(&name),
                        format_xml(&name)
                    );
                    StorageVol::create_xml(&p, &xml, 0)?;
                }
                StorageOp::Grow { name, bytes } => {
                    let p = StoragePool::lookup_by_name(c, &lname)?;
                    StorageVol::lookup_by_name(&p, &name)?.resize(bytes, 0)?;
                }
                StorageOp::Delete { name } => {
                    let p = StoragePool::lookup_by_name(c, &lname)?;
                    if let Ok(v) = StorageVol::lookup_by_name(&p, &name) {
                        v.delete(0)?;
                    }
                }
                StorageOp::CopyImage { image, name, .. } => {
                    // The image cache as a libvirt pool of its own, so that
                    // libvirt can copy (convert) an image into a volume.
                    let dir = image
                        .parent()
                        .map(|d| d.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let images = match StoragePool::lookup_by_name(c, IMAGES_POOL) {
                        Ok(p) => p,
                        Err(_) => {
                            let xml = format!(
                                "<pool type='dir'><name>{IMAGES_POOL}</name><target><path>{}</path></target></pool>",
                                esc(&dir)
                            );
                            StoragePool::define_xml(c, &xml, 0)?
                        }
                    };
                    if !images.is_active()? {
                        images.create(0)?;
                    }
                    images.refresh(0)?;
                    let src = StorageVol::lookup_by_path(c, &image.to_string_lossy())?;
                    let p = StoragePool::lookup_by_name(c, &lname)?;
                    copy_volume(&p, &src, &name)?;
                }
                StorageOp::Clone { from, name } => {
                    let p = StoragePool::lookup_by_name(c, &lname)?;
                    let src = StorageVol::lookup_by_name(&p, &from)?;
                    copy_volume(&p, &src, &name)?;
                }
            }
            Ok(())
        })
        .await
    }
}

/// A new file's format, by its name: qcow2 in the current format (compat
/// 1.1; libvirt's default is 0.10), or raw.
fn format_xml(name: &str) -> String {
    match super::decide::Format::of_file(name) {
        super::decide::Format::Qcow2 => "<format type='qcow2'/><compat>1.1</compat>".into(),
        super::decide::Format::Raw => "<format type='raw'/>".into(),
    }
}

/// The libvirt pool over the agent's image cache (volumes are copied from it).
const IMAGES_POOL: &str = "yk-images";

/// A full copy of `src` into pool `p` as `name` (qcow2), removed again if
/// the copy fails half-way (the next pass makes it again).
fn copy_volume(p: &StoragePool, src: &StorageVol, name: &str) -> Result<(), crate::libvirt::Error> {
    let cap = src.get_info()?.capacity;
    let xml = format!(
        "<volume><name>{}</name><capacity unit='bytes'>{cap}</capacity><target>{}<permissions><mode>0600</mode></permissions></target></volume>",
        esc(name),
        format_xml(name)
    );
    if let Err(e) = StorageVol::create_xml_from(p, &xml, src, 0) {
        if let Ok(v) = StorageVol::lookup_by_name(p, name) {
            let _ = v.delete(0);
        }
        return Err(e);
    }
    Ok(())
}

/// Pools kept in memory, for tests: the same observable behaviour.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct FakePools {
    pub pools: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, PoolSeen>>>,
    /// The capacity a new pool has.
    pub capacity: u64,
}

#[cfg(test)]
impl Pools for FakePools {
    async fn observe(&self, pool: &PoolSpec) -> Result<PoolSeen, HypervisorError> {
        Ok(self
            .pools
            .lock()
            .unwrap()
            .get(&pool.name)
            .cloned()
            .unwrap_or_default())
    }

    async fn apply(&self, pool: &PoolSpec, op: StorageOp) -> Result<(), HypervisorError> {
        let name = pool.name.as_str();
        let mut pools = self.pools.lock().unwrap();
        let missing = || HypervisorError::Libvirt {
            uri: "fake".into(),
            message: format!("no storage pool {name}"),
        };
        match op {
            StorageOp::EnsurePool { path } => {
                let p = pools.entry(name.to_string()).or_default();
                p.active = true;
                p.path = path;
                p.capacity = self.capacity;
            }
            StorageOp::Create { name: v, bytes } => {
                let p = pools.get_mut(name).ok_or_else(missing)?;
                let path = format!("{}/{v}", p.path);
                p.volumes.insert(
                    v,
                    VolSeen {
                        path,
                        capacity: bytes,
                        allocation: 0,
                    },
                );
            }
            StorageOp::Grow { name: v, bytes } => {
                let p = pools.get_mut(name).ok_or_else(missing)?;
                p.volumes.get_mut(&v).ok_or_else(missing)?.capacity = bytes;
            }
            StorageOp::Delete { name: v } => {
                pools.get_mut(name).ok_or_else(missing)?.volumes.remove(&v);
            }
            StorageOp::CopyImage { bytes, name: v, .. } => {
                let p = pools.get_mut(name).ok_or_else(missing)?;
                let path = format!("{}/{v}", p.path);
                p.volumes.insert(
                    v,
                    VolSeen {
                        path,
                        capacity: bytes,
                        allocation: bytes,
                    },
                );
            }
            StorageOp::Clone { from, name: v } => {
                let p = pools.get_mut(name).ok_or_else(missing)?;
                let src = p.volumes.get(&from).cloned().ok_or_else(missing)?;
                let path = format!("{}/{v}", p.path);
                p.volumes.insert(v, VolSeen { path, ..src });
            }
        }
        let p = pools.get_mut(name).ok_or_else(missing)?;
        let used: u64 = p.volumes.values().map(|v| v.allocation).sum();
        p.available = p.capacity.saturating_sub(used);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::decide::{VolumeWant, volume_ops};

    fn test_pool(name: &str) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            type_: PoolType::Dir,
            host: "h".into(),
            path: None,
            ceph: None,
            lvm: None,
        }
    }

    #[test]
    fn the_pool_path_is_read_from_its_xml() {
        assert_eq!(
            pool_path("<pool type='dir'><target><path>/var/x</path></target></pool>"),
            "/var/x"
        );
        assert_eq!(pool_path("<pool/>"), "");
    }

    /// The same against libvirt's test driver (its storage API, in memory;
    /// it has no resize: growing is proved on a real libvirtd, e2e).
    #[tokio::test]
    async fn decided_ops_converge_on_libvirt_test_driver() {
        let uri = crate::libvirt::testd::default_uri();
        let mut keep = crate::libvirt::Connect::open(&uri).unwrap();
        let hv = Hypervisor::start(&uri);
        let uid = "6f1c7e4a-0000-4000-8000-000000000003";
        let mut last = 0;
        for bytes in [64u64 << 20] {
            let want = VolumeWant {
                uid: uid.into(),
                bytes,
                ..Default::default()
            };
            let seen = hv.observe(&test_pool("t")).await.unwrap();
            for op in volume_ops("t", "/yk-test-pool", &seen, &want, 0).unwrap() {
                hv.apply(&test_pool("t"), op).await.unwrap();
            }
            let seen = hv.observe(&test_pool("t")).await.unwrap();
            assert!(seen.active && seen.capacity > 0, "{seen:?}");
            assert_eq!(
                volume_ops("t", "/yk-test-pool", &seen, &want, 0).unwrap(),
                vec![]
            );
            last = crate::storage::decide::backing(
                &seen,
                uid,
                crate::storage::decide::Format::Qcow2,
                None,
            )
            .unwrap()
            .capacity_bytes;
            assert_eq!(last, bytes);
        }
        assert_eq!(last, 64 << 20);
        // A snapshot (libvirt's clone), then the volume deleted with it.
        let snap = VolumeWant {
            uid: uid.into(),
            bytes: 64 << 20,
            snapshots: vec!["s1".into()],
            ..Default::default()
        };
        let seen = hv.observe(&test_pool("t")).await.unwrap();
        for op in volume_ops("t", "/yk-test-pool", &seen, &snap, 0).unwrap() {
            hv.apply(&test_pool("t"), op).await.unwrap();
        }
        let seen = hv.observe(&test_pool("t")).await.unwrap();
        assert_eq!(
            crate::storage::decide::snapshots_of(&seen, uid),
            vec![(
                "s1",
                crate::storage::decide::snapshot_file(
                    uid,
                    "s1",
                    crate::storage::decide::Format::Qcow2
                )
                .as_str()
            )]
        );
        let del = VolumeWant {
            uid: uid.into(),
            delete: true,
            ..Default::default()
        };
        let seen = hv.observe(&test_pool("t")).await.unwrap();
        for op in volume_ops("t", "/yk-test-pool", &seen, &del, 0).unwrap() {
            hv.apply(&test_pool("t"), op).await.unwrap();
        }
        assert!(
            hv.observe(&test_pool("t"))
                .await
                .unwrap()
                .volumes
                .is_empty()
        );
        keep.close().unwrap();
    }

    /// Decisions carried out on the fake reach a state where nothing is
    /// left to do (the executor and the decision agree).
    #[tokio::test]
    async fn decided_ops_converge_on_the_fake() {
        let pools = FakePools {
            capacity: 1 << 30,
            ..Default::default()
        };
        let uid = "6f1c7e4a-0000-4000-8000-000000000001";
        for bytes in [64 << 20, 96 << 20] {
            let want = VolumeWant {
                uid: uid.into(),
                bytes,
                ..Default::default()
            };
            let seen = pools.observe(&test_pool("d")).await.unwrap();
            for op in volume_ops("d", "/p", &seen, &want, 0).unwrap() {
                pools.apply(&test_pool("d"), op).await.unwrap();
            }
            let seen = pools.observe(&test_pool("d")).await.unwrap();
            assert_eq!(volume_ops("d", "/p", &seen, &want, bytes).unwrap(), vec![]);
            assert_eq!(
                crate::storage::decide::backing(
                    &seen,
                    uid,
                    crate::storage::decide::Format::Qcow2,
                    None
                )
                .unwrap()
                .capacity_bytes,
                bytes
            );
        }
    }
}
