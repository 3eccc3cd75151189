//! Exact dedup across instances through a real redis-server, and Redis outages.

mod common;

use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::redis_server::{free_port, RedisServer};
use common::{accept_all, distinct, window_length, within_one_window, Client, Verve};

/// 2 s windows need a grace shorter than the 2 s Redis default.
fn verve_with(redis_url: &str, extra: &[(&str, &str)]) -> Verve {
    let mut env = vec![
        ("VERVE_REDIS_URL", redis_url),
        ("VERVE_WINDOW_GRACE_MS", "1000"),
    ];
    env.extend_from_slice(extra);
    Verve::start(&env)
}

#[test]
fn two_instances_count_each_id_once_and_elect_one_reporter() {
    let redis = RedisServer::start();
    let a = verve_with(&redis.url(), &[("VERVE_INSTANCE", "a")]);
    let b = verve_with(&redis.url(), &[("VERVE_INSTANCE", "b")]);
    let only_a: Vec<i64> = (0..300).collect();
    let only_b: Vec<i64> = (200..500).collect();
    let both: Vec<i64> = (1000..1100).collect();
    let (window, ()) = within_one_window(|| {
        thread::scope(|s| {
            s.spawn(|| accept_all(&mut Client::connect(a.addr), only_a.iter().copied()));
            s.spawn(|| accept_all(&mut Client::connect(b.addr), only_b.iter().copied()));
            // The same ids at the same moment on both instances.
            s.spawn(|| accept_all(&mut Client::connect(a.addr), both.iter().copied()));
            s.spawn(|| accept_all(&mut Client::connect(b.addr), both.iter().copied()));
        });
    });
    let expected = distinct(only_a.iter().chain(&only_b).chain(&both).copied());
    assert_eq!(expected, 600);
    let (line_a, line_b) = (a.wait_for_window(window), b.wait_for_window(window));
    for line in [&line_a, &line_b] {
        assert_eq!(
            (line.unique_requests, line.scope.as_str(), line.late),
            (expected, "global", false)
        );
    }
    assert!(
        line_a.reporter != line_b.reporter,
        "exactly one reporter: {line_a:?} {line_b:?}"
    );
    let key = format!("verve:{{{window}}}");
    let holder: String = redis::cmd("GET")
        .arg(format!("{key}:reporter"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(holder, if line_a.reporter { "a" } else { "b" });
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0, "window keys expire: ttl {ttl}");
}

#[test]
fn a_redis_restart_mid_window_loses_nothing_and_reports_late() {
    let mut redis = RedisServer::start();
    let verve = verve_with(&redis.url(), &[]);
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all(&mut client, 1..=100);
        // Let the first ids reach Redis, then lose them with it.
        let key = format!("verve:{{{}}}", window_length().window_of(SystemTime::now()));
        let deadline = Instant::now() + Duration::from_secs(1);
        while redis::cmd("SCARD")
            .arg(&key)
            .query::<u64>(&mut redis.connection())
            .unwrap()
            < 100
        {
            assert!(Instant::now() < deadline, "ids never reached Redis");
            thread::sleep(Duration::from_millis(5));
        }
        redis.kill();
        accept_all(&mut client, 101..=200);
    });
    // Redis stays down until the window's close time (end + 1 s grace) has passed.
    let closes_at = window_length().end_of(window) + Duration::from_millis(1000);
    while SystemTime::now() < closes_at + Duration::from_millis(300) {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        verve
            .windows()
            .iter()
            .all(|l| l.window_start != window.to_string()),
        "reported without Redis"
    );
    redis.restart();
    let line = verve.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.scope.as_str(), line.late),
        (200, "global", true)
    );
    assert!(
        verve.stderr_text().contains("Redis restarted empty"),
        "{}",
        verve.stderr_text()
    );
}

#[test]
fn redis_never_reachable_keeps_answering_and_refuses_once_the_buffer_is_full() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let mut verve = verve_with(
        &url,
        &[
            ("VERVE_REDIS_BUFFER_IDS", "50"),
            ("VERVE_REDIS_TIMEOUT_MS", "100"),
        ],
    );
    verve.wait_for_stderr("Redis unreachable at start-up", Duration::from_secs(5));
    let mut client = Client::connect(verve.addr);
    accept_all(&mut client, 1..=50);
    // The buffer fills as the aggregator takes the batches in; then new ids are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut id = 51;
    loop {
        let response = client.get(&format!("/api/verve/accept?id={id}"));
        if response.status == 503 {
            assert_eq!(response.body, "failed");
            break;
        }
        assert_eq!(response.status, 200);
        assert!(Instant::now() < deadline, "never refused");
        id += 1;
        thread::sleep(Duration::from_millis(5));
    }
    // Still serving: a bad request is still told so.
    assert_eq!(client.get("/api/verve/accept?id=x").status, 400);
    assert_eq!(client.get("/api/verve/accept?id=1").status, 503);
}

#[test]
fn a_slow_redis_does_not_hold_up_clients() {
    let redis = RedisServer::start();
    let verve = verve_with(&redis.url(), &[("VERVE_REDIS_TIMEOUT_MS", "300")]);
    let (window, answered_while_asleep) = within_one_window(|| {
        let sleeper = thread::spawn({
            let mut connection = redis.connection();
            move || {
                let _: () = redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg("1.5")
                    .query(&mut connection)
                    .unwrap();
                Instant::now()
            }
        });
        thread::sleep(Duration::from_millis(50));
        accept_all(&mut Client::connect(verve.addr), 1..=300);
        let answered = Instant::now();
        answered < sleeper.join().unwrap()
    });
    assert!(answered_while_asleep, "clients waited for Redis");
    assert_eq!(verve.wait_for_window(window).unique_requests, 300);
}

#[test]
fn a_window_cut_short_by_shutdown_is_logged_but_not_claimed() {
    let redis = RedisServer::start();
    let verve = Verve::start(&[
        ("VERVE_REDIS_URL", redis.url().as_str()),
        ("VERVE_WINDOW_SECS", "3600"),
        ("VERVE_INSTANCE", "leaving"),
    ]);
    accept_all(&mut Client::connect(verve.addr), 1..=40);
    let (status, lines) = verve.terminate();
    assert!(status.success());
    let last = lines.last().expect("a count line");
    assert_eq!(
        (last.unique_requests, last.partial, last.reporter),
        (40, true, false),
        "{lines:?}"
    );
    // The election is left to an instance that closes the window normally.
    let key = format!("verve:{{{}}}:reporter", last.window_start);
    let holder: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(holder, None);
}
