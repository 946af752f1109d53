//! One network pass: observe → decide → execute, over a [`Kernel`].
//!
//! The host namespace is read (one netlink dump of links and one of the
//! FDB, read again only after this pass changed something; not read at all
//! when its kernel watch reported nothing since the last pass, whose final
//! state is kept), each step's
//! pure decision ([`super::decide`]) returns typed operations, and the
//! kernel carries them out. Routers are applied 4 at a time, each only
//! when its plan changed, its namespace is missing, its veth left its
//! bridge, a kernel event says something changed inside it, or the
//! verification backstop's turn came. What the agent wrote last (router
//! plans, tables) is remembered, so a table nothing touched since is not
//! listed again. Only names with yukumo's prefixes are ever touched.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;

use super::decide::{self, HostEnv, RouterSeen, TableSeen};
use super::kernel::{Kernel, NsLinks, Result};
use super::observe::{NsState, Want};
use super::ops::{Family, NsOps, ShapeOp, TableOp};
use super::plan::{HostPlan, RouterPlan, is_router_netns};
use super::ruleset::ruleset_hash;
use super::watch::{OWN, RouterWatches};

/// What a pass looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Something changed (a watched object, a kernel event): the host
    /// namespace is repaired in full (read again unless its watch reported
    /// nothing since the last pass); a router is applied when its
    /// plan changed, its namespace is missing, its veth is not on its
    /// bridge, or a kernel event came from inside it.
    Changed,
    /// The periodic backstop: as `Changed`, but the host is always read,
    /// tables are listed, and
    /// [`ROUTERS_PER_VERIFY`] routers (round robin) are read and repaired in
    /// full, so damage a watch missed is found within
    /// `interval × ceil(routers / ROUTERS_PER_VERIFY)`.
    Verify,
}

impl Pass {
    /// Its name in metrics (`pass` label).
    pub fn label(self) -> &'static str {
        match self {
            Pass::Changed => "changed",
            Pass::Verify => "verify",
        }
    }
}

/// The step name of a pass that found the host as the last one left it
/// (instead of "observe host").
pub const HOST_REUSED: &str = "host state reused";

/// A WAN interface and the classes of the agent's shaper on it (None: no
/// shaper).
type Shaped = (String, Option<Vec<(u16, u32)>>);

/// The name gratuitous ARPs for the Site's WAN endpoint are logged under.
pub const WAN_ENDPOINT: &str = "wan-endpoint";

/// Routers read in full per verification pass.
pub const ROUTERS_PER_VERIFY: usize = 64;
/// Routers applied at once.
pub const ROUTER_CONCURRENCY: usize = 4;

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

fn hash<T: Hash>(t: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// What the agent last applied to a router in full.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouterMemo {
    /// Hash of the plan.
    plan: u64,
    /// The hash its table was given.
    ruleset: Option<String>,
}

/// The host's dataplane: its kernel, and what was written last.
pub struct Dataplane<K: Kernel> {
    pub kernel: K,
    /// Prefix of router namespace names.
    pub router_prefix: String,
    pub env: HostEnv,
    /// Router namespace → what was applied to it in full last.
    applied: Mutex<HashMap<String, RouterMemo>>,
    /// The host's anti-spoofing table as last written: `Some(None)` deleted.
    guard: Mutex<Option<Option<String>>>,
    /// The host's tunnel source filter as last written, likewise.
    tunnel_filter: Mutex<Option<Option<String>>>,
    /// The WAN interface and its shaper's classes as last left (None
    /// inside: no shaper).
    shaping: Mutex<Option<Shaped>>,
    /// The WireGuard device as last left (`Some(None)`: none).
    wireguard: Mutex<Option<Option<super::wireguard::WgSeen>>>,
    /// The Site's endpoint this agent holds (interface, address).
    endpoint: Mutex<Option<(String, yukumo_api::net::Ipv4Net)>>,
    /// The host namespace's links and FDB as the last pass left them (read
    /// after its last write), while nothing else can have changed them:
    /// a pass on a watch event with no kernel event from the host uses it
    /// instead of dumping thousands of links again.
    host_seen: Mutex<Option<std::sync::Arc<NsState>>>,
    /// Kernel events from the host's and the routers' namespaces (the agent
    /// and the network benchmark; none in unit tests of the fake): what
    /// changed there is read in full.
    watches: Option<std::sync::Arc<RouterWatches>>,
    /// The name the host namespace is watched under.
    host_watch: String,
    /// Where the next verification slice of routers starts.
    cursor: AtomicUsize,
    /// How long each step of the last complete pass took.
    timings: Mutex<Vec<(&'static str, std::time::Duration)>>,
}

/// Times the steps of a pass.
struct StepClock {
    last: std::time::Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl StepClock {
    fn new() -> Self {
        StepClock {
            last: std::time::Instant::now(),
            steps: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }
}

impl<K: Kernel> std::fmt::Debug for Dataplane<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("router_prefix", &self.router_prefix)
            .field("env", &self.env)
            .finish()
    }
}

/// The host namespace's state as last read, and whether this pass changed
/// it since (then it is read again before the next step).
struct HostView<'a, N: NsLinks> {
    ns: &'a N,
    /// Shared with the routers' jobs and the next pass, never copied.
    state: std::sync::Arc<NsState>,
    stale: bool,
}

impl<N: NsLinks> HostView<'_, N> {
    async fn fresh(&mut self) -> Result<&NsState> {
        Ok(self.shared().await?)
    }

    async fn shared(&mut self) -> Result<&std::sync::Arc<NsState>> {
        if self.stale {
            self.state = std::sync::Arc::new(self.ns.observe(Want::HOST).await?);
            self.stale = false;
        }
        Ok(&self.state)
    }

    async fn apply(&mut self, ops: NsOps) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.stale = true;
        self.ns.apply(&ops).await
    }
}

impl<K: Kernel> Dataplane<K> {
    pub fn new(kernel: K, router_prefix: String, env: HostEnv, host_netns: Option<String>) -> Self {
        Dataplane {
            kernel,
            router_prefix,
            env,
            applied: Mutex::default(),
            guard: Mutex::default(),
            tunnel_filter: Mutex::default(),
            shaping: Mutex::default(),
            wireguard: Mutex::default(),
            endpoint: Mutex::default(),
            host_seen: Mutex::default(),
            watches: None,
            host_watch: host_netns.unwrap_or_else(|| OWN.to_string()),
            cursor: AtomicUsize::new(0),
            timings: Mutex::default(),
        }
    }

    /// Follow kernel events in the host's and the routers' namespaces.
    pub fn with_watches(mut self, w: std::sync::Arc<RouterWatches>) -> Self {
        w.set_host(&self.host_watch);
        self.watches = Some(w);
        self
    }

    /// How long each step of the last complete pass took.
    pub fn last_timings(&self) -> Vec<(&'static str, std::time::Duration)> {
        self.timings.lock().expect("poisoned").clone()
    }

    /// Router namespaces of this host that exist now.
    pub fn existing_routers(&self) -> Vec<String> {
        self.kernel
            .list()
            .into_iter()
            .filter(|n| is_router_netns(&self.router_prefix, n))
            .collect()
    }

    /// Bring the host to `plan`; returns what was changed.
    pub async fn apply(&self, plan: &HostPlan, pass: Pass) -> Result<Changes> {
        let Some(w) = &self.watches else {
            return self.apply_with(plan, pass, &BTreeSet::new()).await;
        };
        // Watches of namespaces that went away or were replaced are dropped
        // first: their sockets would keep the old namespace alive.
        let started = std::time::Instant::now();
        let watched = self.watch_list(plan);
        self.report_unwatched(w.sync(&watched).await);
        let synced = started.elapsed();
        let dirty = w.take_dirty();
        w.begin(&self.host_watch);
        let res = self.apply_with(plan, pass, &dirty).await;
        let mut clock = StepClock::new();
        if w.end(&self.host_watch) > 0 {
            // Something changed the host namespace during the pass (the
            // agent, or someone else in that window).
            self.host_seen.lock().expect("poisoned").take();
        }
        let unknown = self.host_seen.lock().expect("poisoned").is_none();
        if res.is_ok() && unknown && w.watched(&self.host_watch) {
            // Read once more now that its events are news again: a change
            // after this read is an event, one before it is in it.
            if let Ok(ns) = self.kernel.ns(None).await
                && let Ok(s) = ns.observe(Want::HOST).await
            {
                *self.host_seen.lock().expect("poisoned") = Some(std::sync::Arc::new(s));
            }
        }
        clock.step("host read after");
        if res.is_err() {
            // Not repaired yet: kept for the retry.
            w.mark_dirty(dirty);
        } else if res.as_ref().is_ok_and(|c| c.namespaces > 0) {
            // New routers are watched from now on.
            self.report_unwatched(w.sync(&self.watch_list(plan)).await);
        }
        if res.is_ok() {
            clock.step("watches after");
            let mut t = self.timings.lock().expect("poisoned");
            t.insert(0, ("watches before", synced));
            t.extend(clock.steps);
        }
        res
    }

    fn watch_list(&self, plan: &HostPlan) -> Vec<String> {
        let mut v: Vec<String> = plan.routers.keys().cloned().collect();
        v.push(self.host_watch.clone());
        v
    }

    fn report_unwatched(&self, failed: Vec<(String, String)>) {
        for (ns, error) in failed {
            tracing::warn!(%ns, %error, "cannot watch the namespace; the verification backstop covers it");
        }
    }

    /// Whether nothing can have changed `ns` behind the agent's back since
    /// it last looked: it is watched and no event came.
    fn quiet(&self, ns: &str, pass: Pass, dirty: &BTreeSet<String>) -> bool {
        pass == Pass::Changed
            && !dirty.contains(ns)
            && self.watches.as_ref().is_some_and(|w| w.watched(ns))
    }

    /// [`Dataplane::apply`], with the namespaces kernel events came from
    /// (`dirty`: read in full).
    async fn apply_with(
        &self,
        plan: &HostPlan,
        pass: Pass,
        dirty: &BTreeSet<String>,
    ) -> Result<Changes> {
        let mut ch = Changes::default();
        let mut clock = StepClock::new();
        let host_ns = self.kernel.ns(None).await?;
        // Taken: a pass that fails leaves nothing to trust.
        let seen = self.host_seen.lock().expect("poisoned").take();
        let (state, step) = match seen {
            Some(s) if self.quiet(&self.host_watch, pass, dirty) => (s, HOST_REUSED),
            _ => (
                std::sync::Arc::new(host_ns.observe(Want::HOST).await?),
                "observe host",
            ),
        };
        let mut host = HostView {
            state,
            ns: &host_ns,
            stale: false,
        };
        clock.step(step);
        // 0. The Site's WAN tunnel end: the source filter first (no tunnel
        // packet from a stranger is taken in between), then the endpoint's
        // address (the WAN ports send from it).
        let planned = plan.tunnel.as_ref().map(|t| t.ruleset.clone());
        let seen = self
            .table_seen(
                Family::Inet,
                planned.as_deref(),
                &self.tunnel_filter,
                pass,
                dirty,
            )
            .await?;
        if let Some(op) = decide::tunnel_table_op(plan, &seen) {
            self.kernel.apply_table(None, &op).await?;
            ch.tables += 1;
            *self.tunnel_filter.lock().expect("poisoned") = Some(match op {
                TableOp::Replace { ruleset, .. } => Some(ruleset),
                TableOp::Delete { .. } => None,
            });
        } else {
            // As planned (found so, or known so): not listed again while
            // nothing changes the namespace.
            *self.tunnel_filter.lock().expect("poisoned") = Some(planned);
        }
        let known = self.shaping.lock().expect("poisoned").clone();
        match &plan.tunnel {
            Some(t) => {
                // Read on a verification pass, after a kernel event, or
                // when not known; else as the agent left it.
                let seen = match known {
                    Some((dev, k)) if dev == t.dev && self.quiet(&self.host_watch, pass, dirty) => {
                        k
                    }
                    _ => self.kernel.shaping(&t.dev).await?,
                };
                let op = decide::shape_op(plan, seen.as_deref());
                if let Some(op) = &op {
                    self.kernel.apply_shaping(op).await?;
                    ch.tables += 1;
                }
                *self.shaping.lock().expect("poisoned") = Some((
                    t.dev.clone(),
                    match op {
                        Some(ShapeOp::Set { classes, .. }) => Some(classes),
                        Some(ShapeOp::Clear { .. }) => None,
                        None => seen,
                    },
                ));
            }
            // No WAN end here any more: the agent's shaper goes.
            None => {
                if let Some((dev, Some(_))) = known {
                    self.kernel.apply_shaping(&ShapeOp::Clear { dev }).await?;
                    ch.tables += 1;
                }
                *self.shaping.lock().expect("poisoned") = None;
            }
        }
        // 0c. The WireGuard device of a WireGuard Site's endpoint holder
        // (its WAN ports reach the peers through it; the filter above never
        // lets their VXLAN out on the WAN interface in the clear). Read
        // like the shaper.
        let want = plan.tunnel.as_ref().and_then(|t| t.wireguard.as_ref());
        let known = self.wireguard.lock().expect("poisoned").clone();
        let seen = match known {
            Some(k) if self.quiet(&self.host_watch, pass, dirty) => k,
            _ if want.is_none() && known.is_none() && self.kernel.wireguard_key().is_none() => None,
            _ => self.kernel.wireguard().await?,
        };
        let own = self.kernel.wireguard_key();
        let left = match (want, own) {
            (Some(_), None) => {
                // Not chosen as the holder by the controller (it has no
                // key); nothing is made, nothing leaves in the clear.
                tracing::warn!("the Site's tunnels are WireGuard and this host has no WireGuard");
                seen
            }
            (_, own) => match super::wireguard::op(want, seen.as_ref(), &own.unwrap_or_default()) {
                Some(op) => {
                    if let (super::wireguard::WgOp::Set(p), Some(s)) = (&op, &seen) {
                        tracing::info!(
                            differences = ?super::wireguard::differences(p, s, &own.unwrap_or_default()),
                            "setting the WireGuard device"
                        );
                    }
                    self.kernel.apply_wireguard(&op).await?;
                    ch.links += 1;
                    match op {
                        super::wireguard::WgOp::Set(_) => self.kernel.wireguard().await?,
                        super::wireguard::WgOp::Remove => None,
                    }
                }
                None => seen,
            },
        };
        *self.wireguard.lock().expect("poisoned") = Some(left);
        let have = host.fresh().await?;
        let taken = self.endpoint.lock().expect("poisoned").clone();
        let addrs = decide::tunnel_addr_ops(plan, have, taken.as_ref());
        // The endpoint just taken is announced (it may have moved here from
        // another gateway host: the peers' neighbour caches point there).
        let announce = plan.tunnel.as_ref().and_then(|t| {
            let mac = have.link(&t.dev)?.mac?;
            let taken: Vec<std::net::Ipv4Addr> = addrs
                .iter()
                .filter_map(|a| match a {
                    super::ops::AddrOp::Add { net, .. } => Some(net.addr()),
                    super::ops::AddrOp::Del { .. } => None,
                })
                .collect();
            (!taken.is_empty()).then(|| (t.dev.clone(), mac, taken))
        });
        ch.addresses += addrs.len();
        host.apply(NsOps {
            addrs,
            ..Default::default()
        })
        .await?;
        *self.endpoint.lock().expect("poisoned") = plan
            .tunnel
            .as_ref()
            .filter(|t| t.active)
            .map(|t| (t.dev.clone(), t.endpoint));
        if let Some((dev, mac, taken)) = announce {
            self.kernel.announce(WAN_ENDPOINT, &dev, mac, taken).await;
        }
        clock.step("tunnel end");
        // 1. Links of the host namespace: stale ones go, segments come.
        let links = decide::host_links(plan, host.fresh().await?, &self.env)?;
        ch.links += links.len();
        host.apply(NsOps {
            links,
            ..Default::default()
        })
        .await?;

        clock.step("host links");
        // 2. Routers (before guest taps: their veths join the bridges too).
        // New ones get their namespaces, then both legs in one batch for
        // all of them; each is then finished on its own.
        let existing: BTreeSet<String> = self.existing_routers().into_iter().collect();
        let fresh: Vec<&RouterPlan> = plan
            .routers
            .values()
            .map(|r| &**r)
            .filter(|r| !existing.contains(&r.netns))
            .collect();
        if !fresh.is_empty() {
            let mut legs = Vec::new();
            for r in &fresh {
                if self.kernel.stop_stale(&r.netns).await {
                    ch.dhcp += 1;
                }
                self.kernel.create(&r.netns).await?;
                ch.namespaces += 1;
                legs.extend(decide::fresh_router_legs(r, host.fresh().await?));
            }
            ch.links += legs.len();
            host.apply(NsOps {
                links: legs,
                ..Default::default()
            })
            .await?;
        }
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
        let host_links = host.shared().await?.clone();
        clock.step("new routers");
        let todo: Vec<(&RouterPlan, u64, bool, bool)> = {
            let applied = self.applied.lock().expect("poisoned");
            plan.routers
                .values()
                .map(|r| &**r)
                .filter_map(|r| {
                    let h = hash(r);
                    let is_fresh = !existing.contains(&r.netns);
                    let veth_ok = host_links
                        .link(&r.host_veth)
                        .is_some_and(|l| l.up && l.master.as_deref() == Some(r.bridge.as_str()));
                    // Read in full: its turn to be verified, an event from
                    // inside it, or no watch that would have told.
                    let unwatched = self.watches.as_ref().is_some_and(|w| !w.watched(&r.netns));
                    let full =
                        verify.contains(r.netns.as_str()) || dirty.contains(&r.netns) || unwatched;
                    let memo = applied.get(&r.netns);
                    let due = is_fresh || !veth_ok || full || memo.map(|m| m.plan) != Some(h);
                    due.then_some((r, h, is_fresh, full || memo.is_none()))
                })
                .collect()
        };
        let mut jobs = Vec::with_capacity(todo.len());
        for (r, h, is_fresh, full) in todo {
            jobs.push(self.router_job(r, h, is_fresh, full, &host_links));
        }
        clock.step("routers due");
        let results: Vec<(&RouterPlan, u64, Result<Changes>)> = futures::stream::iter(jobs)
            .buffer_unordered(ROUTER_CONCURRENCY)
            .collect()
            .await;
        let mut failed = None;
        for (r, h, res) in results {
            let mut applied = self.applied.lock().expect("poisoned");
            match res {
                Ok(c) => {
                    if c.links > 0 {
                        host.stale = true;
                    }
                    ch.add(&c);
                    applied.insert(
                        r.netns.clone(),
                        RouterMemo {
                            plan: h,
                            ruleset: ruleset_hash(&r.ruleset).map(str::to_string),
                        },
                    );
                }
                Err(e) => {
                    applied.remove(&r.netns);
                    failed.get_or_insert(e);
                }
            }
        }
        let stale: Vec<&String> = existing
            .iter()
            .filter(|name| !plan.routers.contains_key(*name))
            .collect();
        let mut jobs = Vec::with_capacity(stale.len());
        for name in stale {
            jobs.push(async move {
                self.kernel.remove(name).await;
                let r = self.kernel.delete(name).await;
                (name, r)
            });
        }
        let removed: Vec<(&String, Result<()>)> = futures::stream::iter(jobs)
            .buffer_unordered(ROUTER_CONCURRENCY)
            .collect()
            .await;
        for (name, res) in removed {
            match res {
                Ok(()) => {
                    self.applied.lock().expect("poisoned").remove(name);
                    ch.namespaces += 1;
                    host.stale = true;
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }

        clock.step("routers");
        // 3. Taps: re-joined to their bridge if it was recreated.
        let taps = decide::tap_ops(plan, host.fresh().await?);
        ch.links += taps.len();
        host.apply(NsOps {
            links: taps,
            ..Default::default()
        })
        .await?;

        clock.step("taps");
        // 4. The bridges' forwarding: VXLAN remotes, and the ports of guests
        // and routers pinned to their own MACs.
        let (fdb, ports) = decide::bridge_ops(plan, host.fresh().await?);
        ch.fdb += fdb.len();
        ch.links += ports.len();
        host.apply(NsOps {
            links: ports,
            fdb,
            ..Default::default()
        })
        .await?;

        clock.step("bridge ports and fdb");
        // 5. Anti-spoofing table.
        let seen = self
            .table_seen(Family::Bridge, Some(&plan.guard), &self.guard, pass, dirty)
            .await?;
        if let Some(op) = decide::guard_op(plan, &seen) {
            self.kernel.apply_table(None, &op).await?;
            ch.tables += 1;
            *self.guard.lock().expect("poisoned") = Some(match op {
                TableOp::Replace { ruleset, .. } => Some(ruleset),
                TableOp::Delete { .. } => None,
            });
        } else {
            // As planned (found so, or known so): not listed again while
            // nothing changes the namespace.
            let planned =
                (!plan.taps.is_empty() || !plan.segments.is_empty()).then(|| plan.guard.clone());
            *self.guard.lock().expect("poisoned") = Some(planned);
        }
        clock.step("guard table");
        // Known exactly only when this pass did not change it since it last
        // read it (a change is read back by the next pass).
        if !host.stale {
            *self.host_seen.lock().expect("poisoned") = Some(host.state);
        }
        *self.timings.lock().expect("poisoned") = clock.steps;
        Ok(ch)
    }

    /// How a table of the host namespace is: from what the agent wrote
    /// last while nothing can have changed it, else listed.
    async fn table_seen(
        &self,
        family: Family,
        planned: Option<&str>,
        memo: &Mutex<Option<Option<String>>>,
        pass: Pass,
        dirty: &BTreeSet<String>,
    ) -> Result<TableSeen> {
        let written = memo.lock().expect("poisoned").clone();
        if self.quiet(&self.host_watch, pass, dirty) {
            match written {
                Some(None) => return Ok(TableSeen::Absent),
                Some(Some(r)) if planned.is_some_and(|p| ruleset_hash(&r) == ruleset_hash(p)) => {
                    return Ok(TableSeen::Unchanged);
                }
                Some(Some(_)) => return Ok(TableSeen::Outdated),
                None => {}
            }
        }
        Ok(match self.kernel.table(None, family).await? {
            Some(l) => TableSeen::Listed(l),
            None => TableSeen::Absent,
        })
    }
}

mod router;

#[cfg(test)]
mod tests;
