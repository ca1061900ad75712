//! Wall-clock formatting for the sandbox: the RFC 2822 date in the SMTP greeting, the RFC 3339
//! `received_at` in stored envelopes, Entra's `2026-12-01 10:22:33Z` error timestamps and the
//! calendar dates that bound the throwaway certificates.
//!
//! Hand-written because the crate carries no date library; only UTC is ever needed.

use std::time::{SystemTime, UNIX_EPOCH};

const DAY_NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Milliseconds since the Unix epoch; a clock set before 1970 counts as the epoch.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UtcDateTime {
    pub(crate) year: u64,
    pub(crate) month: u32,
    pub(crate) day: u32,
    pub(crate) hour: u32,
    pub(crate) minute: u32,
    pub(crate) second: u32,
    pub(crate) millis: u32,
    /// 0 = Sunday.
    weekday: usize,
}

impl UtcDateTime {
    pub(crate) fn now() -> UtcDateTime {
        UtcDateTime::from_unix_millis(unix_millis())
    }

    pub(crate) fn from_unix_millis(millis: u64) -> UtcDateTime {
        let secs = millis / 1000;
        let mut days = secs / 86_400;
        let secs_of_day = secs % 86_400;
        // 1970-01-01 was a Thursday.
        let weekday = ((days + 4) % 7) as usize;

        // Walking year by year is bounded (a few hundred steps for any real clock) and easier
        // to check by eye than a closed-form calendar formula.
        let mut year = 1970;
        loop {
            let len = if is_leap(year) { 366 } else { 365 };
            if days < len {
                break;
            }
            days -= len;
            year += 1;
        }
        let mut month = 1;
        loop {
            let len = days_in_month(year, month);
            if days < len {
                break;
            }
            days -= len;
            month += 1;
        }

        UtcDateTime {
            year,
            month,
            day: days as u32 + 1,
            hour: (secs_of_day / 3600) as u32,
            minute: (secs_of_day % 3600 / 60) as u32,
            second: (secs_of_day % 60) as u32,
            millis: (millis % 1000) as u32,
            weekday,
        }
    }

    /// `Tue, 1 Dec 2026 10:22:33 +0000`, as Exchange writes it in its greeting.
    pub(crate) fn rfc2822(&self) -> String {
        format!(
            "{}, {} {} {} {:02}:{:02}:{:02} +0000",
            DAY_NAMES[self.weekday],
            self.day,
            MONTH_NAMES[(self.month - 1) as usize],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }

    /// `2026-12-01T10:22:33.123Z`.
    pub(crate) fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }

    /// `2026-12-01 10:22:33Z`, the form Entra uses in `timestamp` and `error_description`.
    pub(crate) fn entra(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

fn is_leap(year: u64) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u64, month: u32) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates() {
        let epoch = UtcDateTime::from_unix_millis(0);
        assert_eq!(epoch.rfc2822(), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(epoch.rfc3339(), "1970-01-01T00:00:00.000Z");

        // 2024-02-29 12:34:56.789 UTC, a leap day.
        let leap = UtcDateTime::from_unix_millis(1_709_210_096_789);
        assert_eq!(leap.rfc3339(), "2024-02-29T12:34:56.789Z");
        assert_eq!(leap.rfc2822(), "Thu, 29 Feb 2024 12:34:56 +0000");
        assert_eq!(leap.entra(), "2024-02-29 12:34:56Z");

        // 2000-12-31 23:59:59 UTC: end of a leap century year.
        let end = UtcDateTime::from_unix_millis(978_307_199_000);
        assert_eq!(end.rfc3339(), "2000-12-31T23:59:59.000Z");
        assert_eq!(end.rfc2822(), "Sun, 31 Dec 2000 23:59:59 +0000");
    }
}
