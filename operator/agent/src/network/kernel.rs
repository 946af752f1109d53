//! The seams between the network decisions and the kernel: traits for
//! links (netlink), namespaces, nftables tables, DHCP servers and
//! gratuitous ARP. [`super::real::RealKernel`] carries them out on the
//! machine; [`super::fake::FakeKernel`] keeps an in-memory model for tests.

use std::future::Future;
use std::net::Ipv4Addr;

use yukumo_api::net::MacAddr;

use super::decide::DhcpSeen;
use super::observe::{NsState, Want};
use super::ops::{DhcpOp, Family, NsOps, ShapeOp, TableOp};

/// A kernel operation that failed: what, and why.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NlError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Impossible(#[from] super::decide::Impossible),
}

impl KernelError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        KernelError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// The links, FDB, addresses and routes of one namespace.
pub trait NsLinks: Send + Sync {
    /// Read what the namespace holds (the parts `want` asks for).
    fn observe(&self, want: Want) -> impl Future<Output = Result<NsState>> + Send;
    /// Carry out `ops`: links (deleted, created, configured, then their
    /// bridge ports), then FDB entries, addresses and the default route.
    fn apply(&self, ops: &NsOps) -> impl Future<Output = Result<()>> + Send;
}

/// Access to the links of any namespace.
pub trait Links: Send + Sync {
    type Ns: NsLinks;
    /// The host's namespace (`None`) or a router's.
    fn ns(&self, name: Option<&str>) -> impl Future<Output = Result<Self::Ns>> + Send;
}

/// Named network namespaces.
pub trait Namespaces: Send + Sync {
    /// Names of the namespaces that exist.
    fn list(&self) -> Vec<String>;
    /// The identity of a namespace (None: it does not exist).
    fn inode(&self, name: &str) -> Option<u64>;
    fn create(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    fn delete(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Whether `net.ipv4.ip_forward` is on in `name`.
    fn forwarding(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;
    fn set_forwarding(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
}

/// The yukumo nftables tables.
pub trait Firewall: Send + Sync {
    /// The listing of `table <family> yukumo` in `ns` (None: absent).
    fn table(
        &self,
        ns: Option<&str>,
        family: Family,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Replace or delete it, one transaction each.
    fn apply_table(
        &self,
        ns: Option<&str>,
        op: &TableOp,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// Traffic shaping of an interface of the host namespace.
pub trait Shaper: Send + Sync {
    /// The classes (minor, Mbit/s) under the agent's root qdisc on `dev`
    /// (`SHAPE_HANDLE:`); None: no such qdisc (absent, or another's).
    fn shaping(&self, dev: &str) -> impl Future<Output = Result<Option<Vec<(u16, u32)>>>> + Send;
    fn apply_shaping(&self, op: &ShapeOp) -> impl Future<Output = Result<()>> + Send;
}

/// The agent's WireGuard device on a gateway (host namespace), with the
/// routes and the rule that send the peers' traffic into it.
pub trait Wireguard: Send + Sync {
    /// This host's public key (None: it has no key, so no WireGuard).
    fn wireguard_key(&self) -> Option<super::wireguard::Key>;
    /// The device, its routes and the rule as found (None: none of them).
    fn wireguard(&self) -> impl Future<Output = Result<Option<super::wireguard::WgSeen>>> + Send;
    fn apply_wireguard(
        &self,
        op: &super::wireguard::WgOp,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The DHCP servers of routers.
pub trait Dhcp: Send + Sync {
    /// The full command line of a router's server (its files included).
    fn args(&self, router: &str, plan_args: &[String]) -> Vec<String>;
    /// How the router's server was found.
    fn seen(&self, router: &str) -> DhcpSeen;
    /// Stop a server left running for `router` outside its current
    /// namespace (the namespace was deleted by hand: the server keeps the
    /// old one, and its addresses, alive). Whether one was stopped.
    fn stop_stale(&self, router: &str) -> impl Future<Output = bool> + Send;
    fn apply_dhcp(&self, router: &str, op: &DhcpOp) -> impl Future<Output = Result<()>> + Send;
    /// Stop the server and forget the router's files.
    fn remove(&self, router: &str) -> impl Future<Output = ()> + Send;
}

/// Gratuitous ARP for the external addresses a router takes.
pub trait Announce: Send + Sync {
    /// Announce `addrs` as the router's (its MAC `mac`), sent out of
    /// `parent`, the host's interface its external leg hangs on. Best
    /// effort, and may still be under way when this returns: neighbours
    /// learn the address on first use otherwise.
    fn announce(
        &self,
        router: &str,
        parent: &str,
        mac: MacAddr,
        addrs: Vec<Ipv4Addr>,
    ) -> impl Future<Output = ()> + Send;
}

/// Everything a network pass needs of the kernel.
pub trait Kernel: Links + Namespaces + Firewall + Dhcp + Announce + Shaper + Wireguard {}

impl<T: Links + Namespaces + Firewall + Dhcp + Announce + Shaper + Wireguard> Kernel for T {}
