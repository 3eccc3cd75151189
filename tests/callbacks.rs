//! Endpoint callbacks against a real HTTP receiver on a loopback port.

mod common;

use std::time::{Duration, SystemTime};

use common::receiver::{Answer, Call, Receiver};
use common::{accept_all, accept_all_with, encode, eventually, within_one_window, Client, Verve};

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
fn immediate_mode_sends_a_windows_last_count_after_the_next_window_began() {
    // Every call is held until the test releases them: window W's first call stays
    // in flight while W's later count waits behind it and W+1 begins.
    let receiver = Receiver::start(Answer::Held(200));
    let verve = Verve::start(&[
        ("VERVE_CALLBACK_TIMING", "immediate"),
        ("VERVE_CALLBACK_CONCURRENCY", "2"),
    ]);
    let hook = receiver.url("/live");
    let length = common::window_length();
    let mut client = Client::connect(verve.addr);
    let window = common::start_of_next_window(length);
    accept_all_with(&mut client, &hook, [1]);
    receiver.wait_for_calls(1, LIMIT);
    accept_all_with(&mut client, &hook, [2, 3]);
    assert_eq!(
        length.window_of(SystemTime::now()),
        window,
        "W's ids must all be sent within W"
    );
    let next = common::start_of_next_window(length);
    assert_eq!(next, length.next(window));
    accept_all_with(&mut client, &hook, [10]);
    // W+1's call is made at once, beside W's: it neither waits behind W's call nor
    // takes the place of W's waiting count.
    let window_of = |call: &Call| call.json()["window_start"].as_str().unwrap().to_owned();
    receiver.wait_for_call(LIMIT, |c| window_of(c) == next.to_string());
    receiver.release();
    receiver.wait_for_call(LIMIT, |c| {
        window_of(c) == window.to_string() && c.json()["unique_requests"] == 3
    });
    let calls: Vec<(String, u64)> = receiver
        .calls()
        .iter()
        .map(|c| (window_of(c), c.json()["unique_requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        calls,
        [
            (window.to_string(), 1),
            (next.to_string(), 1),
            (window.to_string(), 3)
        ]
    );
    assert_eq!(verve.wait_for_window(window).unique_requests, 3);
    assert_eq!(verve.wait_for_window(next).unique_requests, 1);
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

/// A verve with the default policy: the harness's `VERVE_CALLBACK_DENY_PRIVATE=false`
/// is removed, not overridden, so what is tested is the default itself.
fn with_the_default_policy(env: &[(&str, &str)]) -> Verve {
    let mut cmd = common::command(env);
    cmd.env_remove("VERVE_CALLBACK_DENY_PRIVATE");
    Verve::spawn(cmd)
}

#[test]
fn by_default_special_addresses_and_localhost_names_are_refused_at_request_time() {
    let receiver = Receiver::start(Answer::Status(200));
    let port = receiver.addr.port();
    // The request-time refusals are debug lines.
    let verve = with_the_default_policy(&[("RUST_LOG", "info,verve::server=debug")]);
    let metadata = "http://169.254.169.254/latest/meta-data/";
    let refused = [
        receiver.url("/loopback"),
        format!("http://[::1]:{port}/"),
        metadata.to_owned(),
        format!("http://0.0.0.0:{port}/"),
        "http://10.0.0.1/".to_owned(),
        "http://100.64.0.1/".to_owned(),
        "http://127.255.255.254/".to_owned(),
        "http://172.16.0.1/".to_owned(),
        "http://192.0.0.8/".to_owned(),
        "http://192.0.2.1/".to_owned(),
        "http://192.88.99.1/".to_owned(),
        "http://192.168.1.1/".to_owned(),
        "http://198.18.0.1/".to_owned(),
        "http://198.51.100.1/".to_owned(),
        "http://203.0.113.1/".to_owned(),
        "http://224.0.0.1/".to_owned(),
        "http://240.0.0.1/".to_owned(),
        "http://255.255.255.255/".to_owned(),
        "http://[::]/".to_owned(),
        "http://[::ffff:10.0.0.1]/".to_owned(),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://[::10.0.0.1]/".to_owned(),
        "http://[64:ff9b::a00:1]/".to_owned(),
        "http://[64:ff9b:1::1]/".to_owned(),
        "http://[100::1]/".to_owned(),
        "http://[2001::1]/".to_owned(),
        "http://[2001:db8::1]/".to_owned(),
        "http://[2002:a00:1::1]/".to_owned(),
        "http://[3fff::1]/".to_owned(),
        "http://[5f00::1]/".to_owned(),
        "http://[fd12:3456::1]/".to_owned(),
        "http://[fe80::1]/".to_owned(),
        "http://[fec0::1]/".to_owned(),
        "http://[ff02::1]/".to_owned(),
        format!("http://localhost:{port}/"),
        format!("http://api.localhost:{port}/"),
        "http://LOCALHOST./".to_owned(),
    ];
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        for (i, endpoint) in (0..).zip(&refused) {
            accept_all(&mut client, [i]);
            let response = client.get(&format!(
                "/api/verve/accept?id={}&endpoint={}",
                1000 + i,
                encode(endpoint)
            ));
            assert_eq!(
                (response.status, response.body.as_str()),
                (400, "failed"),
                "{endpoint}"
            );
        }
        accept_all(&mut client, [refused.len() as i64]);
    });
    // The ids around the refusals are counted, those refused are not.
    let accepted = refused.len() as u64 + 1;
    assert_eq!(verve.wait_for_window(window).unique_requests, accepted);
    let next = common::window_length().next(window);
    assert_eq!(verve.wait_for_window(next).unique_requests, 0);
    assert_eq!(receiver.calls().len(), 0);

    let logged = verve.stderr_text();
    let refusal_of = |endpoint: &str| {
        // The debug line quotes the endpoint.
        let needle = format!("endpoint={endpoint:?} ");
        let line = logged
            .lines()
            .find(|l| l.contains("refused endpoint") && l.contains(&needle));
        line.unwrap_or_else(|| panic!("no refusal of {endpoint}:\n{logged}"))
            .split_once("refusal=")
            .map(|(_, refusal)| refusal.to_owned())
    };
    assert_eq!(
        refusal_of(metadata).as_deref(),
        Some(
            "169.254.169.254 is not a public address (link-local, RFC 3927); \
             set VERVE_CALLBACK_DENY_PRIVATE=false to allow it"
        )
    );
    assert_eq!(
        refusal_of("http://[::ffff:10.0.0.1]/").as_deref(),
        Some(
            "10.0.0.1 is not a public address (private-use, RFC 1918); \
             set VERVE_CALLBACK_DENY_PRIVATE=false to allow it"
        )
    );
    assert_eq!(
        refusal_of(&format!("http://api.localhost:{port}/")).as_deref(),
        Some(
            "localhost names are this machine (RFC 6761); \
             set VERVE_CALLBACK_DENY_PRIVATE=false to allow them"
        )
    );
}

#[test]
fn by_default_a_name_that_resolves_to_loopback_is_refused_at_call_time() {
    let receiver = Receiver::start(Answer::Status(200));
    let port = receiver.addr.port();
    let verve = with_the_default_policy(&[]);
    // Names are not resolved on a worker, so these are accepted; the resolver
    // turns both into 127.0.0.1 right before the call, and the call is refused.
    let endpoints = [
        format!("http://127.1:{port}/short"),
        format!("http://2130706433:{port}/decimal"),
    ];
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all_with(&mut client, &endpoints[0], [1, 2]);
        accept_all_with(&mut client, &endpoints[1], [2, 3]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 3);
    let failures = eventually(
        LIMIT,
        || format!("two failed callbacks:\n{}", verve.stderr_text()),
        || {
            let text = verve.stderr_text();
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains("callback failed"))
                .map(str::to_owned)
                .collect();
            (lines.len() == 2).then_some(lines)
        },
    );
    for endpoint in &endpoints {
        let needle = format!("endpoint={endpoint} ");
        let line = failures.iter().find(|l| l.contains(&needle));
        let line = line.unwrap_or_else(|| panic!("no failure for {endpoint}: {failures:?}"));
        assert!(
            line.contains(
                "error=other: 127.0.0.1 is not a public address (loopback, RFC 1122); \
                 set VERVE_CALLBACK_DENY_PRIVATE=false to allow it attempts=1 "
            ),
            "{line}"
        );
    }
    assert_eq!(receiver.calls().len(), 0);
}

#[test]
fn with_the_private_rule_off_loopback_and_localhost_receivers_are_called() {
    let receiver = Receiver::start(Answer::Status(200));
    // As the harness sets it, said outright: this is the setting under test.
    let verve = Verve::start(&[("VERVE_CALLBACK_DENY_PRIVATE", "false")]);
    let by_name = format!("http://localhost:{}/named", receiver.addr.port());
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all_with(&mut client, &receiver.url("/literal"), [1]);
        accept_all_with(&mut client, &by_name, [2]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 2);
    let mut targets: Vec<String> = receiver
        .wait_for_calls(2, LIMIT)
        .into_iter()
        .map(|c| c.target)
        .collect();
    targets.sort();
    assert_eq!(targets, ["/literal", "/named"]);
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
