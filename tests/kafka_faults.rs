//! The Kafka sink through broker outages and errors, against librdkafka's own mock
//! cluster: nothing lost, nothing duplicated.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::{all_records, consumer, read_until};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use verve::record::{CountRecord, Scope, Timestamp};
use verve::sink::SinkCounters;
use verve::sink::{Acknowledged, Acks, CountSink, KafkaSettings, KafkaSink};
use verve::window::WindowStart;

const TOPIC: &str = "counts";

fn report(start: u64, unique_requests: u64) -> CountRecord {
    CountRecord {
        window_start: WindowStart::from_unix_secs(start),
        window_seconds: 60,
        unique_requests,
        scope: Scope::Instance,
        revision: 1,
        complete: true,
        partial: false,
        instances: 1,
        published_at: Timestamp::from_unix_millis((start + 60) * 1000 + 12),
    }
}

/// The outage the first test holds: 2 s by default; VERVE_TEST_KAFKA_OUTAGE_SECS=300
/// replays the 5-minute outage that docs/operations.md reports on.
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("VERVE_TEST_KAFKA_OUTAGE_SECS").map_or(2, |s| s.parse().unwrap()),
    )
}

/// A sink to the mock cluster, its counters, and the acknowledgements it reports.
fn sink(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
) -> (KafkaSink, Arc<SinkCounters>, flume::Receiver<Acknowledged>) {
    let counters = Arc::new(SinkCounters::default());
    let (acks, acknowledged) = flume::unbounded();
    let sink = KafkaSink::new(
        &KafkaSettings {
            brokers: cluster.bootstrap_servers(),
            topic: TOPIC.to_owned(),
            // verve's default, ten minutes, outlasts the outage as in production.
            message_timeout: Duration::from_secs(600),
            extra: vec![],
        },
        counters.clone(),
        Some(Acks::new(acks, 1)),
    )
    .unwrap();
    (sink, counters, acknowledged)
}

fn acknowledged(start: u64, revision: u64) -> Acknowledged {
    Acknowledged {
        window: WindowStart::from_unix_secs(start),
        revision,
    }
}

fn delivered(counters: &SinkCounters) -> u64 {
    counters.delivered.load(Ordering::Relaxed)
}

#[test]
fn a_record_published_during_a_broker_outage_is_delivered_once_after_it() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let (mut sink, counters, acks) = sink(&cluster);
    // Warm up: the producer knows the cluster before the outage starts.
    sink.publish(&report(1_795_255_440, 7));
    sink.flush(Instant::now() + Duration::from_secs(10));
    assert_eq!(delivered(&counters), 1);

    cluster.broker_down(1).unwrap();
    sink.publish(&report(1_795_255_500, 42)); // a window closes during the outage
    let outage_ends = Instant::now() + outage();
    while Instant::now() < outage_ends {
        assert_eq!(delivered(&counters), 1, "delivered while down");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.broker_up(1).unwrap();
    sink.flush(Instant::now() + Duration::from_secs(30));
    assert_eq!(delivered(&counters), 2);
    assert_eq!(counters.failed.load(Ordering::Relaxed), 0);
    // Each acknowledgement reported once delivered: what the fleet notes in Redis.
    assert_eq!(
        acks.drain().collect::<Vec<_>>(),
        [
            acknowledged(1_795_255_440, 1),
            acknowledged(1_795_255_500, 1)
        ]
    );

    let records = read_until(
        &consumer(&cluster.bootstrap_servers(), TOPIC),
        Duration::from_secs(20),
        |r| r.len() >= 2,
    );
    let keys: Vec<_> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["2026-11-21T10:04:00Z", "2026-11-21T10:05:00Z"]);
    assert_eq!(
        records[1].value,
        serde_json::json!({
            "window_start": "2026-11-21T10:05:00Z",
            "window_seconds": 60,
            "unique_requests": 42,
            "scope": "instance",
            "revision": 1,
            "complete": true,
            "partial": false,
            "instances": 1,
            "published_at": "2026-11-21T10:06:00.012Z",
        })
    );
}

#[test]
fn transient_produce_errors_are_retried_without_duplicates() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        ],
    );
    let (mut sink, counters, _) = sink(&cluster);
    for (i, start) in [1_795_255_500u64, 1_795_255_560, 1_795_255_620]
        .into_iter()
        .enumerate()
    {
        sink.publish(&report(start, i as u64));
    }
    sink.flush(Instant::now() + Duration::from_secs(30));
    assert_eq!(delivered(&counters), 3);

    // Every record the partition holds: a duplicate would be a fourth.
    let records = all_records(&cluster.bootstrap_servers(), TOPIC, Duration::from_secs(20));
    let counts: Vec<_> = records
        .iter()
        .map(|r| r.value["unique_requests"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [0, 1, 2]);
}
