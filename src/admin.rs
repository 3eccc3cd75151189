//! The operations listener: `/metrics` and `/healthz` on an address of their own
//! (`VERVE_ADMIN_ADDR`, loopback by default), away from the public port.
//!
//! One thread serves it with blocking sockets, one connection at a time and one
//! request per connection (`connection: close`). Scrapes are rare, so this costs
//! the workers nothing, holds at most one rendering in memory, and takes the
//! telemetry's lock only once per scrape. A client that is slow to send its
//! request or to read the answer is cut off after [`CLIENT_DEADLINE`], so nobody
//! holds the listener for long.
//!
//! Dropping it shuts the listening socket down, which wakes the blocked `accept`;
//! the thread is not waited for (it ends after the client it serves, if any).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::http;
use crate::metrics::Telemetry;
use crate::server::response::{self, Persistence, Status};

/// The most a client may take to send its request, and to read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// How long, after the answer, unread input is discarded while waiting for the
/// client to close (up to [`MAX_HEAD_BYTES`] of it), before closing anyway.
const LINGER: Duration = Duration::from_millis(200);

/// A request head larger than this is refused: a scrape's is a few hundred bytes.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Why the operations listener could not start, as one line that says what to do.
#[derive(Debug)]
pub enum AdminError {
    Bind { addr: SocketAddr, source: io::Error },
    Thread(io::Error),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Bind { addr, source } if source.kind() == io::ErrorKind::AddrInUse => {
                write!(
                    f,
                    "cannot listen on {addr} for /metrics and /healthz: address already in use \
                     (set VERVE_ADMIN_ADDR to a free address, or to an empty value to turn it off)"
                )
            }
            AdminError::Bind { addr, source } => write!(
                f,
                "cannot listen on {addr} for /metrics and /healthz: {source} (check VERVE_ADMIN_ADDR)"
            ),
            AdminError::Thread(source) => write!(f, "cannot start a thread: {source}"),
        }
    }
}

impl std::error::Error for AdminError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AdminError::Bind { source, .. } | AdminError::Thread(source) => Some(source),
        }
    }
}

/// The running operations listener.
pub struct AdminListener {
    addr: SocketAddr,
    /// The listening socket, kept to shut it down.
    socket: Socket,
    stopping: Arc<AtomicBool>,
}

impl AdminListener {
    /// Listens on `addr` and serves from a thread of its own.
    pub fn start(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<AdminListener, AdminError> {
        let socket = bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
        let listener: TcpListener = socket.try_clone().map_err(AdminError::Thread)?.into();
        let addr = listener.local_addr().map_err(AdminError::Thread)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        // Not joined: a client being served when the service stops must not hold
        // up its shutdown; the thread ends after that client, within its deadlines.
        std::thread::Builder::new()
            .name("verve-admin".into())
            .spawn(move || serve(&listener, &telemetry, &stop))
            .map_err(AdminError::Thread)?;
        Ok(AdminListener {
            addr,
            socket,
            stopping,
        })
    }

    /// The address it listens on, with the real port if 0 was configured.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Dropping the listener stops it (also when start-up fails after it): no new
/// client is accepted, and the thread ends once the one it serves, if any, is done.
impl Drop for AdminListener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // On Linux, shutting a listening socket down makes a blocked accept fail.
        let _ = self.socket.shutdown(Shutdown::Read);
    }
}

fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    Ok(socket)
}

fn serve(listener: &TcpListener, telemetry: &Telemetry, stopping: &AtomicBool) {
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok((stream, _peer)) => {
                if let Err(err) = answer(stream, telemetry) {
                    tracing::debug!(error = %err, "operations client");
                }
            }
            Err(err) => {
                // Usually EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %err, "operations listener: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, telemetry: &Telemetry) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let status_or_route = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        match route(&head) {
            Some(found) => break found,
            None if head.len() >= MAX_HEAD_BYTES => break Err(Status::HeaderFieldsTooLarge),
            None => {}
        }
    };
    let mut out = Vec::new();
    match status_or_route {
        Ok((Endpoint::Metrics, head_only)) => response::write_body(
            &mut out,
            Status::Ok,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &telemetry.render(),
            Persistence::Close,
            head_only,
        ),
        Ok((Endpoint::Healthz, head_only)) => {
            let (status, body) = match telemetry.health() {
                Ok(()) => (Status::Ok, "ok"),
                Err(reason) => (Status::Unavailable, reason),
            };
            let persistence = Persistence::Close;
            response::write_body(&mut out, status, "text/plain", body, persistence, head_only);
        }
        Err(status) => response::write(&mut out, status, Persistence::Close, false),
    }
    // One deadline for the whole answer: a per-call timeout would let a client
    // that reads a little at a time hold the listener for as long as it likes.
    let write_deadline = Instant::now() + CLIENT_DEADLINE;
    let mut unsent = &out[..];
    while !unsent.is_empty() {
        let left = write_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(unsent)? {
            0 => return Ok(()),
            n => unsent = &unsent[n..],
        }
    }
    // The client may have sent more (pipelined requests) that is never read; a
    // plain close would then reset the connection and could destroy the answer.
    stream.shutdown(Shutdown::Write)?;
    let linger_until = Instant::now() + LINGER;
    let mut discarded = 0;
    while discarded < MAX_HEAD_BYTES {
        let left = linger_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => discarded += n,
            _ => break,
        }
    }
    Ok(())
}

/// What the operations listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Healthz,
}

/// Routes a complete request head: the endpoint and whether to leave the body out
/// (HEAD), or the error status; `None` while the head is incomplete.
///
/// The request line is split here, and only the header fields go through httparse
/// (`parse_headers`): httparse's request parser keeps one caller in the program,
/// the public port's framing, which is what lets LLVM inline it into the workers'
/// loop (about 85 instructions per pipelined request; docs/performance.md).
/// Two fixed paths and two methods need no more than a split at spaces.
fn route(head: &[u8]) -> Option<Result<(Endpoint, bool), Status>> {
    // Empty lines before a request may be ignored (RFC 9112, 2.2), as framing does.
    let head = &head[http::empty_lines(head)..];
    let line_len = head
        .iter()
        .position(|b| !(b' '..=b'~').contains(b))
        .unwrap_or(head.len());
    let (line, rest) = head.split_at(line_len);
    let fields = match rest {
        [] | [b'\r'] => return None,
        [b'\r', b'\n', fields @ ..] | [b'\n', fields @ ..] => fields,
        _ => return Some(Err(Status::BadRequest)),
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(fields, &mut headers) {
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Some(Err(Status::HeaderFieldsTooLarge)),
        Err(_) => return Some(Err(Status::BadRequest)),
    }
    let mut words = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(b"HTTP/1.0" | b"HTTP/1.1"), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Some(Err(Status::BadRequest));
    };
    if method.is_empty() || target.is_empty() {
        return Some(Err(Status::BadRequest));
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let endpoint = match path {
        b"/metrics" => Endpoint::Metrics,
        b"/healthz" => Endpoint::Healthz,
        _ => return Some(Err(Status::NotFound)),
    };
    Some(match method {
        b"GET" => Ok((endpoint, false)),
        b"HEAD" => Ok((endpoint, true)),
        _ => Err(Status::MethodNotAllowed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_two_endpoints_and_refuses_the_rest() {
        let route = |head: &str| route(head.as_bytes());
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ok((Endpoint::Metrics, false)))
        );
        assert_eq!(
            route("HEAD /healthz?verbose HTTP/1.0\r\n\r\n"),
            Some(Ok((Endpoint::Healthz, true)))
        );
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost"), None);
        assert_eq!(
            route("GET /api/verve/accept?id=1 HTTP/1.1\r\n\r\n"),
            Some(Err(Status::NotFound))
        );
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Err(Status::MethodNotAllowed))
        );
        assert_eq!(route("\x16\x03\x01\r\n\r\n"), Some(Err(Status::BadRequest)));
    }

    #[test]
    fn a_head_is_complete_only_with_its_empty_line() {
        let route = |head: &str| route(head.as_bytes());
        assert_eq!(route(""), None);
        assert_eq!(route("\r\n"), None);
        assert_eq!(route("\r\n\r"), None);
        assert_eq!(route("GET /metr"), None);
        assert_eq!(route("GET /metrics HTTP/1.1\r"), None);
        assert_eq!(route("GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            route("\r\nGET /metrics HTTP/1.1\n\n"),
            Some(Ok((Endpoint::Metrics, false)))
        );
    }

    #[test]
    fn a_bad_line_or_header_field_is_refused() {
        let route = |head: &str| route(head.as_bytes());
        let bad = Some(Err(Status::BadRequest));
        // Refused as soon as a byte shows it, without waiting for the line's end.
        assert_eq!(route("\x16\x03\x01"), bad);
        // A bare CR is no empty line.
        assert_eq!(route("\r\rGET /metrics HTTP/1.1\r\n\r\n"), bad);
        assert_eq!(route("GET /metrics\tHTTP/1.1"), bad);
        assert_eq!(route("GET /metrics HTTP/2.0\r\n\r\n"), bad);
        assert_eq!(route("GET /metrics\r\n\r\n"), bad);
        assert_eq!(route("GET  /metrics HTTP/1.1\r\n\r\n"), bad);
        assert_eq!(route(" /metrics HTTP/1.1\r\n\r\n"), bad);
        assert_eq!(route("GET /metrics HTTP/1.1 x\r\n\r\n"), bad);
        assert_eq!(route("GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"), bad);
        let many = format!("GET /metrics HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(33));
        assert_eq!(route(&many), Some(Err(Status::HeaderFieldsTooLarge)));
    }
}
