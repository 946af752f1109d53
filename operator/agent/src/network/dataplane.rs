//! Applying a [`HostPlan`] to the kernel, diff-based and level-triggered.
//!
//! Every pass reads what exists (links, FDB entries, addresses, routes, the
//! yukumo nft tables, the DHCP servers) and changes only what differs from
//! the plan; a pass over a converged host changes nothing. Links are changed
//! with one `ip -batch` per namespace, FDB entries with one `bridge -batch`,
//! and each nft table is replaced in one transaction (`nft -f`: create,
//! delete, define) so no packet ever meets a half-built or empty table.
//! Only names with yukumo's prefixes (`yk…` links, `<prefix>r<id>`
//! namespaces, `yukumo` tables) are ever touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use yukumo_api::networkgroup::SegmentType;

use super::garp;
use super::plan::{
    DhcpPlan, HostPlan, ROUTER_LAN, ROUTER_WAN, RouterPlan, VXLAN_PORT, rule_count, ruleset_hash,
};
use super::watch::RouterWatches;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{cmd}: {msg}")]
    Command { cmd: String, msg: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, NetError>;

/// Where the dataplane lives on this host, and what it last applied.
#[derive(Debug)]
pub struct Dataplane {
    /// The host's network namespace (simulated hosts); `None`: our own.
    pub netns: Option<String>,
    /// Prefix of router namespace names.
    pub router_prefix: String,
    pub underlay: Option<std::net::Ipv4Addr>,
    pub uplink: Option<String>,
    pub state_dir: PathBuf,
    /// Router namespace -> hash of the plan last applied to it in full.
    applied: Mutex<HashMap<String, u64>>,
    /// Kernel events from inside the router namespaces (the agent; none in
    /// benchmarks): a router something changed in is applied in full.
    watches: Option<std::sync::Arc<RouterWatches>>,
    /// Where the next verification slice of routers starts.
    cursor: AtomicUsize,
}

/// What a pass looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Something changed (a watched object, a kernel event): the host
    /// namespace is read and repaired in full; a router is applied when its
    /// plan changed, its namespace is missing or its veth is not on its
    /// bridge.
    Changed,
    /// The periodic backstop: as `Changed`, and [`ROUTERS_PER_VERIFY`]
    /// routers (round robin) are read and repaired in full, so hand-made
    /// damage inside a router namespace is found within
    /// `interval × ceil(routers / ROUTERS_PER_VERIFY)`.
    Verify,
}

/// Routers read in full per verification pass.
pub const ROUTERS_PER_VERIFY: usize = 64;
/// Routers applied at once (their commands are mostly process spawns).
pub const ROUTER_CONCURRENCY: usize = 4;

fn router_hash(r: &RouterPlan) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{r:?}").hash(&mut h);
    h.finish()
}

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub links: usize,
    pub fdb: usize,
    pub tables: usize,
    pub addresses: usize,
    pub namespaces: usize,
    pub dhcp: usize,
}

impl Changes {
    pub fn total(&self) -> usize {
        self.links + self.fdb + self.tables + self.addresses + self.namespaces + self.dhcp
    }

    fn add(&mut self, o: &Changes) {
        self.links += o.links;
        self.fdb += o.fdb;
        self.tables += o.tables;
        self.addresses += o.addresses;
        self.namespaces += o.namespaces;
        self.dhcp += o.dhcp;
    }
}

/// Run `prog args` in namespace `ns` (a name under /run/netns) or here.
///
/// iproute2 enters a namespace itself (`-n`); any other program is spawned
/// from a short-lived thread that entered the namespace (a child inherits
/// its thread's namespaces): one exec, where `nsenter` would be two (about
/// 5 ms less per nft transaction or dnsmasq start on this machine).
pub async fn run_in(
    ns: Option<&str>,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let out = match ns {
        Some(ns) if prog != "ip" && prog != "bridge" => {
            let (ns, prog_s) = (ns.to_string(), prog.to_string());
            let args_s: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let input = stdin.map(str::to_string);
            tokio::task::spawn_blocking(move || spawn_in_netns(&ns, &prog_s, &args_s, input))
                .await
                .map_err(|e| NetError::Command {
                    cmd: prog.to_string(),
                    msg: e.to_string(),
                })??
        }
        _ => {
            let mut cmd = Command::new(prog);
            if let Some(ns) = ns {
                cmd.args(["-n", ns]);
            }
            cmd.args(args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| NetError::Command {
                cmd: prog.to_string(),
                msg: e.to_string(),
            })?;
            if let Some(input) = stdin {
                let mut si = child.stdin.take().expect("piped stdin");
                si.write_all(input.as_bytes()).await?;
                drop(si);
            }
            child.wait_with_output().await?
        }
    };
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: format!("{prog} {}", args.join(" ")),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `f` (blocking) on a scoped thread that entered namespace `ns`
/// first: what it opens, and every process it spawns, is in `ns`; the
/// calling thread keeps its own namespace.
fn in_netns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    in_netns_file(std::fs::File::open(format!("/run/netns/{ns}"))?, f)
}

/// [`in_netns`] for a namespace already opened (`/run/netns/<name>`).
pub(crate) fn in_netns_file<T: Send>(
    file: std::fs::File,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|sc| {
        sc.spawn(|| {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// Gratuitous ARP for `addrs` on a router's WAN leg. Best effort: a
/// failure is logged, and the neighbours learn the address on first use.
async fn announce_in(netns: &str, mac: [u8; 6], addrs: Vec<std::net::Ipv4Addr>) {
    let ns = netns.to_string();
    let res = tokio::task::spawn_blocking(move || {
        in_netns(&ns, || garp::announce(ROUTER_WAN, mac, &addrs))
    })
    .await;
    match res {
        Ok(Ok(n)) => tracing::debug!(router = %netns, announced = n, "gratuitous ARP"),
        Ok(Err(e)) => tracing::warn!(router = %netns, error = %e, "gratuitous ARP failed"),
        Err(e) => tracing::warn!(router = %netns, error = %e, "gratuitous ARP failed"),
    }
}

/// Spawn `prog` inside namespace `ns` and wait for it (blocking).
fn spawn_in_netns(
    ns: &str,
    prog: &str,
    args: &[String],
    stdin: Option<String>,
) -> Result<std::process::Output> {
    in_netns(ns, || {
        let mut child = std::process::Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(input) = &stdin {
            use std::io::Write;
            let mut si = child.stdin.take().expect("piped stdin");
            si.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|e| NetError::Command {
        cmd: format!("{prog} (in {ns})"),
        msg: e.to_string(),
    })
}

#[derive(Debug, Deserialize, Default)]
struct LinkInfoData {
    /// VXLAN VNI or 802.1Q VLAN id.
    id: Option<u32>,
    local: Option<String>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct LinkInfo {
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<LinkInfoData>,
}

#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    mtu: Option<u32>,
    master: Option<String>,
    /// The parent of a VLAN sub-interface or macvlan.
    link: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

impl Link {
    fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
    fn kind(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_kind.as_deref()
    }
}

async fn links(ns: Option<&str>) -> Result<BTreeMap<String, Link>> {
    let out = run_in(ns, "ip", &["-j", "-d", "link", "show"], None).await?;
    let v: Vec<Link> = serde_json::from_str(&out).map_err(|e| NetError::Command {
        cmd: "ip -j link".into(),
        msg: e.to_string(),
    })?;
    Ok(v.into_iter().map(|l| (l.ifname.clone(), l)).collect())
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    local: String,
    prefixlen: u8,
    #[serde(default)]
    family: String,
}

#[derive(Debug, Deserialize)]
struct AddrLink {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

async fn addresses(ns: Option<&str>) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let out = run_in(ns, "ip", &["-j", "addr", "show"], None).await?;
    let v: Vec<AddrLink> = serde_json::from_str(&out).map_err(|e| NetError::Command {
        cmd: "ip -j addr".into(),
        msg: e.to_string(),
    })?;
    Ok(v.into_iter()
        .map(|l| {
            let set = l
                .addr_info
                .iter()
                .filter(|a| a.family == "inet")
                .map(|a| format!("{}/{}", a.local, a.prefixlen))
                .collect();
            (l.ifname, set)
        })
        .collect())
}

#[derive(Debug, Deserialize)]
struct Fdb {
    mac: String,
    ifname: String,
    dst: Option<String>,
    master: Option<String>,
    state: Option<String>,
}

/// A bridge port as `bridge -j -d link show` lists it.
#[derive(Debug, Deserialize)]
struct Port {
    ifname: String,
    master: Option<String>,
    learning: Option<bool>,
    flood: Option<bool>,
}

pub async fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut input = lines.join("\n");
    input.push('\n');
    run_in(ns, "ip", &["-batch", "-"], Some(&input))
        .await
        .map(|_| ())
}

/// Whether the yukumo table `family` in `ns` is the rendered one: present,
/// with its hash comment and every rule (a hand-flushed table has none).
async fn table_current(ns: Option<&str>, family: &str, ruleset: &str) -> bool {
    let Ok(out) = run_in(ns, "nft", &["list", "table", family, "yukumo"], None).await else {
        return false;
    };
    listed_hash(&out) == ruleset_hash(ruleset) && listed_rule_count(&out) == rule_count(ruleset)
}

/// The hash in the `comment "yukumo:<hash>"` of a listed table.
fn listed_hash(listing: &str) -> Option<&str> {
    ruleset_hash(listing)
}

/// Rules of a listed table: the lines one level inside a chain, without the
/// chain headers and map declarations.
fn listed_rule_count(listing: &str) -> usize {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("\t\t"))
        .filter(|l| !l.starts_with('\t') && !l.starts_with(' '))
        .filter(|l| {
            !["type ", "elements", "policy ", "flags "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .count()
}

/// Replace the yukumo table `family` in `ns` in one transaction.
pub async fn replace_table(ns: Option<&str>, family: &str, ruleset: &str) -> Result<()> {
    let script = format!("table {family} yukumo {{}}\ndelete table {family} yukumo\n{ruleset}");
    run_in(ns, "nft", &["-f", "-"], Some(&script))
        .await
        .map(|_| ())
}

async fn delete_table(ns: Option<&str>, family: &str) -> Result<bool> {
    let present = run_in(ns, "nft", &["list", "table", family, "yukumo"], None)
        .await
        .is_ok();
    if present {
        run_in(ns, "nft", &["delete", "table", family, "yukumo"], None).await?;
    }
    Ok(present)
}

/// Links yukumo makes in a host namespace: bridges (`ykbr` VXLAN, `ykbv`
/// VLAN groups), segment links (`ykvx`, `ykvl`) and router veths (`ykgw`,
/// `ykgv`). Guest taps (`ykt`) belong to libvirt.
fn is_ours(name: &str) -> bool {
    ["ykbr", "ykbv", "ykvx", "ykvl", "ykgw", "ykgv"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn netns_inode(name: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

fn pid_netns_inode(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

impl Dataplane {
    pub fn new(
        netns: Option<String>,
        router_prefix: String,
        underlay: Option<std::net::Ipv4Addr>,
        uplink: Option<String>,
        state_dir: PathBuf,
    ) -> Dataplane {
        Dataplane {
            netns,
            router_prefix,
            underlay,
            uplink,
            state_dir,
            applied: Mutex::default(),
            watches: None,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Follow kernel events inside the router namespaces (see
    /// [`super::watch`]).
    pub fn with_watches(mut self, w: std::sync::Arc<RouterWatches>) -> Dataplane {
        self.watches = Some(w);
        self
    }

    fn ns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn router_dir(&self, netns: &str) -> PathBuf {
        self.state_dir.join("net").join(netns)
    }

    /// Router namespaces of this host that exist now.
    pub fn existing_routers(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir("/run/netns") else {
            return vec![];
        };
        let mut out: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.strip_prefix(&self.router_prefix)
                    .and_then(|rest| rest.strip_prefix('r').or_else(|| rest.strip_prefix('v')))
                    .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
            })
            .collect();
        out.sort();
        out
    }

    /// Bring the host to `plan`; returns what was changed.
    pub async fn apply(&self, plan: &HostPlan, pass: Pass) -> Result<Changes> {
        let planned: Vec<String> = plan.routers.keys().cloned().collect();
        let Some(w) = &self.watches else {
            return self
                .apply_with(plan, pass, &planned, &BTreeSet::new())
                .await;
        };
        // Watches of namespaces that went away or were replaced are dropped
        // first: their sockets would keep the old namespace alive.
        self.report_unwatched(w.sync(&planned).await);
        let dirty = w.take_dirty();
        let res = self.apply_with(plan, pass, &planned, &dirty).await;
        if res.is_err() {
            // Not repaired yet: kept for the retry.
            w.mark_dirty(dirty);
        }
        res
    }

    /// [`Dataplane::apply`], with the routers something changed in
    /// (`dirty`: applied in full).
    async fn apply_with(
        &self,
        plan: &HostPlan,
        pass: Pass,
        planned: &[String],
        dirty: &BTreeSet<String>,
    ) -> Result<Changes> {
        let mut ch = Changes::default();
        let ns = self.ns();
        let have = links(ns).await?;
        // 1. Links of the host namespace: stale ones go, segments come.
        let mut batch = Vec::new();
        let wanted: BTreeSet<String> = plan
            .segments
            .values()
            .flat_map(|s| [s.bridge.clone(), s.link.clone()])
            .chain(plan.routers.values().map(|r| r.host_veth.clone()))
            .collect();
        for name in have.keys() {
            if is_ours(name) && !wanted.contains(name) {
                batch.push(format!("link del {name}"));
            }
        }
        for s in plan.segments.values() {
            match have.get(&s.bridge) {
                None => {
                    batch.push(format!("link add {} type bridge", s.bridge));
                    batch.push(format!("link set {} mtu {} up", s.bridge, s.mtu));
                }
                Some(l) if !l.up() || l.mtu != Some(s.mtu) => {
                    batch.push(format!("link set {} mtu {} up", s.bridge, s.mtu));
                }
                _ => {}
            }
            let link_ok = have.get(&s.link).is_some_and(|l| {
                let data = l.linkinfo.as_ref().and_then(|i| i.info_data.as_ref());
                match s.kind {
                    SegmentType::Vxlan => {
                        l.kind() == Some("vxlan")
                            && data.and_then(|d| d.id) == Some(s.id)
                            && data.and_then(|d| d.local.clone())
                                == self.underlay.map(|u| u.to_string())
                    }
                    SegmentType::Vlan => {
                        l.kind() == Some("vlan")
                            && data.and_then(|d| d.id) == Some(s.id)
                            && data.and_then(|d| d.protocol.as_deref()) == Some("802.1Q")
                            && l.link.is_some()
                            && l.link == self.uplink
                    }
                }
            });
            if !link_ok {
                if have.contains_key(&s.link) {
                    batch.push(format!("link del {}", s.link));
                }
                match s.kind {
                    SegmentType::Vxlan => {
                        let mut l = format!(
                            "link add {} type vxlan id {} dstport {VXLAN_PORT} nolearning",
                            s.link, s.id
                        );
                        if let Some(u) = self.underlay {
                            l.push_str(&format!(" local {u}"));
                        }
                        if let Some(up) = &self.uplink {
                            l.push_str(&format!(" dev {up}"));
                        }
                        batch.push(l);
                    }
                    SegmentType::Vlan => {
                        // The Host does not offer 802.1Q without an uplink
                        // (register.rs), so the scheduler keeps VLAN groups
                        // away; a group planned here anyway is an error.
                        let Some(up) = &self.uplink else {
                            return Err(NetError::Command {
                                cmd: format!("link add {}", s.link),
                                msg: format!(
                                    "VLAN segment {} needs an uplink (--uplink) to carry it",
                                    s.id
                                ),
                            });
                        };
                        batch.push(format!(
                            "link add {} link {up} type vlan protocol 802.1Q id {}",
                            s.link, s.id
                        ));
                    }
                }
                batch.push(format!(
                    "link set {} master {} mtu {} up",
                    s.link, s.bridge, s.mtu
                ));
            } else if let Some(l) = have.get(&s.link)
                && (l.master.as_deref() != Some(s.bridge.as_str())
                    || !l.up()
                    || l.mtu != Some(s.mtu))
            {
                batch.push(format!(
                    "link set {} master {} mtu {} up",
                    s.link, s.bridge, s.mtu
                ));
            }
        }
        ch.links += batch.len();
        ip_batch(ns, &batch).await?;

        // 2. Routers (before guest taps: their veths join the bridges too).
        // New ones get their namespace and both legs in two batches for all
        // of them; each is then finished on its own.
        let existing: BTreeSet<String> = self.existing_routers().into_iter().collect();
        let fresh: Vec<&RouterPlan> = plan
            .routers
            .values()
            .filter(|r| !existing.contains(&r.netns))
            .collect();
        if !fresh.is_empty() {
            let mut netns_batch = Vec::new();
            let mut legs = Vec::new();
            let have = links(ns).await?;
            for r in &fresh {
                self.stop_stale_dhcp(r, &mut ch).await;
                netns_batch.push(format!("netns add {}", r.netns));
                if have.contains_key(&r.host_veth) {
                    legs.push(format!("link del {}", r.host_veth));
                }
                legs.extend(veth_commands(r));
                if let Some(w) = &r.wan {
                    legs.push(macvlan_command(r, &w.parent));
                }
            }
            ip_batch(None, &netns_batch).await?;
            ch.namespaces += netns_batch.len();
            ch.links += legs.len();
            ip_batch(ns, &legs).await?;
        }
        let host_links = links(ns).await?;
        let verify: BTreeSet<&str> = if pass == Pass::Verify && !plan.routers.is_empty() {
            let n = plan.routers.len();
            let start = self.cursor.fetch_add(ROUTERS_PER_VERIFY, Ordering::Relaxed) % n;
            plan.routers
                .values()
                .cycle()
                .skip(start)
                .take(ROUTERS_PER_VERIFY.min(n))
                .map(|r| r.netns.as_str())
                .collect()
        } else {
            BTreeSet::new()
        };
        let todo: Vec<(&RouterPlan, u64, bool)> = {
            let applied = self.applied.lock().expect("poisoned");
            plan.routers
                .values()
                .filter_map(|r| {
                    let h = router_hash(r);
                    let fresh = !existing.contains(&r.netns);
                    let veth_ok = host_links
                        .get(&r.host_veth)
                        .is_some_and(|l| l.up() && l.master.as_deref() == Some(r.bridge.as_str()));
                    let due = fresh
                        || !veth_ok
                        || verify.contains(r.netns.as_str())
                        || dirty.contains(&r.netns)
                        || applied.get(&r.netns) != Some(&h);
                    due.then_some((r, h, fresh))
                })
                .collect()
        };
        // A plain loop, not a closure: the futures hold no closure across
        // await points (closures over references there are not `Send`).
        let mut jobs = Vec::with_capacity(todo.len());
        for (r, h, fresh) in todo {
            jobs.push(self.router_job(r, h, fresh, &host_links));
        }
        let results: Vec<(&RouterPlan, u64, Result<Changes>)> = futures::stream::iter(jobs)
            .buffer_unordered(ROUTER_CONCURRENCY)
            .collect()
            .await;
        let mut failed = None;
        {
            let mut applied = self.applied.lock().expect("poisoned");
            for (r, h, res) in results {
                match res {
                    Ok(c) => {
                        ch.add(&c);
                        applied.insert(r.netns.clone(), h);
                    }
                    Err(e) => {
                        applied.remove(&r.netns);
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        let stale: Vec<&String> = existing
            .iter()
            .filter(|name| !plan.routers.values().any(|r| &r.netns == *name))
            .collect();
        let mut jobs = Vec::with_capacity(stale.len());
        for name in stale {
            jobs.push(self.remove_router(name));
        }
        let removed: Vec<Result<String>> = futures::stream::iter(jobs)
            .buffer_unordered(ROUTER_CONCURRENCY)
            .collect()
            .await;
        for res in removed {
            match res {
                Ok(name) => {
                    self.applied.lock().expect("poisoned").remove(&name);
                    ch.namespaces += 1;
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(w) = &self.watches {
            // New routers are watched from now on.
            self.report_unwatched(w.sync(planned).await);
        }
        if let Some(e) = failed {
            return Err(e);
        }

        // 3. Taps: re-joined to their bridge if it was recreated.
        let have = links(ns).await?;
        let mut batch = Vec::new();
        for t in &plan.taps {
            if let Some(l) = have.get(&t.name)
                && l.master.as_deref() != Some(t.bridge.as_str())
                && have.contains_key(&t.bridge)
            {
                batch.push(format!("link set {} master {} up", t.name, t.bridge));
            }
        }
        ch.links += batch.len();
        ip_batch(ns, &batch).await?;

        // 4. The bridges' forwarding: VXLAN remotes, and the ports of guests
        // and routers pinned to their own MACs.
        self.apply_bridge(plan, &mut ch).await?;

        // 5. Anti-spoofing table.
        if plan.taps.is_empty() && plan.segments.is_empty() {
            if delete_table(ns, "bridge").await? {
                ch.tables += 1;
            }
        } else if !table_current(ns, "bridge", &plan.guard).await {
            replace_table(ns, "bridge", &plan.guard).await?;
            ch.tables += 1;
        }
        Ok(ch)
    }

    /// The bridges' forwarding state, read once and changed in one
    /// `bridge -batch`:
    /// - one all-zero FDB entry per remote host of each VXLAN segment
    ///   (head-end replication, no multicast, no learning on the VTEP);
    /// - every guest tap and router veth: a static entry for its own MAC,
    ///   learning off and unknown-unicast flooding off. A unicast frame is
    ///   delivered to a guest only if it is addressed to that guest (never
    ///   flooded to every guest of the group after an entry aged out), and
    ///   nothing a guest sends moves another MAC to its port. Broadcast and
    ///   multicast (ARP, DHCP) still reach every port.
    async fn apply_bridge(&self, plan: &HostPlan, ch: &mut Changes) -> Result<()> {
        let ns = self.ns();
        let out = run_in(ns, "bridge", &["-j", "fdb", "show"], None).await?;
        let entries: Vec<Fdb> = serde_json::from_str(&out).unwrap_or_default();
        let mut have: BTreeSet<(String, String)> = BTreeSet::new();
        let mut pinned: BTreeSet<(String, String)> = BTreeSet::new();
        for e in entries {
            if e.mac == "00:00:00:00:00:00"
                && e.ifname.starts_with("ykvx")
                && let Some(d) = e.dst
            {
                have.insert((e.ifname, d));
            } else if e.master.is_some() && e.state.as_deref() == Some("static") {
                pinned.insert((e.ifname, e.mac));
            }
        }
        let want: BTreeSet<(String, String)> = plan
            .segments
            .values()
            .filter(|s| s.kind == SegmentType::Vxlan)
            .flat_map(|s| s.remotes.iter().map(|r| (s.link.clone(), r.to_string())))
            .collect();
        let mut batch = Vec::new();
        for (dev, dst) in have.difference(&want) {
            // Entries of a link that is going away go with it.
            if plan.segments.values().any(|s| &s.link == dev) {
                batch.push(format!(
                    "fdb del 00:00:00:00:00:00 dev {dev} dst {dst} self"
                ));
            }
        }
        for (dev, dst) in want.difference(&have) {
            batch.push(format!(
                "fdb append 00:00:00:00:00:00 dev {dev} dst {dst} self permanent"
            ));
        }
        ch.fdb += batch.len();
        // Guests' and routers' ports, where they are on their bridge.
        let out = run_in(ns, "bridge", &["-j", "-d", "link", "show"], None).await?;
        let ports: BTreeMap<String, Port> = serde_json::from_str::<Vec<Port>>(&out)
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.ifname.clone(), p))
            .collect();
        let own: Vec<(&str, &str, &str)> = plan
            .taps
            .iter()
            .map(|t| (t.name.as_str(), t.bridge.as_str(), t.mac.as_str()))
            .chain(
                plan.routers
                    .values()
                    .map(|r| (r.host_veth.as_str(), r.bridge.as_str(), r.lan_mac.as_str())),
            )
            .collect();
        let mut port_changes = 0;
        for (port, bridge, mac) in own {
            let Some(p) = ports
                .get(port)
                .filter(|p| p.master.as_deref() == Some(bridge))
            else {
                continue;
            };
            if p.learning != Some(false) || p.flood != Some(false) {
                batch.push(format!("link set dev {port} learning off flood off"));
                port_changes += 1;
            }
            if !pinned.contains(&(port.to_string(), mac.to_string())) {
                batch.push(format!("fdb replace {mac} dev {port} master static"));
                port_changes += 1;
            }
        }
        ch.links += port_changes;
        if !batch.is_empty() {
            let mut input = batch.join("\n");
            input.push('\n');
            run_in(ns, "bridge", &["-batch", "-"], Some(&input)).await?;
        }
        Ok(())
    }

    async fn router_job<'a>(
        &self,
        r: &'a RouterPlan,
        hash: u64,
        fresh: bool,
        host: &BTreeMap<String, Link>,
    ) -> (&'a RouterPlan, u64, Result<Changes>) {
        // What the agent changes in the router is not news to its watch.
        if let Some(w) = &self.watches {
            w.begin(&r.netns);
        }
        let res = self.apply_router(r, fresh, host).await;
        if let Some(w) = &self.watches {
            w.end(&r.netns);
        }
        (r, hash, res)
    }

    fn report_unwatched(&self, failed: Vec<(String, String)>) {
        for (router, error) in failed {
            tracing::warn!(%router, %error, "cannot watch the router's namespace; the verification backstop covers it");
        }
    }

    /// Stop a DHCP server left running in a router namespace that was
    /// deleted by hand (it keeps that namespace, and its WAN addresses,
    /// alive).
    async fn stop_stale_dhcp(&self, r: &RouterPlan, ch: &mut Changes) {
        let pid_file = self.router_dir(&r.netns).join("dnsmasq.pid");
        if let Some(pid) = read_pid(&pid_file).filter(|p| is_our_dnsmasq(*p, &pid_file))
            && pid_netns_inode(pid) != netns_inode(&r.netns)
        {
            stop_pid(pid).await;
            ch.dhcp += 1;
        }
    }

    /// Bring one router to its plan. `fresh`: this pass just made its
    /// namespace and both legs, so nothing inside it is read.
    async fn apply_router(
        &self,
        r: &RouterPlan,
        fresh: bool,
        host: &BTreeMap<String, Link>,
    ) -> Result<Changes> {
        let mut ch = Changes::default();
        let host_ns = self.ns();
        let rns = Some(r.netns.as_str());
        let mut empty = fresh;
        if !fresh {
            self.stop_stale_dhcp(r, &mut ch).await;
            if netns_inode(&r.netns).is_none() {
                run_in(None, "ip", &["netns", "add", &r.netns], None).await?;
                ch.namespaces += 1;
                empty = true;
            }
        }
        if empty
            || sysctl_in(&r.netns, "net/ipv4/ip_forward", None)
                .await?
                .trim()
                != "1"
        {
            sysctl_in(&r.netns, "net/ipv4/ip_forward", Some("1")).await?;
        }
        let inner = if empty {
            BTreeMap::new()
        } else {
            links(rns).await?
        };
        let mut host_batch = Vec::new();
        let mut batch = Vec::new();
        if empty {
            batch.push("link set lo up".to_string());
        }
        // The LAN leg: a veth from the group's bridge into the namespace.
        if fresh {
            batch.push(format!("link set {ROUTER_LAN} up"));
        } else if !inner.contains_key(ROUTER_LAN) || !host.contains_key(&r.host_veth) {
            if host.contains_key(&r.host_veth) {
                host_batch.push(format!("link del {}", r.host_veth));
            }
            if inner.contains_key(ROUTER_LAN) {
                ip_batch(rns, &[format!("link del {ROUTER_LAN}")]).await?;
            }
            host_batch.extend(veth_commands(r));
            batch.push(format!("link set {ROUTER_LAN} up"));
        } else {
            let hv = &host[&r.host_veth];
            if hv.master.as_deref() != Some(r.bridge.as_str()) || !hv.up() {
                host_batch.push(format!("link set {} master {} up", r.host_veth, r.bridge));
            }
            let lan = &inner[ROUTER_LAN];
            if !lan.up() || lan.mtu != Some(r.mtu) {
                batch.push(format!("link set {ROUTER_LAN} mtu {} up", r.mtu));
            }
        }
        // The WAN leg: a macvlan on the host's external interface.
        match &r.wan {
            Some(_) if fresh => batch.push(format!("link set {ROUTER_WAN} up")),
            Some(w) if !inner.contains_key(ROUTER_WAN) => {
                host_batch.push(macvlan_command(r, &w.parent));
                batch.push(format!("link set {ROUTER_WAN} up"));
            }
            Some(_) if !inner[ROUTER_WAN].up() => batch.push(format!("link set {ROUTER_WAN} up")),
            Some(_) => {}
            None if inner.contains_key(ROUTER_WAN) => batch.push(format!("link del {ROUTER_WAN}")),
            None => {}
        }
        ch.links += host_batch.len() + batch.len();
        ip_batch(host_ns, &host_batch).await?;
        // Addresses and the default route: in an empty namespace in the
        // same batch as its links, otherwise diffed against what is there
        // now (a recreated leg has lost its addresses).
        if !empty {
            ip_batch(rns, &batch).await?;
            batch.clear();
        }
        let have_addrs = if empty {
            BTreeMap::new()
        } else {
            addresses(rns).await?
        };
        let mut want: Vec<(&str, BTreeSet<String>)> =
            vec![(ROUTER_LAN, BTreeSet::from([r.lan.clone()]))];
        if let Some(w) = &r.wan {
            want.push((ROUTER_WAN, w.addresses.iter().cloned().collect()));
        }
        // External addresses this pass adds: announced once NAT is in place.
        let mut announce: Vec<std::net::Ipv4Addr> = Vec::new();
        for (dev, addrs) in &want {
            let cur = have_addrs.get(*dev).cloned().unwrap_or_default();
            for a in cur.difference(addrs) {
                batch.push(format!("addr del {a} dev {dev}"));
                ch.addresses += 1;
            }
            for a in addrs.difference(&cur) {
                batch.push(format!("addr add {a} dev {dev}"));
                ch.addresses += 1;
                if *dev == ROUTER_WAN
                    && let Some(ip) = a.split('/').next().and_then(|ip| ip.parse().ok())
                {
                    announce.push(ip);
                }
            }
        }
        if let Some(gw) = r.wan.as_ref().and_then(|w| w.gateway.as_ref()) {
            let ok = !empty && {
                let routes = run_in(rns, "ip", &["-j", "route", "show", "default"], None).await?;
                serde_json::from_str::<serde_json::Value>(&routes)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .is_some_and(|a| {
                        a.iter().any(|r| {
                            r["gateway"].as_str() == Some(gw)
                                && r["dev"].as_str() == Some(ROUTER_WAN)
                        })
                    })
            };
            if !ok {
                batch.push(format!("route replace default via {gw} dev {ROUTER_WAN}"));
                ch.addresses += 1;
            }
        }
        ip_batch(rns, &batch).await?;
        // NAT and firewall.
        if empty || !table_current(rns, "ip", &r.ruleset).await {
            replace_table(rns, "ip", &r.ruleset).await?;
            ch.tables += 1;
        }
        if let Some(mac) = garp::parse_mac(&r.wan_mac)
            && !announce.is_empty()
        {
            announce_in(&r.netns, mac, announce).await;
        }
        // DHCP.
        self.apply_dhcp(r, &mut ch).await?;
        Ok(ch)
    }

    /// The DHCP server's command line for a router, and where its files
    /// are (`<state>/net/<netns>/`: pid, leases, hosts, args).
    pub fn dnsmasq_args(&self, r: &RouterPlan, d: &DhcpPlan) -> Vec<String> {
        let dir = self.router_dir(&r.netns);
        let mut args: Vec<String> = vec![
            "--conf-file=/dev/null".into(),
            "--user=root".into(),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            format!("--dhcp-leasefile={}", dir.join("leases").display()),
            format!("--dhcp-hostsfile={}", dir.join("hosts").display()),
        ];
        args.extend(d.args.iter().cloned());
        args
    }

    async fn apply_dhcp(&self, r: &RouterPlan, ch: &mut Changes) -> Result<()> {
        let dir = self.router_dir(&r.netns);
        let pid_file = dir.join("dnsmasq.pid");
        let running = read_pid(&pid_file).filter(|pid| {
            is_our_dnsmasq(*pid, &pid_file) && pid_netns_inode(*pid) == netns_inode(&r.netns)
        });
        let Some(d) = &r.dhcp else {
            if let Some(pid) = running {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                ch.dhcp += 1;
            }
            return Ok(());
        };
        std::fs::create_dir_all(&dir)?;
        let hosts_file = dir.join("hosts");
        let args_file = dir.join("args");
        let args = self.dnsmasq_args(r, d);
        let args_text = args.join("\n");
        let hosts_changed =
            std::fs::read_to_string(&hosts_file).ok().as_deref() != Some(d.hosts.as_str());
        if hosts_changed {
            write_atomic(&hosts_file, &d.hosts)?;
        }
        let args_same =
            std::fs::read_to_string(&args_file).ok().as_deref() == Some(args_text.as_str());
        match running {
            Some(pid) if args_same => {
                if hosts_changed {
                    // dnsmasq rereads its hosts file on SIGHUP.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGHUP,
                    );
                    ch.dhcp += 1;
                }
            }
            other => {
                if let Some(pid) = other {
                    stop_pid(pid).await;
                }
                write_atomic(&args_file, &args_text)?;
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                run_in(Some(&r.netns), "dnsmasq", &refs, None).await?;
                ch.dhcp += 1;
            }
        }
        Ok(())
    }

    async fn remove_router(&self, netns: &str) -> Result<String> {
        let dir = self.router_dir(netns);
        let pid_file = dir.join("dnsmasq.pid");
        if let Some(pid) = read_pid(&pid_file).filter(|p| is_our_dnsmasq(*p, &pid_file)) {
            stop_pid(pid).await;
        }
        run_in(None, "ip", &["netns", "del", netns], None).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(netns.to_string())
    }
}

/// A router's LAN leg: a veth from its group's bridge into its namespace.
fn veth_commands(r: &RouterPlan) -> [String; 2] {
    [
        format!(
            "link add {} mtu {} type veth peer name {ROUTER_LAN} mtu {} address {} netns {}",
            r.host_veth, r.mtu, r.mtu, r.lan_mac, r.netns
        ),
        format!("link set {} master {} up", r.host_veth, r.bridge),
    ]
}

/// A router's WAN leg: a macvlan on the host's external interface.
fn macvlan_command(r: &RouterPlan, parent: &str) -> String {
    format!(
        "link add {ROUTER_WAN} link {parent} address {} netns {} type macvlan mode bridge",
        r.wan_mac, r.netns
    )
}

/// Read (`value` None) or write a sysctl under /proc/sys of namespace `ns`,
/// from a short-lived thread that enters it: no process spawned.
pub async fn sysctl_in(ns: &str, key: &str, value: Option<&str>) -> Result<String> {
    let (ns, key, value) = (ns.to_string(), key.to_string(), value.map(str::to_string));
    let what = format!("sysctl {key} in {ns}");
    let res = tokio::task::spawn_blocking(move || {
        in_netns(&ns, || {
            let path = format!("/proc/sys/{key}");
            match &value {
                Some(v) => std::fs::write(&path, v).map(|_| v.clone()),
                None => std::fs::read_to_string(&path),
            }
        })
    })
    .await
    .map_err(|e| NetError::Command {
        cmd: what.clone(),
        msg: e.to_string(),
    })?;
    res.map_err(|e| NetError::Command {
        cmd: what,
        msg: e.to_string(),
    })
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A dnsmasq we started: its command line names our pid file.
fn is_our_dnsmasq(pid: i32, pid_file: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("dnsmasq") && c.contains(&*pid_file.to_string_lossy())
        })
        .unwrap_or(false)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn stop_pid(pid: i32) {
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..50 {
        // Gone, or a zombie (dnsmasq daemonizes: it is not our child, and
        // whoever reaps it may be slow).
        if nix::sys::signal::kill(p, None).is_err() || is_zombie(pid) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_table_is_compared_by_hash_and_rule_count() {
        let listing = "table ip yukumo {\n\tcomment \"yukumo:0123456789abcdef\"\n\tmap to_private {\n\t\ttype ipv4_addr : ipv4_addr\n\t\telements = { 1.1.1.1 : 10.0.0.1,\n\t\t\t     1.1.1.2 : 10.0.0.2 }\n\t}\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established,related accept\n\t\tiifname \"lo\" accept\n\t}\n}\n";
        assert_eq!(listed_hash(listing), Some("0123456789abcdef"));
        assert_eq!(listed_rule_count(listing), 2);
        let flushed = listing.replace("\t\tct state established,related accept\n", "");
        assert_eq!(listed_rule_count(&flushed), 1);
    }
}
