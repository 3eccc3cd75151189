//! Shutdown ends within `VERVE_SHUTDOWN_TIMEOUT_MS`, even when Redis, Kafka and
//! every callback endpoint take connections and never answer.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::receiver::{Answer, Receiver};
use common::redis_server::RedisServer;
use common::{accept_all, accept_all_with, fleet_member, until_accepted, Client, Verve};

const DRAIN_MS: u64 = 1000;
const TIMEOUT_MS: u64 = 2000;

/// The stop's budget; the rest is for a process exiting on a busy machine.
/// Before the shutdown had one deadline, these took 9 to 12 s.
const BOUND: Duration = Duration::from_millis(TIMEOUT_MS + 1500);

/// A port that takes connections (into its backlog) and never answers.
fn black_hole() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn port(listener: &TcpListener) -> u16 {
    listener.local_addr().unwrap().port()
}

/// Stops `verve` and returns how long it took.
fn stop(verve: Verve) -> Duration {
    let started = Instant::now();
    let (status, _) = verve.terminate();
    assert!(status.success(), "{status}");
    started.elapsed()
}

#[test]
fn redis_and_kafka_that_never_answer_do_not_hold_up_shutdown() {
    // Redis answers until the instance is in the fleet (it answers no `ok`
    // before), then never again: the link holds every byte.
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let kafka = black_hole();
    let url = format!("redis://127.0.0.1:{}/0", link.port);
    let brokers = format!("127.0.0.1:{}", port(&kafka));
    let (drain, timeout) = (DRAIN_MS.to_string(), TIMEOUT_MS.to_string());
    let verve = fleet_member(
        &url,
        "stuck",
        &[
            ("VERVE_REDIS_TIMEOUT_MS", "500"),
            ("VERVE_SINKS", "log,kafka"),
            ("VERVE_KAFKA_BROKERS", &brokers),
            ("VERVE_SHUTDOWN_DRAIN_MS", &drain),
            ("VERVE_SHUTDOWN_TIMEOUT_MS", &timeout),
            ("VERVE_WINDOW_SECS", "3600"),
        ],
    );
    let mut client = Client::connect(verve.addr);
    until_accepted(&mut client, 0);
    link.hold();
    accept_all(&mut client, 1..=100);
    drop(client);
    let took = stop(verve);
    assert!(took < BOUND, "shutdown took {took:?}");
}

#[test]
fn endpoints_that_never_answer_do_not_hold_up_shutdown() {
    let receiver = Receiver::start(Answer::Never);
    let kafka = black_hole();
    let brokers = format!("127.0.0.1:{}", port(&kafka));
    let (drain, timeout) = (DRAIN_MS.to_string(), TIMEOUT_MS.to_string());
    let verve = Verve::start(&[
        ("VERVE_SINKS", "log,kafka"),
        ("VERVE_KAFKA_BROKERS", &brokers),
        ("VERVE_SHUTDOWN_DRAIN_MS", &drain),
        ("VERVE_SHUTDOWN_TIMEOUT_MS", &timeout),
        ("VERVE_WINDOW_SECS", "3600"),
    ]);
    let mut client = Client::connect(verve.addr);
    for hook in ["/a", "/b", "/c"] {
        accept_all_with(&mut client, &receiver.url(hook), 1..=10);
    }
    drop(client);
    let took = stop(verve);
    assert!(took < BOUND, "shutdown took {took:?}");
    // The partial window's callbacks were attempted, not skipped.
    assert_eq!(receiver.wait_for_calls(3, Duration::from_secs(5)).len(), 3);
}
