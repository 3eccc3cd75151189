//! The Kafka sink: one record per window, to a topic, with no record lost.
//!
//! Records go through rdkafka's `ThreadedProducer` (librdkafka, with its own
//! polling thread), configured idempotent with `acks=all`: librdkafka keeps a
//! record and retries it through a broker outage for up to the message timeout
//! (ten minutes by default), and idempotence keeps retries from duplicating it.
//! The key is the window start, so a window's records stay in one partition, in
//! order. The value is JSON; the schema is in docs/configuration.md.
//!
//! Only the reporter of a window publishes it: in Redis mode, the one instance
//! elected for the window, so the topic gets one record per window for the fleet.
//! Every delivery failure is logged with its window and counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::{CountSink, WindowReport};
use crate::metrics::Telemetry;
use crate::window::WindowStart;

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
    /// This instance's name, part of every record.
    pub instance: String,
}

/// Called by librdkafka's polling thread with each record's fate; counts it.
struct DeliveryReports(Arc<Telemetry>);

impl ClientContext for DeliveryReports {}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = Box<WindowStart>;

    fn delivery(&self, result: &DeliveryResult<'_>, window: Box<WindowStart>) {
        match result {
            Ok(message) => {
                self.0.kafka_delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    window_start = %window,
                    partition = message.partition(),
                    offset = message.offset(),
                    "window published to Kafka"
                );
            }
            Err((error, _)) => {
                let failed = self.0.kafka_failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    window_start = %window,
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
    instance: String,
    telemetry: Arc<Telemetry>,
}

impl KafkaSink {
    /// Creates the producer; brokers need not be reachable yet.
    pub fn new(settings: &KafkaSettings, telemetry: Arc<Telemetry>) -> Result<KafkaSink, String> {
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
            .create_with_context(DeliveryReports(telemetry.clone()))
            .map_err(|e| {
                format!("invalid Kafka settings (VERVE_KAFKA_BROKERS, VERVE_KAFKA_CONFIG): {e}")
            })?;
        Ok(KafkaSink {
            producer,
            topic: settings.topic.clone(),
            instance: settings.instance.clone(),
            telemetry,
        })
    }
}

/// The record value for a window.
pub fn record_value(report: &WindowReport, instance: &str) -> String {
    serde_json::json!({
        "window_start": report.window_start.to_string(),
        "window_seconds": report.window_secs,
        "unique_requests": report.unique_requests,
        "scope": report.scope.as_str(),
        "instance": instance,
        "late": report.late,
        "partial": report.partial,
    })
    .to_string()
}

impl CountSink for KafkaSink {
    fn publish(&mut self, report: &WindowReport) {
        if !report.reporter {
            return;
        }
        let key = report.window_start.to_string();
        let value = record_value(report, &self.instance);
        let record = BaseRecord::with_opaque_to(&self.topic, Box::new(report.window_start))
            .key(&key)
            .payload(&value);
        if let Err((error, _)) = self.producer.send(record) {
            let failed = self.telemetry.kafka_failed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                window_start = %report.window_start,
                %error,
                failed_total = failed,
                "Kafka producer refused the record; this window's count is in the count log only"
            );
        }
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
