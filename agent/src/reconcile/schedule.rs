//! When a disk's scheduled backup or verify is due. A schedule is a 5-field cron expression in
//! local time (croner). A run is due when an occurrence of the schedule falls after the last run
//! (the newest point in the repository for a backup, the last verify for a verify) and at or
//! before now, so one missed while the agent was down runs once when it starts, never more.

use serde::{Deserialize, Serialize};

/// The first occurrence of `cron` strictly after `after` (UTC seconds), in local time.
pub fn next_after(cron: &str, after: i64) -> Option<i64> {
    let c = diskchain_crd::parse_cron(cron).ok()?;
    let start =
        chrono::DateTime::<chrono::Utc>::from_timestamp(after, 0)?.with_timezone(&chrono::Local);
    c.find_next_occurrence(&start, false)
        .ok()
        .map(|t| t.timestamp())
}

/// True when `cron` has an occurrence in `(last, now]`. A last run dated after `now` was taken
/// while the clock was ahead: when it really ran is unknown, so a run is due (a valid
/// expression) and the schedule goes on from the clock as it is, never waiting for that date.
pub fn due(cron: &str, last: i64, now: i64) -> bool {
    if last > now {
        return next_after(cron, now).is_some();
    }
    next_after(cron, last).is_some_and(|t| t <= now)
}

/// What the agent knows of one disk's backups (in `agent.json`; `status` shows it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTrack {
    /// The newest point, and when it was taken (UTC seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point: Option<String>,
    /// When the newest point was taken.
    #[serde(default)]
    pub last_unix: i64,
    /// How the last backup the agent took was taken, and the bytes it wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kind: Option<String>,
    /// Bytes the last backup wrote.
    #[serde(default)]
    pub last_bytes: u64,
    /// When the next scheduled backup is due (UTC seconds; 0: no schedule).
    #[serde(default)]
    pub next_unix: i64,
    /// Points in the repository.
    #[serde(default)]
    pub points: usize,
    /// Failed backups in a row.
    #[serde(default)]
    pub failures: u32,
    /// Why the last backup or verify failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the last verify ran (UTC seconds), and whether it found the repository sound.
    #[serde(default)]
    pub last_verify_unix: i64,
    /// The last verify found every point sound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_ok: Option<bool>,
    /// When the next scheduled verify is due.
    #[serde(default)]
    pub next_verify_unix: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_run_is_due_once() {
        // Every day at 02:00 local time; the last run a few days ago.
        let now = chrono::Local::now().timestamp();
        let last = now - 3 * 86_400;
        assert!(due("0 2 * * *", last, now));
        // Right after a run nothing is due until the next occurrence.
        let next = next_after("0 2 * * *", now).unwrap();
        assert!(!due("0 2 * * *", now, now));
        assert!(next > now && next - now <= 86_400 + 3600);
        assert!(due("0 2 * * *", now, next));
    }

    #[test]
    fn a_run_dated_ahead_of_the_clock_does_not_stall_the_schedule() {
        let now = chrono::Local::now().timestamp();
        // The last point was taken while the clock was a day ahead.
        let last = now + 86_400;
        assert!(due("* * * * *", last, now));
        assert!(due("0 2 * * *", last, now));
        assert!(!due("not cron", last, now));
    }

    #[test]
    fn a_bad_expression_is_never_due() {
        assert!(!due("not cron", 0, i64::MAX / 2));
        assert_eq!(next_after("* * * * * *", 0), None);
    }
}
