//! Window counts streamed to a real Kafka-protocol broker (tansu), read back with
//! rdkafka: one record per window (and revision) with the exact count.

mod common;

use std::time::Duration;

use common::kafka::{all_records, Record};
use common::redis_server::RedisServer;
use common::tansu::Tansu;
use common::{
    accept_all, two_members_with_overlapping_ids, window_length, within_one_window, Client, Verve,
};
use verve::window::WindowStart;

const LIMIT: Duration = Duration::from_secs(30);

/// Every record of `window` on the topic, once the topic also holds the window
/// after it (so that a duplicate for `window` would be there too).
fn records_of(brokers: &str, topic: &str, window: WindowStart) -> Vec<Record> {
    let next = window_length().next(window).to_string();
    common::eventually(
        LIMIT,
        || format!("a record for {next}"),
        || {
            let records = all_records(brokers, topic, LIMIT);
            records.iter().any(|r| r.key == next).then_some(records)
        },
    )
    .into_iter()
    .filter(|r| r.key == window.to_string())
    .collect()
}

#[test]
fn each_window_is_one_record_with_the_exact_count() {
    let tansu = Tansu::start();
    tansu.create_topic("counts-local");
    let brokers = tansu.brokers();
    let verve = Verve::start(&[
        ("VERVE_SINKS", "log,kafka"),
        ("VERVE_KAFKA_BROKERS", &brokers),
        ("VERVE_KAFKA_TOPIC", "counts-local"),
    ]);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(verve.addr), (0..120).map(|i| i % 90))
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 90);
    let records = records_of(&brokers, "counts-local", window);
    assert_eq!(records.len(), 1, "{records:?}");
    let mut value = records[0].value.clone();
    assert!(value["published_at"].take().is_string());
    assert_eq!(
        value,
        serde_json::json!({
            "window_start": window.to_string(),
            "window_seconds": common::WINDOW_SECS,
            "unique_requests": 90,
            "scope": "instance",
            "revision": 1,
            "complete": true,
            "partial": false,
            "instances": 1,
            "published_at": null,
        })
    );
}

#[test]
fn with_redis_the_fleet_publishes_one_record_per_window() {
    let tansu = Tansu::start();
    tansu.create_topic("counts-fleet");
    let redis = RedisServer::start();
    let brokers = tansu.brokers();
    let kafka = [
        ("VERVE_SINKS", "log,kafka"),
        ("VERVE_KAFKA_BROKERS", brokers.as_str()),
        ("VERVE_KAFKA_TOPIC", "counts-fleet"),
    ];
    let (_a, _b, window) = two_members_with_overlapping_ids(&redis.url(), &kafka);

    let records = records_of(&brokers, "counts-fleet", window);
    assert_eq!(records.len(), 1, "{records:?}");
    let value = &records[0].value;
    assert_eq!(
        (
            value["unique_requests"].as_u64(),
            value["scope"].as_str(),
            value["revision"].as_u64(),
            value["complete"].as_bool(),
            value["instances"].as_u64()
        ),
        (Some(300), Some("global"), Some(1), Some(true), Some(2))
    );
}
