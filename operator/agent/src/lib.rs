//! The agent's host-network core as a library: the pure plan of a host's
//! network and the dataplane that applies it to the kernel. The agent binary
//! drives them from its watches; `yukumo-netbench` (`make bench`) measures
//! them against raw `ip -batch` and `nft -f`.

pub mod network {
    pub mod dataplane;
    pub mod plan;
}
