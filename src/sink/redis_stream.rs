//! The Redis stream sink: one stream entry per record, `XADD <stream> MAXLEN ~ N *`.
//!
//! An entry's fields are the count record's JSON fields, in the JSON's order, each
//! value written as JSON writes it but strings without quotes (`window_start
//! 2026-11-21T10:05:00Z … complete true`): they come from the record's `Serialize`
//! impl, so the stream, the count log, Kafka and the callbacks share one schema.
//! The stream is shared like a Kafka topic: the reporter hands this sink only the
//! records this instance published. Queueing, retries, shutdown and
//! acknowledgements (every entry Redis appended, an XADD answered with an id) are
//! [`QueuedSink`]'s; this file is the [`Destination`]: how to append one record.

use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, RedisError};
use serde_json::Value;

use super::queued::{Destination, QueuedSink};
use super::{Acks, SinkCounters, SinkMetricNames};
use crate::record::CountRecord;
use crate::redis_link::{RedisEndpoint, RedisLink};

/// The Redis stream sink's counters in `/metrics`.
pub const METRICS: SinkMetricNames = SinkMetricNames {
    delivered: (
        "verve_redis_stream_delivered",
        "Records appended to the Redis stream.",
    ),
    failed: (
        "verve_redis_stream_failed",
        "Records dropped (queue full) or given up at shutdown by the Redis stream sink.",
    ),
};

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

/// Starts the Redis stream sink's thread; Redis need not be reachable yet. Each
/// appended record is reported to `acks`, if given.
pub fn start(
    endpoint: RedisEndpoint,
    settings: RedisStreamSettings,
    counters: Arc<SinkCounters>,
    acks: Option<Acks>,
) -> std::io::Result<QueuedSink> {
    let stream = Stream {
        endpoint,
        connection: None,
        settings,
    };
    QueuedSink::start(stream, counters, acks)
}

/// A Redis stream, appended to over a connection kept between records.
struct Stream {
    endpoint: RedisEndpoint,
    connection: Option<RedisLink>,
    settings: RedisStreamSettings,
}

impl Destination for Stream {
    const NAME: &'static str = "Redis stream";
    const DELIVERY: &'static str = "append";
    const DELIVERED: &'static str = "appended";
    const THREAD: &'static str = "verve-redis-stream";
    type Error = RedisError;

    fn target(&self) -> &str {
        &self.settings.stream
    }

    fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    /// One XADD, connecting first if needed, every step within `limit`.
    fn deliver(&mut self, record: &CountRecord, limit: Duration) -> Result<String, RedisError> {
        let appended = self.append(&xadd(&self.settings, record), limit);
        if appended.is_err() {
            self.connection = None;
        }
        appended
    }
}

impl Stream {
    fn append(&mut self, command: &Cmd, limit: Duration) -> Result<String, RedisError> {
        if self.connection.is_none() {
            self.connection = Some(self.endpoint.connect(limit)?);
        }
        let link = self.connection.as_mut().expect("connected above");
        link.set_timeout(limit)?;
        command.query(link.connection())
    }
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
