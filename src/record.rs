//! A window's count as published: [`CountRecord`], the one schema of a count.
//!
//! A count log line, a Kafka record, a Redis stream entry and a callback body are
//! each its serialization. A record may be revised (the fleet learned of more ids
//! after publishing); revisions of a window carry the same `window_start`, a
//! higher `revision` and a count at least as high.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::window::WindowStart;

/// The count of one window, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CountRecord {
    pub window_start: WindowStart,
    pub window_seconds: u64,
    /// Distinct ids in the window: this instance's, or the fleet's, as `scope` says.
    pub unique_requests: u64,
    pub scope: Scope,
    /// 1 for the first record of a window, one more for each revision; 0 for a
    /// running count that is not a published record (immediate callbacks).
    pub revision: u64,
    /// Every instance that took part had handed over all its ids when this was
    /// counted; `false` when the record was published at `VERVE_FLEET_WAIT_MS`
    /// without some of them (a revision follows if their ids arrive).
    pub complete: bool,
    /// The window was not covered whole: by this process in local mode, by any
    /// instance of the fleet in Redis mode (started or stopped within it).
    pub partial: bool,
    /// Instances whose ids the count covers (1 in local mode).
    pub instances: u64,
    pub published_at: Timestamp,
}

impl CountRecord {
    /// Whether the count is known not to change: complete and not cut short.
    pub fn is_final(&self) -> bool {
        self.complete && !self.partial
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        // Strings, integers and booleans only: serializing cannot fail.
        serde_json::to_string(self).expect("a count record serializes")
    }
}

#[cfg(test)]
impl CountRecord {
    /// A complete global record of a window of 2026-11-21, for tests.
    pub(crate) fn sample(revision: u64) -> CountRecord {
        CountRecord {
            window_start: WindowStart::from_unix_secs(1_795_255_500),
            window_seconds: 60,
            unique_requests: 42,
            scope: Scope::Global,
            revision,
            complete: true,
            partial: false,
            instances: 2,
            published_at: Timestamp::from_unix_millis(1_795_255_560_512),
        }
    }
}

/// Whose ids a count covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// This instance's (the embedded local store).
    Instance,
    /// Every instance sharing the Redis store.
    Global,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Instance => "instance",
            Scope::Global => "global",
        }
    }
}

/// A moment, written as RFC 3339 in UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }

    pub fn from_unix_millis(millis: u64) -> Self {
        Timestamp(UNIX_EPOCH + Duration::from_millis(millis))
    }

    pub fn unix_millis(self) -> u64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub fn as_system_time(self) -> SystemTime {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_millis(self.0).fmt(f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_serializes_to_the_documented_schema() {
        let json = serde_json::to_value(CountRecord::sample(3)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "window_start": "2026-11-21T10:05:00Z",
                "window_seconds": 60,
                "unique_requests": 42,
                "scope": "global",
                "revision": 3,
                "complete": true,
                "partial": false,
                "instances": 2,
                "published_at": "2026-11-21T10:06:00.512Z",
            })
        );
    }
}
