//! A window's count: what it is ([`CountRecord`]) and where it goes ([`Reporter`]).
//!
//! A [`ClosedWindow`] is what the aggregator knows when it closes a window: its set
//! of ids, how many there are, the endpoints named in it. The dedup store turns it
//! into a [`CountRecord`] (this instance's own count, or the fleet's from Redis) and
//! hands the record to the [`Reporter`], on whichever thread the store reports from.
//!
//! [`CountRecord`] is the one schema of a count: a count log line, a Kafka record
//! and a callback body are each its serialization. A record may be revised (the
//! fleet learned of more ids after publishing); revisions of a window carry the same
//! `window_start`, a higher `revision` and a count at least as high.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::callback::{CallbackJob, Callbacks};
use crate::metrics::Telemetry;
use crate::sink::CountSink;
use crate::store::IdSet;
use crate::window::WindowStart;

/// A window the aggregator has closed.
pub struct ClosedWindow {
    pub window: WindowStart,
    /// Every id this instance received in the window.
    pub ids: IdSet,
    /// How many ids `ids` holds, counted as they were inserted.
    pub unique_requests: u64,
    /// Endpoints named in the window (at most `VERVE_CALLBACK_MAX_ENDPOINTS`).
    pub endpoints: Vec<Arc<str>>,
    /// This process did not run for the whole window: it started or stopped within it.
    pub partial: bool,
}

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

/// Sends each record to the sinks and, in close timing, to its window's endpoints.
pub struct Reporter {
    telemetry: Arc<Telemetry>,
    sinks: Vec<Box<dyn CountSink>>,
    /// Present in close timing; immediate calls are the aggregator's.
    close_callbacks: Option<Callbacks>,
}

impl Reporter {
    pub fn new(
        sinks: Vec<Box<dyn CountSink>>,
        close_callbacks: Option<Callbacks>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Reporter {
            telemetry,
            sinks,
            close_callbacks,
        }
    }

    /// Shutdown: lets every sink deliver what is pending, at most until `deadline`.
    pub fn flush(&mut self, deadline: Instant) {
        for sink in &mut self.sinks {
            sink.flush(deadline);
        }
    }

    /// Reports `record` to every sink, to the shared ones only if this instance
    /// `published` it (so that the fleet writes each revision to them once), and
    /// calls `endpoints` back with it.
    pub fn report(&mut self, record: &CountRecord, published: bool, endpoints: &[Arc<str>]) {
        tracing::info!(
            window_start = %record.window_start,
            unique_requests = record.unique_requests,
            scope = %record.scope.as_str(),
            revision = record.revision,
            complete = record.complete,
            partial = record.partial,
            instances = record.instances,
            published,
            "window counted"
        );
        for sink in &mut self.sinks {
            if published || !sink.is_shared() {
                sink.publish(record);
            }
        }
        if published {
            self.telemetry
                .records_published
                .fetch_add(1, Ordering::Relaxed);
        }
        self.telemetry
            .last_window_unique
            .store(record.unique_requests, Ordering::Relaxed);
        self.call_back(record, endpoints);
    }

    /// Whether some sink is shared by the fleet (Kafka).
    pub fn has_shared_sinks(&self) -> bool {
        self.sinks.iter().any(|sink| sink.is_shared())
    }

    /// Sends `record` to the shared sinks only: its publisher stopped before they
    /// acknowledged it, and this instance already logged it.
    pub fn redeliver(&mut self, record: &CountRecord) {
        for sink in self.sinks.iter_mut().filter(|sink| sink.is_shared()) {
            sink.publish(record);
        }
    }

    /// Calls `endpoints` back with `record` (in close timing; immediate calls are
    /// the aggregator's), without writing it anywhere.
    pub fn call_back(&mut self, record: &CountRecord, endpoints: &[Arc<str>]) {
        if let Some(callbacks) = &mut self.close_callbacks {
            for endpoint in endpoints {
                callbacks.submit(CallbackJob {
                    endpoint: endpoint.clone(),
                    record: *record,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A sink that remembers what it was given.
    #[derive(Clone, Default)]
    struct Recorded {
        records: Arc<Mutex<Vec<u64>>>,
        shared: bool,
    }

    impl CountSink for Recorded {
        fn publish(&mut self, record: &CountRecord) {
            self.records.lock().unwrap().push(record.revision);
        }

        fn is_shared(&self) -> bool {
            self.shared
        }
    }

    fn record(revision: u64) -> CountRecord {
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

    #[test]
    fn shared_sinks_only_get_what_this_instance_published() {
        let local = Recorded::default();
        let shared = Recorded {
            shared: true,
            ..Recorded::default()
        };
        let mut reporter = Reporter::new(
            vec![Box::new(local.clone()), Box::new(shared.clone())],
            None,
            Arc::default(),
        );
        reporter.report(&record(1), false, &[]);
        reporter.report(&record(2), true, &[]);
        assert_eq!(*local.records.lock().unwrap(), vec![1, 2]);
        assert_eq!(*shared.records.lock().unwrap(), vec![2]);
    }

    #[test]
    fn the_record_serializes_to_the_documented_schema() {
        let json = serde_json::to_value(record(3)).unwrap();
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
