//! Reservations as a pure function of time: whether a cluster's nodes should
//! exist and run now, and when that next changes (to requeue exactly then).

use k8s_openapi::jiff::civil::{Date, Time as CivilTime};
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{Timestamp, ToSpan};
use yukumo_api::virtualcluster::{EndAction, Reservation, TransitionAction, Weekday, WeeklyWindow};

/// What the reservation asks for at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerPlan {
    /// Whether the nodes should exist (before `start`, or after `end` with
    /// `endAction: Delete`, they should not).
    pub exists: bool,
    /// Whether they should run.
    pub run: bool,
    /// The next instant at which this changes, and the action then.
    pub next: Option<(Timestamp, TransitionAction)>,
    /// Why, in a few words (for the status).
    pub why: &'static str,
}

fn weekday(d: Date) -> Weekday {
    use k8s_openapi::jiff::civil::Weekday as W;
    match d.weekday() {
        W::Monday => Weekday::Mon,
        W::Tuesday => Weekday::Tue,
        W::Wednesday => Weekday::Wed,
        W::Thursday => Weekday::Thu,
        W::Friday => Weekday::Fri,
        W::Saturday => Weekday::Sat,
        W::Sunday => Weekday::Sun,
    }
}

fn hhmm(s: &str) -> Option<CivilTime> {
    let (h, m) = s.split_once(':')?;
    CivilTime::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
}

/// The (start, end) instants of `w` for windows starting on `day`, if it starts that day.
fn instance(w: &WeeklyWindow, day: Date, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
    if !w.days.contains(&weekday(day)) {
        return None;
    }
    let (s, e) = (hhmm(&w.start)?, hhmm(&w.end)?);
    let start = day.to_datetime(s).to_zoned(tz.clone()).ok()?.timestamp();
    let end_day = if e > s {
        day
    } else {
        day.checked_add(1.day()).ok()?
    };
    let end = end_day
        .to_datetime(e)
        .to_zoned(tz.clone())
        .ok()?
        .timestamp();
    Some((start, end))
}

/// Whether `now` is inside a weekly window, and the next window boundary.
fn weekly(
    windows: &[WeeklyWindow],
    tz: &TimeZone,
    now: Timestamp,
) -> (bool, Option<(Timestamp, TransitionAction)>) {
    let today = now.to_zoned(tz.clone()).date();
    let mut inside = false;
    let mut next: Option<(Timestamp, TransitionAction)> = None;
    let mut consider = |t: Timestamp, what: TransitionAction| {
        if t > now && next.is_none_or(|(n, _)| t < n) {
            next = Some((t, what));
        }
    };
    for offset in -1i64..=8 {
        let Ok(day) = today.checked_add(offset.days()) else {
            continue;
        };
        for w in windows {
            if let Some((s, e)) = instance(w, day, tz) {
                if s <= now && now < e {
                    inside = true;
                }
                consider(s, TransitionAction::Start);
                consider(e, TransitionAction::Stop);
            }
        }
    }
    // While inside, a window start that falls inside another window is no boundary.
    if inside && matches!(next, Some((_, TransitionAction::Start))) {
        let later: Vec<(Timestamp, TransitionAction)> = (-1i64..=8)
            .filter_map(|o| today.checked_add(o.days()).ok())
            .flat_map(|d| windows.iter().filter_map(move |w| instance(w, d, tz)))
            .filter(|(_, e)| *e > now)
            .map(|(_, e)| (e, TransitionAction::Stop))
            .collect();
        next = later.into_iter().min_by_key(|(t, _)| *t);
    }
    (inside, next)
}

/// The weekly windows of `r` that overlap `from`..`until`, within its
/// `start`/`end`, overlapping or touching ones merged, in order (empty
/// without weekly windows). Errors name the field at fault.
pub fn weekly_windows(
    r: &Reservation,
    from: Timestamp,
    until: Timestamp,
) -> Result<Vec<(Timestamp, Timestamp)>, String> {
    if r.weekly.is_empty() {
        return Ok(vec![]);
    }
    let tz = TimeZone::get(&r.time_zone).map_err(|_| {
        format!(
            "spec.reservation.timeZone: {:?} is not a known IANA time zone",
            r.time_zone
        )
    })?;
    let lo = r.start.as_ref().map_or(from, |s| s.0.max(from));
    let hi = r.end.as_ref().map_or(until, |e| e.0.min(until));
    let first = from.to_zoned(tz.clone()).date();
    let tz = &tz;
    let days = (until.as_second() - from.as_second()).max(0) / 86_400 + 2;
    let mut all: Vec<(Timestamp, Timestamp)> = (-1..=days)
        .filter_map(|o| first.checked_add(o.days()).ok())
        .flat_map(|d| r.weekly.iter().filter_map(move |w| instance(w, d, tz)))
        .map(|(s, e)| (s.max(lo), e.min(hi)))
        .filter(|(s, e)| s < e)
        .collect();
    all.sort();
    let mut out: Vec<(Timestamp, Timestamp)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(out)
}

/// The plan for `reservation` at `now`. Errors name the field at fault.
pub fn plan(reservation: Option<&Reservation>, now: Timestamp) -> Result<PowerPlan, String> {
    let Some(r) = reservation else {
        return Ok(PowerPlan {
            exists: true,
            run: true,
            next: None,
            why: "no reservation",
        });
    };
    let tz = TimeZone::get(&r.time_zone).map_err(|_| {
        format!(
            "spec.reservation.timeZone: {:?} is not a known IANA time zone",
            r.time_zone
        )
    })?;
    let start = r.start.as_ref().map(|t| t.0);
    let end = r.end.as_ref().map(|t| t.0);
    if let Some(s) = start
        && now < s
    {
        return Ok(PowerPlan {
            exists: false,
            run: false,
            next: Some((s, TransitionAction::Start)),
            why: "reservation not started",
        });
    }
    if let Some(e) = end
        && now >= e
    {
        return Ok(match r.end_action {
            EndAction::Delete => PowerPlan {
                exists: false,
                run: false,
                next: None,
                why: "reservation ended",
            },
            EndAction::Stop => PowerPlan {
                exists: true,
                run: false,
                next: None,
                why: "reservation ended",
            },
        });
    }
    let end_next = end.map(|e| {
        (
            e,
            if r.end_action == EndAction::Delete {
                TransitionAction::Delete
            } else {
                TransitionAction::Stop
            },
        )
    });
    if r.weekly.is_empty() {
        return Ok(PowerPlan {
            exists: true,
            run: true,
            next: end_next,
            why: "inside the reservation",
        });
    }
    let (inside, next) = weekly(&r.weekly, &tz, now);
    let next = match (next, end_next) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    Ok(PowerPlan {
        exists: true,
        run: inside,
        next,
        why: if inside {
            "inside a weekly window"
        } else {
            "outside the weekly windows"
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn res(
        start: Option<&str>,
        end: Option<&str>,
        weekly: Vec<WeeklyWindow>,
        tz: &str,
        action: EndAction,
    ) -> Reservation {
        Reservation {
            start: start.map(|s| Time(ts(s))),
            end: end.map(|s| Time(ts(s))),
            end_action: action,
            weekly,
            time_zone: tz.into(),
        }
    }

    fn mon_9_12() -> WeeklyWindow {
        WeeklyWindow {
            days: vec![Weekday::Mon],
            start: "09:00".into(),
            end: "12:00".into(),
        }
    }

    #[test]
    fn start_and_end() {
        let r = res(
            Some("2026-11-23T10:00:00Z"),
            Some("2026-11-23T11:00:00Z"),
            vec![],
            "UTC",
            EndAction::Delete,
        );
        let before = plan(Some(&r), ts("2026-11-23T09:59:30Z")).unwrap();
        assert_eq!((before.exists, before.run), (false, false));
        assert_eq!(
            before.next,
            Some((ts("2026-11-23T10:00:00Z"), TransitionAction::Start))
        );
        let during = plan(Some(&r), ts("2026-11-23T10:30:00Z")).unwrap();
        assert_eq!((during.exists, during.run), (true, true));
        assert_eq!(
            during.next,
            Some((ts("2026-11-23T11:00:00Z"), TransitionAction::Delete))
        );
        let after = plan(Some(&r), ts("2026-11-23T11:00:00Z")).unwrap();
        assert_eq!((after.exists, after.run, after.next), (false, false, None));
        let r = res(
            None,
            Some("2026-11-23T11:00:00Z"),
            vec![],
            "UTC",
            EndAction::Stop,
        );
        let after = plan(Some(&r), ts("2026-11-24T00:00:00Z")).unwrap();
        assert_eq!((after.exists, after.run), (true, false));
    }

    #[test]
    fn weekly_window_in_a_time_zone() {
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        let r = res(
            None,
            None,
            vec![mon_9_12()],
            "Europe/Berlin",
            EndAction::Stop,
        );
        let early = plan(Some(&r), ts("2026-11-23T07:59:00Z")).unwrap();
        assert!(!early.run);
        assert_eq!(
            early.next,
            Some((ts("2026-11-23T08:00:00Z"), TransitionAction::Start))
        );
        let inside = plan(Some(&r), ts("2026-11-23T08:00:00Z")).unwrap();
        assert!(inside.run);
        assert_eq!(
            inside.next,
            Some((ts("2026-11-23T11:00:00Z"), TransitionAction::Stop))
        );
        let after = plan(Some(&r), ts("2026-11-23T11:00:00Z")).unwrap();
        assert!(!after.run);
        assert_eq!(
            after.next,
            Some((ts("2026-11-30T08:00:00Z"), TransitionAction::Start)),
            "next Monday"
        );
    }

    #[test]
    fn overnight_window_and_summer_time() {
        let w = WeeklyWindow {
            days: vec![Weekday::Sat],
            start: "22:00".into(),
            end: "02:00".into(),
        };
        let r = res(None, None, vec![w], "UTC", EndAction::Stop);
        // 2026-11-28 is a Saturday.
        assert!(plan(Some(&r), ts("2026-11-29T01:00:00Z")).unwrap().run);
        assert!(!plan(Some(&r), ts("2026-11-29T02:00:00Z")).unwrap().run);
        // Berlin in July is UTC+2.
        let r = res(
            None,
            None,
            vec![mon_9_12()],
            "Europe/Berlin",
            EndAction::Stop,
        );
        assert!(plan(Some(&r), ts("2026-07-06T07:30:00Z")).unwrap().run);
        assert!(!plan(Some(&r), ts("2026-07-06T06:30:00Z")).unwrap().run);
    }

    #[test]
    fn weekly_windows_are_listed_clipped_and_merged() {
        let mut r = res(None, None, vec![mon_9_12()], "UTC", EndAction::Stop);
        // From Sunday 2026-01-04 to two weeks later: two Mondays... and a third
        // cut short by `until`.
        let w = weekly_windows(&r, ts("2026-01-04T00:00:00Z"), ts("2026-01-19T10:00:00Z")).unwrap();
        assert_eq!(
            w,
            vec![
                (ts("2026-01-05T09:00:00Z"), ts("2026-01-05T12:00:00Z")),
                (ts("2026-01-12T09:00:00Z"), ts("2026-01-12T12:00:00Z")),
                (ts("2026-01-19T09:00:00Z"), ts("2026-01-19T10:00:00Z")),
            ]
        );
        // The current window counts from `from`; `end` cuts the list.
        r.end = Some(Time(ts("2026-01-12T11:00:00Z")));
        let w = weekly_windows(&r, ts("2026-01-05T10:00:00Z"), ts("2026-01-30T00:00:00Z")).unwrap();
        assert_eq!(
            w,
            vec![
                (ts("2026-01-05T10:00:00Z"), ts("2026-01-05T12:00:00Z")),
                (ts("2026-01-12T09:00:00Z"), ts("2026-01-12T11:00:00Z")),
            ]
        );
        // Overlapping windows merge.
        let mut long = mon_9_12();
        long.start = "11:00".into();
        long.end = "14:00".into();
        r.end = None;
        r.weekly.push(long);
        let w = weekly_windows(&r, ts("2026-01-04T00:00:00Z"), ts("2026-01-06T00:00:00Z")).unwrap();
        assert_eq!(
            w,
            vec![(ts("2026-01-05T09:00:00Z"), ts("2026-01-05T14:00:00Z"))]
        );
    }

    #[test]
    fn bad_time_zone_names_the_field() {
        let r = res(
            None,
            None,
            vec![mon_9_12()],
            "Mars/Olympus",
            EndAction::Stop,
        );
        assert!(
            plan(Some(&r), ts("2026-11-23T00:00:00Z"))
                .unwrap_err()
                .contains("spec.reservation.timeZone")
        );
    }
}
