//! Which backups a retention policy keeps: Proxmox Backup Server's prune rules, in local time.
//!
//! The backups are taken newest first in the order of the repository's chain (the last point is
//! the newest, whatever its time says: a clock that went back never makes the point just taken
//! look old); their times only say which period each falls in. The options are applied in the order `keepLast`,
//! `keepHourly`, `keepDaily`, `keepWeekly` (ISO weeks), `keepMonthly`, `keepYearly`. Each walks
//! the backups no earlier option has marked and keeps the newest backup of each period (the
//! backup itself for `keepLast`) whose period no earlier option kept a backup of, until it has
//! kept backups of N periods; a later backup of a period it already kept is marked for removal,
//! and later options skip it. Whatever no option kept is removed. Two rules of our own: the
//! newest backup is always kept (the next incremental is backed by it), and a policy with no
//! option keeps everything.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use diskchain_crd::Retention;

/// Whether an option has marked a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    Keep,
    Remove,
}

/// The period a backup (its time, its index) falls in, as an id.
type Period<'a> = dyn Fn(i64, usize) -> String + 'a;

/// The indexes (into `times`, UTC seconds, oldest point first as the repository's chain has them)
/// of the backups `policy` keeps, periods taken in time zone `tz`.
pub fn kept<Tz: TimeZone>(times: &[i64], policy: &Retention, tz: &Tz) -> BTreeSet<usize> {
    let all: BTreeSet<usize> = (0..times.len()).collect();
    let options: [(Option<u32>, &Period<'_>); 6] = [
        (policy.keep_last, &|_, i| i.to_string()),
        (policy.keep_hourly, &|t, _| {
            let d = local(t, tz);
            format!("{}/{}/{}/{}", d.year(), d.month(), d.day(), d.hour())
        }),
        (policy.keep_daily, &|t, _| {
            let d = local(t, tz);
            format!("{}/{}/{}", d.year(), d.month(), d.day())
        }),
        (policy.keep_weekly, &|t, _| {
            let w = local(t, tz).iso_week();
            format!("{}/{}", w.year(), w.week())
        }),
        (policy.keep_monthly, &|t, _| {
            let d = local(t, tz);
            format!("{}/{}", d.year(), d.month())
        }),
        (policy.keep_yearly, &|t, _| local(t, tz).year().to_string()),
    ];
    if options.iter().all(|(n, _)| n.is_none()) {
        return all;
    }
    // Newest first: the chain's order, never the clock's.
    let order: Vec<usize> = (0..times.len()).rev().collect();
    let mut marks: Vec<Option<Mark>> = vec![None; times.len()];
    for (keep, period) in options {
        let Some(keep) = keep else { continue };
        let already: HashSet<String> = order
            .iter()
            .filter(|i| marks[**i] == Some(Mark::Keep))
            .map(|i| period(times[*i], *i))
            .collect();
        let mut included: HashSet<String> = HashSet::new();
        for &i in &order {
            if marks[i].is_some() {
                continue;
            }
            let id = period(times[i], i);
            if already.contains(&id) {
                continue;
            }
            if !included.contains(&id) {
                if included.len() >= keep as usize {
                    break;
                }
                included.insert(id);
                marks[i] = Some(Mark::Keep);
            } else {
                marks[i] = Some(Mark::Remove);
            }
        }
    }
    let mut kept: BTreeSet<usize> = (0..times.len())
        .filter(|i| marks[*i] == Some(Mark::Keep))
        .collect();
    if let Some(newest) = order.first() {
        kept.insert(*newest);
    }
    kept
}

fn local<Tz: TimeZone>(t: i64, tz: &Tz) -> DateTime<Tz> {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .with_timezone(tz)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_point_just_taken_is_kept_when_the_clock_went_back() {
        // Taken at t0, t0+1h, then with the clock 2 h back: the last is the newest.
        let t0 = 1_800_000_000;
        let times = [t0, t0 + 3600, t0 - 3600];
        let policy = Retention {
            keep_last: Some(2),
            ..Default::default()
        };
        let kept = kept(&times, &policy, &chrono::Utc);
        assert_eq!(kept, [1, 2].into_iter().collect());
    }

    use super::*;
    use chrono::FixedOffset;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    fn policy(f: impl FnOnce(&mut Retention)) -> Retention {
        let mut r = Retention::default();
        f(&mut r);
        r
    }

    fn names(times: &[&str], kept: &BTreeSet<usize>) -> Vec<String> {
        kept.iter().map(|i| times[*i].to_string()).collect()
    }

    #[test]
    fn no_option_keeps_everything() {
        let t = [at("2026-01-01T00:00:00Z"), at("2026-01-02T00:00:00Z")];
        assert_eq!(kept(&t, &Retention::default(), &Utc).len(), 2);
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let s = [
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            "2026-01-03T00:00:00Z",
        ];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        let k = kept(&t, &policy(|r| r.keep_last = Some(2)), &Utc);
        assert_eq!(names(&s, &k), vec![s[1], s[2]]);
        // keepLast 0 still keeps the newest: the next incremental is backed by it.
        let k = kept(&t, &policy(|r| r.keep_last = Some(0)), &Utc);
        assert_eq!(names(&s, &k), vec![s[2]]);
    }

    /// Proxmox Backup Server's manual (Maintenance Tasks, Pruning): "keep-daily <N>: Keep backups
    /// for the last <N> days. If there is more than one backup for a single day, only the latest
    /// is retained." Days without a backup do not count.
    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        let s = [
            "2026-03-01T08:00:00Z",
            "2026-03-01T20:00:00Z",
            "2026-03-02T08:00:00Z",
            "2026-03-02T20:00:00Z",
            "2026-03-04T08:00:00Z",
            "2026-03-05T08:00:00Z",
            "2026-03-05T20:00:00Z",
        ];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        let k = kept(&t, &policy(|r| r.keep_daily = Some(3)), &Utc);
        assert_eq!(names(&s, &k), vec![s[3], s[4], s[6]]);
    }

    /// The manual: "The retention options are processed in the order given above. Each option
    /// only covers backups within its time period. The next option does not take care of
    /// already covered backups. It will only consider older backups." A backup an earlier option
    /// marked for removal is not counted again (as Proxmox's `mark_selections` does).
    #[test]
    fn options_apply_in_order_and_do_not_count_twice() {
        let s = [
            "2026-03-01T10:00:00Z",
            "2026-03-02T09:00:00Z",
            "2026-03-02T10:00:00Z",
            "2026-03-03T09:00:00Z",
            "2026-03-03T10:00:00Z",
        ];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        // keepLast 1 takes 03T10; keepDaily 2: the 3rd is covered, so the 2nd (its newest, 10:00)
        // and the 1st are kept; 03T09 and 02T09 go.
        let k = kept(
            &t,
            &policy(|r| {
                r.keep_last = Some(1);
                r.keep_daily = Some(2);
            }),
            &Utc,
        );
        assert_eq!(names(&s, &k), vec![s[0], s[2], s[4]]);
        // keepHourly 2 keeps 03T10 and 03T09; keepDaily 1 then finds the 3rd covered and keeps
        // the 2nd's newest.
        let k = kept(
            &t,
            &policy(|r| {
                r.keep_hourly = Some(2);
                r.keep_daily = Some(1);
            }),
            &Utc,
        );
        assert_eq!(names(&s, &k), vec![s[2], s[3], s[4]]);
    }

    #[test]
    fn weeks_are_iso_weeks_and_periods_are_local_time() {
        // 2026-01-04 is a Sunday (ISO week 1 of 2026 starts Monday 2025-12-29); 2026-01-05 is
        // the Monday of week 2.
        let s = [
            "2025-12-29T12:00:00Z",
            "2026-01-04T12:00:00Z",
            "2026-01-05T12:00:00Z",
        ];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        let k = kept(&t, &policy(|r| r.keep_weekly = Some(5)), &Utc);
        assert_eq!(names(&s, &k), vec![s[1], s[2]]);
        // 23:30 UTC is the next day at UTC+2: two backups on one local day.
        let s = ["2026-03-01T21:00:00Z", "2026-03-01T23:30:00Z"];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        let utc = kept(&t, &policy(|r| r.keep_daily = Some(5)), &Utc);
        assert_eq!(utc.len(), 1);
        let plus2 = FixedOffset::east_opt(2 * 3600).unwrap();
        let local = kept(&t, &policy(|r| r.keep_daily = Some(5)), &plus2);
        assert_eq!(local.len(), 2);
    }

    #[test]
    fn monthly_and_yearly_keep_the_newest_of_their_periods() {
        let s = [
            "2024-06-01T00:00:00Z",
            "2025-01-10T00:00:00Z",
            "2025-01-20T00:00:00Z",
            "2025-02-10T00:00:00Z",
            "2026-05-01T00:00:00Z",
        ];
        let t: Vec<i64> = s.iter().map(|x| at(x)).collect();
        let k = kept(
            &t,
            &policy(|r| {
                r.keep_monthly = Some(2);
                r.keep_yearly = Some(3);
            }),
            &Utc,
        );
        // Monthly: 2026-05 and 2025-02. Yearly: 2026 and 2025 covered, 2024 kept.
        assert_eq!(names(&s, &k), vec![s[0], s[3], s[4]]);
    }
}
