//! The agent's host-network core as a library: the pure plan of a host's
//! network and the dataplane that applies it to the kernel. The agent binary
//! drives them from its watches; `yukumo-netbench` (`make bench`) measures
//! them against raw `ip -batch` and `nft -f`.

// Unsafe code is allowed in one module only: the packet socket of
// gratuitous ARP (`network::garp`), whose address nix cannot build safely.
#![deny(unsafe_code)]

pub mod network {
    pub mod dataplane;
    pub mod garp;
    pub mod plan;
    pub mod watch;
}
