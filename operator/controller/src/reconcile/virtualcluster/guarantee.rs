//! What the capacity calendar guarantees a cluster, and until when, for
//! its status: a pure function of its reservation, its admission, its
//! desired nodes and its placed ones.

use super::super::reservation;
use super::admission::{WEEK_AND_A_DAY, dated_until, scheduled};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use yukumo_api::common::Resources;
use yukumo_api::virtualcluster::{Guarantee, GuaranteeBasis, HeldWindow, Reservation};

const WEEK: SignedDuration = SignedDuration::from_hours(7 * 24);

fn total<'a>(needs: impl Iterator<Item = &'a Resources>) -> (u32, Resources) {
    needs.fold((0, Resources::default()), |(n, sum), r| {
        (n + 1, sum.plus(*r))
    })
}

/// The guarantee of a cluster with reservation `r`, admitted at
/// `admitted_at` (a scheduled reservation), whose desired nodes need
/// `desired` and whose nodes placed on a host need `placed`, at `now`.
/// Values are stable between calls (window starts are not clipped to
/// `now`), so the status is not rewritten on every pass.
pub fn guarantee(
    r: Option<&Reservation>,
    admitted_at: Option<Timestamp>,
    desired: &[Resources],
    placed: &[Resources],
    now: Timestamp,
) -> Option<Guarantee> {
    let Some(r) = r.filter(|r| scheduled(Some(r))) else {
        // No reservation: each placed node holds its host for ever.
        let (nodes, sum) = total(placed.iter());
        return (nodes > 0).then_some(Guarantee {
            basis: GuaranteeBasis::Placed,
            nodes,
            cpu: sum.cpu,
            memory_mib: sum.memory_mib,
            until: None,
            window: None,
        });
    };
    let admitted_at = admitted_at?;
    let (nodes, sum) = total(desired.iter());
    let end = r.end.as_ref().map(|t| t.0);
    let (basis, until, window) = if r.weekly.is_empty() {
        let until = dated_until(r);
        let start = r.start.as_ref().map_or(admitted_at, |t| t.0);
        (GuaranteeBasis::Reservation, until, Some((start, until)))
    } else {
        // The window in force now, else the next one (listed from a week
        // back, so the current one keeps its real start).
        let next = reservation::weekly_windows(r, now - WEEK, now + WEEK_AND_A_DAY)
            .unwrap_or_default()
            .into_iter()
            .find(|(_, e)| *e > now)
            .map(|(s, e)| (s, Some(e)));
        if next.is_none() && end.is_some_and(|e| e <= now) {
            // Past its end: no window is held any more.
            return None;
        }
        (GuaranteeBasis::Weekly, end, next)
    };
    Some(Guarantee {
        basis,
        nodes,
        cpu: sum.cpu,
        memory_mib: sum.memory_mib,
        until: until.map(Time),
        window: window.map(|(start, end)| HeldWindow {
            start: Time(start),
            end: end.map(Time),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use yukumo_api::virtualcluster::{EndAction, Weekday, WeeklyWindow};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn desired(n: usize) -> Vec<Resources> {
        vec![
            Resources {
                cpu: 2,
                memory_mib: 1024,
            };
            n
        ]
    }

    fn res(start: Option<&str>, end: Option<&str>, weekly: Vec<WeeklyWindow>) -> Reservation {
        Reservation {
            start: start.map(|s| Time(ts(s))),
            end: end.map(|s| Time(ts(s))),
            end_action: EndAction::Delete,
            weekly,
            time_zone: "UTC".into(),
        }
    }

    fn monday_9_to_12() -> WeeklyWindow {
        WeeklyWindow {
            days: vec![Weekday::Mon],
            start: "09:00".into(),
            end: "12:00".into(),
        }
    }

    #[test]
    fn a_cluster_without_reservation_holds_what_is_placed() {
        let placed = [Resources {
            cpu: 1,
            memory_mib: 512,
        }];
        let now = ts("2026-01-05T10:00:00Z");
        let g = guarantee(None, None, &desired(2), &placed, now).unwrap();
        assert_eq!(g.basis, GuaranteeBasis::Placed);
        assert_eq!((g.nodes, g.cpu, g.memory_mib), (1, 1, 512));
        assert_eq!((g.until, g.window), (None, None));
        assert!(guarantee(None, None, &desired(2), &[], now).is_none());
    }

    #[test]
    fn a_dated_reservation_is_guaranteed_for_its_window_once_admitted() {
        let r = res(
            Some("2026-01-10T00:00:00Z"),
            Some("2026-01-12T00:00:00Z"),
            vec![],
        );
        let now = ts("2026-01-05T10:00:00Z");
        assert!(
            guarantee(Some(&r), None, &desired(3), &[], now).is_none(),
            "not admitted"
        );
        let g = guarantee(Some(&r), Some(now), &desired(3), &[], now).unwrap();
        assert_eq!(g.basis, GuaranteeBasis::Reservation);
        assert_eq!((g.nodes, g.cpu, g.memory_mib), (3, 6, 3072));
        assert_eq!(g.until, Some(Time(ts("2026-01-12T00:00:00Z"))));
        let w = g.window.unwrap();
        assert_eq!(w.start, Time(ts("2026-01-10T00:00:00Z")));
        // `endAction: Stop`: the stopped nodes keep their hosts after the end.
        let mut stop = r.clone();
        stop.end_action = EndAction::Stop;
        let g = guarantee(Some(&stop), Some(now), &desired(3), &[], now).unwrap();
        assert_eq!(g.until, None);
        assert_eq!(g.window.unwrap().end, None);
    }

    #[test]
    fn a_weekly_cluster_shows_the_window_in_force_or_the_next_one() {
        let r = res(None, None, vec![monday_9_to_12()]);
        let admitted = Some(ts("2026-01-01T00:00:00Z"));
        // Sunday: the next Monday's window.
        let g = guarantee(
            Some(&r),
            admitted,
            &desired(1),
            &[],
            ts("2026-01-04T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(g.basis, GuaranteeBasis::Weekly);
        let w = g.window.unwrap();
        assert_eq!(w.start, Time(ts("2026-01-05T09:00:00Z")));
        assert_eq!(w.end, Some(Time(ts("2026-01-05T12:00:00Z"))));
        // Inside it: the same window, with its real start (stable status).
        let g2 = guarantee(
            Some(&r),
            admitted,
            &desired(1),
            &[],
            ts("2026-01-05T10:30:00Z"),
        )
        .unwrap();
        assert_eq!(
            g2,
            guarantee(
                Some(&r),
                admitted,
                &desired(1),
                &[],
                ts("2026-01-05T11:59:00Z")
            )
            .unwrap()
        );
        assert_eq!(g2.window.unwrap().start, Time(ts("2026-01-05T09:00:00Z")));
        // After it: next week's.
        let g3 = guarantee(
            Some(&r),
            admitted,
            &desired(1),
            &[],
            ts("2026-01-05T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(g3.window.unwrap().start, Time(ts("2026-01-12T09:00:00Z")));
        // With an end: guaranteed until then, nothing after.
        let ended = res(None, Some("2026-01-06T00:00:00Z"), vec![monday_9_to_12()]);
        let g4 = guarantee(
            Some(&ended),
            admitted,
            &desired(1),
            &[],
            ts("2026-01-05T10:00:00Z"),
        )
        .unwrap();
        assert_eq!(g4.until, Some(Time(ts("2026-01-06T00:00:00Z"))));
        assert!(
            guarantee(
                Some(&ended),
                admitted,
                &desired(1),
                &[],
                ts("2026-01-07T00:00:00Z")
            )
            .is_none()
        );
    }
}
