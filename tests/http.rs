//! Protocol behaviour and bad input over real sockets: every bad request gets a
//! clear answer, the server stays up, and the ids accepted around it all count.

mod common;

use common::{accept_all, within_one_window, Client, Verve};

/// Requests that must be answered `400 failed` on a connection that stays open.
const BAD_QUERIES: &[&str] = &[
    "/api/verve/accept",
    "/api/verve/accept?",
    "/api/verve/accept?id=",
    "/api/verve/accept?id=abc",
    "/api/verve/accept?id=1.5",
    "/api/verve/accept?id=9223372036854775808",
    "/api/verve/accept?id=-9223372036854775809",
    "/api/verve/accept?id=%zz",
    "/api/verve/accept?id=1&id=2",
    "/api/verve/accept?id=1&endpoint=ftp://h/",
    "/api/verve/accept?id=1&endpoint=not-a-url",
    "/api/verve/accept?id=1&endpoint=http://",
];

#[test]
fn bad_queries_get_400_failed_and_change_no_count() {
    let verve = Verve::start(&[]);
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        accept_all(&mut client, [1, 2]);
        for target in BAD_QUERIES {
            let response = client.get(target);
            assert_eq!(
                (response.status, response.body.as_str()),
                (400, "failed"),
                "{target}"
            );
            assert_eq!(response.header("content-type"), Some("text/plain"));
        }
        let long = format!(
            "/api/verve/accept?id=1&endpoint=http://h/{}",
            "a".repeat(2048)
        );
        assert_eq!(client.get(&long).status, 400);
        accept_all(&mut client, [2, 3]);
    });
    assert_eq!(verve.wait_for_window(window).unique_requests, 3);
}

#[test]
fn valid_queries_with_escapes_extremes_and_endpoints_are_accepted() {
    let verve = Verve::start(&[]);
    let (window, ()) = within_one_window(|| {
        let mut client = Client::connect(verve.addr);
        for target in [
            "/api/verve/accept?id=9223372036854775807",
            "/api/verve/accept?id=-9223372036854775808",
            "/api/verve/accept?id=%34%32",
            "/api/verve/accept?id=42&endpoint=http%3A%2F%2F127.0.0.1%3A9%2Fhook%3Fa%3D1",
            "/api/verve/accept?endpoint=https://example.com/x&id=7&other=ignored",
        ] {
            let response = client.get(target);
            assert_eq!(
                (response.status, response.body.as_str()),
                (200, "ok"),
                "{target}"
            );
        }
    });
    // MAX, MIN, 42 (three times) and 7.
    assert_eq!(verve.wait_for_window(window).unique_requests, 4);
}

#[test]
fn unknown_paths_and_other_methods() {
    let verve = Verve::start(&[]);
    let mut client = Client::connect(verve.addr);
    assert_eq!(client.get("/").status, 404);
    assert_eq!(client.get("/api/verve/accept/?id=1").status, 404);
    assert_eq!(client.get("/api/verve/other?id=1").status, 404);

    client.send(b"POST /api/verve/accept?id=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    let response = client.read_response();
    assert_eq!((response.status, response.body.as_str()), (405, "failed"));
    assert_eq!(response.header("allow"), Some("GET"));

    client.send(b"HEAD /api/verve/accept?id=1 HTTP/1.1\r\n\r\n");
    let mut status_line = String::new();
    std::io::BufRead::read_line(&mut client.reader, &mut status_line).unwrap();
    assert_eq!(status_line, "HTTP/1.1 405 Method Not Allowed\r\n");
    let mut rest = String::new();
    while rest != "\r\n" {
        rest.clear();
        std::io::BufRead::read_line(&mut client.reader, &mut rest).unwrap();
    }
    // No body followed the HEAD response: the next response starts right here.
    assert_eq!(client.get("/api/verve/accept?id=1").status, 200);
}

#[test]
fn malformed_http_gets_400_and_the_connection_closed() {
    let verve = Verve::start(&[]);
    for raw in [
        &b"NONSENSE\r\n\r\n"[..],
        b"GET /api/verve/accept?id=1 HTTP/9.9\r\n\r\n",
        b"GET /api/verve/accept?id=1 HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /api/verve/accept?id=1 HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    ] {
        let mut client = Client::connect(verve.addr);
        client.send(raw);
        let response = client.read_response();
        assert_eq!((response.status, response.body.as_str()), (400, "failed"));
        assert_eq!(response.header("connection"), Some("close"));
        assert!(client.is_closed_by_server());
    }
    // Still serving.
    assert_eq!(
        Client::connect(verve.addr)
            .get("/api/verve/accept?id=5")
            .status,
        200
    );
}

#[test]
fn http10_closes_unless_keep_alive_is_asked_and_close_is_honoured() {
    let verve = Verve::start(&[]);

    let mut client = Client::connect(verve.addr);
    client.send(b"GET /api/verve/accept?id=1 HTTP/1.0\r\n\r\n");
    let response = client.read_response();
    assert_eq!(
        (response.status, response.header("connection")),
        (200, Some("close"))
    );
    assert!(client.is_closed_by_server());

    let mut client = Client::connect(verve.addr);
    for _ in 0..2 {
        client.send(b"GET /api/verve/accept?id=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let response = client.read_response();
        assert_eq!(
            (response.status, response.header("connection")),
            (200, Some("keep-alive"))
        );
    }

    let mut client = Client::connect(verve.addr);
    client.send(b"GET /api/verve/accept?id=1 HTTP/1.1\r\nConnection: close\r\n\r\nGET /api/verve/accept?id=2 HTTP/1.1\r\n\r\n");
    let response = client.read_response();
    assert_eq!(
        (response.status, response.header("connection")),
        (200, Some("close"))
    );
    // The pipelined request after `Connection: close` is not answered.
    assert!(client.is_closed_by_server());
}
