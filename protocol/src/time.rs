//! Wall-clock time as tally carries it: whole seconds since the Unix epoch.
//!
//! The protocol crate's own code never reads a clock; callers pass the time in.
//! [`UnixTime::now`] is the one wall clock the daemon, the client and the publisher
//! share (nothing in this crate calls it). Dates are shown as
//! ISO 8601 (`2027-12-31`), the format customer IT and vendors both read without doubt.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Seconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnixTime(pub u64);

/// One day in seconds.
pub const DAY: u64 = 86_400;

impl UnixTime {
    /// The system's wall clock, in whole seconds; a clock set before 1970 reads as 0
    /// (the epoch), which every expiry check treats as "long ago", not as a panic.
    pub fn now() -> UnixTime {
        UnixTime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }

    /// This time plus `secs` seconds, saturating instead of overflowing.
    pub fn plus_secs(self, secs: u64) -> UnixTime {
        UnixTime(self.0.saturating_add(secs))
    }

    /// The calendar date (UTC) of this time as `YYYY-MM-DD`.
    pub fn date(self) -> String {
        let (y, m, d) = civil_from_days((self.0 / DAY) as i64);
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// For an end instant (the first moment something is no longer valid), the last
    /// day that is still valid, as `YYYY-MM-DD`: how people say "valid until".
    pub fn last_day(self) -> String {
        UnixTime(self.0.saturating_sub(1)).date()
    }

    /// Parses `YYYY-MM-DD` as the start of that day, UTC.
    pub fn from_date(text: &str) -> Option<UnixTime> {
        let mut parts = text.trim().splitn(3, '-');
        let y: i64 = parts.next()?.parse().ok()?;
        let m: u32 = parts.next()?.parse().ok()?;
        let d: u32 = parts.next()?.parse().ok()?;
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        let days = days_from_civil(y, m, d);
        // Reject dates like 2027-02-31 that normalise into another month.
        if civil_from_days(days) != (y, m, d) {
            return None;
        }
        Some(UnixTime(days as u64 * DAY))
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 % DAY;
        write!(
            f,
            "{}T{:02}:{:02}:{:02}Z",
            self.date(),
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// Howard Hinnant's `days_from_civil`: proleptic Gregorian date to days since the epoch.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(UnixTime(0).date(), "1970-01-01");
        let t = UnixTime::from_date("2027-12-31").unwrap();
        assert_eq!(t.0, 1_830_211_200);
        assert_eq!(t.date(), "2027-12-31");
        assert_eq!(
            UnixTime::from_date("2028-02-29").unwrap().date(),
            "2028-02-29"
        );
        assert_eq!(UnixTime::from_date("2027-02-29"), None);
        assert_eq!(UnixTime::from_date("2027-13-01"), None);
        assert_eq!(UnixTime::from_date("soon"), None);
        assert_eq!(
            UnixTime(1_830_211_200 + 3661).to_string(),
            "2027-12-31T01:01:01Z"
        );
    }
}
