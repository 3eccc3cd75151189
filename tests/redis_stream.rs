//! Window counts appended to a Redis stream on a real redis-server, read back with
//! XRANGE: one entry per record, each field as the count log has it, once for the
//! whole fleet, and delivered once Redis is back.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{
    accept_all, eventually, metric, two_members_with_overlapping_ids, wait_with_deadline,
    window_length, within_one_window, Client, Verve,
};
use verve::window::WindowStart;

const STREAM: &str = "verve:counts";

const LIMIT: Duration = Duration::from_secs(30);

/// One stream entry: its fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry(Vec<(String, String)>);

impl Entry {
    fn get(&self, field: &str) -> &str {
        let found = self.0.iter().find(|(f, _)| f == field);
        &found.unwrap_or_else(|| panic!("no {field} in {self:?}")).1
    }
}

/// Every entry of the stream, oldest first.
fn stream_entries(redis: &RedisServer) -> Vec<Entry> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query(&mut redis.connection())
        .unwrap();
    raw.into_iter()
        .map(|(_, flat)| {
            let pairs = flat.chunks(2).map(|p| (p[0].clone(), p[1].clone()));
            Entry(pairs.collect())
        })
        .collect()
}

/// Every entry of `window`, once the stream also holds the window after it (so
/// that a duplicate for `window` would be there too).
fn entries_of(redis: &RedisServer, window: WindowStart) -> Vec<Entry> {
    let next = window_length().next(window).to_string();
    eventually(
        LIMIT,
        || format!("an entry for {next} in {:?}", stream_entries(redis)),
        || {
            let all = stream_entries(redis);
            all.iter()
                .any(|e| e.get("window_start") == next)
                .then_some(all)
        },
    )
    .into_iter()
    .filter(|e| e.get("window_start") == window.to_string())
    .collect()
}

/// `window`'s record in a count log written with `VERVE_COUNT_LOG_FORMAT=json`.
fn logged_json(verve: &Verve, window: WindowStart) -> serde_json::Map<String, serde_json::Value> {
    let start = serde_json::Value::from(window.to_string());
    eventually(
        LIMIT,
        || format!("{window} in the count log"),
        || {
            let text = std::fs::read_to_string(&verve.count_log).unwrap_or_default();
            text.lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
                .find(|record| record["window_start"] == start)
        },
    )
    .as_object()
    .unwrap()
    .clone()
}

/// verve with the stream sink (and `env`), whose Redis is down: it was started for a
/// free port and stopped, so `restart` brings it back on the same one.
fn with_the_stream_away(env: &[(&str, &str)]) -> (RedisServer, Verve) {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let mut all = vec![
        ("VERVE_SINKS", "log,redis-stream"),
        ("VERVE_REDIS_STREAM_URL", url.as_str()),
        ("VERVE_REDIS_TIMEOUT_MS", "200"),
    ];
    all.extend_from_slice(env);
    let verve = Verve::start(&all);
    (redis, verve)
}

#[test]
fn each_window_is_one_entry_with_every_field_of_the_count_log_record() {
    let redis = RedisServer::start();
    let url = redis.url();
    let verve = Verve::start(&[
        ("VERVE_SINKS", "log,redis-stream"),
        ("VERVE_REDIS_STREAM_URL", &url),
        ("VERVE_COUNT_LOG_FORMAT", "json"),
    ]);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(verve.addr), (0..120).map(|i| i % 90))
    });
    let entries = entries_of(&redis, window);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let logged = logged_json(&verve, window);
    // Every field of the logged record, in its order; strings without quotes.
    let expected: Vec<(String, String)> = logged
        .iter()
        .map(|(field, value)| {
            let value = match value {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            (field.clone(), value)
        })
        .collect();
    assert_eq!(entries[0], Entry(expected));
    let fields = [
        ("window_start", window.to_string()),
        ("window_seconds", common::WINDOW_SECS.to_string()),
        ("unique_requests", "90".to_owned()),
        ("scope", "instance".to_owned()),
        ("revision", "1".to_owned()),
        ("complete", "true".to_owned()),
        ("partial", "false".to_owned()),
        ("instances", "1".to_owned()),
    ];
    for (field, value) in fields {
        assert_eq!(entries[0].get(field), value, "{field}");
    }
    // Every record appended is counted, none failed.
    eventually(
        Duration::from_secs(5),
        || "the delivered count to match the stream".into(),
        || {
            let scrape = verve.scrape();
            let delivered = metric(&scrape, "verve_redis_stream_delivered_total");
            let appended = stream_entries(&redis).len() as u64;
            assert_eq!(metric(&scrape, "verve_redis_stream_failed_total"), 0);
            (delivered == appended).then_some(())
        },
    );
}

#[test]
fn with_redis_the_fleet_appends_each_record_once() {
    let redis = RedisServer::start();
    // No stream URL: the stream lives in the store's Redis.
    let sinks = [("VERVE_SINKS", "log,redis-stream")];
    let (a, b, window) = two_members_with_overlapping_ids(&redis.url(), &sinks);

    let entries = entries_of(&redis, window);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(
        [
            "unique_requests",
            "scope",
            "revision",
            "complete",
            "partial",
            "instances"
        ]
        .map(|f| entry.get(f)),
        ["300", "global", "1", "true", "false", "2"]
    );
    // Every record either instance logged up to the window is in the stream once,
    // and nothing else is: each revision was appended by its publisher alone.
    let up_to = |start: &str| start <= window.to_string().as_str();
    let logged: BTreeSet<(String, u64)> = a
        .windows()
        .into_iter()
        .chain(b.windows())
        .filter(|l| up_to(&l.window_start))
        .map(|l| (l.window_start, l.revision))
        .collect();
    let appended: Vec<(String, u64)> = stream_entries(&redis)
        .iter()
        .filter(|e| up_to(e.get("window_start")))
        .map(|e| {
            let revision = e.get("revision").parse().unwrap();
            (e.get("window_start").to_owned(), revision)
        })
        .collect();
    assert_eq!(appended, logged.into_iter().collect::<Vec<_>>());
    // The append was the acknowledgement the fleet waits for.
    eventually(
        Duration::from_secs(5),
        || format!("{window} acknowledged in Redis"),
        || (redis.record_field(window, "acked").as_deref() == Some("1")).then_some(()),
    );
}

#[test]
fn records_published_while_redis_is_away_are_appended_once_it_is_back() {
    let (mut redis, mut verve) = with_the_stream_away(&[]);
    let (window, ()) = within_one_window(|| accept_all(&mut Client::connect(verve.addr), 1..=30));
    assert_eq!(verve.wait_for_window(window).unique_requests, 30);
    verve.wait_for_stderr("Redis stream append failed", LIMIT);
    redis.restart();

    let entries = entries_of(&redis, window);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].get("unique_requests"), "30");
    // Nothing lost on the way, in order: every window logged up to this one.
    let logged: Vec<String> = verve
        .windows()
        .into_iter()
        .map(|l| l.window_start)
        .filter(|start| *start <= window.to_string())
        .collect();
    let appended: Vec<String> = stream_entries(&redis)
        .iter()
        .map(|e| e.get("window_start").to_owned())
        .filter(|start| *start <= window.to_string())
        .collect();
    assert_eq!(appended, logged);
    // Records wait behind the first one that failed, so one failure was logged.
    let failures = verve
        .stderr_text()
        .matches("Redis stream append failed")
        .count();
    assert_eq!(failures, 1, "{}", verve.stderr_text());
}

#[test]
fn shutdown_gives_up_on_a_redis_that_stays_away_by_its_deadline() {
    let (_redis, mut verve) = with_the_stream_away(&[
        ("VERVE_SHUTDOWN_DRAIN_MS", "200"),
        ("VERVE_SHUTDOWN_TIMEOUT_MS", "1200"),
        ("VERVE_WINDOW_SECS", "3600"),
    ]);
    accept_all(&mut Client::connect(verve.addr), 1..=10);
    let stopping = Instant::now();
    common::signal(verve.child(), libc::SIGTERM);
    let status = wait_with_deadline(verve.child(), Duration::from_secs(15));
    let took = stopping.elapsed();
    assert!(status.success());
    // The stop's whole budget (1.2 s), plus the process's exit.
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    eventually(
        Duration::from_secs(2),
        || format!("the give-up line in:\n{}", verve.stderr_text()),
        || {
            let stderr = verve.stderr_text();
            stderr
                .contains("Redis stream append given up at the shutdown deadline")
                .then_some(())
        },
    );
    assert_eq!(verve.windows().last().unwrap().unique_requests, 10);
}
