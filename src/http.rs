//! HTTP/1.x request framing over a connection's read buffer, with httparse.
//!
//! [`parse`] looks at the buffered bytes and says one of three things: a complete
//! request and how many bytes it used, "not enough yet" (`Ok(None)`), or an error
//! after which the connection cannot be trusted and is closed. It never consumes
//! bytes itself; [`frame_requests`] walks a buffer request by request, and the
//! connection drops what it used.
//!
//! Invariant: the verdict depends on the bytes, never on how they arrived. A request
//! split over any number of reads, down to one byte each, frames exactly as it does
//! in one piece. Each limit is decided at a fixed offset (the head limit at
//! [`Limits::head_bytes`], the request-line limit one byte past the longest line
//! allowed), httparse never sees bytes past the first such offset, and an error
//! httparse finds wins only if it lies before it. The fuzz target and a property
//! test hold the code to this.

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::ControlFlow;

/// The most header fields `VERVE_MAX_HEADERS` may allow: the size of the
/// uninitialised array httparse fills, on a worker's stack, so the limit costs
/// nothing per request.
pub const MAX_HEADERS_CEILING: usize = 256;

/// How large a request may be. Each bound is a configuration knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The head: request line and header fields with their line ends (beyond: 431).
    pub head_bytes: usize,
    /// The request line without its line end (beyond: 414). An accept request with
    /// the longest endpoint, fully escaped, has a line of about 6.2 KiB.
    pub request_line_bytes: usize,
    /// Header fields, at most [`MAX_HEADERS_CEILING`] (beyond: 431).
    pub headers: usize,
    /// A `Content-Length` body, read and discarded (beyond: 413).
    pub body_bytes: usize,
}

impl Limits {
    /// The defaults the configuration documents.
    pub const DEFAULT: Limits = Limits {
        head_bytes: 8 * 1024,
        request_line_bytes: 7 * 1024,
        headers: 64,
        body_bytes: 4 * 1024,
    };

    /// The most bytes one request may occupy in a read buffer.
    pub fn request_bytes(&self) -> usize {
        self.head_bytes + self.body_bytes
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Anything else; only the router cares which.
    Other,
}

/// One parsed request, borrowing the connection's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'b> {
    pub method: Method,
    /// The request target as sent: the path, then `?` and the query if any.
    pub target: &'b [u8],
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// HTTP/1.0 keep-alive must be confirmed in the response; HTTP/1.1 assumes it.
    pub http10: bool,
    /// Bytes of the buffer this request used, head and body.
    pub len: usize,
}

impl<'b> Request<'b> {
    /// The path, without the query.
    pub fn path(&self) -> &'b [u8] {
        self.split_target().0
    }

    /// The query, without the `?`; empty when there is none.
    pub fn query(&self) -> &'b [u8] {
        self.split_target().1
    }

    /// The query (empty when there is none) if the path is exactly `path`. A
    /// router with one route asks this instead of splitting the target: a
    /// compare of `path`'s length, not a search for the `?`.
    #[inline]
    pub fn query_if_path(&self, path: &[u8]) -> Option<&'b [u8]> {
        match self.target.strip_prefix(path)? {
            [] => Some(&[]),
            [b'?', query @ ..] => Some(query),
            _ => None,
        }
    }

    fn split_target(&self) -> (&'b [u8], &'b [u8]) {
        match memchr::memchr(b'?', self.target) {
            Some(q) => (&self.target[..q], &self.target[q + 1..]),
            None => (self.target, &[]),
        }
    }
}

/// Why a request cannot be framed. The connection answers and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not HTTP/1.x as httparse reads it (an HTTP/2 preface, say).
    Malformed,
    /// The request line is longer than [`Limits::request_line_bytes`].
    RequestLineTooLong,
    /// The head is longer than [`Limits::head_bytes`].
    HeadTooLarge,
    /// More header fields than [`Limits::headers`].
    TooManyHeaders,
    /// A `Content-Length` beyond [`Limits::body_bytes`].
    BodyTooLarge,
    /// `Transfer-Encoding` bodies; no endpoint here takes a body.
    UnsupportedBody,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::Malformed => "malformed HTTP request",
            FrameError::RequestLineTooLong => "request line too long",
            FrameError::HeadTooLarge => "request head too large",
            FrameError::TooManyHeaders => "too many header fields",
            FrameError::BodyTooLarge => "request body too large",
            FrameError::UnsupportedBody => "transfer-encoded request body",
        })
    }
}

/// How a run of [`frame_requests`] over a buffer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEnd {
    /// The rest of the buffer is the start of a request, or nothing.
    NeedMore,
    /// A request asked to close the connection; what follows it is not read.
    Close,
    /// The bytes after the last framed request cannot be framed.
    Error(FrameError),
    /// The handler asked to stop; what follows is framed on the next call.
    Paused,
}

/// The outcome of [`frame_requests`]: the bytes its requests used, and why it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed {
    pub consumed: usize,
    pub end: FrameEnd,
}

/// Frames every complete request at the front of `buf`, in order, handing each to
/// `handle`, and stops at the first that closes the connection, at an incomplete
/// one, at an error, or when `handle` breaks.
#[inline]
pub fn frame_requests<'b>(
    buf: &'b [u8],
    limits: &Limits,
    mut handle: impl FnMut(Request<'b>) -> ControlFlow<()>,
) -> Framed {
    let mut consumed = 0;
    let end = loop {
        // Empty lines before a request may be ignored (RFC 9112, 2.2); dropping
        // them here, rather than leaving them for httparse to skip, means a stray
        // CRLF after a request does not look like half of the next one.
        consumed += empty_lines(&buf[consumed..]);
        if consumed == buf.len() {
            break FrameEnd::NeedMore;
        }
        match parse(&buf[consumed..], limits) {
            Ok(Some(req)) => {
                consumed += req.len;
                let flow = handle(req);
                if !req.keep_alive {
                    break FrameEnd::Close;
                }
                if flow.is_break() {
                    break FrameEnd::Paused;
                }
            }
            Ok(None) => break FrameEnd::NeedMore,
            Err(err) => break FrameEnd::Error(err),
        }
    };
    Framed { consumed, end }
}

/// The length of the complete empty lines (`\r\n` or `\n`) at the front of `buf`.
pub(crate) fn empty_lines(buf: &[u8]) -> usize {
    let mut len = 0;
    loop {
        match buf.get(len) {
            Some(b'\n') => len += 1,
            Some(b'\r') if buf.get(len + 1) == Some(&b'\n') => len += 2,
            _ => return len,
        }
    }
}

/// Frames the first request in `buf`.
///
/// This is the one place in the program that calls httparse's request parser (the
/// operations port splits its two-path request line itself), and it calls it once:
/// LLVM inlines the parser into the workers' loop only while it has a single call
/// site, and that is worth about 85 instructions per pipelined request, a twelfth
/// (docs/performance.md). So where the request line runs past its limit, httparse
/// is shown only the bytes up to where that is decided, rather than asked a second
/// time whether an error it found lies before them.
pub fn parse<'b>(buf: &'b [u8], limits: &Limits) -> Result<Option<Request<'b>>, FrameError> {
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'b>>::uninit() }; MAX_HEADERS_CEILING];
    let headers = &mut headers[..limits.headers.min(MAX_HEADERS_CEILING)];
    let line_overflow = request_line_overflow(buf, limits);
    // One expression, not a match: with a branch here LLVM copied the call into
    // both arms, two call sites, and inlined neither. An overflow is decided
    // within the head limit.
    let visible = &buf[..line_overflow.unwrap_or(buf.len()).min(limits.head_bytes)];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(visible, headers) {
        Ok(httparse::Status::Complete(head_len)) => framed(&req, head_len, buf, limits),
        Ok(httparse::Status::Partial) if line_overflow.is_some() => {
            Err(FrameError::RequestLineTooLong)
        }
        Ok(httparse::Status::Partial) if buf.len() >= limits.head_bytes => {
            Err(FrameError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(FrameError::TooManyHeaders),
        Err(_) => Err(FrameError::Malformed),
    }
}

/// The request whose head httparse found complete in its first `head_len` bytes
/// of `buf`, or why it cannot be served, or `Ok(None)` while its body is missing.
fn framed<'b>(
    req: &httparse::Request<'_, 'b>,
    head_len: usize,
    buf: &'b [u8],
    limits: &Limits,
) -> Result<Option<Request<'b>>, FrameError> {
    // httparse only reports Complete with all of these present.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(FrameError::Malformed);
    };
    // The line as httparse accepts it: method, space, target, space, `HTTP/1.x`.
    if method.len() + target.len() + 10 > limits.request_line_bytes {
        return Err(FrameError::RequestLineTooLong);
    }

    let http10 = version == 0;
    let mut keep_alive = !http10;
    let mut body_len = None;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let len = content_length(header.value)?;
            if body_len.is_some_and(|earlier| earlier != len) {
                return Err(FrameError::Malformed);
            }
            body_len = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(FrameError::UnsupportedBody);
        }
    }
    // The head is in `buf`; only a body can be missing.
    let len = match body_len {
        None => head_len,
        Some(body) if body > limits.body_bytes => return Err(FrameError::BodyTooLarge),
        Some(body) if buf.len() < head_len + body => return Ok(None),
        Some(body) => head_len + body,
    };

    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Some(Request {
        method,
        target: target.as_bytes(),
        keep_alive,
        http10,
        len,
    }))
}

/// A `Content-Length` value: digits only (no sign, no spaces inside), as RFC 9110 says.
fn content_length(value: &[u8]) -> Result<usize, FrameError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(FrameError::Malformed);
    }
    let significant = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    let digits = &digits[significant..];
    // Longer than any limit can be: too large, whatever the exact value.
    if digits.len() > 12 {
        return Err(FrameError::BodyTooLarge);
    }
    Ok(digits
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0')))
}

/// Where the request line is known to be too long: the length of the shortest
/// prefix of `buf` that shows it, if `buf` shows it and no earlier than the head
/// limit would. Leading empty lines, which HTTP lets a server skip, do not count.
/// Framing asks this of every request, so the usual answer (the buffer is shorter
/// than the longest line allowed) comes before any search for the line's end.
#[inline]
fn request_line_overflow(buf: &[u8], limits: &Limits) -> Option<usize> {
    if buf.len() <= limits.request_line_bytes {
        return None;
    }
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let decided_at = start + limits.request_line_bytes + 1;
    if decided_at > buf.len() || decided_at > limits.head_bytes {
        return None;
    }
    memchr::memchr2(b'\r', b'\n', &buf[start..decided_at])
        .is_none()
        .then_some(decided_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET /api/verve/accept?id=1 HTTP/1.1\r\nHost: x\r\n\r\n";
    const LIMITS: Limits = Limits::DEFAULT;

    fn frame(buf: &[u8]) -> Result<Option<Request<'_>>, FrameError> {
        parse(buf, &LIMITS)
    }

    #[test]
    fn a_complete_request() {
        let req = frame(GET).unwrap().unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path(), b"/api/verve/accept");
        assert_eq!(req.query(), b"id=1");
        assert!(req.keep_alive);
        assert!(!req.http10);
        assert_eq!(req.len, GET.len());
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        for end in 0..GET.len() {
            assert_eq!(frame(&GET[..end]), Ok(None), "prefix of {end} bytes");
        }
    }

    #[test]
    fn the_query_of_one_path_only_for_that_path() {
        let target = |line: &str| {
            let head = format!("GET {line} HTTP/1.1\r\n\r\n");
            let req = frame(head.as_bytes()).unwrap().unwrap();
            req.query_if_path(b"/api/verve/accept").map(<[u8]>::to_vec)
        };
        assert_eq!(target("/api/verve/accept?id=1"), Some(b"id=1".to_vec()));
        assert_eq!(target("/api/verve/accept?"), Some(Vec::new()));
        assert_eq!(target("/api/verve/accept"), Some(Vec::new()));
        assert_eq!(target("/api/verve/acceptx?id=1"), None);
        assert_eq!(target("/api/verve/accept/?id=1"), None);
        assert_eq!(target("/api/verve/accep"), None);
        assert_eq!(target("/?/api/verve/accept"), None);
    }

    #[test]
    fn path_and_query_split_at_the_first_question_mark() {
        let req = frame(b"GET /a?b?c HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((req.path(), req.query()), (&b"/a"[..], &b"b?c"[..]));
        let req = frame(b"GET /a HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((req.path(), req.query()), (&b"/a"[..], &b""[..]));
    }

    #[test]
    fn pipelined_requests_frame_one_at_a_time() {
        let second = b"GET /api/verve/accept?id=2 HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut buf = GET.to_vec();
        buf.extend_from_slice(second);
        buf.extend_from_slice(GET);
        let mut queries = Vec::new();
        let framed = frame_requests(&buf, &LIMITS, |req| {
            queries.push(req.query());
            ControlFlow::Continue(())
        });
        assert_eq!(queries, [&b"id=1"[..], b"id=2"]);
        assert_eq!(framed.end, FrameEnd::Close);
        assert_eq!(framed.consumed, GET.len() + second.len());
    }

    #[test]
    fn a_handler_can_pause_framing_after_a_request() {
        let buf = GET.repeat(3);
        let mut handled = 0;
        let framed = frame_requests(&buf, &LIMITS, |_| {
            handled += 1;
            match handled {
                2 => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        });
        assert_eq!(handled, 2);
        assert_eq!(
            (framed.consumed, framed.end),
            (2 * GET.len(), FrameEnd::Paused)
        );
    }

    #[test]
    fn empty_lines_between_requests_are_dropped() {
        let mut buf = b"\r\n\n".to_vec();
        buf.extend_from_slice(GET);
        buf.extend_from_slice(b"\r\n\r");
        let mut count = 0;
        let framed = frame_requests(&buf, &LIMITS, |_| {
            count += 1;
            ControlFlow::Continue(())
        });
        assert_eq!(count, 1);
        assert_eq!(framed.end, FrameEnd::NeedMore);
        assert_eq!(&buf[framed.consumed..], b"\r", "half an empty line waits");
    }

    #[test]
    fn framing_stops_at_an_incomplete_request_or_an_error() {
        let mut buf = GET.to_vec();
        buf.extend_from_slice(&GET[..10]);
        let framed = frame_requests(&buf, &LIMITS, |_| ControlFlow::Continue(()));
        assert_eq!(
            (framed.consumed, framed.end),
            (GET.len(), FrameEnd::NeedMore)
        );
        buf.truncate(GET.len());
        buf.extend_from_slice(b"GARBAGE\r\n\r\n");
        let framed = frame_requests(&buf, &LIMITS, |_| ControlFlow::Continue(()));
        let malformed = FrameEnd::Error(FrameError::Malformed);
        assert_eq!((framed.consumed, framed.end), (GET.len(), malformed));
    }

    #[test]
    fn connection_semantics() {
        let keep_alive = |raw: &[u8]| frame(raw).unwrap().unwrap().keep_alive;
        assert!(!keep_alive(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(keep_alive(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        ));
        assert!(frame(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().http10);
        assert!(!keep_alive(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep_alive(
            b"GET / HTTP/1.1\r\nconnection: upgrade, CLOSE\r\n\r\n"
        ));
        assert!(keep_alive(
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn a_body_is_framed_and_skipped() {
        let raw = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET";
        let req = frame(raw).unwrap().unwrap();
        assert_eq!(req.method, Method::Other);
        assert_eq!(&raw[req.len..], b"GET");
        assert_eq!(
            frame(&raw[..raw.len() - 4]),
            Ok(None),
            "body not all here yet"
        );
    }

    #[test]
    fn methods() {
        let method = |raw: &[u8]| frame(raw).unwrap().unwrap().method;
        assert_eq!(method(b"HEAD / HTTP/1.1\r\n\r\n"), Method::Head);
        assert_eq!(method(b"DELETE / HTTP/1.1\r\n\r\n"), Method::Other);
    }

    #[test]
    fn malformed_requests() {
        let malformed = Err(FrameError::Malformed);
        assert_eq!(frame(b"GARBAGE\r\n\r\n"), malformed);
        assert_eq!(frame(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), malformed);
        assert_eq!(frame(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"), malformed);
        assert_eq!(
            frame(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            malformed
        );
        assert_eq!(
            frame(b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"),
            malformed
        );
        assert_eq!(
            frame(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            malformed
        );
        assert_eq!(
            frame(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(FrameError::UnsupportedBody)
        );
    }

    #[test]
    fn a_head_over_the_limit_is_refused_once_the_limit_is_reached() {
        let mut head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        head.resize(LIMITS.head_bytes - 1, b'a');
        assert_eq!(frame(&head), Ok(None));
        head.push(b'a');
        assert_eq!(frame(&head), Err(FrameError::HeadTooLarge));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            frame(&head),
            Err(FrameError::HeadTooLarge),
            "complete, but too large"
        );
    }

    #[test]
    fn a_head_exactly_at_the_limit_is_accepted() {
        let mut head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        head.resize(LIMITS.head_bytes - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(frame(&head).unwrap().unwrap().len, LIMITS.head_bytes);
    }

    #[test]
    fn a_request_line_over_the_limit_is_refused() {
        let line = |len: usize| {
            let mut line = b"GET /".to_vec();
            line.resize(len - " HTTP/1.1".len(), b'a');
            line.extend_from_slice(b" HTTP/1.1");
            line
        };
        let mut fits = line(LIMITS.request_line_bytes);
        fits.extend_from_slice(b"\r\n\r\n");
        assert!(frame(&fits).unwrap().is_some());
        let mut long = line(LIMITS.request_line_bytes + 1);
        assert_eq!(frame(&long[..LIMITS.request_line_bytes]), Ok(None));
        assert_eq!(
            frame(&long),
            Err(FrameError::RequestLineTooLong),
            "no line end yet"
        );
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            frame(&long),
            Err(FrameError::RequestLineTooLong),
            "complete"
        );
    }

    #[test]
    fn an_error_before_the_line_limit_wins_over_it() {
        let mut line = b"GET /a\x01".to_vec();
        line.resize(LIMITS.request_line_bytes + 100, b'a');
        assert_eq!(frame(&line), Err(FrameError::Malformed));
        assert_eq!(frame(&line[..10]), Err(FrameError::Malformed));
    }

    #[test]
    fn too_many_headers() {
        let with_headers = |n: usize| {
            let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                raw.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            raw
        };
        assert!(frame(&with_headers(LIMITS.headers)).unwrap().is_some());
        assert_eq!(
            frame(&with_headers(LIMITS.headers + 1)),
            Err(FrameError::TooManyHeaders)
        );
    }

    #[test]
    fn a_body_over_the_limit_is_refused_from_its_length_alone() {
        let at_limit = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            LIMITS.body_bytes
        );
        assert_eq!(frame(at_limit.as_bytes()), Ok(None), "waits for the body");
        let over = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            LIMITS.body_bytes + 1
        );
        assert_eq!(frame(over.as_bytes()), Err(FrameError::BodyTooLarge));
        let absurd = "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(frame(absurd.as_bytes()), Err(FrameError::BodyTooLarge));
        let zeros = "POST / HTTP/1.1\r\nContent-Length: 00000000000000000000002\r\n\r\nok";
        assert_eq!(frame(zeros.as_bytes()).unwrap().unwrap().len, zeros.len());
    }
}
