//! `schedule = ["Mon-Fri 09:00-17:00"]` with `timezone = "Europe/Berlin"`: when new
//! connections are accepted. Windows may cross midnight (`Fri 22:00-02:00` includes
//! Saturday 01:00).

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const FULL_DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    tz: Tz,
}

#[derive(Debug, Clone)]
struct Window {
    /// Index 0 is Monday; the day a window starts on.
    days: [bool; 7],
    /// Minutes since local midnight; `end <= start` means it ends the next day.
    start: u32,
    end: u32,
}

#[derive(Debug)]
pub enum ScheduleError {
    Window(usize, String),
    Timezone(String),
}

impl ScheduleError {
    /// The config key (relative to the rule) the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            ScheduleError::Window(..) => "schedule",
            ScheduleError::Timezone(_) => "timezone",
        }
    }
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleError::Window(i, e) => write!(f, "window {i}: {e}"),
            ScheduleError::Timezone(e) => f.write_str(e),
        }
    }
}

impl Schedule {
    pub fn parse(windows: &[String], tz: &str) -> Result<Schedule, ScheduleError> {
        let tz: Tz = tz.parse().map_err(|_| {
            ScheduleError::Timezone(format!(
                "{tz:?} is not a time zone name such as \"UTC\" or \"Europe/Berlin\""
            ))
        })?;
        if windows.is_empty() {
            return Err(ScheduleError::Window(
                0,
                "at least one window is required".into(),
            ));
        }
        let windows = windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                parse_window(w).map_err(|e| ScheduleError::Window(i, format!("{w:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Schedule { windows, tz })
    }

    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let yesterday = (day + 6) % 7;
        let minute = local.hour() * 60 + local.minute();
        self.windows.iter().any(|w| {
            if w.start < w.end {
                w.days[day] && (w.start..w.end).contains(&minute)
            } else {
                (w.days[day] && minute >= w.start) || (w.days[yesterday] && minute < w.end)
            }
        })
    }
}

/// `[DAYS ]HH:MM-HH:MM`, DAYS being `Mon`, `Mon-Fri`, `Sat,Sun`, `*` or `daily`; or
/// DAYS alone, for the whole of those days (`daily`, `Sat,Sun`).
fn parse_window(s: &str) -> Result<Window, String> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let (days, times) = match parts.as_slice() {
        [days] if !days.contains(':') => (*days, "00:00-24:00"),
        [times] => ("*", *times),
        [days, times] => (*days, *times),
        _ => return Err("expected \"[DAYS ]HH:MM-HH:MM\", e.g. \"Mon-Fri 09:00-17:00\"".into()),
    };
    let (start, end) = times
        .split_once('-')
        .ok_or("expected a time range HH:MM-HH:MM")?;
    Ok(Window {
        days: parse_days(days)?,
        start: parse_time(start)?,
        end: parse_time(end)?,
    })
}

fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if s == "*" || s.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let day = |d: &str| {
        let d = d.to_ascii_lowercase();
        (0..7)
            .find(|&i| d == DAYS[i] || d == FULL_DAYS[i])
            .ok_or_else(|| format!("{d:?} is not a day (Mon..Sun)"))
    };
    for item in s.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(item)?] = true,
        }
    }
    Ok(days)
}

fn parse_time(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time HH:MM (00:00 to 24:00)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &Schedule, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> bool {
        s.is_open(Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap())
    }

    #[test]
    fn office_hours_in_a_time_zone() {
        // 2026-11-23 is a Monday; Berlin is UTC+1 in November.
        let s = Schedule::parse(&["Mon-Fri 09:00-17:00".into()], "Europe/Berlin").unwrap();
        assert!(!at(&s, 2026, 11, 23, 7, 59));
        assert!(at(&s, 2026, 11, 23, 8, 0));
        assert!(at(&s, 2026, 11, 23, 15, 59));
        assert!(!at(&s, 2026, 11, 23, 16, 0));
        assert!(!at(&s, 2026, 11, 28, 10, 0)); // Saturday
    }

    #[test]
    fn windows_crossing_midnight_and_lists() {
        let s = Schedule::parse(
            &["Fri 22:00-02:00".into(), "Sat,Sun 10:00-11:00".into()],
            "UTC",
        )
        .unwrap();
        assert!(at(&s, 2026, 11, 27, 23, 0)); // Friday night
        assert!(at(&s, 2026, 11, 28, 1, 59)); // Saturday early
        assert!(!at(&s, 2026, 11, 28, 2, 0));
        assert!(at(&s, 2026, 11, 29, 10, 30)); // Sunday
        assert!(!at(&s, 2026, 11, 23, 1, 0)); // Monday early: Sunday has no night window
        let every_day = Schedule::parse(&["00:00-24:00".into()], "UTC").unwrap();
        assert!(at(&every_day, 2026, 11, 25, 12, 0));
        // Days alone are whole days.
        let daily = Schedule::parse(&["daily".into()], "UTC").unwrap();
        assert!(at(&daily, 2026, 11, 25, 0, 0) && at(&daily, 2026, 11, 25, 23, 59));
        let weekend = Schedule::parse(&["Sat,Sun".into()], "UTC").unwrap();
        assert!(at(&weekend, 2026, 11, 28, 0, 0)); // Saturday
        assert!(at(&weekend, 2026, 11, 29, 23, 59)); // Sunday
        assert!(!at(&weekend, 2026, 11, 30, 0, 0)); // Monday
    }

    #[test]
    fn rejects_nonsense() {
        for w in [
            "Mon-Fri 09:00-25:00",
            "Funday 09:00-10:00",
            "09:00",
            "Mon 9-10",
            "a b c",
        ] {
            assert!(Schedule::parse(&[w.into()], "UTC").is_err(), "{w}");
        }
        assert!(matches!(
            Schedule::parse(&["Mon 09:00-10:00".into()], "Mars/Olympus"),
            Err(ScheduleError::Timezone(_))
        ));
    }
}
