//! Counting windows: aligned wall-clock intervals in UTC.
//!
//! A window of length `L` seconds starts at a Unix time that is a multiple of `L`,
//! so every instance of the service, whatever its start time, agrees on which window
//! a moment belongs to. A request belongs to the window of the moment its bytes were
//! read by a worker, not of the moment the aggregator sees it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The start of a counting window, in whole seconds since the Unix epoch (UTC).
///
/// Ordering follows time, so windows can key a `BTreeMap` and be compared directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowStart(u64);

impl WindowStart {
    /// The window start at `unix_secs` seconds since the epoch; not checked for alignment.
    pub const fn from_unix_secs(unix_secs: u64) -> Self {
        WindowStart(unix_secs)
    }

    /// Seconds since the Unix epoch.
    pub const fn unix_secs(self) -> u64 {
        self.0
    }

    /// The moment this window starts.
    pub fn as_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0)
    }
}

/// The length of every window, and the arithmetic that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLength {
    secs: u64,
}

impl WindowLength {
    /// A window length of `secs` seconds.
    ///
    /// # Panics
    /// If `secs` is zero; the configuration refuses zero before it gets here.
    pub fn from_secs(secs: u64) -> Self {
        assert!(secs > 0, "a window must last at least one second");
        WindowLength { secs }
    }

    pub fn as_secs(self) -> u64 {
        self.secs
    }

    /// The window that contains `t`. Times before the epoch fall in the first window:
    /// a clock that far off is not worth a separate error path on every request.
    #[inline]
    pub fn window_of(self, t: SystemTime) -> WindowStart {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        WindowStart(secs - secs % self.secs)
    }

    /// The first moment after `window`: the start of the next window.
    pub fn end_of(self, window: WindowStart) -> SystemTime {
        self.next(window).as_system_time()
    }

    /// The window that follows `window`.
    pub fn next(self, window: WindowStart) -> WindowStart {
        WindowStart(window.0 + self.secs)
    }

    /// How many windows start at or after `from` and before `to`.
    pub fn windows_between(self, from: WindowStart, to: WindowStart) -> u64 {
        to.0.saturating_sub(from.0).div_ceil(self.secs)
    }
}

/// Formats as RFC 3339 in UTC with a `Z` suffix, e.g. `2026-11-21T10:05:00Z`.
impl fmt::Display for WindowStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 > LAST_RFC3339_SECOND {
            // Past year 9999, which RFC 3339 cannot write; only a clock gone wild gets here.
            return write!(f, "@{}", self.0);
        }
        humantime::format_rfc3339_seconds(self.as_system_time()).fmt(f)
    }
}

/// The last second of year 9999.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// As its RFC 3339 text, the form every count record carries.
impl serde::Serialize for WindowStart {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn a_window_contains_its_start_but_not_its_end() {
        let minute = WindowLength::from_secs(60);
        assert_eq!(minute.window_of(at(120, 0)), WindowStart(120));
        assert_eq!(minute.window_of(at(179, 999_999_999)), WindowStart(120));
        assert_eq!(minute.window_of(at(180, 0)), WindowStart(180));
        assert_eq!(minute.end_of(WindowStart(120)), at(180, 0));
        assert_eq!(minute.next(WindowStart(120)), WindowStart(180));
    }

    #[test]
    fn windows_align_to_multiples_of_their_length() {
        let two = WindowLength::from_secs(2);
        assert_eq!(two.window_of(at(1_000_001, 500)), WindowStart(1_000_000));
        let seven = WindowLength::from_secs(7);
        assert_eq!(seven.window_of(at(20, 0)), WindowStart(14));
        assert_eq!(seven.window_of(at(21, 0)), WindowStart(21));
    }

    #[test]
    fn times_before_the_epoch_fall_in_the_first_window() {
        let minute = WindowLength::from_secs(60);
        assert_eq!(
            minute.window_of(UNIX_EPOCH - Duration::from_secs(5)),
            WindowStart(0)
        );
    }

    #[test]
    fn formats_as_rfc3339_utc() {
        assert_eq!(WindowStart(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            WindowStart(1_795_255_500).to_string(),
            "2026-11-21T10:05:00Z"
        );
        // Leap day, end of a leap year, and the day after.
        assert_eq!(WindowStart(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(
            WindowStart(1_735_689_599).to_string(),
            "2024-12-31T23:59:59Z"
        );
        assert_eq!(
            WindowStart(1_735_689_600).to_string(),
            "2025-01-01T00:00:00Z"
        );
        // Not a leap year: 2100-02-28 is followed by 2100-03-01.
        assert_eq!(
            WindowStart(4_107_456_000).to_string(),
            "2100-02-28T00:00:00Z"
        );
        assert_eq!(
            WindowStart(4_107_542_400).to_string(),
            "2100-03-01T00:00:00Z"
        );
    }

    #[test]
    fn beyond_year_9999_falls_back_to_unix_seconds() {
        assert_eq!(
            WindowStart(253_402_300_799).to_string(),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(WindowStart(253_402_300_800).to_string(), "@253402300800");
    }
}
