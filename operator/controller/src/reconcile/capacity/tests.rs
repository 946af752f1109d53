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
    Own { windows, held: &[] }
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
    assert!(
        cal.at(&shrunk, ts("2026-01-01T10:00:00Z"), true)
            .1
            .is_some()
    );
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
                held: &held
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
