//! The fleet protocol under real trouble: a stalled link to Redis, an instance
//! killed, Redis losing its data, the whole fleet stopping, and a real load
//! balancer in front. Real redis-server, tansu, haproxy, sockets; every wait is for
//! a condition, with a deadline.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::haproxy::Haproxy;
use common::kafka::{all_records, Record};
use common::proxy::Proxy;
use common::redis_server::RedisServer;
use common::tansu::Tansu;
use common::{
    accept_all, eventually, fleet_member, metric, signal, wait_with_deadline, window_length,
    within_one_window, Client, WindowLine, FLEET_WAIT_MS,
};
use verve::window::{WindowLength, WindowStart};

const LIMIT: Duration = Duration::from_secs(30);

/// Sinks for an instance publishing to `topic` on `tansu`.
fn kafka(tansu: &Tansu, topic: &str) -> Vec<(String, String)> {
    tansu.create_topic(topic);
    vec![
        ("VERVE_SINKS".into(), "log,kafka".into()),
        ("VERVE_KAFKA_BROKERS".into(), tansu.brokers()),
        ("VERVE_KAFKA_TOPIC".into(), topic.into()),
    ]
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The records of `window` on the topic, in order.
fn records_of(tansu: &Tansu, topic: &str, window: WindowStart) -> Vec<Record> {
    let key = window.to_string();
    all_records(&tansu.brokers(), topic, LIMIT)
        .into_iter()
        .filter(|r| r.key == key)
        .collect()
}

/// Waits until the topic's latest record for `window` is complete, and returns
/// every record of the window.
fn until_complete(tansu: &Tansu, topic: &str, window: WindowStart) -> Vec<Record> {
    eventually(
        LIMIT,
        || format!("a complete record of {window}"),
        || {
            let records = records_of(tansu, topic, window);
            let done = records.last().is_some_and(|r| r.value["complete"] == true);
            done.then_some(records)
        },
    )
}

fn counts_and_revisions(records: &[Record]) -> Vec<(u64, u64, bool)> {
    records
        .iter()
        .map(|r| {
            (
                r.value["revision"].as_u64().unwrap(),
                r.value["unique_requests"].as_u64().unwrap(),
                r.value["complete"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Sends `ids` to `addr` in a burst of pipelined requests; every answer is `ok`.
fn pipelined(addr: SocketAddr, ids: impl IntoIterator<Item = i64>) {
    let mut client = Client::connect(addr);
    let ids: Vec<i64> = ids.into_iter().collect();
    let burst: Vec<u8> = ids
        .iter()
        .flat_map(|id| {
            format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes()
        })
        .collect();
    client.send(&burst);
    for id in ids {
        let response = client.read_response();
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok"),
            "id {id}"
        );
    }
}

/// Sends each id on a connection of its own, closed after the answer.
fn one_per_connection(addr: SocketAddr, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // One write: a request split over several would wait on Nagle's algorithm.
        let request = format!(
            "GET /api/verve/accept?id={id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "id {id}: {answer:?}"
        );
    }
}

/// The case a fixed grace got wrong: one instance's link to Redis stalls from the
/// middle of a window until after the fleet has published it without that
/// instance. The fleet publishes `complete=false` at its wait, then a revision
/// with the exact count once the stalled instance's ids arrive.
#[test]
fn a_stalled_link_to_redis_ends_in_an_exact_revision() {
    let tansu = Tansu::start();
    let sinks = kafka(&tansu, "stall");
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let stalled_url = format!("redis://127.0.0.1:{}/0", link.port);
    let a = fleet_member(&redis.url(), "a", &borrowed(&sinks));
    let b = fleet_member(&stalled_url, "b", &borrowed(&sinks));
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(a.addr), 0..1500);
        accept_all(&mut Client::connect(b.addr), 1000..2000);
        let window = window_length().window_of(SystemTime::now());
        // b's first ids are in Redis: b is one of the window's senders.
        redis.wait_for_mark(window, "b", "sending");
        link.hold();
        // Answered `ok` while b cannot reach Redis.
        accept_all(&mut Client::connect(b.addr), 4000..5000);
        accept_all(&mut Client::connect(a.addr), 1900..2100);
    });
    let exact = (0..2100).chain(4000..5000).collect::<HashSet<i64>>().len() as u64;
    let first = a.wait_for_record(window, "a record", |_| true);
    assert!(
        !first.complete && first.unique_requests < exact,
        "published without b's held ids: {first:?}"
    );
    link.release();
    let records = until_complete(&tansu, "stall", window);
    let seen = counts_and_revisions(&records);
    let (last_revision, last_count, _) = *seen.last().unwrap();
    assert_eq!(last_count, exact, "{seen:?}");
    assert_eq!(
        seen.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=last_revision).collect::<Vec<_>>(),
        "one record per revision: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "counts never go down: {seen:?}"
    );
    // Both instances' count logs end on the same exact record.
    for instance in [&a, &b] {
        let line = instance.wait_for_record(window, "the complete record", |l| l.complete);
        assert_eq!(
            (line.unique_requests, line.revision),
            (exact, last_revision)
        );
    }
}

#[test]
fn an_instance_killed_mid_window_delays_its_window_by_the_fleet_wait_only() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    let mut b = fleet_member(&redis.url(), "b", &[]);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(a.addr), 0..300);
        accept_all(&mut Client::connect(b.addr), 200..600);
        let window = window_length().window_of(SystemTime::now());
        // Every id b answered is in Redis when it dies.
        eventually(
            Duration::from_secs(5),
            || "b's ids in Redis".into(),
            || (redis.scard(window, 1) == 600).then_some(()),
        );
        b.kill();
    });
    let line = a.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.complete, line.instances),
        (600, false, 1),
        "published at the wait, without b: {line:?}"
    );
    let ended = window_length().end_of(window);
    let published_at = SystemTime::UNIX_EPOCH
        + Duration::from_millis(
            redis
                .record_field(window, "published_at")
                .unwrap()
                .parse()
                .unwrap(),
        );
    assert!(
        published_at >= ended + Duration::from_millis(FLEET_WAIT_MS),
        "published before the fleet's wait was over"
    );
    // b's heartbeat has expired: the next windows are complete without it.
    let next = window_length().next(window);
    let line = a.wait_for_record(window_length().next(next), "a record", |_| true);
    assert_eq!((line.complete, line.instances), (true, 1), "{line:?}");
}

/// Redis loses data after one instance is done with a window and before the other
/// is (`lose`; `mid_window` runs once both have delivered their first ids): the
/// ids it lost are sent again, and the final revision is exact. It is
/// `complete=true` only if Redis kept the fleet's epoch (`epoch_kept`, an older
/// snapshot): a window around a loss is never complete.
fn losing_redis_between_two_closes_ends_exact(
    env: &[(&str, &str)],
    mid_window: &dyn Fn(&RedisServer),
    lose: impl FnOnce(&mut RedisServer),
    epoch_kept: bool,
) {
    let shards = env
        .iter()
        .find(|(name, _)| *name == "VERVE_REDIS_SHARDS")
        .map_or(1, |(_, value)| value.parse().unwrap());
    let mut redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let a = fleet_member(&redis.url(), "a", env);
    let b = fleet_member(&format!("redis://127.0.0.1:{}/0", link.port), "b", env);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(a.addr), 0..400);
        accept_all(&mut Client::connect(b.addr), 300..700);
        let window = window_length().window_of(SystemTime::now());
        redis.wait_for_mark(window, "b", "sending");
        eventually(
            Duration::from_secs(5),
            || "the first ids in Redis".into(),
            || (redis.scard(window, shards) == 700).then_some(()),
        );
        mid_window(&redis);
        link.hold();
        accept_all(&mut Client::connect(b.addr), 700..800);
        accept_all(&mut Client::connect(a.addr), 800..850);
    });
    // a closes the window and is done with it; b cannot say so yet.
    redis.wait_for_mark(window, "a", "full");
    lose(&mut redis);
    link.release();
    let line = a.wait_for_record(window, "the exact record", |l| l.unique_requests == 850);
    assert_eq!(
        (line.unique_requests, line.instances, line.complete),
        (850, 2, epoch_kept),
        "{line:?}\na:\n{}\nb:\n{}",
        a.stderr_text(),
        b.stderr_text()
    );
    let last = a
        .windows()
        .into_iter()
        .rfind(|l| l.window_start == window.to_string());
    assert_eq!(last.as_ref(), Some(&line), "a later revision: {last:?}");
    let stderr = a.stderr_text() + &b.stderr_text();
    assert!(
        stderr.contains("Redis lost ids this instance had delivered"),
        "{stderr}"
    );
}

#[test]
fn redis_restarted_empty_between_two_closes() {
    losing_redis_between_two_closes_ends_exact(&[], &|_| {}, |redis| redis.restart(), false);
}

fn flush(redis: &mut RedisServer) {
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
}

#[test]
fn redis_flushed_between_two_closes() {
    losing_redis_between_two_closes_ends_exact(&[], &|_| {}, flush, false);
}

#[test]
fn redis_flushed_between_two_closes_with_sixteen_shards() {
    losing_redis_between_two_closes_ends_exact(
        &[("VERVE_REDIS_SHARDS", "16")],
        &|_| {},
        flush,
        false,
    );
}

/// Redis comes back from a snapshot taken mid-window: the instances' marks are
/// there, ids delivered after the snapshot are not. Each instance's count of
/// delivered ids, written with the ids, is short of what it delivered, so it sends
/// the window again.
#[test]
fn redis_restored_from_an_older_snapshot_between_two_closes() {
    let restart = |redis: &mut RedisServer| redis.restart();
    losing_redis_between_two_closes_ends_exact(&[], &RedisServer::snapshot, restart, true);
}

#[test]
fn the_whole_fleet_stopping_mid_window_publishes_it_once_as_partial() {
    let tansu = Tansu::start();
    let sinks = kafka(&tansu, "leaving");
    let redis = RedisServer::start();
    let mut env = borrowed(&sinks);
    env.push(("VERVE_WINDOW_SECS", "3600"));
    let (mut a, mut b) = (
        fleet_member(&redis.url(), "a", &env),
        fleet_member(&redis.url(), "b", &env),
    );
    accept_all(&mut Client::connect(a.addr), 0..50);
    accept_all(&mut Client::connect(b.addr), 25..100);
    // Both at once: the harder case for "exactly one".
    signal(a.child(), libc::SIGTERM);
    signal(b.child(), libc::SIGTERM);
    for instance in [&mut a, &mut b] {
        assert!(wait_with_deadline(instance.child(), LIMIT).success());
    }
    let records = all_records(&tansu.brokers(), "leaving", LIMIT);
    assert_eq!(
        records.len(),
        1,
        "{records:?}\na:\n{}\nb:\n{}",
        a.stderr_text(),
        b.stderr_text()
    );
    // The fleet began within its hour-long window: never complete, numbered from
    // the epoch's beginning.
    let value = &records[0].value;
    let window = WindowLength::from_secs(3600).window_of(SystemTime::now());
    assert_eq!(
        (
            value["unique_requests"].as_u64(),
            value["partial"].as_bool(),
            value["complete"].as_bool(),
            value["revision"].as_u64()
        ),
        (
            Some(100),
            Some(true),
            Some(false),
            Some(redis.first_revision(window))
        ),
    );
}

/// A window that began within a fleet wait of the fleet's first heartbeat is
/// published `complete=false`, exact; the first window that begins later,
/// `complete=true`. Nothing proves, before the fleet's registry existed, that no
/// other instance answered ids.
#[test]
fn a_fleets_first_window_is_never_complete() {
    let redis = RedisServer::start();
    let wait = [("VERVE_FLEET_WAIT_MS", "5000")];
    let a = common::fleet_member_starting(&redis.url(), "a", &wait);
    let began_ms = common::epoch_began_ms(&a, "a", LIMIT);
    let young = |window: WindowStart| window.unix_secs() * 1000 < began_ms + 5_000;
    let mut client = Client::connect(a.addr);
    let (first, ()) = within_one_window(|| accept_all(&mut client, 0..100));
    assert!(
        young(first),
        "sent too late for the test: {first}, began {began_ms}"
    );
    let line = a.wait_for_record(first, "the first window's record", |_| true);
    assert_eq!(
        (line.unique_requests, line.complete),
        (100, false),
        "{line:?}"
    );
    common::sleep_until(UNIX_EPOCH + Duration::from_millis(began_ms + 5_000));
    let (later, ()) = within_one_window(|| accept_all(&mut client, 100..150));
    assert!(!young(later));
    let line = a.wait_for_record(later, "a later window's record", |_| true);
    assert_eq!(
        (line.unique_requests, line.complete, line.revision),
        (50, true, 1),
        "{line:?}"
    );
}

#[test]
fn two_instances_behind_haproxy_count_exactly_for_every_client_style() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    let b = fleet_member(&redis.url(), "b", &[]);
    let balancer = Haproxy::start(&[a.addr, b.addr]);
    let (window, ()) = within_one_window(|| {
        thread::scope(|s| {
            s.spawn(|| pipelined(balancer.addr, (0..600).map(|i| i % 400)));
            s.spawn(|| accept_all(&mut Client::connect(balancer.addr), 300..700));
            s.spawn(|| one_per_connection(balancer.addr, (650..750).chain(0..50)));
        });
    });
    let line: WindowLine = a.wait_for_record(window, "the complete record", |l| l.complete);
    assert_eq!((line.unique_requests, line.instances), (750, 2), "{line:?}");
    assert_eq!(
        b.wait_for_record(window, "the complete record", |l| l.complete),
        line
    );
    // The balancer spread the requests over both.
    for instance in [&a, &b] {
        assert!(metric(&instance.scrape(), "verve_ids_accepted_total") > 0);
    }
}

/// An instance that starts after a window ended has no ids for it: the fleet does
/// not wait for it on that window (a rolling deploy would otherwise turn windows
/// incomplete, or leave them unpublished).
#[test]
fn an_instance_started_after_a_window_is_not_waited_for_on_it() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    // A long wait, so that the record below is not published at it.
    let wait = [("VERVE_FLEET_WAIT_MS", "4000")];
    let a = fleet_member(&redis.url(), "a", &wait);
    let b = fleet_member(&format!("redis://127.0.0.1:{}/0", link.port), "b", &wait);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(a.addr), 0..100);
        accept_all(&mut Client::connect(b.addr), 50..150);
        let window = window_length().window_of(SystemTime::now());
        redis.wait_for_mark(window, "b", "sending");
        link.hold();
    });
    // a is done; b is held; c joins the fleet before b can finish.
    redis.wait_for_mark(window, "a", "full");
    let c = fleet_member(&redis.url(), "c", &wait);
    link.release();
    let line = a.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.complete, line.instances),
        (150, true, 2),
        "{line:?}"
    );
    assert_eq!(b.wait_for_window(window), line);
    // c took no part in the window: it neither held it up nor logs it.
    c.wait_for_window(window_length().next(window));
    assert!(c
        .windows()
        .iter()
        .all(|l| l.window_start != window.to_string()));
}

/// The last instance left stops while another one, killed a moment before, still
/// looks alive: the window is left to the fleet, and an instance that starts later
/// settles it once its wait is over.
#[test]
fn a_window_left_unfinished_is_settled_by_an_instance_that_starts_later() {
    let redis = RedisServer::start();
    let length = verve::window::WindowLength::from_secs(5);
    let env = [("VERVE_WINDOW_SECS", "5")];
    let a = fleet_member(&redis.url(), "a", &env);
    let mut b = fleet_member(&redis.url(), "b", &env);
    let window = common::start_of_next_window(length);
    accept_all(&mut Client::connect(a.addr), 0..100);
    accept_all(&mut Client::connect(b.addr), 50..200);
    eventually(
        Duration::from_secs(5),
        || "every id in Redis".into(),
        || (redis.scard(window, 1) == 200).then_some(()),
    );
    b.kill();
    let (status, lines) = a.terminate();
    assert!(status.success());
    assert!(
        lines.iter().all(|l| l.window_start != window.to_string()),
        "published with b still looking alive: {lines:?}"
    );
    assert_eq!(
        length.window_of(SystemTime::now()),
        window,
        "took 5 s to stop"
    );
    let c = fleet_member(&redis.url(), "c", &env);
    let line = c.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.complete, line.partial),
        (200, false, true),
        "{line:?}"
    );
}

/// The instance that published a record is killed before Kafka took it: another
/// instance following the window sends it, once the publisher had its time.
#[test]
fn a_record_whose_publisher_died_before_kafka_took_it_is_sent_by_another() {
    a_record_kafka_never_took_from_its_publisher_is_sent_by_another("orphaned", true);
}

/// Issue 23, item 5: the publisher lives on but cannot reach Kafka: another
/// instance following the window sends the record once the bound is over, rather
/// than only when the publisher is gone.
#[test]
fn a_record_whose_live_publisher_cannot_reach_kafka_is_sent_by_another() {
    a_record_kafka_never_took_from_its_publisher_is_sent_by_another("unreached", false);
}

/// a publishes a record that its Kafka (a port that never answers) never takes;
/// `kill`: a is then killed. b's Kafka works: the topic gets the record from b.
fn a_record_kafka_never_took_from_its_publisher_is_sent_by_another(topic: &str, kill: bool) {
    let tansu = Tansu::start();
    let sinks = kafka(&tansu, topic);
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    // a's Kafka never answers: its records are never acknowledged.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
    let fleet = [
        ("VERVE_FLEET_WAIT_MS", "3000"),
        ("VERVE_SHUTDOWN_DRAIN_MS", "200"),
        ("VERVE_SHUTDOWN_TIMEOUT_MS", "1200"),
    ];
    let mut env_a = borrowed(&sinks);
    env_a.retain(|(k, _)| *k != "VERVE_KAFKA_BROKERS");
    env_a.push(("VERVE_KAFKA_BROKERS", &silent));
    env_a.extend(fleet);
    let mut env_b = borrowed(&sinks);
    env_b.extend(fleet);
    let mut a = fleet_member(&format!("redis://127.0.0.1:{}/0", link.port), "a", &env_a);
    let b = fleet_member(&redis.url(), "b", &env_b);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut Client::connect(b.addr), 0..100);
        accept_all(&mut Client::connect(a.addr), 50..120);
        let window = window_length().window_of(SystemTime::now());
        redis.wait_for_mark(window, "a", "sending");
        // a is the last to be done, so a publishes.
        link.hold();
    });
    redis.wait_for_mark(window, "b", "full");
    link.release();
    let line = a.wait_for_window(window);
    assert_eq!((line.unique_requests, line.complete), (120, true));
    if kill {
        a.kill();
    }
    let records = eventually(
        LIMIT,
        || format!("{window} on the topic"),
        || {
            let records = records_of(&tansu, topic, window);
            (!records.is_empty()).then_some(records)
        },
    );
    assert_eq!(counts_and_revisions(&records), [(1, 120, true)]);
    assert!(
        b.stderr_text().contains("sending it on"),
        "{}",
        b.stderr_text()
    );
}

/// Issue 23, item 1: every run that covered a window is killed (`kill -9`, no
/// leave, no orphan noted at shutdown), and the instance restarts under the same
/// name after the window ended. The window's ids sit in Redis; the restarted run
/// adopts the window once its wait is over and publishes the exact count.
#[test]
fn a_window_whose_every_instance_was_killed_is_published_by_the_next_run() {
    let redis = RedisServer::start();
    let length = WindowLength::from_secs(3);
    let env = [("VERVE_WINDOW_SECS", "3")];
    let mut a = fleet_member(&redis.url(), "a", &env);
    let window = common::start_of_next_window(length);
    accept_all(&mut Client::connect(a.addr), 0..200);
    eventually(
        Duration::from_secs(2),
        || "every id in Redis".into(),
        || (redis.scard(window, 1) == 200).then_some(()),
    );
    a.kill();
    assert_eq!(
        length.window_of(SystemTime::now()),
        window,
        "killed after the window ended: it would have published it"
    );
    // Restarted after the window ended: the new run has no ids for it.
    assert_eq!(common::start_of_next_window(length), length.next(window));
    let restarted = fleet_member(&redis.url(), "a", &env);
    let line = restarted.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.revision, line.complete),
        (200, 1, false),
        "{line:?}\n{}",
        restarted.stderr_text()
    );
}

/// Sleeps until `ahead` before the next boundary of windows of `length` (the one
/// after, if that is too close), and returns the window that starts there.
fn just_before_next_window(length: WindowLength, ahead: Duration) -> WindowStart {
    let now = SystemTime::now();
    let mut boundary = length.end_of(length.window_of(now));
    if boundary.duration_since(now).unwrap_or_default() < ahead + Duration::from_millis(50) {
        boundary += Duration::from_secs(length.as_secs());
    }
    // Waiting for the clock to reach that point is the condition itself.
    thread::sleep(boundary.duration_since(now).unwrap_or_default() - ahead);
    length.window_of(boundary)
}

/// a on `redis` directly and b through a link held from just before a window
/// begins, both with `env`; ids `b_ids` to b (first: it answers `ok` only within
/// its lease), then 0..100 to a, all in that window. Returns a, b, b's link and
/// the window once a published its first record: 100, revision 1, incomplete.
fn b_cut_off_from_a_windows_start(
    redis: &RedisServer,
    env: &[(&str, &str)],
    b_ids: std::ops::Range<i64>,
) -> (common::Verve, common::Verve, Proxy, WindowStart) {
    let link = Proxy::start(redis.port);
    let a = fleet_member(&redis.url(), "a", env);
    let b = fleet_member(&format!("redis://127.0.0.1:{}/0", link.port), "b", env);
    let length = window_length();
    let window = just_before_next_window(length, Duration::from_millis(100));
    link.hold();
    assert_eq!(common::start_of_next_window(length), window);
    accept_all(&mut Client::connect(b.addr), b_ids);
    accept_all(&mut Client::connect(a.addr), 0..100);
    assert_eq!(length.window_of(SystemTime::now()), window, "sent too late");
    let first = a.wait_for_record(window, "a record", |_| true);
    assert_eq!(
        (first.unique_requests, first.revision, first.complete),
        (100, 1, false),
        "published as complete without b: {first:?}"
    );
    (a, b, link, window)
}

/// Every key verve wrote to `redis` carries a time to live.
fn assert_every_key_expires(redis: &RedisServer) {
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("verve:*")
        .query(&mut connection)
        .unwrap();
    assert!(!keys.is_empty());
    let without: Vec<(String, i64)> = keys
        .into_iter()
        .map(|key| {
            let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut connection).unwrap();
            (key, ttl)
        })
        .filter(|(_, ttl)| *ttl <= 0)
        .collect();
    assert_eq!(without, [], "keys without a time to live");
}

/// Issue 23, item 2: b's link to Redis is held from just before a window begins
/// until after the fleet's wait for it, so b's heartbeat lapses during the
/// window before b could send anything for it, while b answers `ok`. The record
/// must not say complete without b: `complete=false` at the wait, then
/// `complete=true` with the exact count once b's ids arrive, and no complete
/// record is short.
#[test]
fn a_run_whose_heartbeat_lapsed_during_a_window_keeps_its_record_incomplete() {
    let redis = RedisServer::start();
    let (a, b, link, window) = b_cut_off_from_a_windows_start(&redis, &[], 50..150);
    link.release();
    let last = a.wait_for_record(window, "the complete record", |l| l.complete);
    assert_eq!((last.unique_requests, last.instances), (150, 2), "{last:?}");
    for instance in [&a, &b] {
        let complete: Vec<WindowLine> = instance
            .windows()
            .into_iter()
            .filter(|l| l.window_start == window.to_string() && l.complete)
            .collect();
        assert!(
            complete.iter().all(|l| l.unique_requests == 150),
            "{complete:?}"
        );
    }
    assert_every_key_expires(&redis);
}

/// Issue 23, item 2, its last case: b's link to Redis is held long enough for
/// its heartbeat to expire before a window begins. The fleet then publishes that
/// window `complete=true` without b, which is exact only if b answered no `ok`
/// in it: b's lease lapsed before its heartbeat did, so it answers 503 until
/// Redis hears from it again.
#[test]
fn a_run_cut_off_past_its_lease_refuses_ids_so_a_complete_record_is_never_short() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let a = fleet_member(&redis.url(), "a", &[]);
    let b = fleet_member(&format!("redis://127.0.0.1:{}/0", link.port), "b", &[]);
    let mut to_b = Client::connect(b.addr);
    link.hold();
    eventually(
        Duration::from_secs(10),
        || "b refusing ids once its lease lapsed".into(),
        || (to_b.get("/api/verve/accept?id=7").status == 503).then_some(()),
    );
    let b_run = eventually(
        Duration::from_secs(10),
        || "b's heartbeat expired in Redis".into(),
        || {
            let live = redis.live_runs();
            let runs = redis.registered_runs();
            let b_run = runs.into_iter().find(|run| run.starts_with("b/"))?;
            (!live.contains(&b_run)).then_some(b_run)
        },
    );
    let (window, statuses) = within_one_window(|| {
        accept_all(&mut Client::connect(a.addr), 0..100);
        (50..150)
            .map(|id| to_b.get(&format!("/api/verve/accept?id={id}")).status)
            .collect::<HashSet<u16>>()
    });
    assert_eq!(statuses, HashSet::from([503]), "b answered while lapsed");
    let health = b.admin_get("/healthz");
    assert_eq!(
        (health.status, health.body.as_str()),
        (503, "no heartbeat answered within the lease: refusing ids")
    );
    let line = a.wait_for_record(window, "a record", |_| true);
    assert_eq!(
        (line.unique_requests, line.revision, line.complete),
        (100, 1, true),
        "{line:?}"
    );
    link.release();
    eventually(
        Duration::from_secs(10),
        || format!("{b_run} accepting ids again"),
        || (to_b.get("/api/verve/accept?id=100").status == 200).then_some(()),
    );
    let warned = "no heartbeat answered by Redis within this instance's lease";
    assert!(b.stderr_text().contains(warned), "{}", b.stderr_text());
}

/// Issue 23, item 6: Redis loses a window's keys mid-window (`FLUSHALL`), the
/// next rounds write them again, and the only instance is killed before it
/// settles the window: nothing it wrote lives forever.
#[test]
fn keys_written_again_after_redis_lost_them_still_expire() {
    let redis = RedisServer::start();
    let env = [("VERVE_WINDOW_SECS", "3600")];
    let mut a = fleet_member(&redis.url(), "a", &env);
    let window = WindowLength::from_secs(3600).window_of(SystemTime::now());
    let mut client = Client::connect(a.addr);
    accept_all(&mut client, 0..100);
    let in_redis = |n: u64| {
        eventually(
            Duration::from_secs(5),
            || format!("{n} ids in Redis"),
            || (redis.scard(window, 1) == n).then_some(()),
        )
    };
    in_redis(100);
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    accept_all(&mut client, 100..150);
    in_redis(50);
    // A heartbeat after the loss wrote the registry again.
    eventually(
        Duration::from_secs(5),
        || "the registry written again".into(),
        || {
            let epoch: bool = redis::cmd("EXISTS")
                .arg("verve:{fleet}:epoch")
                .query(&mut redis.connection())
                .unwrap();
            epoch.then_some(())
        },
    );
    a.kill();
    assert_every_key_expires(&redis);
}

/// A process killed when the test ends, passed or not (one that was never
/// refused would otherwise outlive a failed test).
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 23, item 3: an instance whose windows are not the fleet's (a rolling
/// change of `VERVE_WINDOW_SECS`) is refused at start-up with one line, as one
/// with another shard count is, and is not registered: its ids would otherwise
/// go into sets of windows the fleet cuts differently.
#[test]
fn an_instance_with_another_window_length_is_refused_at_start() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    let mut other = KilledOnDrop(
        common::command(&[
            ("VERVE_REDIS_URL", redis.url().as_str()),
            ("VERVE_WINDOW_SECS", "4"),
            ("VERVE_JOURNAL", "false"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let status = wait_with_deadline(&mut other.0, LIMIT);
    let mut stderr = String::new();
    other
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            "verve: VERVE_WINDOW_SECS is 4 here but 2 in the fleet sharing this Redis \
             (prefix verve): every instance must count the same windows, or one window's \
             set would take in another's ids; set it to 2 (or use another VERVE_REDIS_PREFIX)"
        )
    );
    let live = redis.registered_runs();
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(live[0].starts_with("a/"), "{live:?}");
    drop(a);
}

/// Issue 23, item 7: each heartbeat compares this host's clock with Redis's
/// `TIME` and exports the offset. On one host the clocks agree: the offset is
/// within a few ms and the instance is healthy.
#[test]
fn the_offset_from_redis_clock_is_exported_and_healthy_on_one_host() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    let text = a.scrape();
    let line = text
        .lines()
        .find(|l| l.starts_with("verve_clock_offset_ms "))
        .unwrap();
    let offset: i64 = line["verve_clock_offset_ms ".len()..].parse().unwrap();
    assert!(offset.abs() <= 50, "{line}");
    let health = a.admin_get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
}

/// Issue 23, item 4 (its first half): b's link is held from just before a window
/// until the window's keys expired (their lifetime shortened by a test hook), so
/// b comes back with ids for a window whose sets are gone. The record outlives
/// the sets: b never publishes revision 1 again with other content; its count,
/// higher than the record's, comes as revision 2, `complete=false`, and every
/// revision names one count in both count logs.
#[test]
fn a_revision_is_never_published_twice_after_a_windows_sets_expired() {
    let redis = RedisServer::start();
    let env = [("VERVE_TEST_KEY_TTL_SECS", "5")];
    let (a, b, link, window) = b_cut_off_from_a_windows_start(&redis, &env, 50..200);
    // a stops following the window, and its sets expire.
    let sets = redis.window_sets(window, 1);
    eventually(
        Duration::from_secs(30),
        || format!("{window}'s sets expired"),
        || {
            let exists: u64 = redis::cmd("EXISTS")
                .arg(&sets)
                .query(&mut redis.connection())
                .unwrap();
            (exists == 0).then_some(())
        },
    );
    link.release();
    let late = b.wait_for_record(window, "b's revision", |l| l.unique_requests == 150);
    assert_eq!(
        (late.revision, late.complete),
        (2, false),
        "{late:?}\na: {:?}\nb: {:?}\n{}",
        a.windows(),
        b.windows(),
        b.stderr_text()
    );
    let mut by_revision = std::collections::BTreeMap::new();
    for line in a.windows().into_iter().chain(b.windows()) {
        if line.window_start == window.to_string() {
            let count = *by_revision
                .entry(line.revision)
                .or_insert(line.unique_requests);
            assert_eq!(
                count, line.unique_requests,
                "revision {} twice",
                line.revision
            );
        }
    }
    let counts: Vec<u64> = by_revision.values().copied().collect();
    assert_eq!(counts, [100, 150], "{by_revision:?}");
}

/// Issue 23, item 4: a publishes a window's first revision and is killed, then
/// Redis loses everything (`FLUSHALL`) before b, cut off meanwhile, ever saw that
/// record. b cannot put it back, and publishes its own count; numbered in the
/// fleet's new epoch, above every revision of the old one, so that no number
/// names two records. a's ids that only a had are gone with it, and b, which
/// saw a live before the loss and never again, does not call the record complete.
#[test]
fn a_revision_is_never_reused_after_redis_lost_the_record() {
    let mut redis = RedisServer::start();
    let (mut a, b, link, window) = b_cut_off_from_a_windows_start(&redis, &[], 50..200);
    a.kill();
    flush(&mut redis);
    link.release();
    let late = b.wait_for_record(window, "b's record", |_| true);
    // Numbered from the new epoch, which began after the window did.
    let revision = redis.first_revision(window);
    assert!(revision > 1 << 20, "{revision}");
    assert_eq!(
        (late.unique_requests, late.revision, late.complete),
        (150, revision, false),
        "{late:?}\n{}",
        b.stderr_text()
    );
    let epoch: String = redis::cmd("GET")
        .arg("verve:{fleet}:epoch")
        .query(&mut redis.connection())
        .unwrap();
    assert!(epoch.starts_with("1:b/"), "{epoch}");
}

/// libfaketime, which moves the wall clock of a process it is preloaded into
/// (scripts/test.sh installs it with the faketime package).
fn libfaketime() -> std::path::PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists());
    found.expect("libfaketime (apt-get install faketime; scripts/test.sh does)")
}

/// Instance `name` of the fleet on `redis_url`, whose wall clock is offset by
/// what `offset` holds (`+0`, `+5s`, `+2h`, as libfaketime reads it, re-read
/// every second, so that a test can move it while the instance runs); its
/// monotonic clock is left alone.
fn fleet_member_with_clock(
    redis_url: &str,
    name: &str,
    offset: &std::path::Path,
    extra: &[(&str, &str)],
) -> common::Verve {
    let wait = FLEET_WAIT_MS.to_string();
    let mut command = common::command(&common::fleet_env(redis_url, name, &wait, extra));
    command
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", offset)
        .env("FAKETIME_CACHE_DURATION", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    common::in_fleet(common::Verve::spawn(command), name)
}

/// Issue 23, item 7: an instance whose clock is 5 s ahead of Redis's says so:
/// the offset in /metrics, one warning, and /healthz fails.
#[test]
fn a_clock_ahead_of_redis_is_exported_warned_and_unhealthy() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+5s\n").unwrap();
    let mut a = fleet_member_with_clock(&redis.url(), "ahead", &offset, &[]);
    let line = a.wait_for_stderr("this host's clock is off Redis's", Duration::from_secs(5));
    assert!(line.contains("offset_ms=-"), "{line}");
    let text = a.scrape();
    let exported = text
        .lines()
        .find_map(|l| l.strip_prefix("verve_clock_offset_ms "))
        .unwrap();
    let offset_ms: i64 = exported.parse().unwrap();
    assert!((-5_100..=-4_900).contains(&offset_ms), "{offset_ms}");
    let health = a.admin_get("/healthz");
    assert_eq!(
        (health.status, health.body.as_str()),
        (
            503,
            "clock off Redis's by more than VERVE_MAX_CLOCK_SKEW_MS"
        )
    );
}

/// Issue 23, item 7: b's clock jumps two hours forward. b skips the windows
/// without ids in between (one warning, as before), and the fleet must not wait
/// for b on them: a's next window is complete without b.
#[test]
fn an_instance_whose_clock_jumped_forward_is_not_waited_for_on_the_windows_it_skipped() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let a = fleet_member(&redis.url(), "a", &[]);
    let mut b = fleet_member_with_clock(&redis.url(), "b", &offset, &[]);
    std::fs::write(&offset, "+2h\n").unwrap();
    b.wait_for_stderr("the clock jumped forward", Duration::from_secs(10));
    // b's first window in the registry is now past the jump.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let later = later
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    eventually(
        Duration::from_secs(10),
        || format!("b's first window past the jump:\n{}", b.stderr_text()),
        || {
            let joined: Vec<(String, u64)> = redis::cmd("HGETALL")
                .arg("verve:{fleet}:joined")
                .query(&mut redis.connection())
                .unwrap();
            let first = joined.iter().find(|(run, _)| run.starts_with("b/"));
            first.is_some_and(|(_, first)| *first > later).then_some(())
        },
    );
    let (window, ()) = within_one_window(|| accept_all(&mut Client::connect(a.addr), 0..50));
    let line = a.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.complete, line.instances),
        (50, true, 1),
        "{line:?}"
    );
}
