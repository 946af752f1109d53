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
fn nodes(prefix: &str, n: usize, need: Resources) -> Vec<Demand> {
    (0..n)
        .map(|i| Demand {
            node: format!("{prefix}-{i}"),
            sites: vec!["a".into()],
            need,
        })
        .collect()
}
fn w(s: &str, e: Option<&str>) -> Window {
    Window {
        start: ts(s),
        end: e.map(ts),
    }
}
fn hosts(free: &[(&str, Resources)]) -> Vec<HostCap> {
    free.iter()
        .map(|(n, f)| HostCap {
            name: n.to_string(),
            site: "a".into(),
            free: *f,
        })
        .collect()
}
fn own(windows: &[Window]) -> Own<'_> {
    Own {
        windows,
        held: &[],
        placed: &[],
        rest: &[],
    }
}
fn reserved(who: &str, window: Window, unplaced: Vec<Demand>) -> Admitted {
    Admitted {
        who: who.into(),
        windows: vec![window],
        placed: vec![],
        in_use: true,
        unplaced,
    }
}

#[test]
fn fits_alone_and_refused_when_overlapping_names_site_resource_window_and_holder() {
    let hs = hosts(&[("h1", r(3, 4096)), ("h2", r(3, 4096))]);
    let mine = w("2026-01-01T10:00:00Z", Some("2026-01-01T12:00:00Z"));
    let empty = Calendar::default();
    assert!(
        empty
            .admit(std::slice::from_ref(&mine), &nodes("m", 4, r(1, 1024)), &hs)
            .is_ok()
    );
    // Another admitted reservation starts inside my window and takes 4 cpu.
    let cal = Calendar {
        reservations: vec![reserved(
            "ns/other",
            w("2026-01-01T11:00:00Z", Some("2026-01-01T13:00:00Z")),
            nodes("o", 4, r(1, 256)),
        )],
    };
    let err = cal
        .admit(std::slice::from_ref(&mine), &nodes("m", 4, r(1, 1024)), &hs)
        .unwrap_err();
    assert!(err.contains("site a"), "{err}");
    assert!(err.contains("cpu short by 2"), "{err}");
    assert!(err.contains("at 2026-01-01T11:00:00Z"), "{err}");
    assert!(
        err.contains("from 2026-01-01T10:00:00Z to 2026-01-01T12:00:00Z"),
        "{err}"
    );
    assert!(err.contains("reserved then by ns/other"), "{err}");
    // Back to back (the other starts when mine ends): no overlap.
    let before = w("2026-01-01T08:00:00Z", Some("2026-01-01T11:00:00Z"));
    assert!(
        cal.admit(
            std::slice::from_ref(&before),
            &nodes("m", 4, r(1, 1024)),
            &hs
        )
        .is_ok()
    );
}

#[test]
fn host_level_fit_refuses_what_only_the_sites_sum_would_admit() {
    // 4 cpu free in the site, but 2 on each host: a 3-cpu node fits nowhere.
    let hs = hosts(&[("h1", r(2, 8192)), ("h2", r(2, 8192))]);
    let mine = w("2026-01-01T10:00:00Z", None);
    let err = Calendar::default()
        .admit(
            std::slice::from_ref(&mine),
            &nodes("big", 1, r(3, 1024)),
            &hs,
        )
        .unwrap_err();
    assert!(
        err.contains("no host has room for big-0 (3 cpu, 1024 MiB)"),
        "{err}"
    );
    assert!(err.contains("the roomiest, "), "{err}");
    // Largest first: 2+1+1 fills both hosts exactly, in any input order.
    let mut d = nodes("s", 2, r(1, 1024));
    d.extend(nodes("l", 1, r(2, 1024)));
    assert!(
        Calendar::default()
            .admit(std::slice::from_ref(&mine), &d, &hs)
            .is_ok()
    );
}

#[test]
fn an_admitted_reservation_active_at_my_start_counts_and_memory_is_named() {
    let hs = hosts(&[("h1", r(64, 4096))]);
    let cal = Calendar {
        reservations: vec![reserved(
            "ns/early",
            w("2026-01-01T09:00:00Z", None),
            nodes("e", 2, r(1, 1024)),
        )],
    };
    let mine = w("2026-01-01T10:00:00Z", Some("2026-01-01T11:00:00Z"));
    let err = cal
        .admit(std::slice::from_ref(&mine), &nodes("m", 3, r(1, 1024)), &hs)
        .unwrap_err();
    assert!(err.contains("memory short by 1024 MiB"), "{err}");
    assert!(!err.contains("cpu short"), "{err}");
}

#[test]
fn a_placed_reservation_gives_its_hosts_back_when_it_ends() {
    // h1 is full of an active reservation that ends at 11:00.
    let hs = hosts(&[("h1", r(0, 0))]);
    let cal = Calendar {
        reservations: vec![Admitted {
            who: "ns/now".into(),
            windows: vec![w("2026-01-01T09:00:00Z", Some("2026-01-01T11:00:00Z"))],
            placed: vec![("h1".into(), r(4, 4096))],
            in_use: true,
            unplaced: vec![],
        }],
    };
    let at_11 = w("2026-01-01T11:00:00Z", Some("2026-01-01T12:00:00Z"));
    assert!(
        cal.admit(
            std::slice::from_ref(&at_11),
            &nodes("m", 4, r(1, 1024)),
            &hs
        )
        .is_ok()
    );
    let at_10 = w("2026-01-01T10:00:00Z", Some("2026-01-01T12:00:00Z"));
    assert!(
        cal.admit(
            std::slice::from_ref(&at_10),
            &nodes("m", 1, r(1, 1024)),
            &hs
        )
        .is_err()
    );
}

#[test]
fn spills_to_the_next_allowed_site() {
    let hs = vec![
        HostCap {
            name: "a1".into(),
            site: "a".into(),
            free: r(2, 2048),
        },
        HostCap {
            name: "b1".into(),
            site: "b".into(),
            free: r(2, 2048),
        },
    ];
    let demand: Vec<Demand> = (0..4)
        .map(|i| Demand {
            node: format!("n-{i}"),
            sites: vec!["a".into(), "b".into()],
            need: r(1, 1024),
        })
        .collect();
    let mine = w("2026-01-01T10:00:00Z", None);
    assert!(
        Calendar::default()
            .admit(std::slice::from_ref(&mine), &demand, &hs)
            .is_ok()
    );
    let mut demand5 = demand.clone();
    demand5.push(Demand {
        node: "n-4".into(),
        ..demand[0].clone()
    });
    assert!(
        Calendar::default()
            .admit(std::slice::from_ref(&mine), &demand5, &hs)
            .is_err()
    );
}

#[test]
fn a_permanent_node_may_not_take_capacity_promised_to_a_later_window() {
    let now = ts("2026-01-01T08:00:00Z");
    let hs = hosts(&[("h1", r(4, 4096)), ("h2", r(4, 4096))]);
    // A reservation from 10:00 needs 3 cpu on one host, twice.
    let cal = Calendar {
        reservations: vec![reserved(
            "ns/course",
            w("2026-01-01T10:00:00Z", Some("2026-01-01T12:00:00Z")),
            nodes("c", 2, r(3, 1024)),
        )],
    };
    // 1 cpu per host is spare: a 1-cpu node fits on either.
    assert!(cal.permits(&hs, "h1", r(1, 512), now, None).is_ok());
    // A 2-cpu node would leave only 2 cpu on its host: refused, naming the
    // reservation, its window and the instant.
    let err = cal.permits(&hs, "h2", r(2, 512), now, None).unwrap_err();
    assert!(
        err.contains(
            "capacity reserved for ns/course from 2026-01-01T10:00:00Z to 2026-01-01T12:00:00Z (at 2026-01-01T10:00:00Z)"
        ),
        "{err}"
    );
    // Without reservations ahead, anything that fits is permitted.
    assert!(
        Calendar::default()
            .permits(&hs, "h2", r(4, 4096), now, None)
            .is_ok()
    );
    // A reservation the fleet can no longer give does not block the rest.
    let shrunk = hosts(&[("h1", r(2, 4096)), ("h2", r(4, 4096))]);
    let t = ts("2026-01-01T10:00:00Z");
    assert!(!cal.joint(cal.placed_at(&shrunk, t), t, &[]).1.is_empty());
    assert!(cal.permits(&shrunk, "h1", r(1, 512), now, None).is_ok());
}

#[test]
fn weekly_clusters_on_alternate_days_share_a_host_and_keep_it_for_their_windows() {
    // Monday 2026-01-05 08:00; one host of 4 cpu, 4 GiB, all free now.
    let now = ts("2026-01-05T08:00:00Z");
    let hs = hosts(&[("h1", r(4, 4096))]);
    let mon = |d: u32| {
        w(
            &format!("2026-01-{d:02}T09:00:00Z"),
            Some(&format!("2026-01-{d:02}T12:00:00Z")),
        )
    };
    // A Monday class, asleep now (stopped on h1, 3 GiB), back at 09:00.
    let monday = Admitted {
        who: "ns/monday".into(),
        windows: vec![mon(5), mon(12)],
        placed: vec![("h1".into(), r(2, 3072))],
        in_use: false,
        unplaced: vec![],
    };
    let cal = Calendar {
        reservations: vec![monday],
    };
    assert!(cal.holds_ahead());
    // A Tuesday class may sleep on the same host: its windows never meet
    // Monday's.
    let tue = [w("2026-01-06T09:00:00Z", Some("2026-01-06T12:00:00Z"))];
    assert!(
        cal.permits(&hs, "h1", r(2, 3072), now, Some(own(&tue)))
            .is_ok()
    );
    // Admitted as a whole, too.
    assert!(
        cal.admit(&tue, &nodes("t", 1, r(2, 3072)), &hs).is_ok(),
        "Tuesday fits"
    );
    // Another Monday class overlapping does not fit beside it...
    let err = cal
        .permits(&hs, "h1", r(2, 3072), now, Some(own(&[mon(5)])))
        .unwrap_err();
    assert!(
        err.contains(
            "capacity reserved for ns/monday from 2026-01-05T09:00:00Z to 2026-01-05T12:00:00Z (at 2026-01-05T09:00:00Z)"
        ),
        "{err}"
    );
    // ...nor does a permanent node that would hold the room for ever,
    // though the host is free now.
    let err = cal.permits(&hs, "h1", r(1, 2048), now, None).unwrap_err();
    assert!(err.contains("capacity reserved for ns/monday"), "{err}");
    // What is left beside Monday's class may go for ever.
    assert!(cal.permits(&hs, "h1", r(2, 1024), now, None).is_ok());
}

#[test]
fn a_weekly_clusters_own_sleeping_nodes_count_at_its_windows() {
    let now = ts("2026-01-05T08:00:00Z");
    let hs = hosts(&[("h1", r(4, 4096))]);
    let mon = [w("2026-01-05T09:00:00Z", Some("2026-01-05T12:00:00Z"))];
    // Another reservation elsewhere in time makes the calendar non-empty.
    let cal = Calendar::default();
    // One sleeping node of 3 GiB already on h1: a second does not fit
    // there at 09:00, though h1 is free now.
    let held = [("h1".to_string(), r(1, 3072))];
    let err = cal
        .permits(
            &hs,
            "h1",
            r(1, 3072),
            now,
            Some(Own {
                windows: &mon,
                held: &held,
                placed: &[],
                rest: &[],
            }),
        )
        .unwrap_err();
    assert!(err.contains("no room at 2026-01-05T09:00:00Z"), "{err}");
    assert!(
        cal.permits(
            &hs,
            "h1",
            r(1, 1024),
            now,
            Some(Own {
                windows: &mon,
                held: &held,
                placed: &[],
                rest: &[],
            })
        )
        .is_ok()
    );
}

#[test]
fn the_verdict_does_not_depend_on_the_order_of_the_reservations() {
    // Live case (2026-12-03): three hosts at 60% with today's class; the
    // sleeping class holds 60% of each on Saturday. A third class on
    // Saturday must be refused whichever reservation the cache lists
    // first (a take before the give-back saturated at zero and admitted it).
    let hs = hosts(&[
        ("h1", r(15, 9540)),
        ("h2", r(15, 9540)),
        ("h3", r(15, 9540)),
    ]);
    let placed = |mib| {
        vec![
            ("h1".to_string(), r(1, mib)),
            ("h2".to_string(), r(1, mib)),
            ("h3".to_string(), r(1, mib)),
        ]
    };
    let today = Admitted {
        who: "ns/today".into(),
        windows: vec![w("2026-12-03T22:50:00Z", Some("2026-12-03T23:59:00Z"))],
        placed: placed(14309),
        in_use: true,
        unplaced: vec![],
    };
    let saturday = w("2026-12-05T00:00:00Z", Some("2026-12-05T23:59:00Z"));
    let later = Admitted {
        who: "ns/later".into(),
        windows: vec![saturday.clone()],
        placed: placed(14309),
        in_use: false,
        unplaced: vec![],
    };
    for reservations in [
        vec![today.clone(), later.clone()],
        vec![later.clone(), today.clone()],
    ] {
        let cal = Calendar { reservations };
        let err = cal
            .admit(
                std::slice::from_ref(&saturday),
                &nodes("clash", 3, r(1, 14309)),
                &hs,
            )
            .unwrap_err();
        assert!(err.contains("reserved then by ns/later"), "{err}");
        // A class half as big fits beside it.
        assert!(
            cal.admit(
                std::slice::from_ref(&saturday),
                &nodes("half", 3, r(1, 7000)),
                &hs
            )
            .is_ok()
        );
    }
}

#[test]
fn each_instant_packing_is_not_enough_a_node_keeps_its_host_for_its_window() {
    // h0 4 cpu, h1 5 cpu. A (1 cpu, hours 0-10) must share h1 with a
    // 4-cpu node of B at hour 0 (the other takes h0), and h0 with C's
    // 3-cpu node at hour 5 (C's 5-cpu node needs h1 alone): each instant
    // packs, but A cannot be on both hosts.
    let hs = hosts(&[("h0", r(4, 65536)), ("h1", r(5, 65536))]);
    let window = |s: i64, e: i64| Window {
        start: hour(s),
        end: Some(hour(e)),
    };
    let cal = Calendar {
        reservations: vec![
            reserved("ns/a", window(0, 10), nodes("a", 1, r(1, 512))),
            reserved("ns/b", window(0, 5), nodes("b", 2, r(4, 512))),
        ],
    };
    let c = vec![
        Demand {
            node: "c-0".into(),
            sites: vec!["a".into()],
            need: r(5, 512),
        },
        Demand {
            node: "c-1".into(),
            sites: vec!["a".into()],
            need: r(3, 512),
        },
    ];
    let err = cal.admit(&[window(5, 10)], &c, &hs).unwrap_err();
    assert!(err.contains("fit at every instant"), "{err}");
    assert!(err.contains("not each on one host"), "{err}");
    assert!(err.contains("ns/a (from 2030-01-01T00:00:00Z"), "{err}");
    // Once A is gone (hour 10), C fits.
    assert!(cal.admit(&[window(10, 12)], &c, &hs).is_ok());
}

#[test]
fn a_dated_clusters_own_nodes_are_given_back_after_its_window() {
    // h0 4 cpu, h1 5 cpu. The cluster (hours 0-3) has x on h0 (2 cpu) and
    // places y (2 cpu) now. r (1 cpu, hours 1-10) must end up on h0: at
    // hour 5 s takes h1 whole (5 cpu) and 3 cpu of h0. y on h0 fills h0 at
    // hour 1 and sends r to h1: refused, though every instant packs. Seen
    // only if x is given back after hour 3 (else s never fits, with or
    // without y, and nothing would be refused).
    let hs = hosts(&[("h0", r(2, 65536)), ("h1", r(5, 65536))]);
    let window = |s: i64, e: i64| Window {
        start: hour(s),
        end: Some(hour(e)),
    };
    let s_nodes = vec![
        Demand {
            node: "s-0".into(),
            sites: vec!["a".into()],
            need: r(5, 512),
        },
        Demand {
            node: "s-1".into(),
            sites: vec!["a".into()],
            need: r(3, 512),
        },
    ];
    let cal = Calendar {
        reservations: vec![
            reserved("ns/r", window(1, 10), nodes("r", 1, r(1, 512))),
            reserved("ns/s", window(5, 10), s_nodes),
        ],
    };
    let mine = [window(0, 3)];
    let x = [("h0".to_string(), r(2, 512))];
    let own = Own {
        windows: &mine,
        held: &[],
        placed: &x,
        rest: &[],
    };
    let err = cal
        .permits(&hs, "h0", r(2, 512), hour(0), Some(own))
        .unwrap_err();
    assert!(err.contains("one host for their whole window"), "{err}");
    assert!(err.contains("ns/r"), "{err}");
    assert!(
        cal.permits(&hs, "h1", r(2, 512), hour(0), Some(own))
            .is_ok()
    );
    // Counted for ever (not given back), x would hide it.
    let forever = Own { placed: &[], ..own };
    assert!(
        cal.permits(&hs, "h0", r(2, 512), hour(0), Some(forever))
            .is_ok()
    );
}

/// A seeded generator (xorshift64*): the scenarios are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A generated reservation: [start, end) in hours, and its nodes.
#[derive(Debug, Clone)]
struct Req {
    start: i64,
    end: i64,
    nodes: Vec<Resources>,
}

fn hour(h: i64) -> Timestamp {
    ts("2030-01-01T00:00:00Z") + k8s_openapi::jiff::SignedDuration::from_hours(h)
}

fn demand_of(i: usize, q: &Req) -> Vec<Demand> {
    q.nodes
        .iter()
        .enumerate()
        .map(|(k, need)| Demand {
            node: format!("r{i}-{k}"),
            sites: vec!["a".into()],
            need: *need,
        })
        .collect()
}

/// The brute-force model over time: can every node (need, [start, end)
/// in hours) be given one host for all of its hours without exceeding
/// any host at any hour (every assignment tried; hosts in the same state
/// tried once)?
fn brute_fits_over_time(free: &mut [Vec<Resources>], nodes: &[(Resources, i64, i64)]) -> bool {
    let Some((&(need, s, e), rest)) = nodes.split_first() else {
        return true;
    };
    let hours = s as usize..e as usize;
    for i in 0..free.len() {
        if free[..i].contains(&free[i]) || !hours.clone().all(|h| free[i][h].fits(need)) {
            continue;
        }
        hours
            .clone()
            .for_each(|h| free[i][h] = free[i][h].minus(need));
        let ok = brute_fits_over_time(free, rest);
        hours
            .clone()
            .for_each(|h| free[i][h] = free[i][h].plus(need));
        if ok {
            return true;
        }
    }
    false
}

/// 2,000 generated scenarios (the acceptance asks for 50; 2–3 hosts, 3–6
/// dated reservations of 1–3 nodes over a day), each admitted in request order by the calendar, then
/// played hour by hour: at each start the reservation's nodes are placed
/// one by one by the real scheduler (spread, with the calendar's guard,
/// as the controller does), at each end they go. Checked against a
/// brute-force model over time (every assignment of one host per node for
/// its whole window tried): the admitted set has one; every admitted
/// reservation places at its start; no host is ever over its capacity; a
/// reservation refused is one the model cannot fit next to the admitted
/// ones. `YUKUMO_CAPACITY_SEEDS=N` plays N (20,000: 0 failures, 4 s).
#[test]
fn generated_scenarios_against_a_brute_force_model() {
    use crate::reconcile::virtualcluster::admission::host_caps;
    use crate::scheduler::{HostView, Placement, Request, place};
    use std::collections::BTreeMap;
    let (mut admitted_total, mut refused_total) = (0, 0);
    let mut fitting_refusals: Vec<String> = Vec::new();
    // YUKUMO_CAPACITY_SEEDS=N plays seeds 1..=N (2,000 by default: the
    // first 50 never met the per-instant gap this test found at 3,000).
    let seeds: u64 = std::env::var("YUKUMO_CAPACITY_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut misplaced: Vec<String> = Vec::new();
    'scenario: for seed in 1..=seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let hosts: Vec<(String, Resources)> = (0..rng.range(2, 3))
            .map(|i| {
                (
                    format!("h{i}"),
                    r(rng.range(4, 8) as u32, 1024 * rng.range(4, 8)),
                )
            })
            .collect();
        let reqs: Vec<Req> = (0..rng.range(3, 6))
            .map(|_| {
                let start = rng.range(1, 16) as i64;
                Req {
                    start,
                    end: start + rng.range(1, 8) as i64,
                    nodes: (0..rng.range(1, 3))
                        .map(|_| r(rng.range(1, 4) as u32, 1024 * rng.range(1, 4)))
                        .collect(),
                }
            })
            .collect();
        let full: Vec<HostCap> = hosts
            .iter()
            .map(|(n, c)| HostCap {
                name: n.clone(),
                site: "a".into(),
                free: *c,
            })
            .collect();
        let window = |q: &Req| Window {
            start: hour(q.start),
            end: Some(hour(q.end)),
        };
        // The model over time: can the reservations `set` be given one
        // host per node for their whole windows?
        let model_over_time = |set: &[usize]| {
            let mut nodes: Vec<(Resources, i64, i64)> = set
                .iter()
                .flat_map(|&j| {
                    let q = &reqs[j];
                    q.nodes.iter().map(move |n| (*n, q.start, q.end))
                })
                .collect();
            nodes.sort_by_key(|(n, s, e)| std::cmp::Reverse((n.cpu, n.memory_mib, e - s)));
            let mut free: Vec<Vec<Resources>> = hosts.iter().map(|h| vec![h.1; 25]).collect();
            brute_fits_over_time(&mut free, &nodes)
        };
        // Admission, at hour 0, in request order.
        let mut admitted: Vec<usize> = vec![];
        for (i, q) in reqs.iter().enumerate() {
            let cal = Calendar {
                reservations: admitted
                    .iter()
                    .map(|&j| reserved(&format!("r{j}"), window(&reqs[j]), demand_of(j, &reqs[j])))
                    .collect(),
            };
            match cal.admit(&[window(q)], &demand_of(i, q), &full) {
                Ok(()) => admitted.push(i),
                Err(_) => {
                    refused_total += 1;
                    // Refused: either no assignment exists over time (the
                    // model agrees), or the heuristic missed one.
                    let mut with = admitted.clone();
                    with.push(i);
                    if model_over_time(&with) {
                        fitting_refusals.push(format!("seed {seed}: r{i}"));
                    }
                }
            }
        }
        admitted_total += admitted.len();
        // The model: the admitted set has one host per node for its whole
        // window (so every instant fits too).
        assert!(
            model_over_time(&admitted),
            "seed {seed}: admitted reservations cannot all keep one host each: {hosts:?} {reqs:?} admitted {admitted:?}"
        );
        // Play it: hour by hour, ends first, then starts (admission order).
        let mut placed: BTreeMap<usize, Vec<(String, Resources)>> = BTreeMap::new();
        for h in 0..=24 {
            placed.retain(|&j, _| reqs[j].end > h);
            for &i in admitted.iter().filter(|&&j| reqs[j].start == h) {
                let mut views: Vec<HostView> = hosts
                    .iter()
                    .map(|(n, c)| HostView {
                        name: n.clone(),
                        site: "a".into(),
                        gateway: true,
                        ready: true,
                        lost: false,
                        schedulable: true,
                        vlan: false,
                        allocatable: *c,
                        used: placed
                            .values()
                            .flatten()
                            .filter(|(host, _)| host == n)
                            .fold(Resources::default(), |a, (_, need)| a.plus(*need)),
                    })
                    .collect();
                // The calendar as the deciding cluster sees it: every other
                // admitted reservation not ended, placed or not.
                let cal = Calendar {
                    reservations: admitted
                        .iter()
                        .filter(|&&j| j != i && reqs[j].end > h)
                        .map(|&j| Admitted {
                            who: format!("r{j}"),
                            windows: vec![window(&reqs[j])],
                            placed: placed.get(&j).cloned().unwrap_or_default(),
                            in_use: true,
                            unplaced: if placed.contains_key(&j) {
                                vec![]
                            } else {
                                demand_of(j, &reqs[j])
                            },
                        })
                        .collect(),
                };
                let own_windows = [Window {
                    start: hour(h),
                    end: Some(hour(reqs[i].end)),
                }];
                let mut counts = BTreeMap::new();
                let mut mine = vec![];
                // Largest first, each leaving room for the rest (as the
                // controller places a scheduled cluster's nodes).
                let mut order = demand_of(i, &reqs[i]);
                order.sort_by_key(|d| std::cmp::Reverse((d.need.cpu, d.need.memory_mib)));
                for (k, d) in order.iter().enumerate() {
                    let rest = &order[k + 1..];
                    let p = place(
                        &Request {
                            node: d.node.clone(),
                            sites: d.sites.clone(),
                            need: d.need,
                            gateway: false,
                            vlan: false,
                            pinned: None,
                            holds_now: true,
                            pack: true,
                        },
                        &mut views,
                        &mut counts,
                        &|v: &[HostView], host: &HostView, need: Resources| {
                            cal.permits(
                                &host_caps(v),
                                &host.name,
                                need,
                                hour(h),
                                Some(Own {
                                    windows: &own_windows,
                                    held: &[],
                                    placed: &mine,
                                    rest,
                                }),
                            )
                        },
                    );
                    match p {
                        Placement::Host { host, .. } => mine.push((host, d.need)),
                        Placement::Unschedulable(why) => {
                            misplaced.push(format!(
                                "seed {seed}: admitted r{i} does not place at its start (hour {h}): {why}\nhosts {hosts:?}\nreqs {reqs:?}\nadmitted {admitted:?}\nplaced {placed:?}"
                            ));
                            continue 'scenario;
                        }
                    }
                }
                placed.insert(i, mine);
                for v in &views {
                    assert!(
                        v.allocatable.fits(v.used),
                        "seed {seed}: {} over capacity",
                        v.name
                    );
                }
            }
        }
    }
    println!(
        "{seeds} scenarios: {} with an admitted reservation that did not place; {admitted_total} reservations admitted, {refused_total} refused ({} of them fit by brute force)",
        misplaced.len(),
        fitting_refusals.len()
    );
    assert!(misplaced.is_empty(), "{}", misplaced.join("\n\n"));
    assert!(
        fitting_refusals.is_empty(),
        "refused though they fit: {}",
        fitting_refusals.join("\n")
    );
    assert!(
        admitted_total > 100 && refused_total > 10,
        "the scenarios exercise both"
    );
}
