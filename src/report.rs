//! Where a window's count goes: the [`Reporter`] sends each [`CountRecord`] to
//! the sinks and, in close timing, to the window's endpoints, on whichever thread
//! the dedup store reports from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::callback::{CallbackJob, Callbacks};
use crate::record::CountRecord;
use crate::sink::CountSink;

/// What the reporter publishes for `/metrics`; only it writes.
#[derive(Debug, Default)]
pub struct ReportCounters {
    /// Count records this instance published (each revision once, fleet-wide).
    pub records_published: AtomicU64,
    pub last_window_unique: AtomicU64,
}

/// Sends each record to the sinks and, in close timing, to its window's endpoints.
pub struct Reporter {
    counters: Arc<ReportCounters>,
    sinks: Vec<Box<dyn CountSink>>,
    /// Present in close timing; immediate calls are the aggregator's.
    close_callbacks: Option<Callbacks>,
}

impl Reporter {
    pub fn new(
        sinks: Vec<Box<dyn CountSink>>,
        close_callbacks: Option<Callbacks>,
        counters: Arc<ReportCounters>,
    ) -> Self {
        Reporter {
            counters,
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
            self.counters
                .records_published
                .fetch_add(1, Ordering::Relaxed);
        }
        self.counters
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
        reporter.report(&CountRecord::sample(1), false, &[]);
        reporter.report(&CountRecord::sample(2), true, &[]);
        assert_eq!(*local.records.lock().unwrap(), vec![1, 2]);
        assert_eq!(*shared.records.lock().unwrap(), vec![2]);
    }
}
