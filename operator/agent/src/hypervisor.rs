//! The host's libvirt connection, owned by one dedicated thread.
//!
//! libvirt calls block, so every call runs on this thread and callers await a
//! reply; one connection per agent for its whole life (closed on drop), so
//! long runs keep the number of libvirt connections flat.
//!
//! With events ([`Hypervisor::start_with_events`]) the thread also keeps the
//! connection open on its own (a liveness check every second, a reconnect
//! when libvirt went away) and registers a domain lifecycle callback on every
//! connection it opens, so events keep flowing across libvirtd restarts.

pub mod events;

use std::sync::mpsc;
use std::time::Duration;

use crate::libvirt::{self, Connect};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

pub use events::{HvEvent, Lifecycle};

/// Facts about the hypervisor the Host reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorInfo {
    pub cpus: u32,
    pub memory_mib: u64,
    pub description: String,
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// How often the libvirt thread checks its connection when it delivers events.
const KEEPALIVE_TICK: Duration = Duration::from_secs(1);

/// The connection as the libvirt thread holds it.
struct Conn {
    uri: String,
    conn: Option<Connect>,
    /// Where lifecycle events go (`None`: no events).
    events: Option<UnboundedSender<HvEvent>>,
    registration: Option<events::Registration>,
    opened: u64,
    /// The last background reconnect error (logged when it changes).
    last_error: Option<String>,
}

impl Conn {
    /// The live connection: drops one libvirt reports dead, then (re)connects
    /// and registers the event callback on the new connection.
    fn ensure(&mut self) -> Result<&Connect, libvirt::Error> {
        if let Some(c) = self.conn.as_ref()
            && !c.is_alive().unwrap_or(false)
        {
            tracing::warn!(uri = %self.uri, "libvirt connection lost; reconnecting");
            self.close();
        }
        if self.conn.is_none() {
            let c = Connect::open(&self.uri)?;
            if let Some(tx) = &self.events {
                match events::register_lifecycle(&c, tx.clone()) {
                    Ok(r) => {
                        tracing::info!(uri = %self.uri, "libvirt domain lifecycle events registered");
                        self.registration = Some(r);
                    }
                    Err(e) => {
                        tracing::warn!(uri = %self.uri, error = %e, "cannot register domain events; relying on the resync")
                    }
                }
                if self.opened > 0 {
                    let _ = tx.send(HvEvent::Reconnected);
                }
            }
            self.opened += 1;
            self.conn = Some(c);
        }
        Ok(self.conn.as_ref().expect("connected"))
    }

    /// Background tick: keep the connection (and so the events) alive.
    fn keep_connected(&mut self) {
        let error = self.ensure().err().map(|e| e.to_string());
        if error != self.last_error {
            match &error {
                Some(e) => {
                    tracing::warn!(uri = %self.uri, error = %e, "cannot connect to libvirt; retrying")
                }
                None if self.last_error.is_some() => {
                    tracing::info!(uri = %self.uri, "connected to libvirt again")
                }
                None => {}
            }
            self.last_error = error;
        }
    }

    fn close(&mut self) {
        if let Some(mut c) = self.conn.take() {
            if let Some(r) = self.registration.take() {
                r.deregister(&c);
            }
            let _ = c.close();
        }
    }
}

/// Handle to the libvirt thread.
#[derive(Clone)]
pub struct Hypervisor {
    tx: mpsc::Sender<Job>,
    uri: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt at {uri}: {message}")]
    Libvirt { uri: String, message: String },
    #[error("libvirt thread is gone")]
    ThreadGone,
    /// A storage backend outside libvirt (Ceph).
    #[error("{message}")]
    Storage { message: String },
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

impl Hypervisor {
    /// Start the thread without events; it connects lazily and reconnects
    /// after failures.
    #[cfg(test)]
    pub fn start(uri: &str) -> Self {
        Self::spawn(uri, None)
    }

    /// Start the thread delivering domain lifecycle events to `events`: it
    /// connects at once and keeps connected, registering for events on each
    /// new connection and sending [`HvEvent::Reconnected`] after a gap.
    pub fn start_with_events(uri: &str, events: UnboundedSender<HvEvent>) -> Self {
        Self::spawn(uri, Some(events))
    }

    fn spawn(uri: &str, events: Option<UnboundedSender<HvEvent>>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let tick = events.is_some();
        let mut state = Conn {
            uri: uri.to_string(),
            conn: None,
            events,
            registration: None,
            opened: 0,
            last_error: None,
        };
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                if tick {
                    state.keep_connected();
                }
                loop {
                    let job = if tick {
                        match rx.recv_timeout(KEEPALIVE_TICK) {
                            Ok(job) => Some(job),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        match rx.recv() {
                            Ok(job) => Some(job),
                            Err(_) => break,
                        }
                    };
                    match job {
                        Some(job) => job(&mut state),
                        None => state.keep_connected(),
                    }
                }
                state.close();
            })
            .expect("spawn libvirt thread");
        Hypervisor {
            tx,
            uri: uri.to_string(),
        }
    }

    /// Run `f` with a live connection on the libvirt thread.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, libvirt::Error> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let (reply, rx) = oneshot::channel();
        let uri = self.uri.clone();
        let job: Job = Box::new(move |conn: &mut Conn| {
            let result = conn
                .ensure()
                .and_then(f)
                .map_err(|e| HypervisorError::Libvirt {
                    uri: uri.clone(),
                    message: e.to_string(),
                });
            let _ = reply.send(result);
        });
        self.tx.send(job).map_err(|_| HypervisorError::ThreadGone)?;
        rx.await.map_err(|_| HypervisorError::ThreadGone)?
    }

    /// Capacity and description of the hypervisor (cheap calls only).
    pub async fn info(&self) -> Result<HypervisorInfo, HypervisorError> {
        self.call(|c| {
            let node = c.get_node_info()?;
            let lib = c.get_lib_version()?;
            let driver = c.get_type()?;
            Ok(HypervisorInfo {
                cpus: node.cpus,
                memory_mib: node.memory / 1024,
                description: format!("libvirt {} / {}", version_string(lib), driver),
            })
        })
        .await
    }

    /// Whether libvirt advertises KVM domains. Reading the capabilities makes
    /// libvirt probe the host (seconds under QEMU), so this runs once, off the
    /// heartbeat path.
    pub async fn kvm_advertised(&self) -> Result<bool, HypervisorError> {
        self.call(|c| {
            let caps = c.get_capabilities()?;
            Ok(caps.contains("<domain type='kvm'") && std::path::Path::new("/dev/kvm").exists())
        })
        .await
    }

    /// A cheap liveness call (capabilities probing is expensive, so the
    /// heartbeat refreshes full facts only now and then).
    pub async fn ping(&self) -> Result<(), HypervisorError> {
        self.call(|c| c.get_lib_version().map(|_| ())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_driver_reports_capacity() {
        let h = Hypervisor::start(&crate::libvirt::testd::default_uri());
        let info = h.info().await.expect("test driver");
        assert!(info.cpus > 0);
        assert!(info.memory_mib > 0);
        assert!(info.description.contains("TEST"), "{}", info.description);
        h.ping().await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_uri_is_an_error_naming_it() {
        let h = Hypervisor::start("qemu:///system?socket=/nonexistent/libvirt-sock");
        let e = h.info().await.unwrap_err().to_string();
        assert!(e.contains("/nonexistent/libvirt-sock"), "{e}");
    }

    /// Wait (at most 5 s) until `want` arrives, skipping other events.
    async fn wait_for(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<HvEvent>,
        want: HvEvent,
    ) -> Result<(), tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if rx.recv().await.expect("event channel open") == want {
                    return;
                }
            }
        })
        .await
    }

    /// Lifecycle events of a domain of the test driver, through a reconnect.
    #[tokio::test]
    async fn lifecycle_events_are_delivered_and_survive_a_reconnect() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let uri = crate::libvirt::testd::default_uri();
        let h = Hypervisor::start_with_events(&uri, tx);
        // The test driver's state lives while a connection is open: this one
        // keeps the domain across the agent's reconnect.
        let mut keep = Connect::open(&uri).unwrap();
        let name = format!("yk-events-{}", std::process::id());
        let xml = format!(
            "<domain type='test'><name>{name}</name><memory>1024</memory>\
             <os><type>hvm</type></os></domain>"
        );
        let uuid = h
            .call(move |c| {
                let d = libvirt::Domain::define_xml(c, &xml)?;
                d.create()?;
                d.get_uuid_string()
            })
            .await
            .unwrap();
        let destroy = |h: &Hypervisor, uuid: &str| {
            let id = uuid.to_string();
            let h = h.clone();
            async move {
                h.call(move |c| {
                    let d = libvirt::Domain::lookup_by_uuid_string(c, &id)?;
                    d.destroy()?;
                    d.create()
                })
                .await
                .unwrap();
            }
        };
        destroy(&h, &uuid).await;
        let stopped = HvEvent::Lifecycle {
            uuid: uuid.clone(),
            event: Lifecycle::Stopped,
            detail: libvirt::sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
        };
        wait_for(&mut rx, stopped.clone())
            .await
            .expect("stopped event within 5s");
        // Close the connection as a dead one would be: the next open
        // registers the callback again and says so.
        h.tx.send(Box::new(|c: &mut Conn| c.close())).unwrap();
        destroy(&h, &uuid).await;
        wait_for(&mut rx, HvEvent::Reconnected)
            .await
            .expect("reconnected");
        wait_for(&mut rx, stopped)
            .await
            .expect("stopped event after the reconnect");
        let id = uuid.clone();
        h.call(move |c| {
            let d = libvirt::Domain::lookup_by_uuid_string(c, &id)?;
            d.destroy()?;
            d.undefine()
        })
        .await
        .unwrap();
        wait_for(
            &mut rx,
            HvEvent::Lifecycle {
                uuid,
                event: Lifecycle::Undefined,
                detail: 0,
            },
        )
        .await
        .expect("undefined event");
        keep.close().unwrap();
    }

    #[test]
    fn versions() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_010_002), "10.10.2");
    }
}
