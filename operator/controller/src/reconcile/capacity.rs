//! The capacity calendar of the fleet, as pure functions.
//!
//! Every placed node holds its host's capacity from now on: a node of a
//! cluster without a dated reservation (permanent, or weekly: a weekly
//! cluster's stopped nodes keep their hosts) for ever, a node of a dated
//! reservation until the reservation ends (`endAction: Delete`) or for ever
//! (`endAction: Stop`). An admitted dated reservation whose nodes are not
//! placed yet holds capacity for its window as well: at every instant where
//! demand can peak (its start, and the start of every other reservation
//! inside it), its unplaced nodes must pack onto the hosts of their sites,
//! host by host, next to everything placed and every other reservation
//! active then.
//!
//! Two decisions read the calendar:
//! - [`Calendar::admit`]: a dated reservation is admitted once, if its nodes
//!   pack at every peak of its window (host-level fit, not only the sites'
//!   sums: a reservation admitted is a reservation that will place);
//! - [`Calendar::permits`]: a node placed now (it holds capacity for ever)
//!   may go to a host only if every admitted reservation still packs at each
//!   of its peaks afterwards — so a permanent cluster never takes capacity
//!   promised to a later window.
//!
//! Packing is best-fit decreasing, preferring a node's sites in order, with
//! an exact search when best fit misses. Each instant is checked on its own
//! first (its refusals name the site, the resource, the instant and the
//! reservations holding it), then all instants at once: a node keeps one
//! host for its whole window (`temporal`), so what the calendar accepts,
//! the scheduler can place.

use k8s_openapi::jiff::Timestamp;
use yukumo_api::common::Resources;

/// One node's demand: its name, the sites it may use (in order) and what
/// it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub node: String,
    pub sites: Vec<String>,
    pub need: Resources,
}

/// The capacity a reservation holds, from `start` until `end` (`None`: for ever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub start: Timestamp,
    pub end: Option<Timestamp>,
}

impl Window {
    fn contains(&self, t: Timestamp) -> bool {
        self.start <= t && self.end.is_none_or(|e| t < e)
    }
    fn describe(&self) -> String {
        match self.end {
            Some(e) => format!("from {} to {e}", self.start),
            None => format!("from {} on", self.start),
        }
    }
}

/// An admitted reservation of a cluster.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// `namespace/name` of the cluster.
    pub who: String,
    /// When it holds capacity: one window for a dated reservation, each
    /// weekly window (up to the calendar's horizon) for a weekly one.
    /// Sorted; only the last may be open-ended.
    pub windows: Vec<Window>,
    /// Its nodes placed already: host and need.
    pub placed: Vec<(String, Resources)>,
    /// Whether the placed nodes hold their hosts now (are counted in what
    /// is free now): a running cluster's do; a weekly cluster's, stopped
    /// outside its windows, do not (they hold their hosts again at its
    /// next window).
    pub in_use: bool,
    /// Its nodes not placed yet.
    pub unplaced: Vec<Demand>,
}

impl Admitted {
    fn window_at(&self, t: Timestamp) -> Option<&Window> {
        self.windows.iter().find(|w| w.contains(t))
    }
    fn active(&self, t: Timestamp) -> bool {
        self.window_at(t).is_some()
    }
    /// Whether it needs capacity it does not hold now.
    fn holds_ahead(&self) -> bool {
        !self.unplaced.is_empty() || (!self.in_use && !self.placed.is_empty())
    }
    fn describe_at(&self, t: Timestamp) -> String {
        self.window_at(t)
            .or(self.windows.first())
            .map(Window::describe)
            .unwrap_or_default()
    }
}

/// The windows a weekly cluster's nodes hold their hosts in, and its nodes
/// that hold theirs then but not now.
#[derive(Debug, Clone, Copy)]
pub struct Own<'a> {
    pub windows: &'a [Window],
    pub held: &'a [(String, Resources)],
    /// Its nodes placed and counted in what is free now: they hold their
    /// hosts in its windows only (given back for later reservations).
    pub placed: &'a [(String, Resources)],
    /// Its nodes still to be placed after this one (largest first): the
    /// host chosen must leave them room (what the calendar admitted is
    /// what the scheduler places).
    pub rest: &'a [Demand],
}

/// A host as the calendar sees it: what is free on it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCap {
    pub name: String,
    pub site: String,
    pub free: Resources,
}

/// The host `d` goes to: the tightest fit in the first of its sites that
/// has one.
fn best_host(hosts: &[HostCap], d: &Demand) -> Option<usize> {
    d.sites.iter().find_map(|site| {
        hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| &h.site == site && h.free.fits(d.need))
            .min_by_key(|(_, h)| (h.free.memory_mib, h.free.cpu, h.name.clone()))
            .map(|(i, _)| i)
    })
}

/// How many placements the exact search may try before it gives up (and
/// the best-fit verdict stands): enough for every set of a few dozen nodes
/// with distinct hosts, bounded for fleets of any size.
const EXACT_SEARCH_STEPS: u32 = 20_000;

/// Whether every node of `items` (largest first) can be put on a host of
/// its sites without exceeding any (depth-first; hosts in the same state
/// are tried once). `None`: the search ran out of `budget`.
fn exact_fit(free: &mut [HostCap], items: &[&Demand], budget: &mut u32) -> Option<bool> {
    let Some((d, rest)) = items.split_first() else {
        return Some(true);
    };
    let mut tried: Vec<(String, Resources)> = Vec::new();
    for i in 0..free.len() {
        if !d.sites.contains(&free[i].site) || !free[i].free.fits(d.need) {
            continue;
        }
        let state = (free[i].site.clone(), free[i].free);
        if tried.contains(&state) {
            continue;
        }
        tried.push(state);
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        let i_need = d.need;
        free[i].free = free[i].free.minus(i_need);
        let r = exact_fit(free, rest, budget);
        free[i].free = free[i].free.plus(i_need);
        match r {
            Some(false) => {}
            other => return other,
        }
    }
    Some(false)
}

/// The calendar: the admitted reservations (of other clusters than the one
/// deciding).
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    pub reservations: Vec<Admitted>,
}

impl Calendar {
    /// Whether any reservation needs capacity it does not hold now (else
    /// placing a node now cannot take anything promised).
    pub fn holds_ahead(&self) -> bool {
        self.reservations.iter().any(Admitted::holds_ahead)
    }

    /// Pack, at `t`, the unplaced nodes of every reservation active then
    /// together with `extra` (the deciding cluster's), all largest first
    /// (one order for everyone: the verdict does not depend on which
    /// reservation was admitted first), onto `free` (what placed nodes
    /// leave then, see [`Calendar::placed_at`]). A node that finds no host
    /// takes what is left of its sites' roomiest one (whatever it cannot
    /// get is not free for anyone else either) and is returned as failed:
    /// (the index of its reservation, `None` for `extra`; its name).
    fn joint(
        &self,
        mut free: Vec<HostCap>,
        t: Timestamp,
        extra: &[Demand],
    ) -> (Vec<HostCap>, Vec<(Option<usize>, String)>) {
        let mut items: Vec<(Option<usize>, &Demand)> = self
            .reservations
            .iter()
            .enumerate()
            .filter(|(_, r)| r.active(t))
            .flat_map(|(i, r)| r.unplaced.iter().map(move |d| (Some(i), d)))
            .chain(extra.iter().map(|d| (None, d)))
            .collect();
        items.sort_by_key(|(_, d)| std::cmp::Reverse((d.need.cpu, d.need.memory_mib)));
        let start = free.clone();
        let mut failed = Vec::new();
        for &(owner, d) in &items {
            let i = best_host(&free, d).or_else(|| {
                failed.push((owner, d.node.clone()));
                free.iter()
                    .enumerate()
                    .filter(|(_, h)| d.sites.contains(&h.site))
                    .max_by_key(|(_, h)| (h.free.memory_mib, h.free.cpu))
                    .map(|(i, _)| i)
            });
            if let Some(i) = i {
                free[i].free = free[i].free.minus(d.need);
            }
        }
        if !failed.is_empty() {
            // Best fit missed, but an assignment may exist: searched for
            // exactly within a bound (then nothing failed).
            let all: Vec<&Demand> = items.iter().map(|(_, d)| *d).collect();
            let mut budget = EXACT_SEARCH_STEPS;
            if exact_fit(&mut start.clone(), &all, &mut budget) == Some(true) {
                failed.clear();
            }
        }
        (free, failed)
    }

    /// What is free at `t` on each host from placed nodes alone (before
    /// the unplaced ones of the reservations active then are packed,
    /// wherever they fit best, see [`Calendar::joint`]).
    fn placed_at(&self, hosts: &[HostCap], t: Timestamp) -> Vec<HostCap> {
        let mut free = hosts.to_vec();
        // Every host given back first, then every host taken: a take before
        // a give-back on the same host would saturate at zero and lose the
        // difference (the result must not depend on the reservations' order).
        for r in self
            .reservations
            .iter()
            .filter(|r| r.in_use && !r.active(t))
        {
            for (host, need) in &r.placed {
                if let Some(h) = free.iter_mut().find(|h| &h.name == host) {
                    h.free = h.free.plus(*need);
                }
            }
        }
        for r in self
            .reservations
            .iter()
            .filter(|r| !r.in_use && r.active(t))
        {
            for (host, need) in &r.placed {
                if let Some(h) = free.iter_mut().find(|h| &h.name == host) {
                    h.free = h.free.minus(*need);
                }
            }
        }
        free
    }

    /// The reservations active at `t`, for a refusal.
    fn holding(&self, t: Timestamp) -> Vec<String> {
        self.reservations
            .iter()
            .filter(|r| r.active(t) && (!r.unplaced.is_empty() || !r.placed.is_empty()))
            .map(|r| format!("{} ({})", r.who, r.describe_at(t)))
            .collect()
    }

    /// Whether a reservation holding `windows` with `demand` fits: at each
    /// of its windows' starts and at every start of another reservation's
    /// window inside them, its nodes pack next to everything placed and
    /// every reservation active then. `hosts`: what is free now on each
    /// Ready, schedulable host. The error names the site, the resource,
    /// the window, the instant and the reservations holding the capacity.
    pub fn admit(
        &self,
        windows: &[Window],
        demand: &[Demand],
        hosts: &[HostCap],
    ) -> Result<(), String> {
        let inside = |t: Timestamp| windows.iter().find(|w| w.contains(t));
        let mut checkpoints: Vec<Timestamp> = windows.iter().map(|w| w.start).collect();
        checkpoints.extend(
            self.reservations
                .iter()
                .flat_map(|o| o.windows.iter().map(|w| w.start))
                .filter(|t| inside(*t).is_some()),
        );
        checkpoints.sort();
        checkpoints.dedup();
        for t in checkpoints {
            let Some(window) = inside(t) else { continue };
            // Refused if, packed with everything active then, one of its
            // nodes — or of an admitted reservation's that fits without
            // it — finds no host.
            let placed = self.placed_at(hosts, t);
            let (before, without) = self.joint(placed.clone(), t, &[]);
            let (_, with) = self.joint(placed, t, demand);
            let new: Vec<&(Option<usize>, String)> =
                with.iter().filter(|f| !without.contains(f)).collect();
            if !new.is_empty() {
                let d = new
                    .iter()
                    .find(|f| f.0.is_none())
                    .and_then(|f| demand.iter().find(|d| d.node == f.1))
                    .or_else(|| demand.first())
                    .expect("a demand");
                let site = d.sites.first().cloned().unwrap_or_default();
                return Err(self.refusal(window, demand, &before, t, &site, d));
            }
        }
        // Every instant packs; each node must also keep one host for its
        // whole window (refused only if that is what this reservation
        // breaks; an unfinished search leaves the verdict above).
        let extra: Vec<(&[Window], &Demand)> = demand.iter().map(|d| (windows, d)).collect();
        if self.packs_over_time(hosts, None, &[], &[]) == Some(true)
            && self.packs_over_time(hosts, None, &extra, &[]) == Some(false)
        {
            let site = demand
                .first()
                .and_then(|d| d.sites.first())
                .cloned()
                .unwrap_or_default();
            let span = windows.iter().map(Window::describe).collect::<Vec<_>>();
            return Err(format!(
                "site {site}: the reservation's nodes fit at every instant {} but not each on one host for all of it (a node keeps its host from its start to its end){}",
                span.join(", "),
                self.overlapping_note(windows)
            ));
        }
        Ok(())
    }

    /// `; reserved then by …`: the reservations with nodes whose windows
    /// overlap `windows`.
    fn overlapping_note(&self, windows: &[Window]) -> String {
        let overlaps = |a: &Window, b: &Window| {
            a.end.is_none_or(|e| b.start < e) && b.end.is_none_or(|e| a.start < e)
        };
        let who: Vec<String> = self
            .reservations
            .iter()
            .filter(|r| !r.unplaced.is_empty() || !r.placed.is_empty())
            .filter_map(|r| {
                let w = r
                    .windows
                    .iter()
                    .find(|rw| windows.iter().any(|w| overlaps(w, rw)))?;
                Some(format!("{} ({})", r.who, w.describe()))
            })
            .collect();
        if who.is_empty() {
            String::new()
        } else {
            format!("; reserved then by {}", who.join(", "))
        }
    }

    fn refusal(
        &self,
        window: &Window,
        demand: &[Demand],
        free: &[HostCap],
        t: Timestamp,
        site: &str,
        failed: &Demand,
    ) -> String {
        let need = demand
            .iter()
            .filter(|d| d.sites.first().map(String::as_str) == Some(site))
            .fold(Resources::default(), |a, d| a.plus(d.need));
        let have = free
            .iter()
            .filter(|h| h.site == site)
            .fold(Resources::default(), |a, h| a.plus(h.free));
        let mut short = Vec::new();
        if need.cpu > have.cpu {
            short.push(format!("cpu short by {}", need.cpu - have.cpu));
        }
        if need.memory_mib > have.memory_mib {
            short.push(format!(
                "memory short by {} MiB",
                need.memory_mib - have.memory_mib
            ));
        }
        if short.is_empty() {
            let roomiest = free
                .iter()
                .filter(|h| h.site == site)
                .max_by_key(|h| (h.free.memory_mib, h.free.cpu))
                .map(|h| {
                    format!(
                        "the roomiest, {}, has {} cpu, {} MiB",
                        h.name, h.free.cpu, h.free.memory_mib
                    )
                })
                .unwrap_or_else(|| "no host is Ready and schedulable".into());
            short.push(format!(
                "no host has room for {} ({} cpu, {} MiB): {roomiest}",
                failed.node, failed.need.cpu, failed.need.memory_mib
            ));
        }
        let holders = self.holding(t);
        format!(
            "site {site}: the reservation needs {} cpu, {} MiB {}; at {t} only {} cpu, {} MiB are not already placed or reserved ({}){}",
            need.cpu,
            need.memory_mib,
            window.describe(),
            have.cpu,
            have.memory_mib,
            short.join(", "),
            if holders.is_empty() {
                String::new()
            } else {
                format!("; reserved then by {}", holders.join(", "))
            }
        )
    }

    /// Whether a node needing `need` may be placed on `host` now. It holds
    /// the host for ever (`own` is `None`), or, for a weekly cluster, in its
    /// windows only, where its cluster's other nodes outside `hosts` (asleep
    /// now, or placed moments ago) hold theirs too. At every instant it
    /// holds the host where demand can peak, it must fit there, and every
    /// reservation that packs without it must still pack. `hosts`: what is
    /// free now, before this node.
    pub fn permits(
        &self,
        hosts: &[HostCap],
        host: &str,
        need: Resources,
        now: Timestamp,
        own: Option<Own>,
    ) -> Result<(), String> {
        if own.is_none() && !self.holds_ahead() {
            return Ok(());
        }
        let for_ever = [Window {
            start: now,
            end: None,
        }];
        let (windows, held, placed, rest) = match &own {
            Some(o) => (o.windows, o.held, o.placed, o.rest),
            None => (&for_ever[..], &[][..], &[][..], &[][..]),
        };
        let mut checkpoints: Vec<Timestamp> = vec![now];
        checkpoints.extend(windows.iter().map(|w| w.start.max(now)));
        checkpoints.extend(
            self.reservations
                .iter()
                .flat_map(|r| r.windows.iter().map(|w| w.start))
                .filter(|t| *t > now),
        );
        checkpoints.sort();
        checkpoints.dedup();
        for t in checkpoints {
            if !windows.iter().any(|w| w.contains(t)) {
                continue;
            }
            let mut base = hosts.to_vec();
            for (h, n) in held {
                if let Some(f) = base.iter_mut().find(|f| &f.name == h) {
                    f.free = f.free.minus(*n);
                }
            }
            // This node must fit next to what is placed then; the unplaced
            // nodes of reservations (and its cluster's still to place) may
            // go anywhere they still pack.
            let free = self.placed_at(&base, t);
            let Some(here) = free.iter().find(|h| h.name == host) else {
                continue;
            };
            if !here.free.fits(need) {
                // Taken then by a reservation: the one holding this host
                // first, else any active then.
                let active = || self.reservations.iter().filter(|r| r.active(t));
                return Err(
                    match active()
                        .find(|r| r.placed.iter().any(|(h, _)| h == host))
                        .or_else(|| active().next())
                    {
                        Some(r) => format!(
                            "capacity reserved for {} {} (at {t})",
                            r.who,
                            r.describe_at(t)
                        ),
                        None => format!("no room at {t} (its cluster's window)"),
                    },
                );
            }
            // Refused only if putting it here is what makes a node fail
            // that would fit were it placed anywhere (a reservation the
            // fleet can no longer give does not stop every placement).
            let this = Demand {
                node: String::new(),
                sites: vec![here.site.clone()],
                need,
            };
            let anywhere: Vec<Demand> = std::iter::once(this).chain(rest.iter().cloned()).collect();
            let (_, without) = self.joint(free.clone(), t, &anywhere);
            let mut with = free;
            if let Some(h) = with.iter_mut().find(|h| h.name == host) {
                h.free = h.free.minus(need);
            }
            let (_, failed) = self.joint(with, t, rest);
            if let Some((owner, _)) = failed.iter().find(|f| !without.contains(f)) {
                return Err(match owner {
                    Some(i) => {
                        let r = &self.reservations[*i];
                        format!(
                            "capacity reserved for {} {} (at {t})",
                            r.who,
                            r.describe_at(t)
                        )
                    }
                    None => format!(
                        "room kept for the cluster's {} other nodes (at {t})",
                        rest.len()
                    ),
                });
            }
        }
        // Every instant allows it; every reservation's nodes (and its
        // cluster's still to place) must also keep one host each for their
        // whole windows with this node here.
        let Some(site) = hosts
            .iter()
            .find(|h| h.name == host)
            .map(|h| h.site.clone())
        else {
            return Ok(());
        };
        let this = Demand {
            node: String::new(),
            sites: vec![site],
            need,
        };
        let mut now_free = hosts.to_vec();
        for (h, n) in placed {
            if let Some(f) = now_free.iter_mut().find(|f| &f.name == h) {
                f.free = f.free.plus(*n);
            }
        }
        let mut fixed: Vec<temporal::Fixed> = held
            .iter()
            .chain(placed)
            .map(|(h, n)| temporal::Fixed {
                host: h,
                need: *n,
                windows,
            })
            .collect();
        let later: Vec<(&[Window], &Demand)> = rest.iter().map(|d| (windows, d)).collect();
        let anywhere: Vec<(&[Window], &Demand)> =
            later.iter().copied().chain([(windows, &this)]).collect();
        if self.packs_over_time(&now_free, Some(now), &anywhere, &fixed) == Some(true) {
            fixed.push(temporal::Fixed {
                host,
                need,
                windows,
            });
            if self.packs_over_time(&now_free, Some(now), &later, &fixed) == Some(false) {
                return Err(format!(
                    "capacity reserved over its window: on {host}, the nodes still to place would not each keep one host for their whole window{}",
                    self.overlapping_note(windows)
                ));
            }
        }
        Ok(())
    }
}

pub(crate) mod temporal;

#[cfg(test)]
mod tests;
