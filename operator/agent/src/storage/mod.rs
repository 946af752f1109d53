//! Storage on the host: the Volumes whose pool this host holds.
//!
//! Observe → decide → execute, in the engine's shape: the pool and its
//! volumes are observed through the [`pools::Pools`] seam (libvirt's
//! storage API on the real host, an in-memory fake in tests), the pure
//! [`decide`] returns typed [`decide::StorageOp`]s and the backing to
//! report, and [`reconcile`] carries them out and writes the Volume's
//! `status.backing` (the controller turns it into conditions). `rbd` pools
//! are carried out by Ceph's tools instead ([`ceph`]), LVM-backed `iscsi`
//! pools by LVM's ([`lvm`]), behind the same seam.

pub mod ceph;
pub mod decide;
pub mod lvm;
pub mod pools;
#[allow(unsafe_code)] // librados through dlopen: the one FFI of storage.
pub mod rados;
pub mod reconcile;
pub mod targets;
