//! One host per node for its whole window.
//!
//! Checking each instant on its own is not enough: a node placed at its
//! start keeps its host until it ends, so two reservations that each pack
//! at every instant can still fail together when the one host that fits a
//! node at its start is the one another node needs later. Here the unplaced
//! nodes of every reservation (and the deciding cluster's) are given one
//! host each such that, at every instant where demand can peak, no host is
//! exceeded — best fit first, then an exact depth-first search within
//! [`EXACT_SEARCH_STEPS`].

use super::{Calendar, Demand, EXACT_SEARCH_STEPS, HostCap, Window};
use k8s_openapi::jiff::Timestamp;
use yukumo_api::common::Resources;

/// A node that holds a given host over its windows (placed moments ago,
/// or asleep and holding its host again at its windows).
pub struct Fixed<'a> {
    pub host: &'a str,
    pub need: Resources,
    pub windows: &'a [Window],
}

/// A node to give a host: its sites, need and the checkpoints it is
/// active at.
struct Item<'a> {
    sites: &'a [String],
    need: Resources,
    active: Vec<usize>,
}

/// The problem: what each host has free at each checkpoint.
struct Problem {
    site: Vec<String>,
    free: Vec<Vec<Resources>>,
}

impl Problem {
    fn fits(&self, h: usize, it: &Item) -> bool {
        it.active.iter().all(|&k| self.free[h][k].fits(it.need))
    }
    fn take(&mut self, h: usize, it: &Item) {
        for &k in &it.active {
            self.free[h][k] = self.free[h][k].minus(it.need);
        }
    }
    fn give(&mut self, h: usize, it: &Item) {
        for &k in &it.active {
            self.free[h][k] = self.free[h][k].plus(it.need);
        }
    }
    /// The tightest host of the first of its sites that has one: the
    /// least memory (then cpu) left at its busiest checkpoint.
    fn best(&self, it: &Item) -> Option<usize> {
        it.sites.iter().find_map(|site| {
            (0..self.site.len())
                .filter(|&h| &self.site[h] == site && self.fits(h, it))
                .min_by_key(|&h| {
                    it.active
                        .iter()
                        .map(|&k| (self.free[h][k].memory_mib, self.free[h][k].cpu))
                        .min()
                })
        })
    }
    /// Depth-first over the hosts of each item (hosts in the same state
    /// are tried once). `None`: `budget` ran out.
    fn search(&mut self, items: &[Item], budget: &mut u32) -> Option<bool> {
        let Some((it, rest)) = items.split_first() else {
            return Some(true);
        };
        let mut tried: Vec<usize> = Vec::new();
        for h in 0..self.site.len() {
            if !it.sites.contains(&self.site[h]) || !self.fits(h, it) {
                continue;
            }
            // Same site and the same room at every checkpoint (not only
            // the item's: the rest see the others).
            if tried
                .iter()
                .any(|&g| self.site[g] == self.site[h] && self.free[g] == self.free[h])
            {
                continue;
            }
            tried.push(h);
            if *budget == 0 {
                return None;
            }
            *budget -= 1;
            self.take(h, it);
            let r = self.search(rest, budget);
            self.give(h, it);
            match r {
                Some(false) => {}
                other => return other,
            }
        }
        Some(false)
    }
}

impl Calendar {
    /// Whether the unplaced nodes of every reservation, and `extra` (each
    /// with its windows), can each be given one host of their sites for
    /// all of their windows, next to what is placed (`hosts`: free now)
    /// and the `fixed` nodes. From `now` on when given (a window begun
    /// earlier counts from then). `None`: the search ran out of steps.
    pub(super) fn packs_over_time(
        &self,
        hosts: &[HostCap],
        now: Option<Timestamp>,
        extra: &[(&[Window], &Demand)],
        fixed: &[Fixed],
    ) -> Option<bool> {
        let clamp = |t: Timestamp| now.map_or(t, |n| t.max(n));
        let mut checkpoints: Vec<Timestamp> = self
            .reservations
            .iter()
            .flat_map(|r| r.windows.iter())
            .chain(extra.iter().flat_map(|(w, _)| w.iter()))
            .chain(fixed.iter().flat_map(|f| f.windows.iter()))
            .map(|w| clamp(w.start))
            .chain(now)
            .collect();
        checkpoints.sort();
        checkpoints.dedup();
        let active = |windows: &[Window]| -> Vec<usize> {
            (0..checkpoints.len())
                .filter(|&k| windows.iter().any(|w| w.contains(checkpoints[k])))
                .collect()
        };
        let at: Vec<Vec<HostCap>> = checkpoints
            .iter()
            .map(|t| self.placed_at(hosts, *t))
            .collect();
        let mut p = Problem {
            site: hosts.iter().map(|h| h.site.clone()).collect(),
            free: (0..hosts.len())
                .map(|h| at.iter().map(|free| free[h].free).collect())
                .collect(),
        };
        for f in fixed {
            let Some(h) = hosts.iter().position(|h| h.name == f.host) else {
                continue;
            };
            for k in active(f.windows) {
                if !p.free[h][k].fits(f.need) {
                    return Some(false);
                }
                p.free[h][k] = p.free[h][k].minus(f.need);
            }
        }
        let mut items: Vec<Item> = self
            .reservations
            .iter()
            .flat_map(|r| r.unplaced.iter().map(|d| (&r.windows[..], d)))
            .chain(extra.iter().copied())
            .map(|(windows, d)| Item {
                sites: &d.sites,
                need: d.need,
                active: active(windows),
            })
            .filter(|it| !it.active.is_empty())
            .collect();
        items.sort_by_key(|it| {
            std::cmp::Reverse((it.need.cpu, it.need.memory_mib, it.active.len()))
        });
        let start = p.free.clone();
        if items.iter().all(|it| match p.best(it) {
            Some(h) => {
                p.take(h, it);
                true
            }
            None => false,
        }) {
            return Some(true);
        }
        p.free = start;
        let mut budget = EXACT_SEARCH_STEPS;
        p.search(&items, &mut budget)
    }
}
