//! The host's libvirt connection, owned by one dedicated thread.
//!
//! libvirt calls block, so every call runs on this thread and callers await a
//! reply; one connection per agent for its whole life (closed on drop), so
//! long runs keep the number of libvirt connections flat.

use std::sync::mpsc;

use tokio::sync::oneshot;
use virt::connect::Connect;

/// Facts about the hypervisor the Host reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HypervisorInfo {
    pub cpus: u32,
    pub memory_mib: u64,
    pub description: String,
}

type Job = Box<dyn FnOnce(&mut Option<Connect>) + Send>;

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
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

impl Hypervisor {
    /// Start the thread; it connects lazily and reconnects after failures.
    pub fn start(uri: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                let mut conn: Option<Connect> = None;
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
                if let Some(mut c) = conn.take() {
                    let _ = c.close();
                }
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
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let (reply, rx) = oneshot::channel();
        let uri = self.uri.clone();
        let job: Job = Box::new(move |conn: &mut Option<Connect>| {
            let err = |e: virt::error::Error| HypervisorError::Libvirt {
                uri: uri.clone(),
                message: e.to_string(),
            };
            // Drop a connection libvirt reports dead, then (re)connect.
            if let Some(c) = conn.as_ref()
                && !c.is_alive().unwrap_or(false)
                && let Some(mut c) = conn.take()
            {
                let _ = c.close();
            }
            if conn.is_none() {
                match Connect::open(Some(&uri)) {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        let _ = reply.send(Err(err(e)));
                        return;
                    }
                }
            }
            let result = f(conn.as_ref().expect("connected")).map_err(err);
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
        let h = Hypervisor::start("test:///default");
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

    #[test]
    fn versions() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_010_002), "10.10.2");
    }
}
