//! Backup schedules: every few minutes (5, 10, 15, 20 or 30), hourly, daily, weekly or monthly
//! at a time in a time zone, and when one is due. Pure functions of the schedule, its last run and the current time (no I/O), so that
//! `nasbak run-due` can be called every minute by a timer and the decision is tested on its own.
//!
//! A schedule is due when its most recent occurrence at or before now is later than both its
//! last run and its creation: a host that was down at 02:00 runs the missed backup once when it
//! is back (like systemd's `Persistent=true`), never once per missed occurrence.
//!
//! Local times that do not exist (the hour skipped when clocks go forward) run at the first
//! minute after the gap; local times that exist twice (clocks go back) run at the first of them.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::Tz;

/// How often a schedule runs (written as `5m`..`30m`, `hourly`, `daily`, `weekly`, `monthly`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Every {
    /// Every few minutes (a divisor of an hour: 5, 10, 15, 20 or 30), at a minute past each
    /// of those marks.
    Minutes(u32),
    /// Every hour at a minute.
    Hourly,
    /// Every day at a time.
    Daily,
    /// Every week on a weekday at a time.
    Weekly,
    /// Every month on a day at a time (days past the month's end run on its last day).
    Monthly,
}

impl serde::Serialize for Every {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Every {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Every {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hourly" => Ok(Every::Hourly),
            "daily" => Ok(Every::Daily),
            "weekly" => Ok(Every::Weekly),
            "monthly" => Ok(Every::Monthly),
            _ => match s.strip_suffix('m').and_then(|n| n.parse::<u32>().ok()) {
                Some(n) if MINUTE_STEPS.contains(&n) => Ok(Every::Minutes(n)),
                _ => Err(format!(
                    "unknown interval {s:?}; expected 5m, 10m, 15m, 20m, 30m, hourly, daily, weekly or monthly"
                )),
            },
        }
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Every::Minutes(n) = self {
            return write!(f, "{n}m");
        }
        f.write_str(match self {
            Every::Minutes(_) => unreachable!("written above"),
            Every::Hourly => "hourly",
            Every::Daily => "daily",
            Every::Weekly => "weekly",
            Every::Monthly => "monthly",
        })
    }
}

/// When in its period a schedule runs, parsed from `--at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    every: Every,
    minute: u32,
    hour: u32,
    weekday: Weekday,
    day: u32,
}

/// The minute intervals a schedule may have: those that divide an hour.
pub const MINUTE_STEPS: [u32; 5] = [5, 10, 15, 20, 30];

/// What `--at` looks like for each interval.
pub const AT_FORMS: &str = "every N minutes: M (minutes past each mark, below N, e.g. 0); hourly: MM (minute, e.g. 15); \
     daily: HH:MM; weekly: DAY HH:MM (mon..sun); monthly: D HH:MM (day 1..31)";

impl At {
    /// Parses `spec` for `every`: `MM`, `HH:MM`, `DAY HH:MM` or `D HH:MM`.
    pub fn parse(every: Every, spec: &str) -> Result<At, String> {
        let bad = |why: &str| format!("--at {spec:?} for a {every} schedule: {why}; expected {AT_FORMS}");
        let time = |t: &str| -> Result<(u32, u32), String> {
            let (h, m) = t.split_once(':').ok_or_else(|| bad("the time must be HH:MM"))?;
            let h: u32 = h.parse().ok().filter(|h| *h < 24).ok_or_else(|| bad("the hour must be 0 to 23"))?;
            let m: u32 = m.parse().ok().filter(|m| *m < 60).ok_or_else(|| bad("the minute must be 0 to 59"))?;
            Ok((h, m))
        };
        let mut at = At { every, minute: 0, hour: 0, weekday: Weekday::Mon, day: 1 };
        let words: Vec<&str> = spec.split_whitespace().collect();
        match (every, words.as_slice()) {
            (Every::Minutes(n), [m]) => {
                at.minute = m
                    .trim_start_matches(':')
                    .parse()
                    .ok()
                    .filter(|m| *m < n)
                    .ok_or_else(|| bad(&format!("minutes past each mark, 0 to {}", n - 1)))?;
            }
            (Every::Hourly, [m]) => {
                at.minute =
                    m.trim_start_matches(':').parse().ok().filter(|m| *m < 60).ok_or_else(|| bad("minute 0 to 59"))?;
            }
            (Every::Daily, [t]) => (at.hour, at.minute) = time(t)?,
            (Every::Weekly, [d, t]) => {
                at.weekday = d.parse().map_err(|_| bad("the day must be mon, tue, wed, thu, fri, sat or sun"))?;
                (at.hour, at.minute) = time(t)?;
            }
            (Every::Monthly, [d, t]) => {
                at.day =
                    d.parse().ok().filter(|d| (1..=31).contains(d)).ok_or_else(|| bad("the day must be 1 to 31"))?;
                (at.hour, at.minute) = time(t)?;
            }
            _ => return Err(bad("wrong number of fields")),
        }
        Ok(at)
    }

    /// The occurrence in the period containing local time `t`, as a local time.
    fn in_period_of(&self, t: NaiveDateTime) -> NaiveDateTime {
        let hm = NaiveTime::from_hms_opt(self.hour, self.minute, 0).expect("validated on parse");
        match self.every {
            Every::Minutes(n) => {
                // The marks of an hour are self.minute, +n, ...: the last at or before t, in
                // the previous hour when t's minute comes before the first.
                let hour = t.date().and_hms_opt(t.hour(), 0, 0).expect("a whole hour");
                let m = t.minute();
                if m >= self.minute {
                    hour + Duration::minutes(i64::from(self.minute + (m - self.minute) / n * n))
                } else {
                    let last = self.minute + (59 - self.minute) / n * n;
                    hour - Duration::hours(1) + Duration::minutes(i64::from(last))
                }
            }
            Every::Hourly => t.date().and_hms_opt(t.hour(), self.minute, 0).expect("validated on parse"),
            Every::Daily => t.date().and_time(hm),
            Every::Weekly => {
                let monday = t.date() - Duration::days(i64::from(t.weekday().num_days_from_monday()));
                (monday + Duration::days(i64::from(self.weekday.num_days_from_monday()))).and_time(hm)
            }
            Every::Monthly => {
                let first = NaiveDate::from_ymd_opt(t.year(), t.month(), 1).expect("a real month");
                let next = first.checked_add_months(chrono::Months::new(1)).expect("in range");
                let last_day = (next - Duration::days(1)).day();
                first.with_day(self.day.min(last_day)).expect("clamped to the month").and_time(hm)
            }
        }
    }

    /// The start of the period before the one containing `t`.
    fn previous_period(&self, t: NaiveDateTime) -> NaiveDateTime {
        match self.every {
            Every::Minutes(n) => t - Duration::minutes(i64::from(n)),
            Every::Hourly => t - Duration::hours(1),
            Every::Daily => t - Duration::days(1),
            Every::Weekly => t - Duration::weeks(1),
            Every::Monthly => {
                let first = t.date().with_day(1).expect("day 1 exists");
                first.checked_sub_months(chrono::Months::new(1)).expect("in range").and_time(t.time())
            }
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.every {
            Every::Minutes(_) => write!(f, "{}", self.minute),
            Every::Hourly => write!(f, "{:02}", self.minute),
            Every::Daily => write!(f, "{:02}:{:02}", self.hour, self.minute),
            Every::Weekly => {
                write!(f, "{} {:02}:{:02}", self.weekday.to_string().to_lowercase(), self.hour, self.minute)
            }
            Every::Monthly => write!(f, "{} {:02}:{:02}", self.day, self.hour, self.minute),
        }
    }
}

/// Maps a local time to UTC: the first instant of an ambiguous time, the first minute after a
/// gap for a time that does not exist.
fn to_utc(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut t = local;
    for _ in 0..(24 * 60) {
        if let Some(dt) = tz.from_local_datetime(&t).earliest() {
            return dt.with_timezone(&Utc);
        }
        t += Duration::minutes(1);
    }
    // No zone has a gap of a day; fall back to reading the local time as UTC.
    Utc.from_utc_datetime(&local)
}

/// Parses a time-zone name (`UTC`, `Europe/Berlin`, ...).
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("unknown time zone {name:?}; expected an IANA name such as UTC or Europe/Berlin"))
}

/// The most recent occurrence of `at` in `tz` at or before `now`.
pub fn latest_occurrence(at: &At, tz: Tz, now: DateTime<Utc>) -> DateTime<Utc> {
    if let Every::Minutes(_) = at.every {
        // Every few minutes is a cadence in absolute time: the marks are taken in the zone's
        // offset at `now` (a zone half an hour off UTC shifts them), never through local times
        // that a change of offset makes ambiguous.
        let offset =
            Duration::seconds(i64::from(chrono::Offset::fix(now.with_timezone(&tz).offset()).local_minus_utc()));
        let mark = at.in_period_of(now.naive_utc() + offset);
        return Utc.from_utc_datetime(&(mark - offset));
    }
    let local_now = now.with_timezone(&tz).naive_local();
    let mut period = local_now;
    // The occurrence of this period may still be ahead; the previous period's is not (a DST gap
    // moves an occurrence by at most an hour, so two periods back always suffice).
    for _ in 0..3 {
        let candidate = to_utc(tz, at.in_period_of(period));
        if candidate <= now {
            return candidate;
        }
        period = at.previous_period(period);
    }
    to_utc(tz, at.in_period_of(period))
}

/// Whether a schedule created at `created` and last run at `last_run` is due at `now`.
pub fn is_due(at: &At, tz: Tz, created: DateTime<Utc>, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    let occurrence = latest_occurrence(at, tz, now);
    occurrence > created && last_run.is_none_or(|l| occurrence > l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn at_forms_parse_and_print_back() {
        for (every, spec, shown) in [
            (Every::Hourly, "15", "15"),
            (Every::Hourly, ":05", "05"),
            (Every::Daily, "2:30", "02:30"),
            (Every::Weekly, "sun 23:00", "sun 23:00"),
            (Every::Monthly, "31 01:00", "31 01:00"),
        ] {
            let at = At::parse(every, spec).unwrap();
            assert_eq!(at.to_string(), shown);
            assert_eq!(At::parse(every, shown).unwrap(), at);
        }
        for (every, spec, says) in [
            (Every::Daily, "24:00", "hour"),
            (Every::Daily, "1:60", "minute"),
            (Every::Daily, "noon", "HH:MM"),
            (Every::Weekly, "someday 01:00", "mon, tue"),
            (Every::Monthly, "0 01:00", "1 to 31"),
            (Every::Hourly, "1 2", "fields"),
        ] {
            let e = At::parse(every, spec).unwrap_err();
            assert!(e.contains(says) && e.contains(spec) && e.contains("expected"), "{e}");
        }
        assert!(parse_tz("Mars/Olympus").unwrap_err().contains("IANA"));
    }

    #[test]
    fn occurrences_in_each_interval() {
        let tz = parse_tz("UTC").unwrap();
        let now = utc("2026-11-27T10:20:00Z"); // a Friday
        let occ = |e, s| latest_occurrence(&At::parse(e, s).unwrap(), tz, now);
        assert_eq!(occ(Every::Hourly, "15"), utc("2026-11-27T10:15:00Z"));
        assert_eq!(occ(Every::Hourly, "30"), utc("2026-11-27T09:30:00Z"));
        assert_eq!(occ(Every::Daily, "10:20"), now);
        assert_eq!(occ(Every::Daily, "11:00"), utc("2026-11-26T11:00:00Z"));
        assert_eq!(occ(Every::Weekly, "fri 09:00"), utc("2026-11-27T09:00:00Z"));
        assert_eq!(occ(Every::Weekly, "sat 09:00"), utc("2026-11-21T09:00:00Z"));
        assert_eq!(occ(Every::Monthly, "28 00:00"), utc("2026-10-28T00:00:00Z"));
        // Day 31 in a 30-day month runs on the 30th.
        assert_eq!(occ(Every::Monthly, "31 00:00"), utc("2026-10-31T00:00:00Z"));
        let dec = utc("2026-12-01T00:00:00Z");
        assert_eq!(
            latest_occurrence(&At::parse(Every::Monthly, "31 00:00").unwrap(), tz, dec),
            utc("2026-11-30T00:00:00Z")
        );
    }

    #[test]
    fn time_zones_and_dst() {
        let berlin = parse_tz("Europe/Berlin").unwrap();
        let at = At::parse(Every::Daily, "02:30").unwrap();
        // Winter: 02:30 CET is 01:30 UTC.
        assert_eq!(latest_occurrence(&at, berlin, utc("2026-11-27T12:00:00Z")), utc("2026-11-27T01:30:00Z"));
        // 2026-03-29 has no 02:30 in Berlin: the run is at 03:00 CEST (01:00 UTC).
        assert_eq!(latest_occurrence(&at, berlin, utc("2026-03-29T12:00:00Z")), utc("2026-03-29T01:00:00Z"));
        // 2026-10-25 has 02:30 twice: the first (CEST, 00:30 UTC).
        assert_eq!(latest_occurrence(&at, berlin, utc("2026-10-25T12:00:00Z")), utc("2026-10-25T00:30:00Z"));
    }

    #[test]
    fn every_few_minutes() {
        let tz = parse_tz("Europe/Berlin").unwrap();
        assert_eq!("15m".parse::<Every>(), Ok(Every::Minutes(15)));
        assert_eq!(Every::Minutes(5).to_string(), "5m");
        for bad in ["7m", "0m", "60m", "m", "15"] {
            assert!(bad.parse::<Every>().unwrap_err().contains("5m, 10m"), "{bad}");
        }
        assert!(At::parse(Every::Minutes(15), "15").unwrap_err().contains("0 to 14"));
        let at = At::parse(Every::Minutes(15), "5").unwrap();
        assert_eq!(at.to_string(), "5");
        let occ = |now: &str| latest_occurrence(&at, tz, utc(now));
        assert_eq!(occ("2026-11-27T10:20:00Z"), utc("2026-11-27T10:20:00Z"));
        assert_eq!(occ("2026-11-27T10:34:59Z"), utc("2026-11-27T10:20:00Z"));
        assert_eq!(occ("2026-11-27T10:03:00Z"), utc("2026-11-27T09:50:00Z"));
        let at = At::parse(Every::Minutes(5), "0").unwrap();
        let created = utc("2026-11-27T10:00:30Z");
        assert!(!is_due(&at, tz, created, None, utc("2026-11-27T10:04:59Z")));
        assert!(is_due(&at, tz, created, None, utc("2026-11-27T10:05:00Z")));
        let ran = utc("2026-11-27T10:05:02Z");
        assert!(!is_due(&at, tz, created, Some(ran), utc("2026-11-27T10:09:00Z")));
        assert!(is_due(&at, tz, created, Some(ran), utc("2026-11-27T10:10:00Z")));
        // Across the clocks going back (Berlin, 2026-10-25): still every five minutes.
        assert_eq!(latest_occurrence(&at, tz, utc("2026-10-25T01:07:00Z")), utc("2026-10-25T01:05:00Z"));
    }

    #[test]
    fn due_once_per_occurrence_and_never_before_creation() {
        let tz = parse_tz("UTC").unwrap();
        let at = At::parse(Every::Daily, "02:00").unwrap();
        let created = utc("2026-11-26T12:00:00Z");
        // Created yesterday at noon: yesterday's 02:00 does not count, today's does.
        assert!(!is_due(&at, tz, created, None, utc("2026-11-27T01:59:00Z")));
        assert!(is_due(&at, tz, created, None, utc("2026-11-27T02:00:00Z")));
        let ran = utc("2026-11-27T02:00:30Z");
        assert!(!is_due(&at, tz, created, Some(ran), utc("2026-11-27T02:01:00Z")));
        assert!(!is_due(&at, tz, created, Some(ran), utc("2026-11-28T01:59:00Z")));
        // A host down for three days runs the missed backup once.
        assert!(is_due(&at, tz, created, Some(ran), utc("2026-11-30T09:00:00Z")));
        assert!(!is_due(&at, tz, created, Some(utc("2026-11-30T09:00:10Z")), utc("2026-11-30T09:01:00Z")));
    }
}
