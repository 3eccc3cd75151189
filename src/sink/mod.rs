//! Where the count of each window goes.
//!
//! The [`Reporter`](crate::report::Reporter) hands every [`CountRecord`] to each of
//! its [`CountSink`]s in turn and does not know which kinds it has. A sink must not
//! block for long: it runs on the thread that settles counts (the aggregator, or the
//! Redis forwarder), once per record.

pub mod kafka;
pub mod log;

pub use kafka::{KafkaSettings, KafkaSink};
pub use log::{CountLogFormat, LogSink};

use std::time::Instant;

use crate::report::CountRecord;
use crate::window::WindowStart;

/// A shared sink took a record for good (Kafka acknowledged it): in Redis mode the
/// fleet notes it, so that no other instance sends the record again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    pub window: WindowStart,
    pub revision: u64,
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
