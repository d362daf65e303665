//! Cron schedules: which tick of a schedule is due, decided from the clock and
//! the last tick started (pure; the engine starts the instance, idempotent by
//! the tick).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A schedule: start an instance of `flow` with `input` at every tick of
/// `cron` in `timezone`. Each tick starts one instance, whatever the number of
/// workers and processes (the start is idempotent by the tick).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Its name (unique; letters, digits, `_`, `.`, `-`).
    pub name: String,
    /// The flow it starts (its latest version at each tick).
    pub flow: String,
    /// A cron expression with seconds: `sec min hour day-of-month month
    /// day-of-week [year]`, e.g. `0 */5 * * * *` (every five minutes).
    pub cron: String,
    /// The IANA time zone the expression is read in (default `UTC`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// The input of each instance.
    #[serde(default = "empty_object")]
    pub input: Value,
    /// What happens to ticks that passed while no worker ran.
    #[serde(default)]
    pub missed: MissedTicks,
}

fn utc() -> String {
    "UTC".into()
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// What a schedule does about ticks missed while no worker ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedTicks {
    /// Start nothing for them; go on with the next tick (default).
    #[default]
    Skip,
    /// Start one instance, for the latest of them.
    RunOnce,
}

/// How late a tick may be started and still count as on time (not missed):
/// a worker busy or between polls, not down.
pub const ON_TIME: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// At most this many ticks are stepped over when catching up (a schedule of
/// every second after a day down is 86,400); beyond, the search starts later.
const MAX_STEPS: usize = 100_000;

impl Schedule {
    /// Every problem of the schedule, one line each (its flow's existence is
    /// checked by the engine).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        };
        if !valid(&self.name) {
            out.push(format!(
                "name {:?} must be non-empty and contain only letters, digits, '_', '.' and '-'",
                self.name
            ));
        }
        if !valid(&self.flow) {
            out.push(format!("flow {:?} is not a valid flow name", self.flow));
        }
        if let Err(e) = cron::Schedule::from_str(&self.cron) {
            out.push(format!(
                "cron {:?} does not parse ({e}); it has seconds first: \"sec min hour day month weekday\"",
                self.cron
            ));
        }
        if self.timezone.parse::<chrono_tz::Tz>().is_err() {
            out.push(format!(
                "timezone {:?} is not an IANA time zone (such as UTC or Europe/Amsterdam)",
                self.timezone
            ));
        }
        if !self.input.is_object() {
            out.push("input must be a JSON object".into());
        }
        out
    }

    /// The tick to start at `now`, if one is due, given `since`, the last
    /// tick started (or when the schedule was set): the earliest tick after it
    /// that is on time (at most [`ON_TIME`] ago), so a worker that fell behind
    /// catches up tick by tick; for `run_once`, first the latest of the ticks
    /// missed before those. `None` for an invalid expression or zone.
    pub fn due(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let cron = cron::Schedule::from_str(&self.cron).ok()?;
        let tz: chrono_tz::Tz = self.timezone.parse().ok()?;
        // Far behind: only the last day counts (run_once starts one tick).
        let start = since.max(now - chrono::TimeDelta::days(1));
        let mut missed = None;
        for t in cron.after(&start.with_timezone(&tz)).take(MAX_STEPS) {
            let t = t.with_timezone(&Utc);
            if t > now {
                break;
            }
            if now - t > ON_TIME {
                missed = Some(t);
                continue;
            }
            return Some(match (self.missed, missed) {
                (MissedTicks::RunOnce, Some(m)) => m,
                _ => t,
            });
        }
        missed.filter(|_| self.missed == MissedTicks::RunOnce)
    }

    /// The first tick after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let cron = cron::Schedule::from_str(&self.cron).ok()?;
        let tz: chrono_tz::Tz = self.timezone.parse().ok()?;
        cron.after(&after.with_timezone(&tz))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The business key of the instance started for `tick`: the start is
    /// idempotent by it, so every worker may try and one instance results.
    pub fn key(&self, tick: DateTime<Utc>) -> String {
        format!(
            "schedule:{}:{}",
            self.name,
            tick.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn every(cron: &str, missed: MissedTicks) -> Schedule {
        Schedule {
            name: "s".into(),
            flow: "f".into(),
            cron: cron.into(),
            timezone: "UTC".into(),
            input: empty_object(),
            missed,
        }
    }

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, h, m, s).unwrap()
    }

    #[test]
    fn the_latest_tick_on_time_is_due_and_a_started_one_is_not() {
        let s = every("0 */5 * * * *", MissedTicks::Skip);
        assert_eq!(s.due(at(9, 0, 0), at(9, 5, 3)), Some(at(9, 5, 0)));
        // Started already: nothing until the next tick.
        assert_eq!(s.due(at(9, 5, 0), at(9, 7, 0)), None);
        assert_eq!(s.next_after(at(9, 5, 0)), Some(at(9, 10, 0)));
        assert_eq!(s.key(at(9, 5, 0)), "schedule:s:2026-12-01T09:05:00Z");
    }

    #[test]
    fn missed_ticks_are_skipped_or_run_once() {
        // Down from 9:00 to 9:33: ticks at 9:05 ... 9:30 passed.
        let skip = every("0 */5 * * * *", MissedTicks::Skip);
        assert_eq!(skip.due(at(9, 0, 0), at(9, 33, 0)), None);
        assert_eq!(skip.due(at(9, 0, 0), at(9, 35, 10)), Some(at(9, 35, 0)));
        let once = every("0 */5 * * * *", MissedTicks::RunOnce);
        assert_eq!(once.due(at(9, 0, 0), at(9, 33, 0)), Some(at(9, 30, 0)));
        // ... and once only: the next is the next tick.
        assert_eq!(once.due(at(9, 30, 0), at(9, 34, 0)), None);
        // Missed ones before an on-time one: the latest missed first, then it.
        assert_eq!(once.due(at(9, 0, 0), at(9, 35, 10)), Some(at(9, 30, 0)));
        assert_eq!(once.due(at(9, 30, 0), at(9, 35, 10)), Some(at(9, 35, 0)));
    }

    #[test]
    fn a_worker_behind_catches_up_tick_by_tick_while_on_time() {
        let s = every("* * * * * *", MissedTicks::Skip);
        assert_eq!(s.due(at(9, 0, 0), at(9, 0, 3)), Some(at(9, 0, 1)));
        assert_eq!(s.due(at(9, 0, 1), at(9, 0, 3)), Some(at(9, 0, 2)));
    }

    #[test]
    fn a_time_zone_moves_the_ticks() {
        let mut s = every("0 0 9 * * *", MissedTicks::Skip);
        s.timezone = "Europe/Amsterdam".into();
        // 9:00 in Amsterdam in December is 8:00 UTC.
        assert_eq!(s.next_after(at(0, 0, 0)), Some(at(8, 0, 0)));
    }

    #[test]
    fn problems_name_what_is_wrong() {
        let mut s = every("every minute", MissedTicks::Skip);
        s.timezone = "Mars/Olympus".into();
        s.name = "bad name".into();
        let p = s.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[1].starts_with("cron \"every minute\" does not parse"),
            "{p:?}"
        );
        assert!(p[2].contains("Mars/Olympus"), "{p:?}");
    }
}
