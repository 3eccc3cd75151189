//! Window counts streamed to a real Kafka-protocol broker (tansu), read back with
//! rdkafka: exactly one record per window with the exact count.

mod common;

use std::thread;
use std::time::Duration;

use common::kafka::{consumer, read_until, Record};
use common::redis_server::RedisServer;
use common::tansu::Tansu;
use common::{accept_all, window_length, within_one_window, Client, Verve};
use verve::window::WindowStart;

const LIMIT: Duration = Duration::from_secs(30);

/// Reads until the window after `window` has its record too, so that a duplicate
/// for `window` would have shown, and returns the records for `window`.
fn records_of(brokers: &str, topic: &str, window: WindowStart) -> Vec<Record> {
    let next = window_length().next(window).to_string();
    let records = read_until(&consumer(brokers, topic), LIMIT, |r| {
        r.iter().any(|r| r.key == next)
    });
    let window = window.to_string();
    records.into_iter().filter(|r| r.key == window).collect()
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
        ("VERVE_INSTANCE", "solo"),
    ]);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(verve.addr), (0..120).map(|i| i % 90))
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 90);
    let records = records_of(&brokers, "counts-local", window);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        records[0].value,
        serde_json::json!({
            "window_start": window.to_string(),
            "window_seconds": common::WINDOW_SECS,
            "unique_requests": 90,
            "scope": "instance",
            "instance": "solo",
            "late": false,
            "partial": false,
        })
    );
}

#[test]
fn with_redis_the_fleet_publishes_one_record_per_window() {
    let tansu = Tansu::start();
    tansu.create_topic("counts-fleet");
    let redis = RedisServer::start();
    let brokers = tansu.brokers();
    let redis_url = redis.url();
    let instance = |name| {
        Verve::start(&[
            ("VERVE_SINKS", "log,kafka"),
            ("VERVE_KAFKA_BROKERS", &brokers),
            ("VERVE_KAFKA_TOPIC", "counts-fleet"),
            ("VERVE_REDIS_URL", &redis_url),
            ("VERVE_WINDOW_GRACE_MS", "1000"),
            ("VERVE_INSTANCE", name),
        ])
    };
    let (a, b) = (instance("a"), instance("b"));
    let (window, ()) = within_one_window(|| {
        thread::scope(|s| {
            s.spawn(|| accept_all(&mut Client::connect(a.addr), 0..200));
            s.spawn(|| accept_all(&mut Client::connect(b.addr), 100..300));
        });
    });
    let (line_a, line_b) = (a.wait_for_window(window), b.wait_for_window(window));
    assert_eq!((line_a.unique_requests, line_b.unique_requests), (300, 300));
    let reporter = if line_a.reporter { "a" } else { "b" };
    assert!(line_a.reporter != line_b.reporter);

    let records = records_of(&brokers, "counts-fleet", window);
    assert_eq!(records.len(), 1, "{records:?}");
    let value = &records[0].value;
    assert_eq!(
        (value["unique_requests"].as_u64(), value["scope"].as_str()),
        (Some(300), Some("global"))
    );
    assert_eq!(value["instance"], reporter);
}
