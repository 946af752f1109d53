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
//! Packing is best-fit decreasing, preferring a node's sites in order: what
//! the calendar accepts, the scheduler can place. Refusals name the site,
//! the resource, the instant and the reservations holding it.

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
}

/// A host as the calendar sees it: what is free on it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCap {
    pub name: String,
    pub site: String,
    pub free: Resources,
}

fn largest_first(demand: &[Demand]) -> Vec<&Demand> {
    let mut order: Vec<&Demand> = demand.iter().collect();
    order.sort_by_key(|d| std::cmp::Reverse((d.need.cpu, d.need.memory_mib)));
    order
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

/// Pack `demand` onto `hosts` (best fit, largest first); on failure, the
/// first node that found no host.
fn pack<'a>(hosts: &mut [HostCap], demand: &'a [Demand]) -> Result<(), &'a Demand> {
    for d in largest_first(demand) {
        let i = best_host(hosts, d).ok_or(d)?;
        hosts[i].free = hosts[i].free.minus(d.need);
    }
    Ok(())
}

/// Pack an admitted reservation: a node that no longer fits (the fleet
/// shrank since it was admitted) takes what is left of its sites' roomiest
/// host — whatever it cannot get is not free for anyone else either.
fn pack_admitted(hosts: &mut [HostCap], demand: &[Demand]) {
    for d in largest_first(demand) {
        let i = best_host(hosts, d).or_else(|| {
            hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| d.sites.contains(&h.site))
                .max_by_key(|(_, h)| (h.free.memory_mib, h.free.cpu))
                .map(|(i, _)| i)
        });
        if let Some(i) = i {
            hosts[i].free = hosts[i].free.minus(d.need);
        }
    }
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

    /// What is free at `t`, `hosts` being what is free now: reservations
    /// that hold their hosts now but not at `t` give them back, placed
    /// nodes that hold theirs at `t` but not now take them, and the
    /// unplaced nodes of every reservation active at `t` are packed. With
    /// `strict`, the first reservation that does not fit then is returned;
    /// else one that does not (the fleet shrank since it was admitted)
    /// takes what is left of its sites' roomiest hosts — whatever it cannot
    /// get is not free for anyone else either.
    fn at<'a>(
        &'a self,
        hosts: &[HostCap],
        t: Timestamp,
        strict: bool,
    ) -> (Vec<HostCap>, Option<&'a Admitted>) {
        let mut free = hosts.to_vec();
        let mut broken = None;
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
                    if !h.free.fits(*need) {
                        broken.get_or_insert(r);
                    }
                    h.free = h.free.minus(*need);
                }
            }
        }
        for r in self.reservations.iter().filter(|r| r.active(t)) {
            if strict {
                if pack(&mut free, &r.unplaced).is_err() {
                    broken.get_or_insert(r);
                }
            } else {
                pack_admitted(&mut free, &r.unplaced);
            }
        }
        (free, broken)
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
            let (before, _) = self.at(hosts, t, false);
            let mut free = before.clone();
            if let Err(d) = pack(&mut free, demand) {
                let site = d.sites.first().cloned().unwrap_or_default();
                return Err(self.refusal(window, demand, &before, t, &site, d));
            }
        }
        Ok(())
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
        let (windows, held) = match &own {
            Some(o) => (o.windows, o.held),
            None => (&for_ever[..], &[][..]),
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
            let (free, broken_without) = self.at(&base, t, true);
            if free
                .iter()
                .find(|h| h.name == host)
                .is_some_and(|h| !h.free.fits(need))
            {
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
            let mut with = base;
            if let Some(h) = with.iter_mut().find(|h| h.name == host) {
                h.free = h.free.minus(need);
            }
            // Refused only if this node is what breaks a reservation that
            // fits without it (one the fleet can no longer give does not
            // stop every other placement).
            if let (_, Some(r)) = self.at(&with, t, true)
                && broken_without.is_none()
            {
                return Err(format!(
                    "capacity reserved for {} {} (at {t})",
                    r.who,
                    r.describe_at(t)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
