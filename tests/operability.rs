//! /metrics and /healthz over real sockets, on the operations listener.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::redis_server::{free_port, RedisServer};
use common::{accept_all, eventually, metric, until_accepted, within_one_window, Client, Verve};

/// Polls /healthz until it answers 503, and returns that answer.
fn unhealthy(verve: &Verve, limit: Duration) -> common::Response {
    let poll = || Some(verve.admin_get("/healthz")).filter(|r| r.status == 503);
    eventually(limit, || "healthz to turn 503".into(), poll)
}

#[test]
fn metrics_count_requests_ids_and_windows() {
    let verve = Verve::start(&[]);
    let mut client = Client::connect(verve.addr);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut client, [1, 2, 2]);
        assert_eq!(client.get("/api/verve/accept?id=nope").status, 400);
        assert_eq!(client.get("/elsewhere").status, 404);
    });
    verve.wait_for_window(window);
    let response = verve.admin_get("/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = response.body;
    assert_eq!(
        metric(
            &text,
            "verve_requests_total{route=\"accept\",status=\"200\"}"
        ),
        3
    );
    assert_eq!(
        metric(
            &text,
            "verve_requests_total{route=\"accept\",status=\"400\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            "verve_requests_total{route=\"other\",status=\"404\"}"
        ),
        1
    );
    assert_eq!(metric(&text, "verve_ids_accepted_total"), 3);
    assert_eq!(
        metric(&text, "verve_ids_rejected_total{reason=\"invalid\"}"),
        1
    );
    assert_eq!(
        metric(&text, "verve_ids_rejected_total{reason=\"overloaded\"}"),
        0
    );
    assert!(metric(&text, "verve_windows_closed_total") >= 1);
    assert_eq!(metric(&text, "verve_late_ids_total"), 0);
    assert!(text.contains("# TYPE verve_requests counter"));
}

#[test]
fn healthz_is_ok_and_refuses_other_methods() {
    let verve = Verve::start(&[]);
    let response = verve.admin_get("/healthz");
    assert_eq!((response.status, response.body.as_str()), (200, "ok"));
    assert_eq!(response.header("connection"), Some("close"));
    let mut client = Client::connect(verve.admin.unwrap());
    client.send(b"POST /healthz HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(client.read_response().status, 405);
    assert_eq!(verve.admin_get("/api/verve/accept?id=1").status, 404);
}

#[test]
fn the_public_port_serves_only_the_api() {
    let verve = Verve::start(&[]);
    let mut client = Client::connect(verve.addr);
    let (window, ()) = within_one_window(|| {
        accept_all(&mut client, [1]);
        assert_eq!(client.get("/metrics").status, 404);
        assert_eq!(client.get("/healthz").status, 404);
        accept_all(&mut client, [2]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 2);
    let text = verve.scrape();
    assert_eq!(
        metric(
            &text,
            "verve_requests_total{route=\"other\",status=\"404\"}"
        ),
        2
    );
}

#[test]
fn the_operations_listener_answers_one_request_per_connection() {
    let verve = Verve::start(&[]);
    // Pipelined scrapes get one rendering, then the end of the connection: a
    // client cannot make the service render into one buffer again and again.
    let mut client = Client::connect(verve.admin.unwrap());
    client.send(&b"GET /metrics HTTP/1.1\r\n\r\n".repeat(100));
    let response = client.read_response();
    assert_eq!(response.status, 200);
    assert!(response.body.contains("# TYPE verve_requests counter"));
    assert!(client.is_closed_by_server());
}

#[test]
fn the_operations_listener_can_be_turned_off() {
    let mut verve = Verve::start(&[("VERVE_ADMIN_ADDR", "")]);
    let line = verve.wait_for_stderr("verve listening", Duration::from_secs(1));
    assert!(line.contains(" admin=off "), "{line}");
    assert_eq!(verve.admin, None);
}

#[test]
fn healthz_reports_redis_trouble() {
    let redis = RedisServer::start();
    let link = Proxy::start(redis.port);
    let url = format!("redis://127.0.0.1:{}/0", link.port);
    let verve = Verve::start(&[
        ("VERVE_REDIS_URL", url.as_str()),
        ("VERVE_REDIS_BUFFER_IDS", "20"),
        ("VERVE_REDIS_TIMEOUT_MS", "100"),
    ]);
    let mut client = Client::connect(verve.addr);
    // No `ok` before the fleet took the instance in; then Redis stops answering.
    until_accepted(&mut client, 0);
    eventually(
        Duration::from_secs(5),
        || "the first id in Redis".into(),
        || {
            let text = verve.scrape();
            let taken = metric(&text, "verve_redis_rounds_total") >= 1;
            (taken && metric(&text, "verve_redis_buffered_ids") == 0).then_some(())
        },
    );
    link.hold();
    // Unreachable, but not yet for a whole window.
    assert_eq!(verve.admin_get("/healthz").status, 200);
    accept_all(&mut client, 1..=20);
    assert_eq!(
        unhealthy(&verve, Duration::from_secs(5)).body,
        "dedup buffer over 90%"
    );
    // Turning 503 takes 19 of the 20; on a loaded machine the last may still be in
    // its worker's batch, and the first failed attempt may still be under way
    // (start-up waits for it only so long).
    let all_buffered_and_a_failure_counted = || {
        let text = verve.scrape();
        let buffered = metric(&text, "verve_redis_buffered_ids");
        (buffered == 20 && metric(&text, "verve_redis_errors_total") >= 1).then_some(())
    };
    eventually(
        Duration::from_secs(5),
        || "20 ids buffered and a failed Redis call counted".into(),
        all_buffered_and_a_failure_counted,
    );
}

#[test]
fn healthz_says_when_redis_has_been_gone_for_a_window() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let verve = Verve::start(&[("VERVE_REDIS_URL", url.as_str())]);
    // Healthy at first: unreachable, but not yet for a whole window.
    assert_eq!(verve.admin_get("/healthz").status, 200);
    assert_eq!(
        unhealthy(&verve, Duration::from_secs(10)).body,
        "redis unreachable for longer than a window"
    );
}
