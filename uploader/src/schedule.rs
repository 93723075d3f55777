//! Snapshot schedules: when a volume closes its epochs.
//!
//! A volume's configuration names its schedule as text. [`Schedule::parse`]
//! turns the text into a set of fire times; the daemon asks
//! [`Schedule::next_after`] for the first one after the close it just made
//! and sleeps until then, and the simulator reads [`Schedule::interval`] for
//! `every` schedules. Times are Unix seconds.
//!
//! # Forms
//!
//! - `every INTERVAL` (`every 15m`, `every 90s`, `every 1h30m`): fires at the
//!   multiples of the interval since the Unix epoch, in UTC whatever the
//!   [`Zone`], so `every 15m` fires at :00, :15, :30 and :45. The interval
//!   is read by [`crate::units::parse_interval`] and must be whole seconds,
//!   at least one.
//! - `hourly`, `daily`, `daily HH:MM`, `weekly DAY HH:MM`: shorthands for the
//!   cron expressions `0 * * * *`, `0 0 * * *`, `MM HH * * *` and
//!   `MM HH * * DAY`.
//! - `MIN HOUR DOM MON DOW`, a five-field cron expression: `*`, numbers,
//!   ranges `A-B`, steps `*/N`, `A-B/N` and `A/N` (= `A-MAX/N`), lists of
//!   these joined by `,`, month names `jan`..`dec`, day names `sun`..`sat`;
//!   day of week 0 and 7 are both Sunday.
//!
//! Calendar schedules are held as the sets of minutes, hours, days, months
//! and weekdays they allow, so schedules that fire at the same times compare
//! equal (`daily` equals `0 0 * * *`), and [`Display`](std::fmt::Display)
//! prints the shortest form that parses back to the same sets.
//!
//! # Days
//!
//! As in cron, when both the day-of-month and the day-of-week field are
//! restricted, a day matches if either does (`0 0 13 * fri` fires on every
//! 13th and every Friday); otherwise a day must match both. A field counts
//! as restricted when it leaves out some value, so `*`, `*/1` and `1-31` all
//! leave the day of month free. (Vixie cron instead asks whether the field's
//! text starts with `*`, which makes `*/2` free and `1-31` restricted.)
//!
//! A schedule that can never fire is refused at parse time. Under the rule
//! above only a day-of-month field without a day-of-week field can rule out
//! every day, and it does so exactly when no allowed month has an allowed
//! day (`0 0 30 2 *`, `0 0 31 4 *`); 29 February counts, since leap years
//! come at least every eight years.
//!
//! # Search
//!
//! [`Schedule::next_after`] walks the calendar forward from the given time:
//! a month outside the schedule is skipped whole, a day that does not match
//! is skipped whole, and within a matching day the next allowed hour and
//! minute are found by bit search. The walk gives up after [`HORIZON_DAYS`],
//! which no schedule that parses needs.
//!
//! # Local time
//!
//! With [`Zone::Local`] the fields are wall-clock times in the C library's
//! local time zone (the `TZ` variable or `/etc/localtime`, reread through
//! `tzset` on every call). Daylight-saving changes are handled so that every
//! scheduled wall-clock time fires at most once:
//!
//! - A wall-clock time that occurs twice, in the hour repeated when the
//!   clocks go back, fires at its first occurrence only. A frequent local
//!   schedule (`*/15 * * * *`) therefore pauses for the repeated hour; use
//!   `every`, which runs in UTC, for a steady rhythm.
//! - A wall-clock time that does not exist, in the hour skipped when the
//!   clocks go forward, is moved forward to the first instant after the gap
//!   (`daily 02:30` fires at 03:00 on that day in central Europe). Several
//!   skipped times fire once there, together.
//!
//! `Zone::Local` reads the process environment through the C library, so it
//! must not run while another thread calls `setenv` (which Rust's
//! `std::env::set_var` does and is `unsafe` for).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::units::parse_interval;

/// The time zone whose wall clock a calendar schedule reads. `every`
/// schedules ignore it: they always run in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Zone {
    /// Coordinated Universal Time.
    #[default]
    Utc,
    /// The C library's local time zone, with its daylight-saving rules.
    Local,
}

/// When a volume closes its epochs: an interval or a calendar rule.
/// Parse one with [`Schedule::parse`] or [`str::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schedule {
    rule: Rule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Rule {
    /// Every `secs` seconds (at least 1), aligned to the Unix epoch.
    Every {
        secs: u64,
    },
    Calendar(Cron),
}

/// The allowed values of each cron field as bit sets: bit `v` set means
/// value `v` is allowed. Day of week is folded to 0..=6 (7 becomes 0).
/// Every set is non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Cron {
    minutes: u64,
    hours: u64,
    doms: u64,
    months: u64,
    dows: u64,
}

/// A cron field, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CronField {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

/// Why a schedule did not parse. The message names the input and says what
/// is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// None of the accepted forms.
    #[error(
        "invalid schedule '{0}': give every INTERVAL, hourly, daily [HH:MM], weekly DAY HH:MM \
         or a cron expression MIN HOUR DOM MON DOW"
    )]
    Form(String),
    /// `every` with an interval that is not whole seconds of at least one.
    #[error(
        "invalid interval in schedule '{0}': give whole seconds, at least 1s, \
         as every 90s, every 15m or every 1h30m"
    )]
    Interval(String),
    /// `daily` or `weekly` with a bad time of day.
    #[error(
        "invalid time of day in schedule '{0}': give HH:MM from 00:00 to 23:59, as daily 02:30"
    )]
    Time(String),
    /// `weekly` with a bad day name.
    #[error(
        "invalid day in schedule '{0}': give mon, tue, wed, thu, fri, sat or sun, as weekly sun 03:00"
    )]
    Day(String),
    /// A cron field that does not parse or holds a value out of range.
    #[error(
        "invalid {field} '{value}' in schedule '{text}': {reason}; \
         give {} as *, N, A-B, */N, A-B/N or a list of these",
        .field.accepted()
    )]
    Field {
        text: String,
        field: CronField,
        value: String,
        reason: &'static str,
    },
    /// A cron expression whose days of month never fall in its months.
    #[error(
        "schedule '{0}' never fires: none of its months has any of its days; \
         check the day-of-month and month fields"
    )]
    NeverFires(String),
}

/// How far [`Schedule::next_after`] searches, in days: 28 years. The longest
/// wait of a schedule that parses is 29 February across a century year that
/// is not a leap year (2096 to 2104, eight years); 28 years is also the
/// period after which weekdays and leap years line up again within a
/// century.
pub const HORIZON_DAYS: i64 = 28 * 366;

const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// Bound on the wall-clock times [`Schedule::next_after`] tries in local
/// time before giving up. Each try that fails is a wall-clock time already
/// passed in a repeated hour, so a clock that goes back an hour costs at
/// most 60 tries; this allows a week of minutes.
const LOCAL_TRIES: u32 = 7 * 24 * 60;

const DAY_NAMES: [(&str, &str); 7] = [
    ("sun", "sunday"),
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
];

const MONTH_NAMES: [(&str, &str); 12] = [
    ("jan", "january"),
    ("feb", "february"),
    ("mar", "march"),
    ("apr", "april"),
    ("may", "may"),
    ("jun", "june"),
    ("jul", "july"),
    ("aug", "august"),
    ("sep", "september"),
    ("oct", "october"),
    ("nov", "november"),
    ("dec", "december"),
];

impl Schedule {
    /// Parses any of the forms in the [module docs](self). Keywords and
    /// names are case-insensitive; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let t = text.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        let keyword = words.first().map(|w| w.to_ascii_lowercase());
        let rule = match (keyword.as_deref(), words.len()) {
            (Some("every"), _) => Rule::Every {
                secs: parse_every(t)?,
            },
            (Some("hourly"), 1) => Rule::Calendar(Cron::at(0, None, None)),
            (Some("daily"), 1) => Rule::Calendar(Cron::at(0, Some(0), None)),
            (Some("daily"), 2) => {
                let (hour, minute) = parse_time(t, words[1])?;
                Rule::Calendar(Cron::at(minute, Some(hour), None))
            }
            (Some("weekly"), 3) => {
                let day = day_number(words[1]).ok_or_else(|| ScheduleError::Day(t.to_owned()))?;
                let (hour, minute) = parse_time(t, words[2])?;
                Rule::Calendar(Cron::at(minute, Some(hour), Some(day)))
            }
            (Some("hourly" | "daily" | "weekly") | None, _) => {
                return Err(ScheduleError::Form(t.to_owned()));
            }
            (Some(_), 5) => Rule::Calendar(Cron::parse(t, &words)?),
            (Some(_), _) => return Err(ScheduleError::Form(t.to_owned())),
        };
        Ok(Schedule { rule })
    }

    /// The first fire time strictly after `after` (Unix seconds), reading
    /// calendar fields in `zone`. None only if it never fires again within
    /// [`HORIZON_DAYS`] or the answer is beyond what the C library can
    /// convert (neither happens for a parsed schedule at dates people use).
    pub fn next_after(&self, after: i64, zone: Zone) -> Option<i64> {
        match (&self.rule, zone) {
            (Rule::Every { secs }, _) => {
                let secs = i64::try_from(*secs).ok()?;
                after.div_euclid(secs).checked_add(1)?.checked_mul(secs)
            }
            (Rule::Calendar(cron), Zone::Utc) => cron.next_wall_after(after),
            (Rule::Calendar(cron), Zone::Local) => next_local(cron, after),
        }
    }

    /// For `every` schedules, the interval; None for calendar ones.
    pub fn interval(&self) -> Option<Duration> {
        match self.rule {
            Rule::Every { secs } => Some(Duration::from_secs(secs)),
            Rule::Calendar(_) => None,
        }
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Schedule::parse(s)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Every { secs } => {
                f.write_str("every ")?;
                let mut rest = *secs;
                for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
                    if rest >= size {
                        write!(f, "{}{unit}", rest / size)?;
                        rest %= size;
                    }
                }
                Ok(())
            }
            Rule::Calendar(cron) => cron.fmt(f),
        }
    }
}

/// The interval of `every INTERVAL`, in whole seconds.
fn parse_every(text: &str) -> Result<u64, ScheduleError> {
    let bad = || ScheduleError::Interval(text.to_owned());
    let (_, interval) = text.split_once(char::is_whitespace).ok_or_else(bad)?;
    let interval = parse_interval(interval).map_err(|_| bad())?;
    if interval.subsec_nanos() != 0 || interval.as_secs() == 0 {
        return Err(bad());
    }
    Ok(interval.as_secs())
}

/// `HH:MM` (or `H:MM`) as (hour, minute).
fn parse_time(text: &str, word: &str) -> Result<(i64, i64), ScheduleError> {
    let bad = || ScheduleError::Time(text.to_owned());
    let (h, m) = word.split_once(':').ok_or_else(bad)?;
    let digits = |s: &str, len: std::ops::RangeInclusive<usize>| {
        (len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    let hour = digits(h, 1..=2).filter(|h| *h < 24).ok_or_else(bad)?;
    let minute = digits(m, 2..=2).filter(|m| *m < 60).ok_or_else(bad)?;
    Ok((hour, minute))
}

/// A day name, short or full, as 0 (Sunday) ..= 6.
fn day_number(word: &str) -> Option<i64> {
    name_number(&DAY_NAMES, word)
}

fn name_number(names: &[(&str, &str)], word: &str) -> Option<i64> {
    let word = word.to_ascii_lowercase();
    let index = names
        .iter()
        .position(|(short, long)| word == *short || word == *long)?;
    i64::try_from(index).ok()
}

impl CronField {
    /// The smallest and largest value the field accepts.
    fn bounds(self) -> (i64, i64) {
        match self {
            CronField::Minute => (0, 59),
            CronField::Hour => (0, 23),
            CronField::DayOfMonth => (1, 31),
            CronField::Month => (1, 12),
            CronField::DayOfWeek => (0, 7),
        }
    }

    /// What the field accepts, for error messages.
    fn accepted(self) -> &'static str {
        match self {
            CronField::Minute => "minutes 0-59",
            CronField::Hour => "hours 0-23",
            CronField::DayOfMonth => "days 1-31",
            CronField::Month => "months 1-12 or jan-dec",
            CronField::DayOfWeek => "days 0-7 or sun-sat (0 and 7 are Sunday)",
        }
    }

    /// A value: a number, or a name where the field has names.
    fn value(self, word: &str) -> Option<i64> {
        if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) {
            // Too many digits for an i64 is out of range all the same.
            return Some(word.parse().unwrap_or(i64::MAX));
        }
        match self {
            CronField::Month => name_number(&MONTH_NAMES, word).map(|m| m + 1),
            CronField::DayOfWeek => day_number(word),
            _ => None,
        }
    }
}

impl fmt::Display for CronField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CronField::Minute => "minute",
            CronField::Hour => "hour",
            CronField::DayOfMonth => "day of month",
            CronField::Month => "month",
            CronField::DayOfWeek => "day of week",
        })
    }
}

/// The set with bits `lo..=hi` set (`hi` < 64).
fn bits(lo: i64, hi: i64) -> u64 {
    (lo..=hi).fold(0, |set, v| set | bit(v))
}

/// The set with bit `v` set, or the empty set if `v` is not in 0..64.
fn bit(v: i64) -> u64 {
    if (0..64).contains(&v) { 1u64 << v } else { 0 }
}

/// The smallest value in `set` that is at least `from`.
fn next_bit(set: u64, from: i64) -> Option<i64> {
    let masked = match from {
        ..=0 => set,
        64.. => 0,
        _ => set & (u64::MAX << from),
    };
    (masked != 0).then(|| i64::from(masked.trailing_zeros()))
}

/// The single value of a one-element set.
fn only(set: u64) -> Option<i64> {
    (set.count_ones() == 1).then(|| i64::from(set.trailing_zeros()))
}

const ALL_HOURS: u64 = (1 << 24) - 1;
const ALL_DOMS: u64 = ((1 << 32) - 1) & !1;
const ALL_MONTHS: u64 = ((1 << 13) - 1) & !1;
const ALL_DOWS: u64 = (1 << 7) - 1;

impl Cron {
    /// At `minute` of `hour` (every hour if None) on `dow` (every day if
    /// None).
    fn at(minute: i64, hour: Option<i64>, dow: Option<i64>) -> Cron {
        Cron {
            minutes: bit(minute),
            hours: hour.map_or(ALL_HOURS, bit),
            doms: ALL_DOMS,
            months: ALL_MONTHS,
            dows: dow.map_or(ALL_DOWS, bit),
        }
    }

    /// Five fields, `words`, of the schedule `text`.
    fn parse(text: &str, words: &[&str]) -> Result<Cron, ScheduleError> {
        let [minute, hour, dom, month, dow] = words else {
            return Err(ScheduleError::Form(text.to_owned()));
        };
        let mut dows = parse_field(text, dow, CronField::DayOfWeek)?;
        if dows & bit(7) != 0 {
            dows = (dows & !bit(7)) | bit(0);
        }
        let cron = Cron {
            minutes: parse_field(text, minute, CronField::Minute)?,
            hours: parse_field(text, hour, CronField::Hour)?,
            doms: parse_field(text, dom, CronField::DayOfMonth)?,
            months: parse_field(text, month, CronField::Month)?,
            dows,
        };
        if !cron.can_fire() {
            return Err(ScheduleError::NeverFires(text.to_owned()));
        }
        Ok(cron)
    }

    /// Whether some day matches. A restricted day of week matches some day
    /// of every month (either alone or, with a restricted day of month,
    /// under the OR rule); otherwise some allowed month must be long enough
    /// for some allowed day, 29 February included.
    fn can_fire(&self) -> bool {
        if self.dows != ALL_DOWS {
            return true;
        }
        (1..=12).any(|m| self.months & bit(m) != 0 && self.doms & bits(1, max_days(m)) != 0)
    }

    fn day_matches(&self, days: i64, dom: i64) -> bool {
        let dom_ok = self.doms & bit(dom) != 0;
        let dow_ok = self.dows & bit(weekday(days)) != 0;
        match (self.doms == ALL_DOMS, self.dows == ALL_DOWS) {
            (true, true) => true,
            (true, false) => dow_ok,
            (false, true) => dom_ok,
            (false, false) => dom_ok || dow_ok,
        }
    }

    /// The first matching minute strictly after `after`, both in seconds
    /// of a wall clock that runs like UTC (no leaps, no gaps): UTC itself,
    /// or local time before the daylight-saving rules are applied.
    fn next_wall_after(&self, after: i64) -> Option<i64> {
        let start = after
            .div_euclid(MINUTE)
            .checked_add(1)?
            .checked_mul(MINUTE)?;
        let mut days = start.div_euclid(DAY);
        let mut hour = start.rem_euclid(DAY) / HOUR;
        let mut minute = start.rem_euclid(HOUR) / MINUTE;
        let last = days.checked_add(HORIZON_DAYS)?;
        while days <= last {
            let (year, month, dom) = civil_from_days(days);
            if self.months & bit(month) == 0 {
                // Skip to the first of the next month.
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                days = days_from_civil(year, month, 1);
                (hour, minute) = (0, 0);
                continue;
            }
            if self.day_matches(days, dom)
                && let Some((h, m)) = self.time_in_day(hour, minute)
            {
                return days.checked_mul(DAY)?.checked_add(h * HOUR + m * MINUTE);
            }
            days += 1;
            (hour, minute) = (0, 0);
        }
        None
    }

    /// The first allowed (hour, minute) at or after `hour:minute` of a day.
    fn time_in_day(&self, hour: i64, minute: i64) -> Option<(i64, i64)> {
        let h = next_bit(self.hours, hour)?;
        let from = if h == hour { minute } else { 0 };
        if let Some(m) = next_bit(self.minutes, from) {
            return Some((h, m));
        }
        let h = next_bit(self.hours, h + 1)?;
        Some((h, next_bit(self.minutes, 0)?))
    }
}

/// One comma-separated cron field as a bit set of values in the field's
/// bounds.
fn parse_field(text: &str, value: &str, field: CronField) -> Result<u64, ScheduleError> {
    let bad = |reason| ScheduleError::Field {
        text: text.to_owned(),
        field,
        value: value.to_owned(),
        reason,
    };
    let (lo, hi) = field.bounds();
    let number = |word: &str| -> Result<i64, ScheduleError> {
        let v = field
            .value(word)
            .ok_or_else(|| bad("not a number or a name"))?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad("out of range"))
        }
    };
    let mut set = 0;
    for item in value.split(',') {
        if item.is_empty() {
            return Err(bad("empty list item"));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step = match step.parse::<u64>() {
                    Ok(0) => return Err(bad("step of 0")),
                    Ok(step) => usize::try_from(step).unwrap_or(usize::MAX),
                    Err(_) => return Err(bad("step is not a number")),
                };
                (range, Some(step))
            }
            None => (item, None),
        };
        let (first, last) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (number(a)?, number(b)?)
        } else {
            let a = number(range)?;
            // `A/N` runs from A to the end of the field.
            (a, if step.is_some() { hi } else { a })
        };
        if first > last {
            return Err(bad("reversed range"));
        }
        set |= (first..=last)
            .step_by(step.unwrap_or(1))
            .fold(0, |set, v| set | bit(v));
    }
    Ok(set)
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let free_days = self.doms == ALL_DOMS && self.months == ALL_MONTHS;
        if let (Some(minute), true) = (only(self.minutes), free_days) {
            match (self.hours, only(self.hours), self.dows, only(self.dows)) {
                (ALL_HOURS, _, ALL_DOWS, _) if minute == 0 => return f.write_str("hourly"),
                (_, Some(hour), ALL_DOWS, _) => return write!(f, "daily {hour:02}:{minute:02}"),
                (_, Some(hour), _, Some(dow)) => {
                    let name = usize::try_from(dow)
                        .ok()
                        .and_then(|d| DAY_NAMES.get(d))
                        .map_or("sun", |(short, _)| short);
                    return write!(f, "weekly {name} {hour:02}:{minute:02}");
                }
                _ => {}
            }
        }
        write!(
            f,
            "{} {} {} {} {}",
            FieldSet(self.minutes, 0, 59),
            FieldSet(self.hours, 0, 23),
            FieldSet(self.doms, 1, 31),
            FieldSet(self.months, 1, 12),
            FieldSet(self.dows, 0, 6),
        )
    }
}

/// A field's set in canonical cron form: `*` when full, else a list of
/// single values and ranges `A-B`.
struct FieldSet(u64, i64, i64);

impl fmt::Display for FieldSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let FieldSet(set, lo, hi) = *self;
        if set == bits(lo, hi) {
            return f.write_str("*");
        }
        let mut sep = "";
        let mut next = next_bit(set, lo);
        while let Some(first) = next {
            let mut last = first;
            while set & bit(last + 1) != 0 {
                last += 1;
            }
            if first == last {
                write!(f, "{sep}{first}")?;
            } else {
                write!(f, "{sep}{first}-{last}")?;
            }
            sep = ",";
            next = next_bit(set, last + 1);
        }
        Ok(())
    }
}

/// The next fire time after `after` with the cron fields read on the local
/// wall clock. Walks wall-clock times forward from the one `after` shows
/// and maps each to an instant; a wall-clock time whose first occurrence is
/// not after `after` (a repeated hour) is passed over.
fn next_local(cron: &Cron, after: i64) -> Option<i64> {
    // SAFETY: tzset only reads the environment and writes the C library's
    // time zone state; it races only with a concurrent setenv, which this
    // crate never calls (see the module docs).
    unsafe { tzset() };
    let mut wall = local_wall(after)?;
    for _ in 0..LOCAL_TRIES {
        wall = cron.next_wall_after(wall)?;
        let at = instant_of_wall(wall)?;
        if at > after {
            return Some(at);
        }
    }
    None
}

/// The instant the local wall clock first shows `wall`; or, if it never
/// does (skipped by a daylight-saving change), the first instant after the
/// gap. Assumes UTC offsets of less than a day, as all real ones are.
fn instant_of_wall(wall: i64) -> Option<i64> {
    // Whatever offset holds at the instant we look for also holds within a
    // day of `wall`; try the offsets there.
    let mut first: Option<i64> = None;
    for probe in [wall.checked_sub(DAY)?, wall, wall.checked_add(DAY)?] {
        let offset = local_wall(probe)? - probe;
        let at = wall.checked_sub(offset)?;
        if local_wall(at)? == wall {
            first = Some(first.map_or(at, |f| f.min(at)));
        }
    }
    if first.is_some() {
        return first;
    }
    // A gap: find the first instant whose wall clock is past `wall`. The
    // clock shows at most `wall` two days before and more after.
    let (mut lo, mut hi) = (wall.checked_sub(2 * DAY)?, wall.checked_add(2 * DAY)?);
    if local_wall(lo)? > wall || local_wall(hi)? <= wall {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if local_wall(mid)? > wall {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The local wall-clock time at instant `t`, as seconds since 1970-01-01
/// 00:00 of a clock without time zones. None if the C library cannot
/// convert `t`.
fn local_wall(t: i64) -> Option<i64> {
    // time_t is 32 bits on some targets; on 64-bit Linux this cannot fail.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let time = libc::time_t::try_from(t).ok()?;
    // SAFETY: `tm` is plain integers plus, on some libcs, a pointer to the
    // zone name; all zeros is a valid value for each.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid and unaliased for the call;
    // localtime_r writes only `tm` (not the shared static buffer of
    // localtime) and returns null on failure.
    let result = unsafe { libc::localtime_r(&time, &mut tm) };
    if result.is_null() {
        return None;
    }
    let days = days_from_civil(
        i64::from(tm.tm_year) + 1900,
        i64::from(tm.tm_mon) + 1,
        i64::from(tm.tm_mday),
    );
    let secs = i64::from(tm.tm_hour) * HOUR + i64::from(tm.tm_min) * MINUTE + i64::from(tm.tm_sec);
    days.checked_mul(DAY)?.checked_add(secs)
}

unsafe extern "C" {
    /// POSIX `tzset`: (re)loads the local time zone from `TZ` or
    /// `/etc/localtime`. The libc crate does not declare it for Unix.
    fn tzset();
}

/// Days in month `m` of a leap year: the most any year gives it.
fn max_days(m: i64) -> i64 {
    match m {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Day of week (0 = Sunday) of the day `days` after 1970-01-01, a Thursday.
fn weekday(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1..=12).
/// Howard Hinnant's `days_from_civil`: years start in March so the leap
/// day comes last, and 400-year eras repeat exactly.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The (year, month 1..=12, day 1..=31) of the day `days` after
/// 1970-01-01: the inverse of [`days_from_civil`].
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400;
    (if month <= 2 { year + 1 } else { year }, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn next(text: &str, after: i64) -> i64 {
        let schedule = Schedule::parse(text).unwrap();
        schedule.next_after(after, Zone::Utc).unwrap()
    }

    fn cron(text: &str) -> Cron {
        match Schedule::parse(text).unwrap().rule {
            Rule::Calendar(cron) => cron,
            Rule::Every { .. } => panic!("{text} is not a calendar schedule"),
        }
    }

    #[test]
    fn every_aligns_to_the_epoch() {
        // 2024-01-01 00:07:30 UTC -> 00:15, and 00:15 itself -> 00:30.
        assert_eq!(next("every 15m", 1_704_067_650), 1_704_068_100);
        assert_eq!(next("every 15m", 1_704_068_100), 1_704_069_000);
        assert_eq!(next("every 90s", 100), 180);
        assert_eq!(next("every 90s", 180), 270);
        // 2024-01-01 00:00 UTC is a multiple of 5400 s.
        assert_eq!(next("every 1h30m", 1_704_067_199), 1_704_067_200);
        assert_eq!(next("every 1h", -1), 0);
        assert_eq!(next("every 1h", -3600), 0);
        let s = Schedule::parse("every 1h 30m").unwrap();
        assert_eq!(s.interval(), Some(Duration::from_secs(5400)));
        assert_eq!(s.next_after(1, Zone::Local), Some(5400), "zone is ignored");
        assert_eq!(Schedule::parse("daily").unwrap().interval(), None);
        assert_eq!(
            Schedule::parse("every 60000ms").unwrap().interval(),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn shorthands_at_hand_computed_times() {
        // 2024-02-29 23:59:59 -> 2024-03-01 00:00.
        assert_eq!(next("hourly", 1_709_251_199), 1_709_251_200);
        // 2024-02-28 03:00 -> 2024-02-29 02:30 (leap day).
        assert_eq!(next("daily 02:30", 1_709_089_200), 1_709_173_800);
        assert_eq!(next("DAILY 2:30", 1_709_089_200), 1_709_173_800);
        // 2023-12-31 12:00 -> 2024-01-01 00:00.
        assert_eq!(next("daily", 1_704_024_000), 1_704_067_200);
        assert_eq!(
            Schedule::parse("daily").unwrap(),
            Schedule::parse("daily 00:00").unwrap()
        );
        // Monday 2024-01-01 00:00 -> Sunday 2024-01-07 03:00.
        assert_eq!(next("weekly sun 03:00", 1_704_067_200), 1_704_596_400);
        assert_eq!(next("weekly Sunday 03:00", 1_704_067_200), 1_704_596_400);
        // Friday 2024-01-05 18:45 -> Friday 2024-01-12 18:45.
        assert_eq!(next("weekly FRI 18:45", 1_704_480_300), 1_705_085_100);
        assert_eq!(next("weekly friday 18:45", 1_704_480_299), 1_704_480_300);
    }

    #[test]
    fn cron_at_hand_computed_times() {
        // Friday 2024-01-05 17:50 -> Monday 2024-01-08 09:00.
        assert_eq!(next("*/15 9-17 * * mon-fri", 1_704_477_000), 1_704_704_400);
        // 2024-01-01 00:00 -> 2024-01-13 00:00.
        assert_eq!(next("0 0 13 * *", 1_704_067_200), 1_705_104_000);
        // OR rule: Friday 2024-01-05, then Saturday the 13th after Friday
        // 2024-01-12.
        assert_eq!(next("0 0 13 * fri", 1_704_067_200), 1_704_412_800);
        assert_eq!(next("0 0 13 * fri", 1_705_017_600), 1_705_104_000);
        // Day of month free: weekday alone decides.
        assert_eq!(next("0 0 * * fri", 1_705_017_600), 1_705_017_600 + 7 * DAY);
        // Within the hour, then the next allowed hour.
        assert_eq!(
            next("5,10 1,3 * * *", 1_704_067_200 + HOUR + 5 * MINUTE),
            1_704_067_200 + HOUR + 10 * MINUTE
        );
        assert_eq!(
            next("5,10 1,3 * * *", 1_704_067_200 + HOUR + 10 * MINUTE),
            1_704_067_200 + 3 * HOUR + 5 * MINUTE
        );
        // Seconds are rounded up to the next minute, never down.
        assert_eq!(next("* * * * *", 59), 60);
        assert_eq!(next("* * * * *", 60), 120);
        assert_eq!(next("* * * * *", -1), 0);
    }

    #[test]
    fn leap_days() {
        // 2024-03-01 -> 2028-02-29; 2096-03-01 -> 2104-02-29 (2100 is not a
        // leap year).
        assert_eq!(next("0 0 29 2 *", 1_709_251_200), 1_835_395_200);
        assert_eq!(next("0 0 29 feb *", 3_981_398_400), 4_233_686_400);
        // OR rule: 29 February or any Monday in February. Wednesday
        // 2023-02-01 -> Monday 2023-02-06; Tuesday 2024-02-27 -> Thursday
        // 2024-02-29; Monday 2023-02-27 -> Monday 2024-02-05.
        assert_eq!(next("0 0 29 2 1", 1_675_209_600), 1_675_641_600);
        assert_eq!(next("0 0 29 2 1", 1_708_992_000), 1_709_164_800);
        assert_eq!(next("0 0 29 2 1", 1_677_456_000), 1_707_091_200);
    }

    #[test]
    fn cron_fields_parse_to_sets() {
        let c = cron("0,30 */6 1-10/3 jan,JUL-Sep sun,3-5");
        assert_eq!(c.minutes, bit(0) | bit(30));
        assert_eq!(c.hours, bit(0) | bit(6) | bit(12) | bit(18));
        assert_eq!(c.doms, bit(1) | bit(4) | bit(7) | bit(10));
        assert_eq!(c.months, bit(1) | bits(7, 9));
        assert_eq!(c.dows, bit(0) | bits(3, 5));
        assert_eq!(cron("50/5 * * * *").minutes, bit(50) | bit(55));
        assert_eq!(cron("* * * january-march *").months, bits(1, 3));
        assert_eq!(cron("* * * * monday,friday").dows, bit(1) | bit(5));
        assert_eq!(cron("0 0 * * 5-7").dows, bit(0) | bit(5) | bit(6));
        // Sunday three ways.
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * 0"));
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * sun"));
        // Full sets are `*` whatever the spelling.
        assert_eq!(cron("*/1 0-23 1-31 1-12 0-7"), cron("* * * * *"));
        assert_eq!(
            Schedule::parse("0 * * * *").unwrap(),
            Schedule::parse("hourly").unwrap()
        );
        assert_eq!(
            Schedule::parse("30 2 * * 0").unwrap(),
            Schedule::parse("weekly sun 02:30").unwrap()
        );
        assert_eq!(cron("*/7 * * * 0/3").dows, bit(0) | bit(3) | bit(6));
    }

    #[test]
    fn errors_name_the_input_and_the_forms() {
        let form = |t: &str| ScheduleError::Form(t.to_owned());
        for bad in [
            "",
            "  ",
            "sometimes",
            "every",
            "hourly 5",
            "daily 1 2",
            "weekly mon",
            "0 0 * *",
            "0 0 * * * *",
        ] {
            let want = if bad == "every" {
                ScheduleError::Interval(bad.into())
            } else {
                form(bad.trim())
            };
            assert_eq!(Schedule::parse(bad).unwrap_err(), want, "{bad:?}");
        }
        assert_eq!(
            form("sometimes").to_string(),
            "invalid schedule 'sometimes': give every INTERVAL, hourly, daily [HH:MM], \
             weekly DAY HH:MM or a cron expression MIN HOUR DOM MON DOW"
        );
        for bad in [
            "every 500ms",
            "every 1.5s",
            "every 0s",
            "every soon",
            "every -1m",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert_eq!(e, ScheduleError::Interval(bad.into()));
            assert!(
                e.to_string().contains(bad) && e.to_string().contains("at least 1s"),
                "{e}"
            );
        }
        for bad in [
            "daily 24:00",
            "daily 12:60",
            "daily 12",
            "daily 1:5",
            "daily 123:00",
            "weekly mon 7:5",
            "daily +1:00",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert_eq!(e, ScheduleError::Time(bad.into()));
            assert!(e.to_string().contains("HH:MM"), "{e}");
        }
        let e = Schedule::parse("weekly someday 03:00").unwrap_err();
        assert_eq!(e, ScheduleError::Day("weekly someday 03:00".into()));
        assert!(e.to_string().contains("mon, tue"), "{e}");
        let field = |text: &str, field, value: &str, reason| ScheduleError::Field {
            text: text.into(),
            field,
            value: value.into(),
            reason,
        };
        for (text, f, value, reason) in [
            ("60 * * * *", CronField::Minute, "60", "out of range"),
            ("* 24 * * *", CronField::Hour, "24", "out of range"),
            ("* * 0 * *", CronField::DayOfMonth, "0", "out of range"),
            ("* * 32 * *", CronField::DayOfMonth, "32", "out of range"),
            ("* * * 13 *", CronField::Month, "13", "out of range"),
            ("* * * * 8", CronField::DayOfWeek, "8", "out of range"),
            (
                "99999999999999999999 * * * *",
                CronField::Minute,
                "99999999999999999999",
                "out of range",
            ),
            ("1,,2 * * * *", CronField::Minute, "1,,2", "empty list item"),
            ("1, * * * *", CronField::Minute, "1,", "empty list item"),
            ("*/0 * * * *", CronField::Minute, "*/0", "step of 0"),
            (
                "*/x * * * *",
                CronField::Minute,
                "*/x",
                "step is not a number",
            ),
            ("* 5-1 * * *", CronField::Hour, "5-1", "reversed range"),
            (
                "* * * dec-jan *",
                CronField::Month,
                "dec-jan",
                "reversed range",
            ),
            (
                "mon * * * *",
                CronField::Minute,
                "mon",
                "not a number or a name",
            ),
            (
                "* * * * jan",
                CronField::DayOfWeek,
                "jan",
                "not a number or a name",
            ),
            (
                "* * * * -1",
                CronField::DayOfWeek,
                "-1",
                "not a number or a name",
            ),
            (
                "*-5 * * * *",
                CronField::Minute,
                "*-5",
                "not a number or a name",
            ),
        ] {
            assert_eq!(
                Schedule::parse(text).unwrap_err(),
                field(text, f, value, reason),
                "{text}"
            );
        }
        assert_eq!(
            Schedule::parse("61 * * * *").unwrap_err().to_string(),
            "invalid minute '61' in schedule '61 * * * *': out of range; \
             give minutes 0-59 as *, N, A-B, */N, A-B/N or a list of these"
        );
    }

    #[test]
    fn impossible_dates_are_refused() {
        for bad in [
            "0 0 30 2 *",
            "0 0 31 4 *",
            "0 0 31 2,4,6,9,11 *",
            "0 0 30-31 feb *",
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert_eq!(e, ScheduleError::NeverFires(bad.into()));
            assert!(e.to_string().contains("never fires"), "{e}");
        }
        // Possible, if rarely, or through the OR rule.
        for good in ["0 0 29 2 *", "0 0 31 4,5 *", "0 0 30 2 mon", "0 0 31 * *"] {
            let s = Schedule::parse(good).unwrap();
            assert!(s.next_after(0, Zone::Utc).is_some(), "{good}");
        }
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        for (text, shown) in [
            ("every 90s", "every 1m30s"),
            ("every 1h 30m", "every 1h30m"),
            ("every 2d", "every 2d"),
            ("every 86401", "every 1d1s"),
            ("hourly", "hourly"),
            ("0 * * * *", "hourly"),
            ("daily", "daily 00:00"),
            ("daily 2:05", "daily 02:05"),
            ("5 2 * * *", "daily 02:05"),
            ("weekly Monday 23:59", "weekly mon 23:59"),
            ("0 3 * * 7", "weekly sun 03:00"),
            ("30 * * * *", "30 * * * *"),
            ("*/15 9-17 * * mon-fri", "0,15,30,45 9-17 * * 1-5"),
            ("0 0 29 feb mon", "0 0 29 2 1"),
            ("0 0 1,2,3,5 */2 *", "0 0 1-3,5 1,3,5,7,9,11 *"),
            ("0 12 * jan 0,6", "0 12 * 1 0,6"),
            ("0 0 * * 5-7", "0 0 * * 0,5-6"),
        ] {
            let s = Schedule::parse(text).unwrap();
            assert_eq!(s.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<Schedule>().unwrap(), s, "{text}");
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(weekday(0), 4);
        // 2000-02-29 (a leap century) and 1969-12-31.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    /// One item of a generated cron field.
    #[derive(Debug, Clone)]
    enum Item {
        Star,
        StarStep(i64),
        One(i64),
        Range(i64, i64),
        RangeStep(i64, i64, i64),
    }

    impl Item {
        fn text(&self) -> String {
            match *self {
                Item::Star => "*".into(),
                Item::StarStep(n) => format!("*/{n}"),
                Item::One(v) => v.to_string(),
                Item::Range(a, b) => format!("{a}-{b}"),
                Item::RangeStep(a, b, n) => format!("{a}-{b}/{n}"),
            }
        }

        /// Whether the item allows `v`, worked out from the item itself
        /// rather than the parser's bit sets.
        fn allows(&self, v: i64, lo: i64, hi: i64) -> bool {
            let stepped = |a: i64, b: i64, n: i64| (a..=b).contains(&v) && (v - a) % n == 0;
            match *self {
                Item::Star => (lo..=hi).contains(&v),
                Item::StarStep(n) => stepped(lo, hi, n),
                Item::One(a) => v == a,
                Item::Range(a, b) => stepped(a, b, 1),
                Item::RangeStep(a, b, n) => stepped(a, b, n),
            }
        }
    }

    fn item(lo: i64, hi: i64) -> impl Strategy<Value = Item> {
        prop_oneof![
            Just(Item::Star),
            (1..=hi).prop_map(Item::StarStep),
            (lo..=hi).prop_map(Item::One),
            (lo..=hi, lo..=hi).prop_map(|(a, b)| Item::Range(a.min(b), a.max(b))),
            (lo..=hi, lo..=hi, 1..=hi).prop_map(|(a, b, n)| Item::RangeStep(a.min(b), a.max(b), n)),
        ]
    }

    type Fields = [Vec<Item>; 5];

    fn fields() -> impl Strategy<Value = Fields> {
        let list = |lo, hi| prop::collection::vec(item(lo, hi), 1..=3);
        (
            list(0, 59),
            list(0, 23),
            list(1, 31),
            list(1, 12),
            list(0, 7),
        )
            .prop_map(|(a, b, c, d, e)| [a, b, c, d, e])
    }

    const BOUNDS: [(i64, i64); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];

    fn expression(fields: &Fields) -> String {
        fields
            .iter()
            .map(|items| items.iter().map(Item::text).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn allows(items: &[Item], field: usize, v: i64) -> bool {
        let (lo, hi) = BOUNDS[field];
        items.iter().any(|i| i.allows(v, lo, hi))
            || (field == 4 && v == 0 && items.iter().any(|i| i.allows(7, lo, hi)))
    }

    /// The reference: broken-down UTC from the C library, fields checked
    /// against the generated items, the OR rule straight from its
    /// definition.
    fn brute_matches(fields: &Fields, t: i64) -> bool {
        let time = libc::time_t::try_from(t).unwrap();
        // SAFETY: all zeros is a valid `tm`.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers; gmtime_r writes only `tm`.
        assert!(!unsafe { libc::gmtime_r(&time, &mut tm) }.is_null());
        // A field is restricted when some day leaves it out; weekday 7 is
        // Sunday again, not an eighth day.
        let restricted = |field: usize| {
            let (lo, hi) = BOUNDS[field];
            let hi = if field == 4 { 6 } else { hi };
            (lo..=hi).any(|v| !allows(&fields[field], field, v))
        };
        let dom = allows(&fields[2], 2, tm.tm_mday.into());
        let dow = allows(&fields[4], 4, tm.tm_wday.into());
        let day = match (restricted(2), restricted(4)) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        };
        day && allows(&fields[0], 0, tm.tm_min.into())
            && allows(&fields[1], 1, tm.tm_hour.into())
            && allows(&fields[3], 3, i64::from(tm.tm_mon) + 1)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn cron_matches_a_minute_by_minute_search(
            fields in fields(),
            // 2000-01-01 to 2100-01-01.
            after in 946_684_800i64..4_102_444_800,
        ) {
            let text = expression(&fields);
            let schedule = match Schedule::parse(&text) {
                Ok(s) => s,
                Err(ScheduleError::NeverFires(_)) => {
                    // Then no month may hold any allowed day.
                    for m in 1..=12 {
                        for d in 1..=max_days(m) {
                            prop_assert!(!(allows(&fields[3], 3, m) && allows(&fields[2], 2, d)));
                        }
                    }
                    return Ok(());
                }
                Err(e) => panic!("{text}: {e}"),
            };
            let got = schedule.next_after(after, Zone::Utc);
            prop_assert!(got.is_some(), "{text}");
            let got = got.unwrap();
            prop_assert!(got > after);
            // 35 days of minutes.
            let window_end = after + 35 * DAY;
            let first = (after.div_euclid(MINUTE) + 1) * MINUTE;
            let want = (first..=window_end).step_by(60).find(|&t| brute_matches(&fields, t));
            match want {
                Some(want) => prop_assert_eq!(got, want, "{}", text),
                None => prop_assert!(got > window_end, "{text}: {got}"),
            }
            // The canonical form names the same schedule.
            prop_assert_eq!(schedule.to_string().parse::<Schedule>().unwrap(), schedule);
        }
    }

    const CET: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

    /// Local time with daylight saving, in a child process: the C library's
    /// time zone is process-wide state read from `TZ`, and setting `TZ` here
    /// would race with other tests reading the environment.
    #[test]
    fn local_time_follows_daylight_saving() {
        let exe = std::env::current_exe().unwrap();
        let module = module_path!().split_once("::").unwrap().1;
        let name = format!("{module}::local_time_in_child");
        let out = std::process::Command::new(exe)
            .args([name.as_str(), "--exact", "--ignored", "--test-threads=1"])
            .env("TZ", CET)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    #[ignore = "run with TZ set, in a child process, by local_time_follows_daylight_saving"]
    fn local_time_in_child() {
        if std::env::var("TZ").as_deref() != Ok(CET) {
            return;
        }
        let local = |text: &str, after: i64| {
            Schedule::parse(text)
                .unwrap()
                .next_after(after, Zone::Local)
                .unwrap()
        };
        // Plain offsets: 2024-07-01 12:00 CEST is 10:00 UTC; 2024-01-15
        // 12:00 CET is 11:00 UTC.
        assert_eq!(local("daily 12:00", 1_719_792_000), 1_719_828_000);
        assert_eq!(local("daily 12:00", 1_705_276_800), 1_705_316_400);
        // Spring forward, 2024-03-31: 02:00 CET jumps to 03:00 CEST at
        // 01:00 UTC (1711846800). 02:30 does not exist and moves to the end
        // of the gap; the next day's 02:30 CEST is 00:30 UTC on 2024-04-01.
        assert_eq!(local("daily 02:30", 1_711_800_000), 1_711_846_800);
        assert_eq!(local("daily 02:30", 1_711_846_800), 1_711_931_400);
        // Hourly: 01:00 CET (00:00 UTC), then the skipped 02:00 and 03:00
        // CEST fire once together at 01:00 UTC, then 04:00 CEST.
        assert_eq!(local("hourly", 1_711_839_600), 1_711_843_200);
        assert_eq!(local("hourly", 1_711_845_000), 1_711_846_800);
        assert_eq!(local("hourly", 1_711_846_800), 1_711_850_400);
        // Every skipped quarter hour fires once, at the end of the gap.
        assert_eq!(local("*/15 * * * *", 1_711_846_799), 1_711_846_800);
        assert_eq!(
            local("*/15 * * * *", 1_711_846_800),
            1_711_846_800 + 15 * MINUTE
        );
        // Fall back, 2024-10-27: 03:00 CEST goes back to 02:00 CET at 01:00
        // UTC (1729990800). 02:30 fires at its first occurrence (00:30 UTC)
        // only; the next is 2024-10-28 02:30 CET (01:30 UTC).
        assert_eq!(local("daily 02:30", 1_729_944_000), 1_729_989_000);
        assert_eq!(local("daily 02:30", 1_729_989_000), 1_730_079_000);
        // From inside the repeated hour, either pass.
        assert_eq!(
            local("daily 02:30", 1_729_990_800 + 10 * MINUTE),
            1_730_079_000
        );
        assert_eq!(
            local("daily 02:30", 1_729_989_000 - 20 * MINUTE),
            1_729_989_000
        );
        // Hourly: 02:00 CEST (00:00 UTC), then 03:00 CET (02:00 UTC): the
        // repeated 02:00 does not fire again.
        assert_eq!(local("hourly", 1_729_985_400), 1_729_987_200);
        assert_eq!(local("hourly", 1_729_987_200), 1_729_994_400);
        // `every` stays in UTC.
        assert_eq!(local("every 15m", 1_711_846_799), 1_711_846_800);
        assert_eq!(local("every 1h", 1_729_987_200), 1_729_990_800);
        // Weekly on the day of the change: Sunday 2024-03-31 02:30 moves to
        // 03:00 CEST.
        assert_eq!(local("weekly sun 02:30", 1_711_800_000), 1_711_846_800);
    }
}
