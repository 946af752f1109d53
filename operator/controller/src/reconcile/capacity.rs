//! Admission of reservations against a site's capacity, as a pure function.
//!
//! A cluster with a dated reservation (`start` and/or `end`) holds capacity
//! for its whole window: its nodes are created at `start` and keep their
//! placement until `end` (for ever with `endAction: Stop`, since stopped nodes
//! keep their hosts). Before its nodes exist, the reservation is admitted
//! once: at every instant of its window where demand can peak (its start and
//! every start of an overlapping admitted reservation), the site's
//! allocatable must cover what permanent clusters use now, every admitted
//! reservation active then, and this one. Admitted reservations keep their
//! guarantee; a later one that would overbook is refused with the site, the
//! resource and the window named.
//!
//! The check is per site (sum over its Ready, schedulable hosts), greedily in
//! the order of each node's allowed sites; per-host fragmentation is left to
//! the scheduler when the nodes are created.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use yukumo_api::common::Resources;

/// One node's demand: the sites it may use (in order) and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
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

/// An admitted reservation of another cluster.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub window: Window,
    pub demand: Vec<Demand>,
}

/// Charge `demand` to `free` greedily; on failure, the site and the shortfall.
fn charge(
    free: &mut BTreeMap<String, Resources>,
    demand: &[Demand],
) -> Result<(), (String, Resources)> {
    for d in demand {
        let fit = d
            .sites
            .iter()
            .find(|s| free.get(*s).is_some_and(|f| f.fits(d.need)));
        match fit {
            Some(site) => {
                let f = free.get_mut(site).expect("site present");
                f.cpu -= d.need.cpu;
                f.memory_mib -= d.need.memory_mib;
            }
            None => {
                let site = d.sites.first().cloned().unwrap_or_default();
                let have = free.get(&site).copied().unwrap_or_default();
                return Err((site, have));
            }
        }
    }
    Ok(())
}

fn sum_by_site(demand: &[Demand]) -> BTreeMap<String, Resources> {
    let mut out: BTreeMap<String, Resources> = BTreeMap::new();
    for d in demand {
        if let Some(s) = d.sites.first() {
            let e = out.entry(s.clone()).or_default();
            *e = e.plus(d.need);
        }
    }
    out
}

/// Whether a reservation with `window` and `demand` fits. `capacity` is each
/// site's allocatable, `permanent` what clusters without a dated reservation
/// use per site, `others` the admitted reservations of other clusters.
/// The error names the site, the resource, the window and the instant.
pub fn admit(
    window: &Window,
    demand: &[Demand],
    capacity: &BTreeMap<String, Resources>,
    permanent: &BTreeMap<String, Resources>,
    others: &[Admitted],
) -> Result<(), String> {
    let mut checkpoints = vec![window.start];
    checkpoints.extend(
        others
            .iter()
            .map(|o| o.window.start)
            .filter(|t| window.contains(*t)),
    );
    checkpoints.sort();
    checkpoints.dedup();
    for t in checkpoints {
        let mut free: BTreeMap<String, Resources> = capacity
            .iter()
            .map(|(site, cap)| {
                let used = permanent.get(site).copied().unwrap_or_default();
                (
                    site.clone(),
                    Resources {
                        cpu: cap.cpu.saturating_sub(used.cpu),
                        memory_mib: cap.memory_mib.saturating_sub(used.memory_mib),
                    },
                )
            })
            .collect();
        for o in others.iter().filter(|o| o.window.contains(t)) {
            // Admitted reservations were checked when admitted; if the fleet
            // shrank since, whatever they cannot get is simply not free.
            for d in &o.demand {
                if let Some(f) = d.sites.iter().find_map(|s| {
                    free.get(s)
                        .is_some_and(|f| f.fits(d.need))
                        .then_some(s.clone())
                }) {
                    let f = free.get_mut(&f).expect("site present");
                    f.cpu -= d.need.cpu;
                    f.memory_mib -= d.need.memory_mib;
                } else if let Some(f) = d.sites.first().and_then(|s| free.get_mut(s)) {
                    f.cpu = f.cpu.saturating_sub(d.need.cpu);
                    f.memory_mib = f.memory_mib.saturating_sub(d.need.memory_mib);
                }
            }
        }
        let before = free.clone();
        if let Err((site, _)) = charge(&mut free, demand) {
            let need = sum_by_site(demand).get(&site).copied().unwrap_or_default();
            let have = before.get(&site).copied().unwrap_or_default();
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
                short.push("no single site has room for one of its nodes".into());
            }
            return Err(format!(
                "site {site}: the reservation needs {} cpu, {} MiB {}; at {t} only {} cpu, {} MiB are not already reserved ({})",
                need.cpu,
                need.memory_mib,
                window.describe(),
                have.cpu,
                have.memory_mib,
                short.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn r(cpu: u32, mib: u64) -> Resources {
        Resources {
            cpu,
            memory_mib: mib,
        }
    }
    fn nodes(n: usize, need: Resources) -> Vec<Demand> {
        vec![
            Demand {
                sites: vec!["a".into()],
                need
            };
            n
        ]
    }
    fn w(s: &str, e: Option<&str>) -> Window {
        Window {
            start: ts(s),
            end: e.map(ts),
        }
    }

    #[test]
    fn fits_alone_and_refused_when_overlapping_names_site_resource_window() {
        let cap = BTreeMap::from([("a".to_string(), r(8, 8192))]);
        let perm = BTreeMap::from([("a".to_string(), r(2, 1024))]);
        let mine = w("2026-01-01T10:00:00Z", Some("2026-01-01T12:00:00Z"));
        assert!(admit(&mine, &nodes(4, r(1, 1024)), &cap, &perm, &[]).is_ok());
        // Another admitted reservation starts inside my window and takes 4 cpu.
        let other = Admitted {
            window: w("2026-01-01T11:00:00Z", Some("2026-01-01T13:00:00Z")),
            demand: nodes(4, r(1, 256)),
        };
        let err = admit(
            &mine,
            &nodes(4, r(1, 1024)),
            &cap,
            &perm,
            std::slice::from_ref(&other),
        )
        .unwrap_err();
        assert!(err.contains("site a"), "{err}");
        assert!(err.contains("cpu short by 2"), "{err}");
        assert!(err.contains("2026-01-01T11:00:00Z"), "{err}");
        assert!(
            err.contains("from 2026-01-01T10:00:00Z to 2026-01-01T12:00:00Z"),
            "{err}"
        );
        // Back to back (other starts when mine ends): no overlap.
        let later = w("2026-01-01T08:00:00Z", Some("2026-01-01T11:00:00Z"));
        assert!(admit(&later, &nodes(4, r(1, 1024)), &cap, &perm, &[other]).is_ok());
    }

    #[test]
    fn an_admitted_reservation_active_at_my_start_counts_and_memory_is_named() {
        let cap = BTreeMap::from([("a".to_string(), r(64, 4096))]);
        let other = Admitted {
            window: w("2026-01-01T09:00:00Z", None),
            demand: nodes(2, r(1, 1024)),
        };
        let mine = w("2026-01-01T10:00:00Z", Some("2026-01-01T11:00:00Z"));
        let err = admit(
            &mine,
            &nodes(3, r(1, 1024)),
            &cap,
            &BTreeMap::new(),
            &[other],
        )
        .unwrap_err();
        assert!(err.contains("memory short by 1024 MiB"), "{err}");
        assert!(!err.contains("cpu short"), "{err}");
    }

    #[test]
    fn spills_to_the_next_allowed_site() {
        let cap = BTreeMap::from([("a".to_string(), r(2, 2048)), ("b".to_string(), r(2, 2048))]);
        let demand = vec![
            Demand {
                sites: vec!["a".into(), "b".into()],
                need: r(1, 1024)
            };
            4
        ];
        let mine = w("2026-01-01T10:00:00Z", None);
        assert!(admit(&mine, &demand, &cap, &BTreeMap::new(), &[]).is_ok());
        let demand5 = vec![demand[0].clone(); 5];
        assert!(admit(&mine, &demand5, &cap, &BTreeMap::new(), &[]).is_err());
    }
}
