//! libvirt domain lifecycle events: the daemon sends them as messages on
//! the connection that registered for them.

use tokio::sync::mpsc::UnboundedSender;

use crate::libvirt::{Connect, Error, sys};

/// What the libvirt connection reports to its subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvEvent {
    /// A lifecycle event of the domain with this UUID.
    Lifecycle {
        uuid: String,
        event: Lifecycle,
        detail: i32,
    },
    /// The connection was re-opened (and the callback registered again):
    /// events of the gap are lost, so the subscriber should resync.
    Reconnected,
}

/// `virDomainEventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    Other,
}

impl Lifecycle {
    fn from_raw(event: i32) -> Self {
        match event {
            sys::VIR_DOMAIN_EVENT_DEFINED => Lifecycle::Defined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Lifecycle::Undefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Lifecycle::Started,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Lifecycle::Suspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Lifecycle::Resumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Lifecycle::Stopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Lifecycle::Shutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Lifecycle::PmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Lifecycle::Crashed,
            _ => Lifecycle::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Defined => "defined",
            Lifecycle::Undefined => "undefined",
            Lifecycle::Started => "started",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Resumed => "resumed",
            Lifecycle::Stopped => "stopped",
            Lifecycle::Shutdown => "shutdown",
            Lifecycle::PmSuspended => "pmsuspended",
            Lifecycle::Crashed => "crashed",
            Lifecycle::Other => "other",
        }
    }
}

/// A lifecycle callback registered on one connection.
#[derive(Debug)]
pub struct Registration;

/// Register for lifecycle events of every domain of `conn`, sending each
/// to `tx` (from the connection's reader thread).
pub fn register_lifecycle(
    conn: &Connect,
    tx: UnboundedSender<HvEvent>,
) -> Result<Registration, Error> {
    conn.register_lifecycle(move |uuid, event, detail| {
        let _ = tx.send(HvEvent::Lifecycle {
            uuid,
            event: Lifecycle::from_raw(event),
            detail,
        });
    })?;
    Ok(Registration)
}

impl Registration {
    /// Deregister from `conn` (the connection it was registered on).
    pub fn deregister(self, conn: &Connect) {
        if let Err(e) = conn.deregister_lifecycle() {
            tracing::debug!(error = %e, "deregistering the domain event callback");
        }
    }
}
