//! Exact dedup across instances through a real redis-server, and Redis outages.
//! The fleet protocol under real trouble (stalls, crashes, lost data) is in
//! tests/fleet.rs.

mod common;

use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::proxy::Proxy;
use common::redis_server::RedisServer;
use common::{
    accept_all, distinct, eventually, fleet_member, metric, within_one_window, Client, Verve,
};
use verve::window::WindowLength;

#[test]
fn two_instances_count_each_id_once_and_publish_one_record() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    // b splits its sets over partition owners; a fleet may mix the two.
    let b = fleet_member(&redis.url(), "b", &[("VERVE_PARTITIONS", "3")]);
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
    assert_eq!(line_a, line_b, "both instances log the fleet's record");
    assert_eq!(
        (
            line_a.unique_requests,
            line_a.scope.as_str(),
            line_a.revision,
            line_a.complete,
            line_a.partial,
            line_a.instances
        ),
        (expected, "global", 1, true, false, 2)
    );
    // One of the two published it, once: by the next window there is no revision.
    a.wait_for_window(common::window_length().next(window));
    assert_eq!(redis.record_field(window, "revision").as_deref(), Some("1"));
    let by = redis.record_field(window, "by").unwrap();
    assert!(by.starts_with("a/") || by.starts_with("b/"), "{by}");
    // Every set the window's ids went to expires (-2: a set no id went to).
    let mut connection = redis.connection();
    let ttls: Vec<i64> = redis
        .window_sets(window, 1)
        .iter()
        .map(|set| redis::cmd("TTL").arg(set).query(&mut connection).unwrap())
        .filter(|&ttl: &i64| ttl != -2)
        .collect();
    assert!(
        !ttls.is_empty() && ttls.iter().all(|&ttl| ttl > 0),
        "window keys expire: {ttls:?}"
    );
}

/// Issue 26: a window's shards are split into as many sets as the first round
/// to reach its sentinel said. Here the next window is split into 3 before any
/// round reaches it, as if another run had proposed 3 (runs propose powers of
/// two): this run's first round, split its own way, is refused, and sent again
/// split into 3. Its refused `SADD`s stay in sets of another count, which no
/// survey counts: the count is exact, and every id is in its set of the 3.
#[test]
fn a_round_split_another_way_than_its_window_is_sent_again_the_windows_way() {
    let redis = RedisServer::start();
    let a = fleet_member(&redis.url(), "a", &[]);
    let length = common::window_length();
    let ids = 0..600i64;
    let window = (0..3)
        .find_map(|_| {
            let start = length.end_of(length.window_of(SystemTime::now()));
            let window = length.window_of(start);
            let _: () = redis::cmd("HSET")
                .arg(format!("verve:{{{window}}}:rounds"))
                .arg("sets")
                .arg(3)
                .query(&mut redis.connection())
                .unwrap();
            common::sleep_until(start + Duration::from_millis(20));
            accept_all(&mut Client::connect(a.addr), ids.clone());
            (length.window_of(SystemTime::now()) == window).then_some(window)
        })
        .expect("600 ids sent within one window, in three tries");
    let line = a.wait_for_window(window);
    assert_eq!(line.unique_requests, 600);
    assert_eq!(redis.sets_per_shard(window), 3);
    let shards = verve::store::window_shards("verve", window, 1);
    let mut connection = redis.connection();
    let mut held = 0;
    for set in verve::store::window_sets(&shards[0], 3) {
        let size: u64 = redis::cmd("SCARD")
            .arg(&set)
            .query(&mut connection)
            .unwrap();
        held += size;
    }
    assert_eq!(held, 600);
    for id in ids {
        let set = verve::store::set_of_id(&shards, 3, id);
        let member: bool = redis::cmd("SISMEMBER")
            .arg(&set)
            .arg(id)
            .query(&mut connection)
            .unwrap();
        assert!(member, "{id} not in {set}");
    }
    // The refused round's sets, of another count, are there, uncounted.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("verve:{{{window}}}:*/*"))
        .query(&mut connection)
        .unwrap();
    let refused: Vec<&String> = keys.iter().filter(|k| !k.contains("}:3/")).collect();
    assert!(!refused.is_empty(), "{keys:?}");
}

#[test]
fn a_window_sharded_over_sixteen_sets_counts_exactly() {
    let redis = RedisServer::start();
    let shards = [("VERVE_REDIS_SHARDS", "16")];
    let a = fleet_member(&redis.url(), "a", &shards);
    let b = fleet_member(&redis.url(), "b", &shards);
    let (window, ()) = within_one_window(|| {
        thread::scope(|s| {
            s.spawn(|| accept_all(&mut Client::connect(a.addr), 0..700));
            s.spawn(|| accept_all(&mut Client::connect(b.addr), 500..1000));
        });
    });
    let line = a.wait_for_window(window);
    assert_eq!(b.wait_for_window(window), line);
    assert_eq!((line.unique_requests, line.complete), (1000, true));
    // Every shard took its part of the ids, split into the sets the window's
    // sentinel records, each set with a time to live; no unsharded set was
    // written.
    let sets = redis.sets_per_shard(window);
    let mut connection = redis.connection();
    let sizes: Vec<u64> = verve::store::window_shards("verve", window, 16)
        .iter()
        .map(|shard| {
            let mut size = 0;
            for key in verve::store::window_sets(shard, sets) {
                let ids: u64 = redis::cmd("SCARD")
                    .arg(&key)
                    .query(&mut connection)
                    .unwrap();
                let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut connection).unwrap();
                assert!(ids == 0 || ttl > 0, "{key}: ttl {ttl}");
                size += ids;
            }
            size
        })
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), 1000);
    assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");
    let unsharded: bool = redis::cmd("EXISTS")
        .arg(format!("verve:{{{window}}}"))
        .query(&mut connection)
        .unwrap();
    assert!(!unsharded);

    // An instance that would split windows differently is refused at start-up.
    let mut other = common::command(&[
        ("VERVE_REDIS_URL", redis.url().as_str()),
        ("VERVE_REDIS_SHARDS", "4"),
        ("VERVE_JOURNAL", "false"),
    ]);
    let output = other.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            "verve: VERVE_REDIS_SHARDS is 4 here but 16 in the fleet sharing this Redis \
             (prefix verve): every instance must split windows the same way, or ids would \
             be counted twice; set it to 16"
        )
    );
    // Nor is it registered: the fleet does not wait for it.
    let live = redis.registered_runs();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live
        .iter()
        .all(|run| run.starts_with("a/") || run.starts_with("b/")));
}

#[test]
fn a_redis_restart_mid_window_loses_nothing() {
    let mut redis = RedisServer::start();
    // Partitioned, so the replay reads the window's ids from every part.
    let verve = fleet_member(&redis.url(), "solo", &[("VERVE_PARTITIONS", "2")]);
    let closed = |v: &Verve| metric(&v.scrape(), "verve_windows_closed_total");
    let (window, closed_before) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all(&mut client, 1..=100);
        // Let the first ids reach Redis, and the instance hear that they did (a
        // round Redis ran but never answered is sent again whole, which is not
        // the loss this test is about), then lose them with it.
        let window = common::window_length().window_of(std::time::SystemTime::now());
        eventually(
            Duration::from_secs(1),
            || "the first ids in Redis, acknowledged".into(),
            || {
                let acknowledged = metric(&verve.scrape(), "verve_redis_buffered_ids") == 0;
                (redis.scard(window, 1) == 100 && acknowledged).then_some(())
            },
        );
        redis.kill();
        accept_all(&mut client, 101..=200);
        closed(&verve)
    });
    // Redis stays down until the window has closed on the instance.
    eventually(
        Duration::from_secs(10),
        || "the window to close".into(),
        || (closed(&verve) > closed_before).then_some(()),
    );
    let unpublished = |v: &Verve| {
        v.windows()
            .iter()
            .all(|l| l.window_start != window.to_string())
    };
    assert!(unpublished(&verve), "published without Redis");
    redis.restart();
    // Exact; not complete: the window began before the epoch Redis lost.
    let line = verve.wait_for_window(window);
    assert_eq!(
        (line.unique_requests, line.scope.as_str(), line.complete),
        (200, "global", false)
    );
    assert!(
        verve
            .stderr_text()
            .contains("Redis lost ids this instance had delivered"),
        "{}",
        verve.stderr_text()
    );
    assert!(metric(&verve.scrape(), "verve_redis_replays_total") >= 1);
}

/// Issue 23, item 3: a run that has not heard from the fleet cannot know that it
/// may deliver (its shards and window length may not be the fleet's), so it
/// answers no `ok` until a heartbeat is answered: 503 until then, `ok` after.
#[test]
fn redis_unreachable_at_start_refuses_ids_until_the_fleet_answers() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    link.hold();
    let mut verve = common::fleet_member_starting(
        &format!("redis://127.0.0.1:{}/0", link.port),
        "patient",
        &[],
    );
    assert_eq!(metric(&verve.scrape(), "verve_redis_in_fleet"), 0);
    verve.wait_for_stderr("Redis unreachable at start-up", Duration::from_secs(5));
    let mut client = Client::connect(verve.addr);
    let response = client.get("/api/verve/accept?id=1");
    assert_eq!((response.status, response.body.as_str()), (503, "failed"));
    // Still serving: a bad request is still told so.
    assert_eq!(client.get("/api/verve/accept?id=x").status, 400);
    link.release();
    eventually(
        Duration::from_secs(10),
        || "an ok once the fleet answered".into(),
        || (client.get("/api/verve/accept?id=2").status == 200).then_some(()),
    );
    assert_eq!(metric(&verve.scrape(), "verve_redis_in_fleet"), 1);
    let live = redis.registered_runs();
    assert_eq!(live.len(), 1, "{live:?}");
}

#[test]
fn redis_lost_after_start_keeps_answering_and_refuses_once_the_buffer_is_full() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let verve = fleet_member(
        &format!("redis://127.0.0.1:{}/0", link.port),
        "lonely",
        &[
            ("VERVE_REDIS_BUFFER_IDS", "50"),
            ("VERVE_REDIS_TIMEOUT_MS", "100"),
        ],
    );
    let mut client = Client::connect(verve.addr);
    // Registered with the fleet: ids are accepted.
    eventually(
        Duration::from_secs(5),
        || "the first ok".into(),
        || (client.get("/api/verve/accept?id=0").status == 200).then_some(()),
    );
    link.hold();
    accept_all(&mut client, 1..=49);
    // The buffer fills as the aggregator takes the batches in; then new ids are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut id = 50;
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
    let verve = fleet_member(&redis.url(), "patient", &[]);
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
fn the_last_instance_to_leave_publishes_the_window_cut_short() {
    let redis = RedisServer::start();
    let verve = fleet_member(&redis.url(), "last", &[("VERVE_WINDOW_SECS", "3600")]);
    accept_all(&mut Client::connect(verve.addr), 1..=40);
    let (status, lines) = verve.terminate();
    assert!(status.success());
    // The fleet began within its hour-long window: never complete, numbered from
    // the epoch's beginning.
    let window = WindowLength::from_secs(3600).window_of(std::time::SystemTime::now());
    let last = lines.last().expect("a count line");
    assert_eq!(
        (
            last.unique_requests,
            last.partial,
            last.complete,
            last.revision
        ),
        (40, true, false, redis.first_revision(window)),
        "{lines:?}"
    );
}

#[test]
fn an_instance_leaving_mid_window_leaves_the_window_to_the_others() {
    let redis = RedisServer::start();
    // Windows long enough that the leaving instance stops well within one.
    let length = WindowLength::from_secs(5);
    let env = [("VERVE_WINDOW_SECS", "5")];
    let leaving = fleet_member(&redis.url(), "leaving", &env);
    let staying = fleet_member(&redis.url(), "staying", &env);
    let window = common::start_of_next_window(length);
    accept_all(&mut Client::connect(leaving.addr), 1..=40);
    accept_all(&mut Client::connect(staying.addr), 30..=60);
    let (status, lines) = leaving.terminate();
    assert!(status.success());
    assert_eq!(
        length.window_of(SystemTime::now()),
        window,
        "this machine took 5 s to stop an instance"
    );
    let window_start = window.to_string();
    assert!(
        lines.iter().all(|l| l.window_start != window_start),
        "the leaving instance published {window}: {lines:?}"
    );
    let line = staying.wait_for_window(window);
    assert_eq!(
        (
            line.unique_requests,
            line.complete,
            line.partial,
            line.instances
        ),
        (60, true, false, 2)
    );
    assert_eq!(redis.mark(window, "leaving").as_deref(), Some("partial"));
}

#[test]
fn a_user_without_info_or_config_rights_is_enough() {
    let redis = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "plain",
                "on",
                ">secret",
                "~verve:*",
                "+@all",
                "-@dangerous",
            ][..],
        )
        .query(&mut redis.connection())
        .unwrap();
    let url = format!("redis://plain:secret@127.0.0.1:{}/0", redis.port);
    let verve = fleet_member(&url, "plain", &[]);
    let (window, ()) = within_one_window(|| accept_all(&mut Client::connect(verve.addr), 1..=25));
    let line = verve.wait_for_window(window);
    assert_eq!((line.unique_requests, line.complete), (25, true));
    let stderr = verve.stderr_text();
    assert!(!stderr.contains("Redis refused"), "{stderr}");
}
