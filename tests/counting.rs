//! Exact counts in the count log, for every style of client, on every io driver.

mod common;

use std::io::Write;
use std::thread;
use std::time::Duration;

use common::{accept_all, distinct, within_one_window, Client, Verve};

#[test]
fn many_connections_over_several_workers_count_each_id_once() {
    for driver in common::drivers() {
        let verve = Verve::start(&[("VERVE_WORKERS", "4"), ("VERVE_IO_DRIVER", driver)]);
        // 16 connections with overlapping id ranges: ids repeat within a connection
        // (each range twice) and across connections (neighbouring ranges overlap).
        let ranges: Vec<Vec<i64>> = (0..16i64)
            .map(|c| (c * 50..c * 50 + 100).chain(c * 50..c * 50 + 100).collect())
            .collect();
        let (window, ()) = within_one_window(|| {
            thread::scope(|s| {
                for ids in &ranges {
                    s.spawn(|| accept_all(&mut Client::connect(verve.addr), ids.iter().copied()));
                }
            });
        });
        let expected = distinct(ranges.iter().flatten().copied());
        assert_eq!(expected, 850);
        let line = verve.wait_for_window(window);
        assert_eq!(
            (line.unique_requests, line.partial),
            (expected, false),
            "{driver}"
        );
    }
}

#[test]
fn pipelined_requests_are_answered_in_order_and_counted() {
    for driver in common::drivers() {
        let verve = Verve::start(&[("VERVE_IO_DRIVER", driver)]);
        let ids: Vec<i64> = (0..2000).map(|i| i % 700 - 350).collect();
        let (window, ()) = within_one_window(|| {
            let mut client = Client::connect(verve.addr);
            let mut burst = Vec::new();
            for id in &ids {
                burst.extend_from_slice(
                    format!("GET /api/verve/accept?id={id} HTTP/1.1\r\n\r\n").as_bytes(),
                );
            }
            // An invalid request and a valid one last, to see each answer land in its place.
            burst.extend_from_slice(b"GET /api/verve/accept?id=x HTTP/1.1\r\n\r\n");
            burst.extend_from_slice(b"GET /api/verve/accept?id=1 HTTP/1.1\r\n\r\n");
            client.send(&burst);
            for _ in &ids {
                assert_eq!(client.read_response().body, "ok");
            }
            assert_eq!(client.read_response().status, 400);
            assert_eq!(client.read_response().status, 200);
        });
        assert_eq!(
            verve.wait_for_window(window).unique_requests,
            700,
            "{driver}"
        );
    }
}

#[test]
fn a_request_sent_byte_by_byte_is_counted() {
    for driver in common::drivers() {
        let verve = Verve::start(&[("VERVE_IO_DRIVER", driver)]);
        let (window, ()) = within_one_window(|| {
            let mut client = Client::connect(verve.addr);
            for id in [11, 12, 11] {
                let raw = format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nHost: x\r\n\r\n");
                for byte in raw.as_bytes() {
                    client.reader.get_mut().write_all(&[*byte]).unwrap();
                    client.reader.get_mut().flush().unwrap();
                }
                assert_eq!(client.read_response().body, "ok");
            }
        });
        assert_eq!(verve.wait_for_window(window).unique_requests, 2, "{driver}");
    }
}

#[test]
fn an_id_counts_again_in_the_next_window_and_idle_windows_report_zero() {
    let verve = Verve::start(&[]);
    let mut client = Client::connect(verve.addr);
    let (first, ()) = within_one_window(|| accept_all(&mut client, 1..=10));
    let (second, ()) = within_one_window(|| accept_all(&mut client, 1..=5));
    assert_eq!(verve.wait_for_window(first).unique_requests, 10);
    assert_eq!(verve.wait_for_window(second).unique_requests, 5);

    // The window after the second one had no traffic at all.
    let idle = common::window_length().next(second);
    let line = verve.wait_for_window(idle);
    assert_eq!((line.unique_requests, line.partial), (0, false));
}

#[test]
fn the_same_id_on_many_connections_at_once_counts_once() {
    let verve = Verve::start(&[("VERVE_WORKERS", "4")]);
    let (window, ()) = within_one_window(|| {
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| accept_all(&mut Client::connect(verve.addr), [i64::MIN, 0, i64::MAX]));
            }
        });
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 3);
}

#[test]
fn sigterm_reports_the_open_window_as_partial_with_every_accepted_id() {
    for driver in common::drivers() {
        let verve = Verve::start(&[("VERVE_IO_DRIVER", driver), ("VERVE_WINDOW_SECS", "3600")]);
        // A long window: the only way these ids get reported is the shutdown.
        let mut idle = Client::connect(verve.addr);
        assert_eq!(idle.get("/api/verve/accept?id=-1").body, "ok");
        let mut client = Client::connect(verve.addr);
        accept_all(&mut client, 0..500);
        let (status, lines) = verve.terminate();
        assert!(status.success(), "{status}");
        let last = lines.last().expect("a count line");
        assert_eq!(
            (last.unique_requests, last.partial),
            (501, true),
            "{driver}: {lines:?}"
        );
        // The idle keep-alive connection was closed by the server, not left hanging.
        assert!(idle.is_closed_by_server());
    }
}

#[test]
fn shutdown_with_an_idle_connection_does_not_wait_for_the_drain_deadline() {
    let verve = Verve::start(&[
        ("VERVE_SHUTDOWN_DRAIN_MS", "60000"),
        ("VERVE_SHUTDOWN_TIMEOUT_MS", "61000"),
    ]);
    let mut idle = Client::connect(verve.addr);
    assert_eq!(idle.get("/api/verve/accept?id=1").body, "ok");
    let started = std::time::Instant::now();
    let (status, _) = verve.terminate();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the idle client"
    );
}

#[test]
fn ids_split_over_partition_owners_count_exactly_across_windows_and_at_shutdown() {
    let verve = Verve::start(&[("VERVE_WORKERS", "2"), ("VERVE_PARTITIONS", "3")]);
    // Repeats within a connection, across connections, and across windows.
    let ranges: Vec<Vec<i64>> = (0..6i64)
        .map(|c| {
            (c * 300..c * 300 + 600)
                .chain(c * 300..c * 300 + 600)
                .collect()
        })
        .collect();
    let expected = distinct(ranges.iter().flatten().copied());
    assert_eq!(expected, 2100);
    let mut windows = Vec::new();
    for _ in 0..2 {
        let (window, ()) = within_one_window(|| {
            thread::scope(|s| {
                for ids in &ranges {
                    s.spawn(|| accept_all(&mut Client::connect(verve.addr), ids.iter().copied()));
                }
            });
        });
        windows.push(window);
    }
    for window in windows {
        let line = verve.wait_for_window(window);
        assert_eq!((line.unique_requests, line.partial), (expected, false));
    }
    // The window open at shutdown is counted over every part too.
    let mut client = Client::connect(verve.addr);
    let (last, ()) = within_one_window(|| accept_all(&mut client, [7, 8, 9, 7, i64::MIN, 0]));
    let (status, lines) = verve.terminate();
    assert!(status.success(), "{status}");
    let line = lines
        .iter()
        .find(|line| line.window_start == last.to_string());
    assert_eq!(
        line.map(|line| (line.unique_requests, line.partial)),
        Some((5, true)),
        "{lines:?}"
    );
}
