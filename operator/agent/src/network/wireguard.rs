//! WireGuard between the gateways of Sites whose tunnels ask for it.
//!
//! The gateway holding its Site's WAN endpoint has one WireGuard device,
//! [`LINK`], listening on the endpoint's port, with one peer per peer Site:
//! its holder's public key, its endpoint, and its endpoint address as the
//! only allowed source. The groups' WAN ports stay what they are without
//! encryption (VXLAN from the Site's endpoint to the peers' endpoints) but
//! on the next port, and reach the peers through the device: a policy rule
//! sends every packet not marked [`FWMARK`] to table [`TABLE`], which routes
//! each peer's endpoint into the device; WireGuard's own packets carry the
//! mark and take the main table to the WAN. So the VXLAN of a group never
//! leaves the host in the clear, and what comes in from the WAN is
//! WireGuard, authenticated by the peer's key (the WAN filter takes the
//! inner VXLAN port only from the device).
//!
//! The private key is made once per host and kept in the agent's state
//! directory (mode 0600); the public key is published in the Host's status,
//! where the controller copies the holder's into its Site's tunnel ends.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The agent's WireGuard device on a gateway.
pub const LINK: &str = "ykwg";
/// The mark of WireGuard's own packets, and the routing table (and rule
/// priority) that sends everything else for a peer into the device ("yk").
pub const FWMARK: u32 = 0x796b;
pub const TABLE: u32 = 0x796b;
pub const RULE_PRIORITY: u32 = 0x796b;
/// Seconds between keepalives: the tunnel stays up through NAT and its
/// status measures a live handshake.
pub const KEEPALIVE: u16 = 25;

/// Bytes WireGuard over IPv4 adds (outer IPv4 20, UDP 8, its header 16
/// and tag 16): the device's MTU is the WAN's less this.
pub const OVERHEAD: u32 = 60;

/// A WireGuard key (private or public), 32 bytes.
pub type Key = [u8; 32];

pub fn encode(k: &Key) -> String {
    STANDARD.encode(k)
}

pub fn decode(s: &str) -> Option<Key> {
    STANDARD.decode(s.trim()).ok()?.try_into().ok()
}

/// This host's key pair.
#[derive(Clone)]
pub struct Keys {
    pub private: Key,
    pub public: Key,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("public", &encode(&self.public))
            .finish_non_exhaustive()
    }
}

impl Keys {
    pub fn from_private(private: Key) -> Keys {
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Keys {
            private: secret.to_bytes(),
            public,
        }
    }

    /// The key pair kept in `dir/wireguard.key`, made (from the kernel's
    /// random source) when there is none.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Keys> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("wireguard.key");
        match std::fs::read_to_string(&path) {
            Ok(s) => decode(&s).map(Keys::from_private).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a base64 WireGuard key", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
                let keys = Keys::from_private(k);
                std::fs::create_dir_all(dir)?;
                let tmp = dir.join("wireguard.key.tmp");
                {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(encode(&keys.private).as_bytes())?;
                    f.sync_all()?;
                }
                std::fs::rename(&tmp, &path)?;
                Ok(keys)
            }
            Err(e) => Err(e),
        }
    }
}

/// The device as planned: its port, its MTU, and each peer Site's endpoint
/// address with its holder's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPlan {
    pub port: u16,
    pub mtu: u32,
    pub peers: BTreeMap<Ipv4Addr, Key>,
}

/// The device as found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgSeen {
    pub up: bool,
    pub mtu: u32,
    pub port: u16,
    pub fwmark: u32,
    /// The public key of its private key (None: none set).
    pub public: Option<Key>,
    /// Peers by key: endpoint and allowed sources.
    pub peers: BTreeMap<Key, WgPeerSeen>,
    /// Peers' endpoints routed into the device (table [`TABLE`]).
    pub routes: std::collections::BTreeSet<Ipv4Addr>,
    /// Whether the rule to [`TABLE`] is in.
    pub rule: bool,
}

/// A peer as the device holds it, with its traffic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgPeerSeen {
    pub endpoint: Option<SocketAddrV4>,
    pub allowed: Vec<(Ipv4Addr, u8)>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What to do to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WgOp {
    /// Make it (if absent) exactly so: key, port, mark, peers (others
    /// removed), MTU, up; routes of the table exactly the peers'; the rule.
    Set(WgPlan),
    /// Remove the device, its routes and the rule.
    Remove,
}

/// What of `seen` differs from `plan` on a device keyed with `own` (empty:
/// it is as planned).
pub fn differences(plan: &WgPlan, seen: &WgSeen, own: &Key) -> Vec<String> {
    let mut d = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            d.push(what);
        }
    };
    check(seen.up, "down".into());
    check(seen.mtu == plan.mtu, format!("mtu {}", seen.mtu));
    check(seen.port == plan.port, format!("port {}", seen.port));
    check(seen.fwmark == FWMARK, format!("fwmark {:#x}", seen.fwmark));
    check(seen.public.as_ref() == Some(own), "another key".into());
    for (addr, key) in &plan.peers {
        match seen.peers.get(key) {
            None => check(false, format!("peer {addr} missing")),
            Some(p) => {
                check(
                    p.endpoint == Some(SocketAddrV4::new(*addr, plan.port)),
                    format!("peer {addr} at {:?}", p.endpoint),
                );
                check(
                    p.allowed == [(*addr, 32)],
                    format!("peer {addr} allows {:?}", p.allowed),
                );
            }
        }
    }
    check(
        seen.peers.len() == plan.peers.len(),
        format!("{} peers", seen.peers.len()),
    );
    check(
        seen.routes.iter().eq(plan.peers.keys()),
        format!("routes {:?}", seen.routes),
    );
    check(seen.rule, "no rule".into());
    d
}

/// Whether `seen` is `plan` on a device keyed with `own`.
pub fn matches(plan: &WgPlan, seen: &WgSeen, own: &Key) -> bool {
    differences(plan, seen, own).is_empty()
}

/// The op that makes the device as planned (`plan` None: no device), given
/// what was found (`seen` None: no device, no rule); None when it is so.
pub fn op(plan: Option<&WgPlan>, seen: Option<&WgSeen>, own: &Key) -> Option<WgOp> {
    match (plan, seen) {
        (None, None) => None,
        (None, Some(_)) => Some(WgOp::Remove),
        (Some(p), Some(s)) if matches(p, s, own) => None,
        (Some(p), _) => Some(WgOp::Set(p.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> WgPlan {
        WgPlan {
            port: 4790,
            mtu: 1440,
            peers: BTreeMap::from([("100.64.0.102".parse().unwrap(), [2u8; 32])]),
        }
    }

    fn seen_as(plan: &WgPlan, own: Key) -> WgSeen {
        WgSeen {
            up: true,
            mtu: plan.mtu,
            port: plan.port,
            fwmark: FWMARK,
            public: Some(own),
            peers: plan
                .peers
                .iter()
                .map(|(a, k)| {
                    (
                        *k,
                        WgPeerSeen {
                            endpoint: Some(SocketAddrV4::new(*a, plan.port)),
                            allowed: vec![(*a, 32)],
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            routes: plan.peers.keys().copied().collect(),
            rule: true,
        }
    }

    #[test]
    fn a_device_as_planned_is_left_alone_and_any_difference_sets_it_all() {
        let own = Keys::from_private([7u8; 32]).public;
        let p = plan();
        let s = seen_as(&p, own);
        assert_eq!(op(Some(&p), Some(&s), &own), None);
        assert_eq!(op(None, None, &own), None);
        assert_eq!(op(None, Some(&s), &own), Some(WgOp::Remove));
        assert_eq!(op(Some(&p), None, &own), Some(WgOp::Set(p.clone())));
        // Each difference: another key, port, MTU, a peer's endpoint or
        // sources, a stray peer or route, the rule gone, the device down.
        let mut variants: Vec<WgSeen> = Vec::new();
        let mut v = s.clone();
        v.public = Some([9u8; 32]);
        variants.push(v);
        let mut v = s.clone();
        v.port = 51820;
        variants.push(v);
        let mut v = s.clone();
        v.mtu = 1420;
        variants.push(v);
        let mut v = s.clone();
        v.peers.get_mut(&[2u8; 32]).unwrap().endpoint = Some("100.64.0.9:4790".parse().unwrap());
        variants.push(v);
        let mut v = s.clone();
        v.peers.get_mut(&[2u8; 32]).unwrap().allowed = vec![("0.0.0.0".parse().unwrap(), 0)];
        variants.push(v);
        let mut v = s.clone();
        v.peers.insert([3u8; 32], WgPeerSeen::default());
        variants.push(v);
        let mut v = s.clone();
        v.routes.insert("100.64.0.103".parse().unwrap());
        variants.push(v);
        let mut v = s.clone();
        v.rule = false;
        variants.push(v);
        let mut v = s.clone();
        v.up = false;
        variants.push(v);
        let mut v = s.clone();
        v.fwmark = 0;
        variants.push(v);
        for v in variants {
            assert_eq!(
                op(Some(&p), Some(&v), &own),
                Some(WgOp::Set(p.clone())),
                "{v:?}"
            );
        }
    }

    #[test]
    fn a_key_is_made_once_kept_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("yk-wg-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Keys::load_or_create(&dir).unwrap();
        let b = Keys::load_or_create(&dir).unwrap();
        assert_eq!((a.private, a.public), (b.private, b.public));
        assert_ne!(a.private, [0u8; 32]);
        let mode = std::fs::metadata(dir.join("wireguard.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The public key of a known private key (RFC 7748, 6.1: Alice's).
        let alice = Keys::from_private(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            alice.public,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(decode(&encode(&alice.public)), Some(alice.public));
        assert!(!format!("{alice:?}").contains(&encode(&alice.private)));
        std::fs::write(dir.join("wireguard.key"), "nonsense").unwrap();
        assert!(Keys::load_or_create(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn hex(s: &str) -> Key {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }
}
