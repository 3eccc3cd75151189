//! Where the count of each window goes.
//!
//! The [`Reporter`](crate::report::Reporter) hands every [`CountRecord`] to each of
//! its [`CountSink`]s in turn and does not know which kinds it has. A sink must not
//! block for long: it runs on the thread that settles counts (the aggregator, or the
//! Redis forwarder), once per record. The sinks that talk to a network queue the
//! record for a thread: librdkafka's own for Kafka, and a [`QueuedSink`]'s for the
//! others (a Redis stream), which only say how to deliver one record.
//!
//! In Redis mode the shared sinks report what they took for good through [`Acks`],
//! which tells the fleet a record is acknowledged once every shared sink took it.

pub mod kafka;
pub mod log;
pub mod queued;
pub mod redis_stream;

pub use kafka::{KafkaSettings, KafkaSink};
pub use log::{CountLogFormat, LogSink};
pub use queued::QueuedSink;
pub use redis_stream::RedisStreamSettings;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::record::CountRecord;
use crate::window::WindowStart;

/// A shared sink took a record for good (Kafka acknowledged it, or Redis appended
/// it to the stream): in Redis mode the fleet notes it, so that no other instance
/// sends the record again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Acknowledged {
    pub window: WindowStart,
    pub revision: u64,
}

/// Records some but not all shared sinks acknowledged are remembered up to this
/// many, the oldest forgotten first. A record stays partial only when a sink gave
/// it up, and the fleet stops following a window a few windows after its end, so
/// an acknowledgement that old can no longer matter.
const PARTIAL_ACKS: usize = 1024;

/// Where the shared sinks report acknowledgements, one clone each, for the fleet.
///
/// The fleet keeps one acknowledged revision per window, so with several shared
/// sinks (Kafka and a Redis stream) a record is passed on only once each of them
/// acknowledged it: if its publisher stops before one of them took it, another
/// instance still sends it on.
#[derive(Clone)]
pub struct Acks {
    fleet: flume::Sender<Acknowledged>,
    /// The shared sinks that must each acknowledge a record.
    sinks: usize,
    /// How many sinks acknowledged each record not yet passed on. Locked by the
    /// sinks' delivery threads once per record, for a map lookup: never contended
    /// for long.
    partial: Arc<Mutex<BTreeMap<Acknowledged, usize>>>,
}

impl Acks {
    /// Acknowledgements of `sinks` shared sinks, passed on to `fleet`.
    pub fn new(fleet: flume::Sender<Acknowledged>, sinks: usize) -> Self {
        Acks {
            fleet,
            sinks,
            partial: Arc::default(),
        }
    }

    /// One shared sink took `ack`'s record for good.
    pub fn acknowledged(&self, ack: Acknowledged) {
        if self.sinks > 1 {
            let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
            let took = partial.entry(ack).or_default();
            *took += 1;
            if *took < self.sinks {
                if partial.len() > PARTIAL_ACKS {
                    partial.pop_first();
                }
                return;
            }
            partial.remove(&ack);
        }
        // Nobody listens once this instance has left the fleet (at shutdown), and
        // an acknowledgement is then of no use.
        let _ = self.fleet.send(ack);
    }
}

/// What a shared sink delivered and gave up, for `/metrics`; only the sink writes.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

/// How `/metrics` names a kind of network sink's counters, and what each counts:
/// each sink's file declares its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkMetricNames {
    /// `verve_<kind>_delivered`, and its help text.
    pub delivered: (&'static str, &'static str),
    /// `verve_<kind>_failed`, and its help text.
    pub failed: (&'static str, &'static str),
}

/// The counters of every network sink the service started, for `/metrics`.
#[derive(Debug, Default)]
pub struct SinkMetrics(Mutex<Vec<(SinkMetricNames, Arc<SinkCounters>)>>);

impl SinkMetrics {
    /// New counters for a sink named by `names`, in every scrape from now on.
    pub fn register(&self, names: SinkMetricNames) -> Arc<SinkCounters> {
        let counters = Arc::new(SinkCounters::default());
        self.sinks().push((names, counters.clone()));
        counters
    }

    /// Every registered sink's counters: (metric name, help, value).
    pub fn read(&self) -> Vec<(&'static str, &'static str, u64)> {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        self.sinks()
            .iter()
            .flat_map(|(names, counters)| {
                let (delivered, failed) = (names.delivered, names.failed);
                [
                    (delivered.0, delivered.1, load(&counters.delivered)),
                    (failed.0, failed.1, load(&counters.failed)),
                ]
            })
            .collect()
    }

    fn sinks(&self) -> std::sync::MutexGuard<'_, Vec<(SinkMetricNames, Arc<SinkCounters>)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A destination for window counts.
pub trait CountSink: Send {
    /// Records one count. Failures are the sink's to log; counting carries on with
    /// the next window either way.
    fn publish(&mut self, record: &CountRecord);

    /// Whether the destination is shared by the fleet (a Kafka topic), so that it
    /// gets each record once, from the instance that published it, rather than from
    /// every instance that learns of it (as each instance's own count log does).
    fn is_shared(&self) -> bool {
        false
    }

    /// Shutdown: delivers what is still pending, at most until `deadline`.
    fn flush(&mut self, _deadline: Instant) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(window: u64, revision: u64) -> Acknowledged {
        Acknowledged {
            window: WindowStart::from_unix_secs(window * 60),
            revision,
        }
    }

    #[test]
    fn every_registered_sink_is_read_under_its_own_names() {
        let metrics = SinkMetrics::default();
        let kafka = metrics.register(kafka::METRICS);
        let stream = metrics.register(redis_stream::METRICS);
        kafka.delivered.store(3, Ordering::Relaxed);
        stream.failed.store(1, Ordering::Relaxed);
        let read: Vec<(&str, u64)> = metrics.read().into_iter().map(|(n, _, v)| (n, v)).collect();
        assert_eq!(
            read,
            [
                ("verve_kafka_delivered", 3),
                ("verve_kafka_failed", 0),
                ("verve_redis_stream_delivered", 0),
                ("verve_redis_stream_failed", 1),
            ]
        );
    }

    #[test]
    fn one_shared_sink_acknowledges_alone() {
        let (fleet, noted) = flume::unbounded();
        Acks::new(fleet, 1).acknowledged(ack(1, 1));
        assert_eq!(noted.drain().collect::<Vec<_>>(), vec![ack(1, 1)]);
    }

    #[test]
    fn with_two_shared_sinks_a_record_is_acknowledged_once_both_took_it() {
        let (fleet, noted) = flume::unbounded();
        // One clone per sink, as start-up hands them out.
        let kafka = Acks::new(fleet, 2);
        let stream = kafka.clone();
        stream.acknowledged(ack(1, 1));
        stream.acknowledged(ack(1, 2));
        assert!(noted.is_empty(), "only one of the two took them");
        kafka.acknowledged(ack(1, 2));
        kafka.acknowledged(ack(1, 1));
        assert_eq!(
            noted.drain().collect::<Vec<_>>(),
            vec![ack(1, 2), ack(1, 1)]
        );
        assert!(kafka.partial.lock().unwrap().is_empty());
    }

    #[test]
    fn records_only_one_sink_took_are_forgotten_oldest_first() {
        let (fleet, noted) = flume::unbounded();
        let acks = Acks::new(fleet, 2);
        for window in 0..=PARTIAL_ACKS as u64 {
            acks.acknowledged(ack(window, 1));
        }
        assert_eq!(acks.partial.lock().unwrap().len(), PARTIAL_ACKS);
        // The oldest was forgotten, so a second acknowledgement does not complete
        // it; the others still complete.
        acks.acknowledged(ack(0, 1));
        acks.acknowledged(ack(1, 1));
        assert_eq!(noted.drain().collect::<Vec<_>>(), vec![ack(1, 1)]);
    }
}
