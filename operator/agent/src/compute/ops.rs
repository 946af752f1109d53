//! The typed operations a node's decision returns: what to do to its
//! libvirt domain and its disks on this host.

use std::path::PathBuf;

use super::disks::qcow2::BackingFormat;
use super::guestconfig::GuestConfig;

/// A change of a node's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainOp {
    /// Remove the domain that holds this node's name but realises another
    /// node (a deleted node recreated under its name): yukumo's to remove,
    /// never to adopt.
    RemoveStale {
        name: String,
    },
    /// Define (or redefine) the domain from this XML.
    Define {
        xml: String,
    },
    Start,
    /// Power it off (the domain and its disks stay).
    Destroy,
    /// Hot-plug a volume disk into the running guest (the definition has
    /// it already: a `Define` comes first).
    AttachDisk {
        xml: String,
    },
    /// Hot-unplug a volume disk (asynchronous: the guest releases it; the
    /// live XML shows it until then).
    DetachDisk {
        xml: String,
    },
    /// Grow a running guest's volume disk through QEMU (the guest sees
    /// the new size at once).
    ResizeDisk {
        target: String,
        bytes: u64,
    },
}

impl DomainOp {
    /// The mutating libvirt calls the op makes, for the metric.
    pub fn label(&self) -> &'static str {
        match self {
            DomainOp::RemoveStale { .. } => "undefine",
            DomainOp::Define { .. } => "define",
            DomainOp::Start => "start",
            DomainOp::Destroy => "destroy",
            DomainOp::AttachDisk { .. } => "attach",
            DomainOp::DetachDisk { .. } => "detach",
            DomainOp::ResizeDisk { .. } => "resize",
        }
    }
}

/// A change of a node's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// The copy-on-write root disk on the cached image.
    CreateOverlay {
        path: PathBuf,
        backing: PathBuf,
        format: BackingFormat,
        size: u64,
    },
    /// The NoCloud config disk, and the stamp of what it holds.
    WriteConfig {
        path: PathBuf,
        stamp: PathBuf,
        config: GuestConfig,
    },
}
