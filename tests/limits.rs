//! The HTTP front's defences, over real sockets: size limits, slow clients,
//! clients that do not read, the connection cap, a slowloris crowd. Each refusal
//! gets its status and a closed connection, the service stays up, and ids accepted
//! before or around it are all counted.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{accept_all, drivers, eventually, metric, within_one_window, Client, Response, Verve};
use verve::http::Limits;
use verve::server::file_limit;

/// Sends `raw` on a new connection and returns the answer, which must close it.
fn refused(addr: SocketAddr, raw: &[u8]) -> u16 {
    let mut client = Client::connect(addr);
    client.send(raw);
    let response = client.read_response();
    assert_eq!(response.body, "failed");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        client.is_closed_by_server(),
        "open after {}",
        response.status
    );
    response.status
}

/// An accept request for `id` whose request line is exactly `len` bytes.
fn with_line_of(len: usize, id: i64) -> String {
    let target = format!("/api/verve/accept?id={id}&pad=");
    let pad = len - "GET ".len() - target.len() - " HTTP/1.1".len();
    format!("GET {target}{} HTTP/1.1\r\n\r\n", "x".repeat(pad))
}

/// An accept request for `id` whose head is exactly `len` bytes.
fn with_head_of(len: usize, id: i64) -> String {
    let start = format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nx-pad: ");
    let pad = len - start.len() - "\r\n\r\n".len();
    format!("{start}{}\r\n\r\n", "x".repeat(pad))
}

/// An accept request for `id` with `n` header fields.
fn with_headers(n: usize, id: i64) -> String {
    let fields: String = (0..n).map(|i| format!("h{i}: v\r\n")).collect();
    format!("GET /api/verve/accept?id={id} HTTP/1.1\r\n{fields}\r\n")
}

/// An accept request for `id` that says it has a body of `declared` bytes and sends `sent`.
fn with_body(declared: usize, sent: usize, id: i64) -> String {
    let head = format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nContent-Length: {declared}\r\n");
    format!("{head}\r\n{}", "b".repeat(sent))
}

/// Probes every size limit at its edge: at the limit is served, one past it is
/// refused with its own status. Returns the ids accepted on the way.
fn probe_size_limits(addr: SocketAddr, limits: &Limits) -> Vec<i64> {
    let mut client = Client::connect(addr);
    let ok = |client: &mut Client, raw: String| {
        client.send(raw.as_bytes());
        let response = client.read_response();
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));
    };
    ok(&mut client, with_line_of(limits.request_line_bytes, 1));
    ok(&mut client, with_head_of(limits.head_bytes, 2));
    ok(&mut client, with_headers(limits.headers, 3));
    // A body within the limit is read and dropped; the connection stays usable.
    ok(
        &mut client,
        with_body(limits.body_bytes, limits.body_bytes, 4),
    );
    accept_all(&mut client, [5]);

    let too_long = with_line_of(limits.request_line_bytes + 1, 101);
    assert_eq!(refused(addr, too_long.as_bytes()), 414);
    let too_large = with_head_of(limits.head_bytes + 1, 102);
    assert_eq!(refused(addr, too_large.as_bytes()), 431);
    let too_many = with_headers(limits.headers + 1, 103);
    assert_eq!(refused(addr, too_many.as_bytes()), 431);
    // Refused on its declared length, before any of the body is sent.
    let too_big = with_body(limits.body_bytes + 1, 0, 104);
    assert_eq!(refused(addr, too_big.as_bytes()), 413);
    let chunked =
        "GET /api/verve/accept?id=105 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(refused(addr, chunked.as_bytes()), 501);
    let http2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_eq!(refused(addr, http2_preface), 400);

    // The first connection was never disturbed.
    accept_all(&mut client, [6]);
    vec![1, 2, 3, 4, 5, 6]
}

#[test]
fn each_size_limit_answers_its_status_at_the_default_and_when_configured() {
    let small = Limits {
        head_bytes: 1024,
        request_line_bytes: 512,
        headers: 8,
        body_bytes: 16,
    };
    let configured = [
        ("VERVE_MAX_HEAD_BYTES", "1024"),
        ("VERVE_MAX_REQUEST_LINE_BYTES", "512"),
        ("VERVE_MAX_HEADERS", "8"),
        ("VERVE_MAX_BODY_BYTES", "16"),
    ];
    for (env, limits) in [(&[][..], Limits::DEFAULT), (&configured[..], small)] {
        let verve = Verve::start(env);
        let (window, accepted) = within_one_window(|| probe_size_limits(verve.addr, &limits));
        let line = verve.wait_for_window(window);
        assert_eq!(line.unique_requests, accepted.len() as u64, "{limits:?}");
    }
}

/// Reads a response if the server sends one before closing, `None` if it just closes.
fn response_or_close(client: &mut Client) -> Option<Response> {
    let mut first = [0u8; 1];
    loop {
        // A blocking peek, unlike read_exact, hands a signal's EINTR back to us.
        match client.reader.get_mut().peek(&mut first) {
            Ok(0) => return None,
            Ok(_) => return Some(client.read_response()),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => panic!("no answer and no close: {err}"),
        }
    }
}

#[test]
fn a_request_must_arrive_whole_within_the_head_timeout() {
    for driver in drivers() {
        head_timeout(driver);
    }
}

fn head_timeout(driver: &str) {
    let verve = Verve::start(&[
        ("VERVE_IO_DRIVER", driver),
        ("VERVE_HEAD_TIMEOUT_MS", "500"),
    ]);
    let timeout = Duration::from_millis(500);
    // Deadlines carry a sweep interval of slack, so closes are not early; the
    // tenth of margin covers a sweep that overslept on a loaded machine.
    let at_least = timeout - timeout / 10;

    let started = Instant::now();
    let mut half = Client::connect(verve.addr);
    half.send(b"GET /api/verve/accept?id=1 HTTP/1.1\r\nHo");
    let response = response_or_close(&mut half).expect("a 408");
    assert_eq!((response.status, response.body.as_str()), (408, "failed"));
    assert!(half.is_closed_by_server());
    assert!(started.elapsed() >= at_least, "{:?}", started.elapsed());

    // A connection that never sends anything is closed without a word.
    let started = Instant::now();
    let mut silent = Client::connect(verve.addr);
    assert_eq!(response_or_close(&mut silent), None);
    assert!(started.elapsed() >= at_least, "{:?}", started.elapsed());

    // Sending a byte at a time does not move the deadline.
    let mut trickle = Client::connect(verve.addr);
    let mut writer = trickle.reader.get_ref().try_clone().unwrap();
    let started = Instant::now();
    let trickling = std::thread::spawn(move || {
        let request = b"GET /api/verve/accept?id=2 HTTP/1.1\r\nx-slow: ";
        for byte in request.iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).is_err() || started.elapsed() > 10 * timeout {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let response = response_or_close(&mut trickle).expect("a 408");
    assert_eq!(response.status, 408);
    assert!(started.elapsed() < 3 * timeout, "{:?}", started.elapsed());
    trickling.join().unwrap();

    // A keep-alive connection gets a fresh deadline for each request.
    let mut steady = Client::connect(verve.addr);
    for id in 0..4 {
        std::thread::sleep(timeout / 2);
        accept_all(&mut steady, [id]);
    }

    let metrics = verve.scrape();
    let series = "verve_connections_timed_out_total{waiting_for=\"head\"}";
    assert_eq!(metric(&metrics, series), 3);
    assert_eq!(
        metric(
            &metrics,
            "verve_requests_total{route=\"other\",status=\"408\"}"
        ),
        2
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    for driver in drivers() {
        idle_timeout(driver);
    }
}

fn idle_timeout(driver: &str) {
    let verve = Verve::start(&[
        ("VERVE_IO_DRIVER", driver),
        ("VERVE_IDLE_TIMEOUT_MS", "600"),
    ]);
    let timeout = Duration::from_millis(600);

    // Busy: a request every quarter of the timeout, for three timeouts.
    let mut busy = Client::connect(verve.addr);
    for id in 0..12 {
        accept_all(&mut busy, [id]);
        std::thread::sleep(timeout / 4);
    }
    accept_all(&mut busy, [12]);
    drop(busy);

    let mut idle = Client::connect(verve.addr);
    accept_all(&mut idle, [13]);
    let started = Instant::now();
    assert_eq!(response_or_close(&mut idle), None);
    assert!(
        started.elapsed() >= timeout - timeout / 10,
        "{:?}",
        started.elapsed()
    );

    let metrics = verve.scrape();
    let series = "verve_connections_timed_out_total{waiting_for=\"idle\"}";
    assert_eq!(metric(&metrics, series), 1);
    assert_eq!(metric(&metrics, "verve_ids_accepted_total"), 14);
}

#[test]
fn a_client_that_does_not_read_its_responses_is_cut_off() {
    for driver in drivers() {
        write_timeout(driver);
    }
}

fn write_timeout(driver: &str) {
    let verve = Verve::start(&[
        ("VERVE_IO_DRIVER", driver),
        ("VERVE_WRITE_TIMEOUT_MS", "500"),
    ]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small receive window so that the server's writes stall soon.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&verve.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let requests = b"GET /api/verve/accept?id=1 HTTP/1.1\r\n\r\n".repeat(1000);
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        if let Err(err) = stream.write_all(&requests) {
            break err;
        }
        assert!(
            Instant::now() < deadline,
            "the server never cut the client off"
        );
    };
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    let metrics = verve.scrape();
    let series = "verve_connections_timed_out_total{waiting_for=\"write\"}";
    assert_eq!(metric(&metrics, series), 1);
}

/// Clients that pipeline without reading their answers.
const STALLED_CLIENTS: usize = 1000;

/// What one stalled client may cost the server, at most: its read buffer (one
/// chunk at the default limits) and one turn's responses, both bounded; a few KiB
/// each in practice. Without the output limit and the idle shrinking, a connection
/// could hold whatever its client asked for (megabytes, with large limits).
const STALLED_CLIENT_BYTES: u64 = 32 * 1024;

#[test]
fn clients_that_pipeline_without_reading_hold_bounded_memory() {
    let open_files = file_limit::raise_to_hard_limit().unwrap();
    assert!(
        open_files > 2 * STALLED_CLIENTS as u64 + 256,
        "ulimit -n too low"
    );
    // The write timeout would cut them off during the test; this test is about
    // what they cost while they are there.
    let verve = Verve::start(&[("VERVE_WRITE_TIMEOUT_MS", "600000")]);
    let request = b"GET /api/verve/accept?id=7 HTTP/1.1\r\n\r\n";
    let mut clients: Vec<TcpStream> = (0..STALLED_CLIENTS)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // Small kernel buffers, so that the server's writes stall soon.
            socket.set_recv_buffer_size(4096).unwrap();
            socket.set_send_buffer_size(4096).unwrap();
            socket.connect(&verve.addr.into()).unwrap();
            let mut stream: TcpStream = socket.into();
            stream.write_all(request).unwrap();
            let mut answer = [0; 66];
            stream.read_exact(&mut answer).unwrap();
            assert!(answer.ends_with(b"ok"));
            stream.set_nonblocking(true).unwrap();
            stream
        })
        .collect();
    let before = verve.rss_kib();

    // Pipeline until no client can send a byte more: every server-side connection
    // is then stalled on a write, holding what it holds.
    // Two rounds in a row without a byte taken, so no connection is caught between
    // a write finishing and its next read.
    let burst = request.repeat(100);
    let mut quiet_rounds = 0;
    eventually(
        Duration::from_secs(60),
        || "the server to stop reading from every stalled client".into(),
        || {
            let mut sent = 0;
            for client in &mut clients {
                while let Ok(n) = client.write(&burst) {
                    sent += n;
                }
            }
            quiet_rounds = if sent == 0 { quiet_rounds + 1 } else { 0 };
            (quiet_rounds == 2).then_some(())
        },
    );
    let grown_kib = verve.rss_kib().saturating_sub(before);
    assert!(
        grown_kib * 1024 < STALLED_CLIENTS as u64 * STALLED_CLIENT_BYTES,
        "{grown_kib} KiB more for {STALLED_CLIENTS} stalled clients"
    );
    eprintln!("{STALLED_CLIENTS} stalled clients: {grown_kib} KiB more");

    // Someone else is still served.
    let mut other = Client::connect(verve.addr);
    accept_all(&mut other, [8]);
}

#[test]
fn connections_beyond_the_cap_are_closed_at_once_and_the_listener_goes_on() {
    let verve = Verve::start(&[("VERVE_WORKERS", "1"), ("VERVE_MAX_CONNECTIONS", "20")]);
    let mut held: Vec<Client> = (0..20)
        .map(|id| {
            let mut client = Client::connect(verve.addr);
            accept_all(&mut client, [id]);
            client
        })
        .collect();
    let open = "verve_connections_open";
    assert_eq!(metric(&verve.scrape(), open), 20);

    let mut extra = Client::connect(verve.addr);
    assert_eq!(response_or_close(&mut extra), None, "closed without a word");
    let metrics = verve.scrape();
    assert_eq!(metric(&metrics, "verve_connections_refused_total"), 1);
    assert_eq!(metric(&metrics, open), 20);

    drop(held.pop());
    eventually(
        Duration::from_secs(5),
        || "the server to see a held connection close".into(),
        || (metric(&verve.scrape(), open) == 19).then_some(()),
    );
    let mut next = Client::connect(verve.addr);
    accept_all(&mut next, [100]);
    for client in &mut held {
        accept_all(client, [101]);
    }
    let metrics = verve.scrape();
    assert_eq!(metric(&metrics, "verve_connections_refused_total"), 1);
    assert_eq!(metric(&metrics, "verve_ids_accepted_total"), 20 + 1 + 19);
}

#[test]
fn a_slowloris_crowd_does_not_keep_other_clients_waiting() {
    // Each half-open request is a descriptor here and one in the server.
    let open_files = file_limit::raise_to_hard_limit().unwrap();
    let loris = 3000.min(open_files.saturating_sub(256) as usize);
    let verve = Verve::start(&[("VERVE_WORKERS", "1"), ("VERVE_HEAD_TIMEOUT_MS", "3000")]);
    let mut crowd: Vec<TcpStream> = (0..loris)
        .map(|_| {
            let mut stream = TcpStream::connect(verve.addr).unwrap();
            stream
                .write_all(b"GET /api/verve/accept?id=1 HTTP/1.1\r\nx-slow: ")
                .unwrap();
            stream
        })
        .collect();

    // Served while the whole crowd holds half-sent requests, each within a second.
    let mut keep_alive = Client::connect(verve.addr);
    for id in 0..100 {
        let quick = Duration::from_secs(1);
        keep_alive
            .reader
            .get_ref()
            .set_read_timeout(Some(quick))
            .unwrap();
        accept_all(&mut keep_alive, [id]);
        let mut fresh = Client::connect(verve.addr);
        fresh
            .reader
            .get_ref()
            .set_read_timeout(Some(quick))
            .unwrap();
        accept_all(&mut fresh, [1000 + id]);
    }
    // The crowd was all there, waiting, while those were served.
    let metrics = verve.scrape();
    let head_timeouts = "verve_connections_timed_out_total{waiting_for=\"head\"}";
    assert_eq!(metric(&metrics, head_timeouts), 0);
    assert!(metric(&metrics, "verve_connections_open") > loris as u64);

    for stream in &mut crowd {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer:?}"
        );
    }
    let metrics = verve.scrape();
    assert_eq!(metric(&metrics, head_timeouts), loris as u64);
    assert_eq!(metric(&metrics, "verve_ids_accepted_total"), 200);
}
