//! Recurring time windows: `time = { days = [...], hours = "09:00-17:00", tz = "Europe/Paris" }`.

use std::fmt;

use jiff::tz::{TimeZone, TimeZoneDatabase};
use time::OffsetDateTime;

/// Day names in policy order, Monday first.
pub(crate) const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Why a time window is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeWindowError {
    /// A day that is not one of `mon`..`sun`.
    #[error("unknown day `{0}` (expected mon, tue, wed, thu, fri, sat, sun)")]
    Day(String),
    /// `days = []`: the rule could never match.
    #[error("`days` is empty, so the rule could never match; omit `days` for every day")]
    NoDays,
    /// Not `HH:MM-HH:MM`.
    #[error("expected hours like `09:00-17:00` (24-hour clock, end may be `24:00`)")]
    Hours,
    /// The end is not after the start (windows across midnight are refused).
    #[error("hours must end after they start; split a window across midnight into two rules")]
    HoursOrder,
    /// The time zone is not in the IANA database.
    #[error("unknown time zone `{0}` (use an IANA name like `Europe/Paris` or `UTC`)")]
    TimeZone(String),
    /// The time zone is spelt differently from its canonical IANA name.
    #[error("write the time zone as `{0}`")]
    TimeZoneSpelling(String),
}

/// A weekly window in a time zone. Start inclusive, end exclusive, both local wall-clock times.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    /// Bit `i` set = day `DAY_NAMES[i]` included.
    days: u8,
    start_min: u16,
    end_min: u16,
    tz: TimeZone,
    tz_name: String,
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// Parses `days` names into a bit set.
pub(crate) fn parse_day(s: &str) -> Result<u8, TimeWindowError> {
    DAY_NAMES
        .iter()
        .position(|d| *d == s)
        .map(|i| 1u8 << i)
        .ok_or_else(|| TimeWindowError::Day(s.to_owned()))
}

/// Parses `HH:MM-HH:MM` into minutes since midnight.
pub(crate) fn parse_hours(s: &str) -> Result<(u16, u16), TimeWindowError> {
    let (a, b) = s.split_once('-').ok_or(TimeWindowError::Hours)?;
    let start = parse_hhmm(a.trim()).ok_or(TimeWindowError::Hours)?;
    let end = parse_hhmm(b.trim()).ok_or(TimeWindowError::Hours)?;
    if end <= start || start == 24 * 60 {
        return Err(TimeWindowError::HoursOrder);
    }
    Ok((start, end))
}

/// Looks a zone up in the compiled-in IANA database (no file or environment access).
pub(crate) fn parse_tz(name: &str) -> Result<TimeZone, TimeWindowError> {
    let tz = TimeZoneDatabase::bundled()
        .get(name)
        .map_err(|_| TimeWindowError::TimeZone(name.to_owned()))?;
    match tz.iana_name() {
        Some(canon) if canon != name => Err(TimeWindowError::TimeZoneSpelling(canon.to_owned())),
        _ => Ok(tz),
    }
}

impl TimeWindow {
    /// A window from parsed parts: `days` bit set (all 7 = every day), minutes, a zone.
    pub(crate) fn new(days: u8, hours: (u16, u16), tz: TimeZone, tz_name: &str) -> TimeWindow {
        TimeWindow {
            days,
            start_min: hours.0,
            end_min: hours.1,
            tz,
            tz_name: tz_name.to_owned(),
        }
    }

    /// True if `now` falls inside the window, read on the wall clock of the window's zone.
    pub fn contains(&self, now: OffsetDateTime) -> bool {
        let Ok(nanos) = i32::try_from(now.nanosecond()) else {
            return false;
        };
        let Ok(ts) = jiff::Timestamp::new(now.unix_timestamp(), nanos) else {
            return false;
        };
        let local = self.tz.to_datetime(ts);
        let day = local.weekday().to_monday_zero_offset();
        let Ok(day) = u8::try_from(day) else {
            return false;
        };
        if self.days & (1 << day) == 0 {
            return false;
        }
        let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
        minute >= i32::from(self.start_min) && minute < i32::from(self.end_min)
    }
}

fn fmt_min(f: &mut fmt::Formatter<'_>, m: u16) -> fmt::Result {
    write!(f, "{:02}:{:02}", m / 60, m % 60)
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = (0..7)
            .filter(|i| self.days & (1 << i) != 0)
            .filter_map(|i| DAY_NAMES.get(i).copied())
            .collect();
        write!(f, "[{}] ", days.join(","))?;
        fmt_min(f, self.start_min)?;
        f.write_str("-")?;
        fmt_min(f, self.end_min)?;
        write!(f, " {}", self.tz_name)
    }
}
