//! Exact dedup across instances through a real Redis Cluster
//! (`VERVE_REDIS_MODE=cluster`): a window's ids are split over shard sets that
//! live on different masters, and a master may be replaced mid-window, by a
//! failover or by a crash. The protocol on one redis-server is tested in
//! tests/redis.rs and tests/fleet.rs.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, SystemTime};

use common::redis_cluster::RedisCluster;
use common::{
    accept_all, eventually, fleet_member, metric, start_of_next_window,
    two_members_with_overlapping_ids, within_one_window, within_one_window_of, Client, Verve,
    WindowLine,
};
use verve::window::{WindowLength, WindowStart};

const CLUSTER_MODE: (&str, &str) = ("VERVE_REDIS_MODE", "cluster");

/// Shards per window when `VERVE_REDIS_SHARDS` is not set, in cluster mode.
const DEFAULT_SHARDS: usize = 48;

#[test]
fn two_instances_over_three_masters_count_exactly() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b, window) = two_members_with_overlapping_ids(&cluster.urls(), &[CLUSTER_MODE]);
    let line = both_log_one_record(&a, &b, window);
    assert_eq!(summary(&line), (300, "global", 1, true, false, 2));
    assert_eq!(
        cluster.record_field(window, "revision").as_deref(),
        Some("1")
    );
    let by = cluster.record_field(window, "by").unwrap();
    assert!(by.starts_with("a/") || by.starts_with("b/"), "{by}");
    // Shard k's slot is in the k-th of 48 slices of the slots, and redis-cli
    // gave each master a third of them, in one range: each master serves 16 of
    // the window's 48 shards, give or take the one slice a range boundary splits
    // (slot 5461, the second master's first, is in slice 15), whatever the window.
    let mut shards_by_master: BTreeMap<u16, usize> = BTreeMap::new();
    for key in verve::store::window_shards("verve", window, DEFAULT_SHARDS) {
        *shards_by_master
            .entry(cluster.owner_of_key(&key))
            .or_default() += 1;
    }
    assert_eq!(shards_by_master.len(), 3, "{shards_by_master:?}");
    assert!(
        shards_by_master.values().all(|n| (15..=17).contains(n)),
        "{shards_by_master:?}"
    );
    let by_master = cluster.scard_by_master(window, DEFAULT_SHARDS);
    assert_eq!(by_master.values().sum::<u64>(), 300, "{by_master:?}");
    // 300 ids leave a master's 15 shards empty with chance about 3·(11/16)^300.
    assert!(by_master.values().all(|&ids| ids > 0), "{by_master:?}");
}

#[test]
fn default_shards_in_cluster_mode_are_forty_eight() {
    let cluster = RedisCluster::start(3, 0);
    let verve = fleet_member(&cluster.urls(), "solo", &[CLUSTER_MODE]);
    let (window, ()) = within_one_window(|| accept_all(&mut Client::connect(verve.addr), 0..3000));
    let line = verve.wait_for_window(window);
    assert_eq!((line.unique_requests, line.complete), (3000, true));
    // 3,000 ids leave one of 48 shards empty with chance about 48·(47/48)^3000 ≈ 1e-26.
    let expected: BTreeSet<String> = verve::store::window_shards("verve", window, DEFAULT_SHARDS)
        .into_iter()
        .collect();
    assert_eq!(cluster.shard_keys(window), expected);
    assert!(
        !cluster.exists(&format!("verve:{{{window}}}")),
        "an unsharded set for {window}"
    );
    let by_master = cluster.scard_by_master(window, DEFAULT_SHARDS);
    assert_eq!(by_master.values().sum::<u64>(), 3000, "{by_master:?}");
}

/// `CLUSTER FAILOVER` of the master serving most of the window's ids, between
/// two halves of them: the instances follow the slots to the promoted replica.
#[test]
fn a_master_replaced_by_its_replica_mid_window_loses_nothing() {
    let cluster = RedisCluster::start(3, 1);
    // Long enough for half the ids, a failover (well under a second) and the rest.
    let length = WindowLength::from_secs(5);
    let env = [CLUSTER_MODE, ("VERVE_WINDOW_SECS", "5")];
    let a = fleet_member(&cluster.urls(), "a", &env);
    let b = fleet_member(&cluster.urls(), "b", &env);
    let (window, (old, new)) = within_one_window_of(length, || {
        let window = length.window_of(SystemTime::now());
        send_both((&a, 0..100), (&b, 50..150));
        let held = wait_for_ids(&cluster, window, 150, length.as_secs());
        let busiest = busiest(&held);
        let replica = cluster.failover(busiest);
        let kept = cluster.scard_by_master(window, DEFAULT_SHARDS);
        assert_eq!(
            kept.values().sum::<u64>(),
            150,
            "after the failover: {kept:?}"
        );
        // b also sends ids a sent before: the promoted replica must know them.
        send_both((&a, 150..250), (&b, (0..50).chain(200..300)));
        (busiest, replica)
    });
    let line = both_log_one_record(&a, &b, window);
    assert_eq!(summary(&line), (300, "global", 1, true, false, 2));
    let masters = cluster.masters();
    assert!(
        masters.contains(&new) && !masters.contains(&old),
        "{masters:?}"
    );
    let by_master = cluster.scard_by_master(window, DEFAULT_SHARDS);
    assert_eq!(by_master.values().sum::<u64>(), 300, "{by_master:?}");
}

/// The master serving most of the window's ids dies (SIGKILL) holding ids its
/// replica never received; the replica takes over mid-window, and the
/// instances write the lost ids again.
#[test]
fn a_master_killed_mid_window_loses_nothing() {
    let mut cluster = RedisCluster::start(3, 1);
    // The replica takes over after the node timeout (1 s) and an election:
    // 2 to 3 s here, well within the window.
    let length = WindowLength::from_secs(10);
    let env = [CLUSTER_MODE, ("VERVE_WINDOW_SECS", "10")];
    let a = fleet_member(&cluster.urls(), "a", &env);
    let b = fleet_member(&cluster.urls(), "b", &env);
    let window = start_of_next_window(length);
    send_both((&a, 0..100), (&b, 50..150));
    let held = wait_for_ids(&cluster, window, 150, 5);
    let doomed = busiest(&held);
    let replica = cluster.replica_of(doomed);
    cluster.cut_off_replica(replica);
    send_both((&a, 150..250), (&b, 200..300));
    wait_for_ids(&cluster, window, 300, 5);
    let (master, copy) = (
        cluster.scard_on(doomed, window, DEFAULT_SHARDS),
        cluster.scard_on(replica, window, DEFAULT_SHARDS),
    );
    assert!(
        copy < master,
        "replica {replica} has {copy} of {master} ids"
    );
    cluster.kill(doomed);
    // b sends ids a sent since the replica was cut off, some of them lost with
    // the master, while their shards may have no master.
    accept_all(&mut Client::connect(b.addr), 150..200);
    cluster.wait_until_converged();
    assert_eq!(cluster.masters().len(), 3);
    assert!(cluster.masters().contains(&replica));
    assert_eq!(
        length.window_of(SystemTime::now()),
        window,
        "this machine took 10 s to lose a master"
    );
    let line = both_log_one_record(&a, &b, window);
    assert_eq!(summary(&line), (300, "global", 1, true, false, 2));
    let by_master = cluster.scard_by_master(window, DEFAULT_SHARDS);
    assert_eq!(by_master.values().sum::<u64>(), 300, "{by_master:?}");
    // The promoted replica lacked ids both had delivered: whoever had ids in
    // its shards sent them again (one instance or both).
    let replays = |v: &Verve| metric(&v.scrape(), "verve_redis_replays_total");
    assert!(
        replays(&a) + replays(&b) >= 1,
        "no replay, yet ids were lost"
    );
}

/// Sends each instance its ids, at the same time.
fn send_both(
    (a, ids_a): (&Verve, impl IntoIterator<Item = i64> + Send),
    (b, ids_b): (&Verve, impl IntoIterator<Item = i64> + Send),
) {
    thread::scope(|s| {
        s.spawn(|| accept_all(&mut Client::connect(a.addr), ids_a));
        s.spawn(|| accept_all(&mut Client::connect(b.addr), ids_b));
    });
}

/// Waits up to `secs` until the cluster holds `ids` ids of `window` (default
/// shards) and returns how many each master holds.
fn wait_for_ids(
    cluster: &RedisCluster,
    window: WindowStart,
    ids: u64,
    secs: u64,
) -> BTreeMap<u16, u64> {
    let last = RefCell::new(BTreeMap::new());
    eventually(
        Duration::from_secs(secs),
        || format!("{ids} ids of {window} in the cluster: {:?}", last.borrow()),
        || {
            let held = cluster.scard_by_master(window, DEFAULT_SHARDS);
            let done = held.values().sum::<u64>() == ids;
            *last.borrow_mut() = held.clone();
            done.then_some(held)
        },
    )
}

/// The master holding the most ids.
fn busiest(held: &BTreeMap<u16, u64>) -> u16 {
    *held.iter().max_by_key(|(_, ids)| **ids).unwrap().0
}

/// Waits until both instances log `window` and checks they log the same record.
fn both_log_one_record(a: &Verve, b: &Verve, window: WindowStart) -> WindowLine {
    let line = a.wait_for_window(window);
    assert_eq!(
        b.wait_for_window(window),
        line,
        "both instances log the fleet's record"
    );
    line
}

fn summary(line: &WindowLine) -> (u64, &str, u64, bool, bool, u64) {
    (
        line.unique_requests,
        line.scope.as_str(),
        line.revision,
        line.complete,
        line.partial,
        line.instances,
    )
}
