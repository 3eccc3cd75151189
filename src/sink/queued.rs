//! A shared sink that never makes the reporter wait: [`CountSink::publish`] only
//! queues the record (a full queue drops it, logged and counted), and a thread of
//! its own delivers the records in order to a [`Destination`], retrying each with
//! backoff until the destination takes it. At shutdown the thread gets until the
//! deadline; what is left then is logged and counted as failed.
//!
//! Every record the destination took is an acknowledgement passed to [`Acks`]
//! (in Redis mode the fleet notes it, so that no other instance sends the record
//! again), then counted. A network sink is a [`Destination`]: how to deliver one
//! record within a time limit, and the words its log lines use.

use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::RecvTimeoutError;

use super::{Acknowledged, Acks, CountSink, SinkCounters};
use crate::backoff::Backoff;
use crate::record::CountRecord;

/// Records waiting for the thread. One record per window (and revision): at 60 s
/// windows this is 17 hours of the destination being away, in about 100 KiB.
const QUEUE_RECORDS: usize = 1024;

/// How long after the shutdown deadline the sink waits for its thread to have
/// ended, which it does at the deadline.
const ENDING_GRACE: Duration = Duration::from_millis(500);

/// The first retry of a record waits this long, each further one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two attempts: a record is delivered at most this long
/// after the destination is back, and one that stays away costs one connection
/// attempt per this interval.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where a [`QueuedSink`] delivers, one record at a time, from its own thread.
pub trait Destination: Send + 'static {
    /// What log lines call it ("Redis stream").
    const NAME: &'static str;
    /// What a delivery is called in log lines ("append"), and its participle
    /// ("appended").
    const DELIVERY: &'static str;
    const DELIVERED: &'static str;
    /// The thread's name.
    const THREAD: &'static str;

    type Error: Display;

    /// Where in the destination records go (a stream's key), for log lines.
    fn target(&self) -> &str;

    /// How long one attempt may take outside shutdown.
    fn timeout(&self) -> Duration;

    /// Delivers `record`, every step within `limit`; returns the destination's
    /// receipt for the log (an entry id). After an error, the next attempt starts
    /// afresh (a new connection).
    fn deliver(&mut self, record: &CountRecord, limit: Duration) -> Result<String, Self::Error>;
}

/// The queue's end that the reporter holds; the thread holds the other.
pub struct QueuedSink {
    /// Dropped at shutdown: the thread then ends once the queue is empty.
    records: Option<flume::Sender<CountRecord>>,
    /// The queue, for shutdown to account for what the thread never took.
    queue: flume::Receiver<CountRecord>,
    /// Tells the thread the shutdown deadline (waking it from a backoff).
    finish: flume::Sender<Instant>,
    /// Disconnects when the thread ends.
    ended: flume::Receiver<()>,
    counters: Arc<SinkCounters>,
    name: &'static str,
    delivered: &'static str,
}

impl QueuedSink {
    /// Starts the thread delivering to `destination`, which need not be reachable
    /// yet. Each record it takes is reported to `acks`, if given.
    pub fn start<D: Destination>(
        destination: D,
        counters: Arc<SinkCounters>,
        acks: Option<Acks>,
    ) -> std::io::Result<QueuedSink> {
        let (records, queue) = flume::bounded(QUEUE_RECORDS);
        let (finish, deadline) = flume::bounded(1);
        let (end, ended) = flume::bounded(0);
        let courier = Courier {
            destination,
            records: queue.clone(),
            finish: deadline,
            deadline: None,
            acks,
            counters: counters.clone(),
            _end: end,
        };
        std::thread::Builder::new()
            .name(D::THREAD.into())
            .spawn(move || courier.run())?;
        Ok(QueuedSink {
            records: Some(records),
            queue,
            finish,
            ended,
            counters,
            name: D::NAME,
            delivered: D::DELIVERED,
        })
    }
}

impl CountSink for QueuedSink {
    fn publish(&mut self, record: &CountRecord) {
        // Gone only after shutdown's flush, when nothing is reported any more.
        let Some(records) = &self.records else {
            return;
        };
        if records.try_send(*record).is_err() {
            let failed = count_failed(&self.counters, 1);
            tracing::warn!(
                window_start = %record.window_start,
                revision = record.revision,
                queued = QUEUE_RECORDS,
                failed_total = failed,
                "{} queue full (away for long); record dropped, its count is in the count log only",
                self.name
            );
        }
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn flush(&mut self, deadline: Instant) {
        let _ = self.finish.try_send(deadline);
        self.records = None;
        // The thread ends at the deadline on its own (attempts it starts once the
        // deadline is known are bounded by it) and then says what it gave up;
        // waiting only until the deadline would race it, and the process could exit
        // before that line is written. The grace is for that line; an attempt
        // already under way with the ordinary timeout when shutdown began can
        // outlast it.
        let _ = self.ended.recv_deadline(deadline + ENDING_GRACE);
        let left: Vec<CountRecord> = self.queue.drain().collect();
        if let (Some(first), Some(last)) = (left.first(), left.last()) {
            let failed = count_failed(&self.counters, left.len() as u64);
            tracing::error!(
                records = left.len(),
                first_window = %first.window_start,
                last_window = %last.window_start,
                failed_total = failed,
                "records still queued for the {} at the shutdown deadline were not {}",
                self.name,
                self.delivered
            );
        }
    }
}

/// The thread that delivers.
struct Courier<D: Destination> {
    destination: D,
    records: flume::Receiver<CountRecord>,
    finish: flume::Receiver<Instant>,
    /// The shutdown deadline, once known.
    deadline: Option<Instant>,
    acks: Option<Acks>,
    counters: Arc<SinkCounters>,
    /// Dropped with the thread's state, when it ends.
    _end: flume::Sender<()>,
}

impl<D: Destination> Courier<D> {
    fn run(mut self) {
        while let Ok(record) = self.records.recv() {
            if !self.deliver(&record) {
                return;
            }
        }
    }

    /// Delivers `record`, retrying until the destination takes it; `false` if the
    /// shutdown deadline came first (the record is then given up).
    fn deliver(&mut self, record: &CountRecord) -> bool {
        let mut waits = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut attempts = 0u32;
        loop {
            if self.deadline.is_none() {
                self.deadline = self.finish.try_recv().ok();
            }
            // At shutdown no attempt may outlast the deadline.
            let timeout = self.destination.timeout();
            let limit = match self.deadline {
                None => timeout,
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(timeout),
                    _ => {
                        self.give_up(record, attempts);
                        return false;
                    }
                },
            };
            attempts += 1;
            match self.destination.deliver(record, limit) {
                Ok(receipt) => {
                    if let Some(acks) = &self.acks {
                        // Before it is counted: whoever sees the count sees the ack too.
                        acks.acknowledged(Acknowledged {
                            window: record.window_start,
                            revision: record.revision,
                        });
                    }
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        window_start = %record.window_start,
                        revision = record.revision,
                        id = %receipt,
                        attempts,
                        "window {} to the {}",
                        D::DELIVERED,
                        D::NAME
                    );
                    return true;
                }
                Err(error) if attempts == 1 => tracing::warn!(
                    window_start = %record.window_start,
                    revision = record.revision,
                    %error,
                    target = self.destination.target(),
                    "{} {} failed; retrying with backoff",
                    D::NAME,
                    D::DELIVERY
                ),
                Err(error) => tracing::debug!(
                    window_start = %record.window_start,
                    attempts,
                    %error,
                    "{} {} still failing",
                    D::NAME,
                    D::DELIVERY
                ),
            }
            self.pause(waits.next_wait());
        }
    }

    /// Waits `wait` before the next attempt, or less if shutdown begins meanwhile.
    fn pause(&mut self, wait: Duration) {
        match self.deadline {
            Some(deadline) => {
                std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())))
            }
            None => match self.finish.recv_timeout(wait) {
                Ok(deadline) => self.deadline = Some(deadline),
                Err(RecvTimeoutError::Timeout) => {}
                // The sink was dropped without a flush: no deadline will come.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            },
        }
    }

    fn give_up(&self, record: &CountRecord, attempts: u32) {
        let failed = count_failed(&self.counters, 1);
        tracing::error!(
            window_start = %record.window_start,
            revision = record.revision,
            attempts,
            failed_total = failed,
            "{} {} given up at the shutdown deadline; this window's count is in the count log only",
            D::NAME,
            D::DELIVERY
        );
    }
}

/// Counts `records` as given up; returns the total so far, for the log line.
fn count_failed(counters: &SinkCounters, records: u64) -> u64 {
    counters.failed.fetch_add(records, Ordering::Relaxed) + records
}
