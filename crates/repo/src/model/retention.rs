//! Retention: which backups to keep, as a pure function of their times and a policy.
//!
//! The semantics are Proxmox's prune semantics. The rules run in the order last, hourly, daily,
//! weekly, monthly, yearly. Each rule walks the backups newest first and keeps the newest backup
//! of each period (hour, day, ISO week, month, year) until it has kept as many periods as it is
//! allowed; periods already covered by a backup an earlier rule kept do not count again.
//! Everything no rule keeps is removed. A policy with no rule keeps everything. The reference
//! system's "keep at most N" per schedule is `keep-last N`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDateTime, Timelike};

use super::error::ParseError;

/// How many periods each rule keeps; `None` (or 0) disables a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionPolicy {
    /// The N newest backups.
    pub last: Option<u32>,
    /// The newest backup of each of the N newest hours that have one.
    pub hourly: Option<u32>,
    /// ... of days.
    pub daily: Option<u32>,
    /// ... of ISO weeks.
    pub weekly: Option<u32>,
    /// ... of months.
    pub monthly: Option<u32>,
    /// ... of years.
    pub yearly: Option<u32>,
}

/// Why a backup is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KeepReason {
    /// No rule is set: everything is kept.
    NoPolicy,
    /// keep-last.
    Last,
    /// keep-hourly.
    Hourly,
    /// keep-daily.
    Daily,
    /// keep-weekly.
    Weekly,
    /// keep-monthly.
    Monthly,
    /// keep-yearly.
    Yearly,
}

/// The plan for one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionDecision<T> {
    /// The backup (whatever the caller identifies it by).
    pub backup: T,
    /// Kept, and why; `None` means removed.
    pub keep: Option<KeepReason>,
}

/// The period a backup falls in for a rule; keep-last counts backups, not times, so each backup
/// (its index `i` in the newest-first list) is its own period.
fn period(reason: KeepReason, i: usize, t: &NaiveDateTime) -> (i32, u32, u32, u32, usize) {
    let (a, b, c, d) = match reason {
        KeepReason::Last | KeepReason::NoPolicy => return (0, 0, 0, 0, i),
        KeepReason::Hourly => (t.year(), t.ordinal(), t.hour(), 0),
        KeepReason::Daily => (t.year(), t.ordinal(), 0, 0),
        KeepReason::Weekly => (t.iso_week().year(), t.iso_week().week(), 0, 0),
        KeepReason::Monthly => (t.year(), t.month(), 0, 0),
        KeepReason::Yearly => (t.year(), 0, 0, 0),
    };
    (a, b, c, d, usize::MAX)
}

impl RetentionPolicy {
    /// Keep the `n` newest backups (the reference system's per-schedule "keep at most N").
    pub fn keep_last(n: u32) -> Self {
        RetentionPolicy { last: Some(n), ..RetentionPolicy::default() }
    }

    fn rules(&self) -> Vec<(KeepReason, usize)> {
        [
            (KeepReason::Last, self.last),
            (KeepReason::Hourly, self.hourly),
            (KeepReason::Daily, self.daily),
            (KeepReason::Weekly, self.weekly),
            (KeepReason::Monthly, self.monthly),
            (KeepReason::Yearly, self.yearly),
        ]
        .into_iter()
        .filter_map(|(r, n)| n.filter(|n| *n > 0).map(|n| (r, n as usize)))
        .collect()
    }

    /// Decides for every backup, given its time. The result is newest first; equal times are
    /// ordered by `backup` so the plan never depends on the input order.
    pub fn plan<T: Clone + Ord>(&self, backups: &[(T, NaiveDateTime)]) -> Vec<RetentionDecision<T>> {
        let mut list: Vec<&(T, NaiveDateTime)> = backups.iter().collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let rules = self.rules();
        if rules.is_empty() {
            return list
                .into_iter()
                .map(|(b, _)| RetentionDecision { backup: b.clone(), keep: Some(KeepReason::NoPolicy) })
                .collect();
        }
        let mut kept: HashMap<usize, KeepReason> = HashMap::new();
        for (reason, allowed) in rules {
            let covered: HashSet<_> = kept.keys().map(|&i| period(reason, i, &list[i].1)).collect();
            let mut chosen = HashSet::new();
            for (i, (_, t)) in list.iter().enumerate() {
                if kept.contains_key(&i) {
                    continue;
                }
                let p = period(reason, i, t);
                if covered.contains(&p) || chosen.contains(&p) {
                    continue;
                }
                if chosen.len() >= allowed {
                    break;
                }
                chosen.insert(p);
                kept.insert(i, reason);
            }
        }
        list.into_iter()
            .enumerate()
            .map(|(i, (b, _))| RetentionDecision { backup: b.clone(), keep: kept.get(&i).copied() })
            .collect()
    }
}

impl fmt::Display for RetentionPolicy {
    /// `last=3,daily=7,...`: the form [`RetentionPolicy::from_str`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];
        let values = [self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly];
        let parts: Vec<String> = names.iter().zip(values).filter_map(|(n, v)| v.map(|v| format!("{n}={v}"))).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for RetentionPolicy {
    type Err = ParseError;
    /// Reads `last=3,daily=7,weekly=4` (any subset, any order; `keep-` prefixes accepted).
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let expected = "expected comma-separated RULE=N with RULE one of last, hourly, daily, weekly, monthly, yearly";
        let mut p = RetentionPolicy::default();
        let mut pos = 0;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let at = s[pos..].find(item).map_or(pos, |i| pos + i);
            pos = at + item.len();
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ParseError::new("retention", s, at, format!("{item:?} has no =N"), expected))?;
            let n: u32 = value.parse().map_err(|_| {
                ParseError::new("retention", s, at + key.len() + 1, format!("{value:?} is not a count"), expected)
            })?;
            let slot = match key.trim_start_matches("keep-") {
                "last" => &mut p.last,
                "hourly" => &mut p.hourly,
                "daily" => &mut p.daily,
                "weekly" => &mut p.weekly,
                "monthly" => &mut p.monthly,
                "yearly" => &mut p.yearly,
                _ => return Err(ParseError::new("retention", s, at, format!("unknown rule {key:?}"), expected)),
            };
            if slot.replace(n).is_some() {
                return Err(ParseError::new("retention", s, at, format!("{key} is given twice"), expected));
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(y: i32, m: u32, d: u32, h: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d).unwrap().and_hms_opt(h, 0, 0).unwrap()
    }

    fn kept(policy: RetentionPolicy, times: &[NaiveDateTime]) -> Vec<NaiveDateTime> {
        let backups: Vec<(NaiveDateTime, NaiveDateTime)> = times.iter().map(|t| (*t, *t)).collect();
        policy.plan(&backups).into_iter().filter(|d| d.keep.is_some()).map(|d| d.backup).collect()
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_and_skips_days_last_covered() {
        let times = [at(2026, 1, 3, 10), at(2026, 1, 3, 8), at(2026, 1, 2, 20), at(2026, 1, 2, 9), at(2026, 1, 1, 5)];
        // last=1 keeps Jan 3 10:00; daily=2 then skips Jan 3 (covered) and keeps Jan 2 20:00 and Jan 1.
        let p = RetentionPolicy { last: Some(1), daily: Some(2), ..Default::default() };
        assert_eq!(kept(p, &times), [at(2026, 1, 3, 10), at(2026, 1, 2, 20), at(2026, 1, 1, 5)]);
        assert_eq!(kept(RetentionPolicy::keep_last(2), &times), [at(2026, 1, 3, 10), at(2026, 1, 3, 8)]);
        assert_eq!(kept(RetentionPolicy::default(), &times).len(), 5);
    }

    #[test]
    fn keep_last_counts_backups_even_with_equal_times() {
        // Backups made within one second (ids with -N suffixes) are distinct backups.
        let same = [("a", at(2026, 1, 3, 10)), ("b", at(2026, 1, 3, 10)), ("c", at(2026, 1, 3, 10))];
        let plan = RetentionPolicy::keep_last(2).plan(&same);
        let kept: Vec<&str> = plan.iter().filter(|d| d.keep.is_some()).map(|d| d.backup).collect();
        assert_eq!(kept, ["c", "b"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_and_monthly_and_yearly_their_periods() {
        // 2026-01-04 is a Sunday (ISO week 1), 2026-01-05 a Monday (week 2).
        let times = [at(2026, 1, 5, 1), at(2026, 1, 4, 1), at(2025, 12, 29, 1), at(2025, 12, 1, 1), at(2024, 6, 1, 1)];
        let weekly = RetentionPolicy { weekly: Some(2), ..Default::default() };
        assert_eq!(kept(weekly, &times), [at(2026, 1, 5, 1), at(2026, 1, 4, 1)]);
        let monthly = RetentionPolicy { monthly: Some(3), ..Default::default() };
        assert_eq!(kept(monthly, &times), [at(2026, 1, 5, 1), at(2025, 12, 29, 1), at(2024, 6, 1, 1)]);
        let yearly = RetentionPolicy { yearly: Some(5), ..Default::default() };
        assert_eq!(kept(yearly, &times), [at(2026, 1, 5, 1), at(2025, 12, 29, 1), at(2024, 6, 1, 1)]);
    }

    #[test]
    fn policies_parse_and_display() {
        let p: RetentionPolicy = "last=3,keep-daily=7,weekly=4".parse().unwrap();
        assert_eq!(p, RetentionPolicy { last: Some(3), daily: Some(7), weekly: Some(4), ..Default::default() });
        assert_eq!(p.to_string(), "last=3,daily=7,weekly=4");
        assert_eq!(p.to_string().parse::<RetentionPolicy>().unwrap(), p);
        let e = "last=3,dayly=2".parse::<RetentionPolicy>().unwrap_err();
        assert_eq!(e.position, 7);
        assert!("last=x".parse::<RetentionPolicy>().unwrap_err().problem.contains("not a count"));
        assert!("last=1,last=2".parse::<RetentionPolicy>().unwrap_err().problem.contains("twice"));
    }
}
