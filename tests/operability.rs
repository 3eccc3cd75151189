//! /metrics and /healthz over real sockets.

mod common;

use std::time::Duration;

use common::redis_server::free_port;
use common::{accept_all, eventually, metric, within_one_window, Client, Verve};

/// Polls /healthz until it answers 503, and returns that answer.
fn unhealthy(client: &mut Client, limit: Duration) -> common::Response {
    let poll = || Some(client.get("/healthz")).filter(|r| r.status == 503);
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
    let response = client.get("/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4")
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
    assert!(text.contains("# TYPE verve_requests_total counter"));
}

#[test]
fn healthz_is_ok_and_refuses_other_methods() {
    let verve = Verve::start(&[]);
    let mut client = Client::connect(verve.addr);
    let response = client.get("/healthz");
    assert_eq!((response.status, response.body.as_str()), (200, "ok"));
    client.send(b"POST /healthz HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(client.read_response().status, 405);
}

#[test]
fn healthz_reports_redis_trouble() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let verve = Verve::start(&[
        ("VERVE_REDIS_URL", url.as_str()),
        ("VERVE_REDIS_BUFFER_IDS", "20"),
        ("VERVE_REDIS_TIMEOUT_MS", "100"),
    ]);
    let mut client = Client::connect(verve.addr);
    // Unreachable, but not yet for a whole window.
    assert_eq!(client.get("/healthz").status, 200);
    accept_all(&mut client, 1..=20);
    assert_eq!(
        unhealthy(&mut client, Duration::from_secs(5)).body,
        "dedup buffer over 90%"
    );
    let text = client.get("/metrics").body;
    assert_eq!(metric(&text, "verve_redis_buffered_ids"), 20);
    assert!(metric(&text, "verve_redis_errors_total") >= 1);
}

#[test]
fn healthz_says_when_redis_has_been_gone_for_a_window() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let verve = Verve::start(&[("VERVE_REDIS_URL", url.as_str())]);
    let mut client = Client::connect(verve.addr);
    // Healthy at first: unreachable, but not yet for a whole window.
    assert_eq!(client.get("/healthz").status, 200);
    assert_eq!(
        unhealthy(&mut client, Duration::from_secs(10)).body,
        "redis unreachable for longer than a window"
    );
}
