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
    fn ended(&self, t: Timestamp) -> bool {
        self.end.is_some_and(|e| e <= t)
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
    pub window: Window,
    /// Its nodes placed already: host and need (already in the hosts' use).
    pub placed: Vec<(String, Resources)>,
    /// Its nodes not placed yet.
    pub unplaced: Vec<Demand>,
}

/// A host as the calendar sees it: what is free on it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCap {
    pub name: String,
    pub site: String,
    pub free: Resources,
}

/// `a - b`, never below zero.
pub fn minus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu: a.cpu.saturating_sub(b.cpu),
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
    }
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
        hosts[i].free = minus(hosts[i].free, d.need);
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
            hosts[i].free = minus(hosts[i].free, d.need);
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
    /// Whether any reservation still has nodes to place (else placing a
    /// node now cannot take anything promised).
    pub fn holds_ahead(&self) -> bool {
        self.reservations.iter().any(|r| !r.unplaced.is_empty())
    }

    /// What is free at `t` once the reservations active then are packed;
    /// `hosts` is what is free now (every placed node counted).
    fn free_at(&self, hosts: &[HostCap], t: Timestamp) -> Vec<HostCap> {
        let mut free = hosts.to_vec();
        for r in self.reservations.iter().filter(|r| r.window.ended(t)) {
            for (host, need) in &r.placed {
                if let Some(h) = free.iter_mut().find(|h| &h.name == host) {
                    h.free = h.free.plus(*need);
                }
            }
        }
        for r in self.reservations.iter().filter(|r| r.window.contains(t)) {
            pack_admitted(&mut free, &r.unplaced);
        }
        free
    }

    /// The reservations active at `t`, for a refusal.
    fn holding(&self, t: Timestamp, site: &str) -> Vec<String> {
        self.reservations
            .iter()
            .filter(|r| {
                r.window.contains(t)
                    && (r.unplaced.iter().any(|d| d.sites.iter().any(|s| s == site))
                        || !r.placed.is_empty())
            })
            .map(|r| format!("{} ({})", r.who, r.window.describe()))
            .collect()
    }

    /// Whether a dated reservation with `window` and `demand` fits: at its
    /// start and at every start of another reservation inside it, its
    /// nodes pack next to everything placed and every reservation active
    /// then. `hosts`: what is free now on each Ready, schedulable host.
    /// The error names the site, the resource, the window, the instant and
    /// the reservations holding the capacity.
    pub fn admit(
        &self,
        window: &Window,
        demand: &[Demand],
        hosts: &[HostCap],
    ) -> Result<(), String> {
        let mut checkpoints = vec![window.start];
        checkpoints.extend(
            self.reservations
                .iter()
                .map(|o| o.window.start)
                .filter(|t| window.contains(*t)),
        );
        checkpoints.sort();
        checkpoints.dedup();
        for t in checkpoints {
            let before = self.free_at(hosts, t);
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
        let holders = self.holding(t, site);
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

    /// Whether a node needing `need` may be placed on `host` now (it then
    /// holds that capacity for ever): every reservation must still pack at
    /// each of its peaks. `hosts`: what is free now, before this node.
    pub fn permits(
        &self,
        hosts: &[HostCap],
        host: &str,
        need: Resources,
        now: Timestamp,
    ) -> Result<(), String> {
        if !self.holds_ahead() {
            return Ok(());
        }
        let mut after = hosts.to_vec();
        if let Some(h) = after.iter_mut().find(|h| h.name == host) {
            h.free = minus(h.free, need);
        }
        let mut checkpoints: Vec<Timestamp> = self
            .reservations
            .iter()
            .filter(|r| !r.unplaced.is_empty())
            .map(|r| r.window.start.max(now))
            .collect();
        checkpoints.sort();
        checkpoints.dedup();
        for t in checkpoints {
            // Refused only if this node is what breaks a packing that holds
            // without it (a reservation the fleet can no longer give does
            // not stop every other placement).
            if let Some(r) = self.breaks(&after, t)
                && self.breaks(hosts, t).is_none()
            {
                return Err(format!(
                    "capacity reserved for {} {} (at {t})",
                    r.who,
                    r.window.describe()
                ));
            }
        }
        Ok(())
    }

    /// The first reservation active at `t` whose unplaced nodes do not pack
    /// onto `hosts` (what is free now) next to the others.
    fn breaks(&self, hosts: &[HostCap], t: Timestamp) -> Option<&Admitted> {
        let mut free = hosts.to_vec();
        for r in self.reservations.iter().filter(|r| r.window.ended(t)) {
            for (h, n) in &r.placed {
                if let Some(f) = free.iter_mut().find(|f| &f.name == h) {
                    f.free = f.free.plus(*n);
                }
            }
        }
        self.reservations
            .iter()
            .filter(|r| r.window.contains(t))
            .find(|r| pack(&mut free, &r.unplaced).is_err())
    }
}

#[cfg(test)]
mod tests;
