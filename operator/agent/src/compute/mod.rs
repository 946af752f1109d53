//! Compute on the host: VirtualNodes placed here become libvirt domains.

pub mod decide;
pub mod disks;
pub mod domain;
pub mod domains;
pub mod guestconfig;
pub mod images;
pub mod ops;
pub mod reconcile;
pub mod resync;
