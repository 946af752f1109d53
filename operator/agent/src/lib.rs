//! The agent's host-network core as a library: in-process namespaces and
//! netlink, the pure plan of a host's network, the decisions that close the
//! gap to what the kernel holds, and the dataplane that carries them out
//! through the kernel traits (real, or the in-repo fake). The agent binary
//! drives them from its watches; `yukumo-netbench` (`make bench`) measures
//! them against raw `ip -batch` and `nft -f`.

// Unsafe code is allowed in one module only: the packet socket of
// gratuitous ARP (`network::garp`), whose address nix cannot build safely.
#![deny(unsafe_code)]

pub mod netlink;
pub mod netns;

pub mod network {
    pub mod dataplane;
    pub mod decide;
    pub mod fake;
    pub mod garp;
    pub mod kernel;
    pub mod observe;
    pub mod ops;
    pub mod plan;
    pub mod real;
    pub mod ruleset;
    #[cfg(test)]
    pub mod testkit;
    pub mod tunnels;
    pub mod watch;
    pub mod wireguard;
}
