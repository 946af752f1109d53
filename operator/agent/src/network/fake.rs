//! An in-memory kernel behind the [`super::kernel`] traits, for fast tests
//! of the network decisions and the dataplane: namespaces with links,
//! bridge FDBs, addresses, routes, tables, forwarding and DHCP servers,
//! with the kernel's rules where a decision depends on them (a name is
//! taken once, a veth dies with its peer, a port leaves a deleted bridge
//! and its FDB entries go with it, a route needs its gateway on-link).
//! Tests change it by hand to play an operator's damage.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use yukumo_api::net::{Ipv4Net, MacAddr};

use super::kernel::{KernelError, Links, Namespaces, NsLinks, Result};
use super::observe::{LinkKind, LinkState, NsState, Want};
use super::ops::{AddrOp, FdbOp, LinkOp, NsOps};

/// One namespace of the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsModel {
    pub inode: u64,
    pub state: NsState,
    /// The peer of each veth end: (namespace, name); `None` the host's.
    pub peers: BTreeMap<String, (Option<String>, String)>,
    pub tables: BTreeMap<&'static str, String>,
    pub forwarding: bool,
    /// A DHCP server running here: its arguments.
    pub dhcp: Option<Vec<String>>,
    /// The agent's shaper by interface: its classes (minor, Mbit/s).
    pub shaping: BTreeMap<String, Vec<(u16, u32)>>,
    /// The agent's WireGuard device, routes and rule.
    pub wireguard: Option<super::wireguard::WgSeen>,
}

/// The whole model: the host's namespace and the named ones.
#[derive(Debug, Default)]
pub struct Model {
    pub host: NsModel,
    pub named: BTreeMap<String, NsModel>,
    next_inode: u64,
    /// DHCP files by router: (arguments, leases).
    pub dhcp_files: BTreeMap<String, (Vec<String>, String)>,
    /// Gratuitous ARPs sent: (router, addresses).
    pub announced: Vec<(String, Vec<Ipv4Addr>)>,
    /// Operations carried out, in order (for tests that count them).
    pub log: Vec<String>,
}

impl Model {
    fn ns(&mut self, name: Option<&str>) -> Result<&mut NsModel> {
        match name {
            None => Ok(&mut self.host),
            Some(n) => self
                .named
                .get_mut(n)
                .ok_or_else(|| errno(format!("namespace {n}"), libc::ENOENT)),
        }
    }
}

fn errno(what: String, e: i32) -> KernelError {
    KernelError::io(what, std::io::Error::from_raw_os_error(e))
}

/// The fake kernel (cheap to clone: one shared model).
#[derive(Clone, Default)]
pub struct FakeKernel {
    pub model: Arc<Mutex<Model>>,
    /// This host's WireGuard public key (None: no WireGuard).
    pub wireguard_key: Option<super::wireguard::Key>,
}

impl FakeKernel {
    pub fn new() -> FakeKernel {
        let k = FakeKernel::default();
        k.with(|m| {
            m.host.inode = 1;
            m.next_inode = 2;
        });
        k
    }

    /// Run `f` on the model.
    pub fn with<T>(&self, f: impl FnOnce(&mut Model) -> T) -> T {
        f(&mut self.model.lock().expect("poisoned"))
    }

    /// Give the host a plain link (an uplink, an external interface, a
    /// guest's tap as libvirt would make it).
    pub fn add_plain_link(&self, name: &str) {
        self.with(|m| {
            m.host.state.links.insert(
                name.to_string(),
                LinkState {
                    mac: Some(MacAddr([0x02, 0xaa, 0, 0, 0, name.len() as u8])),
                    name: name.to_string(),
                    kind: LinkKind::Other("veth".into()),
                    up: true,
                    mtu: 1500,
                    master: None,
                    parent: None,
                    port: None,
                },
            );
        })
    }
}

/// One namespace of the fake.
pub struct FakeNs {
    model: Arc<Mutex<Model>>,
    name: Option<String>,
}

impl Links for FakeKernel {
    type Ns = FakeNs;
    async fn ns(&self, name: Option<&str>) -> Result<FakeNs> {
        if let Some(n) = name {
            self.with(|m| m.ns(Some(n)).map(|_| ()))?;
        }
        Ok(FakeNs {
            model: self.model.clone(),
            name: name.map(str::to_string),
        })
    }
}

fn link(name: &str, kind: LinkKind, mtu: u32, up: bool) -> LinkState {
    LinkState {
        mac: None,
        name: name.to_string(),
        kind,
        up,
        mtu,
        master: None,
        parent: None,
        port: None,
    }
}

/// Remove link `name` of namespace `ns` and what goes with it.
fn remove_link(m: &mut Model, ns: Option<&str>, name: &str) {
    let Ok(n) = m.ns(ns) else { return };
    if n.state.links.remove(name).is_none() {
        return;
    }
    n.state.addrs.remove(name);
    n.state.remotes.retain(|(d, _)| d != name);
    n.state.pinned.retain(|(p, _)| p != name);
    if n.state
        .default_route
        .as_ref()
        .is_some_and(|(_, d)| d == name)
    {
        n.state.default_route = None;
    }
    // Ports of a deleted bridge are released, their bridge entries gone.
    let ports: Vec<String> = n
        .state
        .links
        .values()
        .filter(|l| l.master.as_deref() == Some(name))
        .map(|l| l.name.clone())
        .collect();
    for p in ports {
        let l = n.state.links.get_mut(&p).expect("port");
        l.master = None;
        l.port = None;
        n.state.pinned.retain(|(q, _)| q != &p);
    }
    if let Some((pns, peer)) = n.peers.remove(name) {
        remove_link(m, pns.as_deref(), &peer);
    }
}

fn apply_link(m: &mut Model, ns: Option<&str>, op: &LinkOp) -> Result<()> {
    let exists = |m: &mut Model, target: Option<&str>, name: &str| -> Result<()> {
        if m.ns(target)?.state.links.contains_key(name) {
            return Err(errno(format!("add {name}"), libc::EEXIST));
        }
        Ok(())
    };
    let parent_ok = |m: &mut Model, parent: &str| -> Result<()> {
        if !m.ns(ns)?.state.links.contains_key(parent) {
            return Err(errno(format!("parent {parent}"), libc::ENODEV));
        }
        Ok(())
    };
    match op {
        LinkOp::Delete(name) => {
            if !m.ns(ns)?.state.links.contains_key(name) {
                return Err(errno(format!("delete {name}"), libc::ENODEV));
            }
            remove_link(m, ns, name);
        }
        LinkOp::AddBridge { name, mtu } => {
            exists(m, ns, name)?;
            m.ns(ns)?
                .state
                .links
                .insert(name.clone(), link(name, LinkKind::Bridge, *mtu, true));
        }
        LinkOp::AddVxlan {
            name,
            vni,
            local,
            dev,
            mtu,
            port,
        } => {
            exists(m, ns, name)?;
            if let Some(d) = dev {
                parent_ok(m, d)?;
            }
            let l = link(
                name,
                LinkKind::Vxlan {
                    vni: *vni,
                    local: *local,
                    port: *port,
                },
                *mtu,
                false,
            );
            m.ns(ns)?.state.links.insert(name.clone(), l);
        }
        LinkOp::AddVlan {
            name,
            parent,
            id,
            mtu,
        } => {
            exists(m, ns, name)?;
            parent_ok(m, parent)?;
            let mut l = link(name, LinkKind::Vlan { id: Some(*id) }, *mtu, false);
            l.parent = Some(parent.clone());
            m.ns(ns)?.state.links.insert(name.clone(), l);
        }
        LinkOp::AddVeth {
            name,
            mtu,
            peer,
            peer_mac: _,
            peer_netns,
        } => {
            exists(m, ns, name)?;
            exists(m, Some(peer_netns), peer)?;
            m.ns(ns)?
                .state
                .links
                .insert(name.clone(), link(name, LinkKind::Veth, *mtu, false));
            let here = ns.map(str::to_string);
            m.ns(ns)?
                .peers
                .insert(name.clone(), (Some(peer_netns.clone()), peer.clone()));
            let target = m.ns(Some(peer_netns))?;
            target
                .state
                .links
                .insert(peer.clone(), link(peer, LinkKind::Veth, *mtu, false));
            target.peers.insert(peer.clone(), (here, name.clone()));
        }
        LinkOp::AddMacvlan {
            name,
            parent,
            netns,
            ..
        } => {
            parent_ok(m, parent)?;
            exists(m, Some(netns), name)?;
            let l = link(name, LinkKind::Macvlan, 1500, false);
            m.ns(Some(netns))?.state.links.insert(name.clone(), l);
        }
        LinkOp::Set { name, master, mtu } => {
            let n = m.ns(ns)?;
            if let Some(b) = master
                && n.state.links.get(b).map(|l| &l.kind) != Some(&LinkKind::Bridge)
            {
                return Err(errno(format!("master {b}"), libc::ENODEV));
            }
            let l = n
                .state
                .links
                .get_mut(name)
                .ok_or_else(|| errno(format!("set {name}"), libc::ENODEV))?;
            l.up = true;
            if let Some(mtu) = mtu {
                l.mtu = *mtu;
            }
            if let Some(b) = master
                && l.master.as_ref() != Some(b)
            {
                l.master = Some(b.clone());
                l.port = Some((true, true));
            }
        }
        LinkOp::Port {
            name,
            learning,
            flood,
        } => {
            let n = m.ns(ns)?;
            let l = n
                .state
                .links
                .get_mut(name)
                .filter(|l| l.master.is_some())
                .ok_or_else(|| errno(format!("port {name}"), libc::EOPNOTSUPP))?;
            l.port = Some((*learning, *flood));
        }
    }
    Ok(())
}

impl NsLinks for FakeNs {
    async fn observe(&self, want: Want) -> Result<NsState> {
        let mut m = self.model.lock().expect("poisoned");
        let s = m.ns(self.name.as_deref())?.state.clone();
        Ok(NsState {
            links: s.links,
            remotes: if want.fdb {
                s.remotes
            } else {
                Default::default()
            },
            pinned: if want.fdb {
                s.pinned
            } else {
                Default::default()
            },
            addrs: if want.addrs {
                s.addrs
            } else {
                Default::default()
            },
            default_route: if want.routes { s.default_route } else { None },
        })
    }

    async fn apply(&self, ops: &NsOps) -> Result<()> {
        let mut m = self.model.lock().expect("poisoned");
        let ns = self.name.as_deref();
        let mut links = ops.links.clone();
        links.sort_by_key(LinkOp::phase);
        for op in &links {
            m.log.push(format!("{ns:?} {op:?}"));
            apply_link(&mut m, ns, op)?;
        }
        for op in &ops.fdb {
            m.log.push(format!("{ns:?} {op:?}"));
            let n = m.ns(ns)?;
            match op {
                FdbOp::AddRemote { dev, dst } => {
                    if !matches!(
                        n.state.links.get(dev).map(|l| &l.kind),
                        Some(LinkKind::Vxlan { .. })
                    ) {
                        return Err(errno(format!("fdb {dev}"), libc::EINVAL));
                    }
                    n.state.remotes.insert((dev.clone(), *dst));
                }
                FdbOp::DelRemote { dev, dst } => {
                    if !n.state.remotes.remove(&(dev.clone(), *dst)) {
                        return Err(errno(format!("fdb del {dev}"), libc::ENOENT));
                    }
                }
                FdbOp::Pin { port, mac } => {
                    if n.state
                        .links
                        .get(port)
                        .and_then(|l| l.master.as_ref())
                        .is_none()
                    {
                        return Err(errno(format!("fdb {port}"), libc::EINVAL));
                    }
                    n.state.pinned.retain(|(p, m)| !(p == port && m == mac));
                    n.state.pinned.insert((port.clone(), *mac));
                }
            }
        }
        for op in &ops.addrs {
            m.log.push(format!("{ns:?} {op:?}"));
            let n = m.ns(ns)?;
            match op {
                AddrOp::Add { dev, net } => {
                    if !n.state.links.contains_key(dev) {
                        return Err(errno(format!("addr {dev}"), libc::ENODEV));
                    }
                    if !n.state.addrs.entry(dev.clone()).or_default().insert(*net) {
                        return Err(errno(format!("addr add {net}"), libc::EEXIST));
                    }
                }
                AddrOp::Del { dev, net } => {
                    if !n.state.addrs.get_mut(dev).is_some_and(|s| s.remove(net)) {
                        return Err(errno(format!("addr del {net}"), libc::EADDRNOTAVAIL));
                    }
                }
            }
        }
        if let Some(r) = &ops.route {
            m.log.push(format!("{ns:?} {r:?}"));
            let n = m.ns(ns)?;
            let on_link = n
                .state
                .addrs
                .get(&r.dev)
                .is_some_and(|s| s.iter().any(|a: &Ipv4Net| a.contains(r.via)));
            if !on_link {
                return Err(errno(format!("route via {}", r.via), libc::ENETUNREACH));
            }
            n.state.default_route = Some((r.via, r.dev.clone()));
        }
        Ok(())
    }
}

impl Namespaces for FakeKernel {
    fn list(&self) -> Vec<String> {
        self.with(|m| m.named.keys().cloned().collect())
    }
    fn inode(&self, name: &str) -> Option<u64> {
        self.with(|m| m.named.get(name).map(|n| n.inode))
    }
    async fn create(&self, name: &str) -> Result<()> {
        self.with(|m| {
            if m.named.contains_key(name) {
                return Err(errno(format!("create {name}"), libc::EEXIST));
            }
            m.next_inode += 1;
            let mut n = NsModel {
                inode: m.next_inode,
                ..Default::default()
            };
            n.state.links.insert(
                "lo".into(),
                link("lo", LinkKind::Other("loopback".into()), 65536, false),
            );
            m.named.insert(name.to_string(), n);
            m.log.push(format!("netns add {name}"));
            Ok(())
        })
    }
    async fn delete(&self, name: &str) -> Result<()> {
        self.with(|m| {
            let Some(n) = m.named.remove(name) else {
                return Ok(());
            };
            // The namespace's veth ends take their peers along.
            for (pns, peer) in n.peers.values() {
                remove_link(m, pns.as_deref(), peer);
            }
            m.log.push(format!("netns del {name}"));
            Ok(())
        })
    }
    async fn forwarding(&self, name: &str) -> Result<bool> {
        self.with(|m| Ok(m.ns(Some(name))?.forwarding))
    }
    async fn set_forwarding(&self, name: &str) -> Result<()> {
        self.with(|m| {
            m.ns(Some(name))?.forwarding = true;
            Ok(())
        })
    }
}

mod services;
pub use services::listing_of;
