//! The Redis stream sink: one stream entry per record, `XADD <stream> MAXLEN ~ N *`.
//!
//! An entry's fields are the count record's JSON fields, in the JSON's order, each
//! value written as JSON writes it but strings without quotes (`window_start
//! 2026-11-21T10:05:00Z … complete true`): they come from the record's `Serialize`
//! impl, so the stream, the count log, Kafka and the callbacks share one schema.
//! The stream is shared like a Kafka topic: the reporter hands this sink only the
//! records this instance published, and in Redis mode every entry Redis appended
//! (an XADD answered with an id) is an acknowledgement the fleet notes, so that no
//! other instance sends the record again.
//!
//! The reporter's thread never waits for the network: [`CountSink::publish`] only
//! queues the record (a full queue drops it, logged and counted), and a thread of
//! its own appends the records in order, retrying each with backoff until Redis
//! takes it. At shutdown it gets until the deadline; what is left then is logged
//! and counted as failed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flume::RecvTimeoutError;
use redis::{Cmd, RedisResult};
use serde_json::Value;

use super::{Acknowledged, Acks, CountSink, SinkCounters};
use crate::backoff::Backoff;
use crate::record::CountRecord;
use crate::redis_link::{RedisEndpoint, RedisLink};

/// Records waiting for the thread. One record per window (and revision): at 60 s
/// windows this is 17 hours of Redis being away, in about 100 KiB.
const QUEUE_RECORDS: usize = 1024;

/// How long after the shutdown deadline the sink waits for its thread to have
/// ended, which it does at the deadline.
const ENDING_GRACE: Duration = Duration::from_millis(500);

/// The first retry of a record waits this long, each further one twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two attempts: a record reaches Redis at most this long
/// after Redis is back, and a Redis that stays away costs one connection attempt
/// per this interval.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where to append.
#[derive(Debug, Clone)]
pub struct RedisStreamSettings {
    /// The stream's key.
    pub stream: String,
    /// Entries the stream keeps, trimmed approximately.
    pub maxlen: u64,
    /// Connect, read and write timeout of each XADD.
    pub timeout: Duration,
}

pub struct RedisStreamSink {
    /// Dropped at shutdown: the thread then ends once the queue is empty.
    records: Option<flume::Sender<CountRecord>>,
    /// The queue, for shutdown to account for what the thread never took.
    queue: flume::Receiver<CountRecord>,
    /// Tells the thread the shutdown deadline (waking it from a backoff).
    finish: flume::Sender<Instant>,
    /// Disconnects when the thread ends.
    ended: flume::Receiver<()>,
    counters: Arc<SinkCounters>,
}

impl RedisStreamSink {
    /// Starts the thread; Redis need not be reachable yet. Each appended record is
    /// reported to `acks`, if given.
    pub fn start(
        endpoint: RedisEndpoint,
        settings: RedisStreamSettings,
        counters: Arc<SinkCounters>,
        acks: Option<Acks>,
    ) -> std::io::Result<RedisStreamSink> {
        let (records, queue) = flume::bounded(QUEUE_RECORDS);
        let (finish, deadline) = flume::bounded(1);
        let (end, ended) = flume::bounded(0);
        let appender = Appender {
            endpoint,
            connection: None,
            settings,
            records: queue.clone(),
            finish: deadline,
            deadline: None,
            acks,
            counters: counters.clone(),
            _end: end,
        };
        std::thread::Builder::new()
            .name("verve-redis-stream".into())
            .spawn(move || appender.run())?;
        Ok(RedisStreamSink {
            records: Some(records),
            queue,
            finish,
            ended,
            counters,
        })
    }
}

impl CountSink for RedisStreamSink {
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
                "Redis stream queue full (Redis away for long); record dropped, its count is in the count log only"
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
                "records still queued for the Redis stream at the shutdown deadline were not appended"
            );
        }
    }
}

/// The thread that appends.
struct Appender {
    endpoint: RedisEndpoint,
    connection: Option<RedisLink>,
    settings: RedisStreamSettings,
    records: flume::Receiver<CountRecord>,
    finish: flume::Receiver<Instant>,
    /// The shutdown deadline, once known.
    deadline: Option<Instant>,
    acks: Option<Acks>,
    counters: Arc<SinkCounters>,
    /// Dropped with the thread's state, when it ends.
    _end: flume::Sender<()>,
}

impl Appender {
    fn run(mut self) {
        while let Ok(record) = self.records.recv() {
            if !self.append(&record) {
                return;
            }
        }
    }

    /// Appends `record`, retrying until Redis takes it; `false` if the shutdown
    /// deadline came first (the record is then given up).
    fn append(&mut self, record: &CountRecord) -> bool {
        let command = xadd(&self.settings, record);
        let mut waits = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut attempts = 0u32;
        loop {
            if self.deadline.is_none() {
                self.deadline = self.finish.try_recv().ok();
            }
            // At shutdown no attempt may outlast the deadline.
            let limit = match self.deadline {
                None => self.settings.timeout,
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(self.settings.timeout),
                    _ => {
                        self.give_up(record, attempts);
                        return false;
                    }
                },
            };
            attempts += 1;
            match self.attempt(&command, limit) {
                Ok(id) => {
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
                        id = %id,
                        attempts,
                        "window appended to the Redis stream"
                    );
                    return true;
                }
                Err(error) => {
                    self.connection = None;
                    if attempts == 1 {
                        tracing::warn!(
                            window_start = %record.window_start,
                            revision = record.revision,
                            %error,
                            stream = %self.settings.stream,
                            "Redis stream append failed; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(window_start = %record.window_start, attempts, %error, "Redis stream append still failing");
                    }
                }
            }
            self.pause(waits.next_wait());
        }
    }

    /// One XADD, connecting first if needed, every step within `limit`.
    fn attempt(&mut self, command: &Cmd, limit: Duration) -> RedisResult<String> {
        if self.connection.is_none() {
            self.connection = Some(self.endpoint.connect(limit)?);
        }
        let link = self.connection.as_mut().expect("connected above");
        link.set_timeout(limit)?;
        command.query(link.connection())
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
            "Redis stream append given up at the shutdown deadline; this window's count is in the count log only"
        );
    }
}

/// Counts `records` as given up; returns the total so far, for the log line.
fn count_failed(counters: &SinkCounters, records: u64) -> u64 {
    counters.failed.fetch_add(records, Ordering::Relaxed) + records
}

/// The XADD that appends `record`, with the stream trimmed to about `maxlen`.
fn xadd(settings: &RedisStreamSettings, record: &CountRecord) -> Cmd {
    let mut command = redis::cmd("XADD");
    command
        .arg(&settings.stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(settings.maxlen)
        .arg("*");
    for (field, value) in fields(record) {
        command.arg(field).arg(value);
    }
    command
}

/// The record's fields in the order of its JSON, each value as the JSON writes it
/// but strings without their quotes.
fn fields(record: &CountRecord) -> Vec<(String, String)> {
    let Value::Object(object) = serde_json::to_value(record).expect("a count record serializes")
    else {
        unreachable!("a count record serializes to a JSON object")
    };
    object
        .into_iter()
        .map(|(field, value)| {
            let value = match value {
                Value::String(text) => text,
                other => other.to_string(),
            };
            (field, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Scope, Timestamp};
    use crate::window::WindowStart;

    fn record() -> CountRecord {
        CountRecord {
            window_start: WindowStart::from_unix_secs(1_795_255_500),
            window_seconds: 60,
            unique_requests: 42,
            scope: Scope::Global,
            revision: 2,
            complete: false,
            partial: true,
            instances: 3,
            published_at: Timestamp::from_unix_millis(1_795_255_560_501),
        }
    }

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fields_are_the_json_fields_in_order_with_strings_unquoted() {
        assert_eq!(
            fields(&record()),
            pairs(&[
                ("window_start", "2026-11-21T10:05:00Z"),
                ("window_seconds", "60"),
                ("unique_requests", "42"),
                ("scope", "global"),
                ("revision", "2"),
                ("complete", "false"),
                ("partial", "true"),
                ("instances", "3"),
                ("published_at", "2026-11-21T10:06:00.501Z"),
            ])
        );
    }

    #[test]
    fn the_command_appends_every_field_and_trims_approximately() {
        let settings = RedisStreamSettings {
            stream: "verve:counts".into(),
            maxlen: 100_000,
            timeout: Duration::from_secs(1),
        };
        let args: Vec<String> = xadd(&settings, &record())
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let mut expected = ["XADD", "verve:counts", "MAXLEN", "~", "100000", "*"]
            .map(String::from)
            .to_vec();
        for (field, value) in fields(&record()) {
            expected.extend([field, value]);
        }
        assert_eq!(args, expected);
    }
}
