//! The Kafka sink: one record per window, to a topic, with no record lost.
//!
//! Records go through rdkafka's `ThreadedProducer` (librdkafka, with its own
//! polling thread), configured idempotent with `acks=all`: librdkafka keeps a
//! record and retries it through a broker outage for up to the message timeout
//! (ten minutes by default), and idempotence keeps retries from duplicating it.
//! The key is the window start, so a window's records (its first and its revisions)
//! stay in one partition, in order, and a compacted topic keeps the latest. The
//! value is the [`CountRecord`] as JSON; the schema is in docs/configuration.md.
//!
//! The topic is shared by the fleet: the reporter hands this sink only the records
//! this instance published, so the topic gets each revision of a window once.
//! Every delivery failure is logged with its window and counted.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{Acknowledged, Acks, CountSink, SinkCounters, SinkMetricNames};
use crate::record::CountRecord;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// How long librdkafka keeps trying to deliver a record.
    pub message_timeout: Duration,
    /// Further librdkafka settings, applied last.
    pub extra: Vec<(String, String)>,
}

/// Called by librdkafka's polling thread with each record's fate; counts it, and
/// passes acknowledgements on to whoever follows them (the Redis store).
struct DeliveryReports {
    counters: Arc<SinkCounters>,
    acks: Option<Acks>,
}

impl ClientContext for DeliveryReports {}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = Box<Acknowledged>;

    fn delivery(&self, result: &DeliveryResult<'_>, record: Box<Acknowledged>) {
        match result {
            Ok(message) => {
                // Before it is counted: whoever sees the count sees the ack too.
                if let Some(acks) = &self.acks {
                    acks.acknowledged(*record);
                }
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    window_start = %record.window,
                    revision = record.revision,
                    partition = message.partition(),
                    offset = message.offset(),
                    "window published to Kafka"
                );
            }
            Err((error, _)) => {
                let failed = self.counters.failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    window_start = %record.window,
                    revision = record.revision,
                    %error,
                    failed_total = failed,
                    "Kafka delivery failed; this window's count is in the count log only"
                );
            }
        }
    }
}

pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryReports>,
    topic: String,
    counters: Arc<SinkCounters>,
}

/// The Kafka sink's counters in `/metrics`.
pub const METRICS: SinkMetricNames = SinkMetricNames {
    delivered: ("verve_kafka_delivered", "Records Kafka acknowledged."),
    failed: ("verve_kafka_failed", "Records given up or refused."),
};

/// librdkafka refused the producer's settings.
#[derive(Debug)]
pub struct KafkaStartError(KafkaError);

impl fmt::Display for KafkaStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let error = &self.0;
        write!(
            f,
            "invalid Kafka settings (VERVE_KAFKA_BROKERS, VERVE_KAFKA_CONFIG): {error}"
        )
    }
}

impl std::error::Error for KafkaStartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl KafkaSink {
    /// Creates the producer; brokers need not be reachable yet. Each record Kafka
    /// acknowledges is sent to `acks`, if given.
    pub fn new(
        settings: &KafkaSettings,
        counters: Arc<SinkCounters>,
        acks: Option<Acks>,
    ) -> Result<KafkaSink, KafkaStartError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &settings.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                settings.message_timeout.as_millis().to_string(),
            );
        for (key, value) in &settings.extra {
            config.set(key, value);
        }

        let producer = config
            .create_with_context(DeliveryReports {
                counters: counters.clone(),
                acks,
            })
            .map_err(KafkaStartError)?;
        Ok(KafkaSink {
            producer,
            topic: settings.topic.clone(),
            counters,
        })
    }
}

impl CountSink for KafkaSink {
    fn publish(&mut self, record: &CountRecord) {
        let key = record.window_start.to_string();
        let value = record.to_json();
        let acknowledged = Acknowledged {
            window: record.window_start,
            revision: record.revision,
        };
        let message = BaseRecord::with_opaque_to(&self.topic, Box::new(acknowledged))
            .key(&key)
            .payload(&value);
        if let Err((error, _)) = self.producer.send(message) {
            let failed = self.counters.failed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                window_start = %record.window_start,
                %error,
                failed_total = failed,
                "Kafka producer refused the record; this window's count is in the count log only"
            );
        }
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn flush(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if self.producer.flush(left).is_err() {
            tracing::error!(
                undelivered = self.producer.in_flight_count(),
                "Kafka records still undelivered at shutdown"
            );
        }
    }
}
