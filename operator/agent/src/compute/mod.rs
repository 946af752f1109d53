//! Compute on the host: VirtualNodes placed here become libvirt domains.

pub mod domain;
pub mod guestconfig;
pub mod images;
pub mod reconcile;
