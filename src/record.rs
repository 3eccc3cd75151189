//! A window's count as published: [`CountRecord`], the one schema of a count,
//! built by the service only through its named constructors, one per case that exists (an
//! instance's window, a count so far, the fleet's record), so that what `scope`,
//! `revision` and `complete` mean is decided here.
//!
//! A count log line, a Kafka record, a Redis stream entry and a callback body are
//! each its serialization. A record may be revised (the fleet learned of more ids
//! after publishing); revisions of a window carry the same `window_start`, a
//! higher `revision` and a count at least as high.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::window::{WindowLength, WindowStart};

/// The count of one window, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CountRecord {
    pub window_start: WindowStart,
    pub window_seconds: u64,
    /// Distinct ids in the window: this instance's, or the fleet's, as `scope` says.
    pub unique_requests: u64,
    pub scope: Scope,
    /// 1 for the first record of a window, higher for each revision (numbered
    /// from the loss's time by Redis's clock for a window that began before
    /// Redis lost its data: see the fleet protocol); 0 for a count so far that
    /// is not a published record.
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
    /// An instance's record of a closed window (local mode): this process's
    /// count, complete, `revision` 1 or the next after one a stop published
    /// within the window; `partial` if the process did not cover it whole.
    pub fn instance(
        window: WindowStart,
        length: WindowLength,
        unique_requests: u64,
        revision: u64,
        partial: bool,
    ) -> CountRecord {
        CountRecord {
            window_start: window,
            window_seconds: length.as_secs(),
            unique_requests,
            scope: Scope::Instance,
            revision,
            complete: true,
            partial,
            instances: 1,
            published_at: Timestamp::now(),
        }
    }

    /// A count so far, not a published record (`revision` 0, never complete):
    /// this instance's, for immediate callbacks and for a window a stopping
    /// instance could not get the fleet's record of; or the fleet's, for the
    /// callbacks of an instance leaving a window to the rest of the fleet.
    pub fn so_far(
        window: WindowStart,
        length: WindowLength,
        unique_requests: u64,
        whose: SoFar,
    ) -> CountRecord {
        let (scope, instances, partial) = match whose {
            SoFar::Instance { partial } => (Scope::Instance, 1, partial),
            SoFar::Fleet { instances } => (Scope::Global, instances, true),
        };
        CountRecord {
            window_start: window,
            window_seconds: length.as_secs(),
            unique_requests,
            scope,
            revision: 0,
            complete: false,
            partial,
            instances,
            published_at: Timestamp::now(),
        }
    }

    /// The fleet's record of a window, as the fleet protocol published it: its
    /// revision, count and flags are the fleet's, decided in one script.
    pub fn fleet(window: WindowStart, length: WindowLength, fleet: FleetRecord) -> CountRecord {
        CountRecord {
            window_start: window,
            window_seconds: length.as_secs(),
            unique_requests: fleet.unique_requests,
            scope: Scope::Global,
            revision: fleet.revision,
            complete: fleet.complete,
            partial: fleet.partial,
            instances: fleet.instances,
            published_at: Timestamp::from_unix_millis(fleet.published_at_ms),
        }
    }

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

/// Whose count a [`CountRecord::so_far`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoFar {
    /// This instance's; `partial` if it did not cover the window whole.
    Instance { partial: bool },
    /// The fleet's, of a window this instance leaves to it (so cut short), with
    /// the instances done with it.
    Fleet { instances: u64 },
}

/// What the fleet protocol stores of a published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetRecord {
    pub revision: u64,
    pub unique_requests: u64,
    pub complete: bool,
    pub partial: bool,
    pub instances: u64,
    pub published_at_ms: u64,
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

    const W: WindowStart = WindowStart::from_unix_secs(1_795_255_500);

    /// What a record says of itself, beside its count.
    fn meaning(r: &CountRecord) -> (Scope, u64, bool, bool, u64, u64) {
        (
            r.scope,
            r.revision,
            r.complete,
            r.partial,
            r.instances,
            r.window_seconds,
        )
    }

    #[test]
    fn each_kind_of_record_says_what_it_is() {
        let minute = WindowLength::from_secs(60);
        let instance = CountRecord::instance(W, minute, 7, 2, true);
        assert_eq!(meaning(&instance), (Scope::Instance, 2, true, true, 1, 60));
        let mine = CountRecord::so_far(W, minute, 7, SoFar::Instance { partial: false });
        assert_eq!(meaning(&mine), (Scope::Instance, 0, false, false, 1, 60));
        let fleets = CountRecord::so_far(W, minute, 7, SoFar::Fleet { instances: 3 });
        assert_eq!(meaning(&fleets), (Scope::Global, 0, false, true, 3, 60));
        let fleet = FleetRecord {
            revision: (1 << 32) + 1,
            unique_requests: 7,
            complete: true,
            partial: false,
            instances: 2,
            published_at_ms: 1_795_255_560_512,
        };
        let published = CountRecord::fleet(W, minute, fleet);
        assert_eq!(
            meaning(&published),
            (Scope::Global, (1 << 32) + 1, true, false, 2, 60)
        );
        assert_eq!(published.published_at.unix_millis(), 1_795_255_560_512);
        assert!([instance, mine, fleets, published]
            .iter()
            .all(|r| r.unique_requests == 7));
    }

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
