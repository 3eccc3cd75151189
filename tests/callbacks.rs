//! Endpoint callbacks against a real HTTP receiver on a loopback port.

mod common;

use std::time::Duration;

use common::receiver::{Answer, Receiver};
use common::{accept_all, accept_all_with, encode, within_one_window, Client, Verve};

const LIMIT: Duration = Duration::from_secs(15);

#[test]
fn post_at_close_calls_each_endpoint_once_with_the_final_count() {
    let receiver = Receiver::start(Answer::Status(200));
    let verve = Verve::start(&[]);
    let hook = receiver.url("/hook?x=1");
    let other = receiver.url("/other");
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all_with(&mut client, &hook, 1..=30);
        accept_all_with(&mut client, &other, 20..=40);
        accept_all(&mut client, [1, 41]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 41);
    let mut calls = receiver.wait_for_calls(2, LIMIT);
    // The next window (no endpoints in it) closes: still exactly one call each.
    verve.wait_for_window(common::window_length().next(window));
    assert_eq!(receiver.calls().len(), 2, "{calls:?}");

    calls.sort_by(|a, b| a.target.cmp(&b.target));
    assert_eq!(calls[0].target, "/hook?x=1");
    assert_eq!(calls[1].target, "/other");
    for call in &calls {
        assert_eq!(call.method, "POST");
        assert_eq!(call.header("content-type"), Some("application/json"));
        let mut body = call.json();
        let published_at = body["published_at"].take();
        assert!(
            published_at.as_str().is_some_and(|at| at.ends_with('Z')),
            "{published_at}"
        );
        assert_eq!(
            body,
            serde_json::json!({
                "window_start": window.to_string(),
                "window_seconds": common::WINDOW_SECS,
                "unique_requests": 41,
                "scope": "instance",
                "revision": 1,
                "complete": true,
                "partial": false,
                "instances": 1,
                "published_at": null,
                "final": true,
            })
        );
    }
    let stderr = verve.stderr_text();
    assert!(
        stderr.contains(&format!("endpoint={hook}")) && stderr.contains("status=200"),
        "{stderr}"
    );
}

#[test]
fn get_appends_the_count_to_the_endpoints_own_query() {
    let receiver = Receiver::start(Answer::Status(204));
    let verve = Verve::start(&[("VERVE_CALLBACK_METHOD", "get")]);
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all_with(&mut client, &receiver.url("/p?x=1&y=%2F"), [5, 6, 7, 5]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 3);
    let calls = receiver.wait_for_calls(1, LIMIT);
    assert_eq!(
        (calls[0].method.as_str(), calls[0].target.as_str()),
        ("GET", "/p?x=1&y=%2F&count=3")
    );
    assert_eq!(calls[0].body, "");
}

#[test]
fn immediate_mode_coalesces_to_one_call_in_flight_and_the_latest_count() {
    // A slow endpoint, so that later counts pile up behind the call in flight.
    let receiver = Receiver::start(Answer::Delayed(200, Duration::from_millis(150)));
    let verve = Verve::start(&[
        ("VERVE_CALLBACK_TIMING", "immediate"),
        ("VERVE_CALLBACK_CONCURRENCY", "4"),
    ]);
    let hook = receiver.url("/live");
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        for burst in 0..10 {
            accept_all_with(&mut client, &hook, burst * 20..burst * 20 + 20);
            std::thread::sleep(Duration::from_millis(30)); // spreads the requests over batches
        }
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 200);
    // Whatever was skipped, the last count is delivered.
    receiver.wait_for_call(LIMIT, |c| c.json()["unique_requests"] == 200);
    let calls = receiver.calls();
    assert_eq!(receiver.max_in_flight(), 1, "{calls:?}");
    assert!(
        calls.len() < 100,
        "coalesced: {} calls for 200 requests",
        calls.len()
    );
    let counts: Vec<u64> = calls
        .iter()
        .map(|c| c.json()["unique_requests"].as_u64().unwrap())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "counts never go back: {counts:?}"
    );
    assert!(calls.iter().all(|c| c.json()["final"] == false));
}

#[test]
fn a_failing_endpoint_is_retried_and_logged_and_counting_goes_on() {
    let receiver = Receiver::start(Answer::Status(500));
    let verve = Verve::start(&[("VERVE_CALLBACK_RETRIES", "2")]);
    let (window, ()) = within_one_window(|| {
        accept_all_with(
            &mut Client::connect(verve.addr),
            &receiver.url("/down"),
            1..=10,
        );
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 10);
    // One call and two retries, then the next window passes with no more.
    receiver.wait_for_calls(3, LIMIT);
    let next = common::window_length().next(window);
    assert_eq!(verve.wait_for_window(next).unique_requests, 0);
    assert_eq!(receiver.calls().len(), 3);
    let logged = verve.stderr_text();
    assert!(logged.contains("status=500 attempts=3"), "{logged}");
}

#[test]
fn an_endpoint_that_never_answers_times_out_without_holding_anything_up() {
    let receiver = Receiver::start(Answer::Never);
    let verve = Verve::start(&[
        ("VERVE_CALLBACK_TIMEOUT_MS", "300"),
        ("VERVE_CALLBACK_RETRIES", "1"),
    ]);
    let (window, ()) = within_one_window(|| {
        accept_all_with(
            &mut Client::connect(verve.addr),
            &receiver.url("/hang"),
            1..=5,
        );
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 5);
    // While the endpoint hangs, clients are answered and the next window counts.
    let (next, ()) = within_one_window(|| accept_all(&mut Client::connect(verve.addr), 1..=7));
    assert_eq!(verve.wait_for_window(next).unique_requests, 7);
    assert_eq!(
        receiver.wait_for_calls(2, LIMIT).len(),
        2,
        "one call and one retry"
    );
    let logged = verve.stderr_text();
    assert!(
        logged.contains("callback failed") && logged.contains("attempts=2"),
        "{logged}"
    );
    assert!(logged.to_lowercase().contains("timeout"), "{logged}");
}

#[test]
fn endpoints_beyond_the_cap_are_counted_and_not_called() {
    let receiver = Receiver::start(Answer::Status(200));
    let verve = Verve::start(&[("VERVE_CALLBACK_MAX_ENDPOINTS", "3")]);
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        for i in 0..10 {
            accept_all_with(&mut client, &receiver.url(&format!("/e{i}")), [i]);
        }
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 10);
    receiver.wait_for_calls(3, LIMIT);
    verve.wait_for_window(common::window_length().next(window));
    assert_eq!(receiver.calls().len(), 3);
    let logged = verve.stderr_text();
    assert!(logged.contains("endpoints_over_cap=7"), "{logged}");
}

#[test]
fn deny_private_refuses_loopback_endpoints_at_request_time() {
    let receiver = Receiver::start(Answer::Status(200));
    let verve = Verve::start(&[("VERVE_CALLBACK_DENY_PRIVATE", "true")]);
    let mut client = Client::connect(verve.addr);
    for endpoint in [
        receiver.url("/x"),
        "http://localhost:9/".to_owned(),
        "http://[::1]/".to_owned(),
    ] {
        let response = client.get(&format!(
            "/api/verve/accept?id=1&endpoint={}",
            encode(&endpoint)
        ));
        assert_eq!(
            (response.status, response.body.as_str()),
            (400, "failed"),
            "{endpoint}"
        );
    }
    let response = client.get("/api/verve/accept?id=2&endpoint=http%3A%2F%2F8.8.8.8%2F");
    assert_eq!(response.status, 200);
}

#[test]
fn the_allow_list_is_applied_after_dns_resolution() {
    let receiver = Receiver::start(Answer::Status(200));
    let verve = Verve::start(&[("VERVE_CALLBACK_ALLOW", "10.0.0.0/8")]);
    // A name cannot be judged at request time; it resolves to 127.0.0.1 at call time.
    let endpoint = format!("http://localhost:{}/named", receiver.addr.port());
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all_with(&mut client, &endpoint, [1]);
        let refused = client.get(&format!(
            "/api/verve/accept?id=2&endpoint={}",
            encode(&receiver.url("/ip"))
        ));
        assert_eq!(
            refused.status, 400,
            "an address literal outside the list is refused at once"
        );
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 1);
    let mut verve = verve;
    let line = verve.wait_for_stderr("callback failed", LIMIT);
    assert!(
        line.contains("not in VERVE_CALLBACK_ALLOW") && line.contains("attempts=1"),
        "{line}"
    );
    assert_eq!(receiver.calls().len(), 0);
}
