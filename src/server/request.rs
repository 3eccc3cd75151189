//! HTTP/1.x request framing over a connection's read buffer, with httparse.
//!
//! [`parse`] looks at the buffered bytes and says one of three things: a complete
//! request and how many bytes it used, "not enough yet" (`Ok(None)`), or an error
//! after which the connection cannot be trusted and is closed. It never consumes
//! bytes itself; the connection advances its buffer by the returned length, so a
//! request split over any number of reads, down to one byte each, parses the same.

use std::fmt;

/// The largest request (head plus body) a connection buffers. An accept request with
/// the longest endpoint, fully escaped, is about 6.2 KiB; this leaves room for headers.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Headers beyond this many make the request too large.
const MAX_HEADERS: usize = 32;

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
    /// The path, without the query.
    pub path: &'b [u8],
    /// The query, without the `?`; empty when there is none.
    pub query: &'b [u8],
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// HTTP/1.0 keep-alive must be confirmed in the response; HTTP/1.1 assumes it.
    pub http10: bool,
    /// Bytes of the buffer this request used, head and body.
    pub len: usize,
}

/// Why a request cannot be framed. The connection answers and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not HTTP/1.x as httparse reads it.
    Malformed,
    /// The request does not fit [`MAX_REQUEST_BYTES`] or has too many headers.
    TooLarge,
    /// `Transfer-Encoding` bodies; no endpoint here takes a body.
    UnsupportedBody,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::Malformed => "malformed HTTP request",
            FrameError::TooLarge => "request too large",
            FrameError::UnsupportedBody => "transfer-encoded request body",
        })
    }
}

/// Frames the first request in `buf`.
pub fn parse(buf: &[u8]) -> Result<Option<Request<'_>>, FrameError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            return Err(FrameError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(FrameError::TooLarge),
        Err(_) => return Err(FrameError::Malformed),
    };
    // httparse only reports Complete with all of these present.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(FrameError::Malformed);
    };

    let http10 = version == 0;
    let mut keep_alive = !http10;
    let mut body_len = 0usize;
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
            let value = std::str::from_utf8(header.value.trim_ascii())
                .map_err(|_| FrameError::Malformed)?;
            let len: usize = value.parse().map_err(|_| FrameError::Malformed)?;
            if body_len != 0 && body_len != len {
                return Err(FrameError::Malformed);
            }
            body_len = len;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(FrameError::UnsupportedBody);
        }
    }

    let len = head_len.checked_add(body_len).ok_or(FrameError::TooLarge)?;
    if len > MAX_REQUEST_BYTES {
        return Err(FrameError::TooLarge);
    }
    if buf.len() < len {
        return Ok(None);
    }

    let target = target.as_bytes();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &target[target.len()..]),
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Some(Request {
        method,
        path,
        query,
        keep_alive,
        http10,
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET /api/verve/accept?id=1 HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_complete_request() {
        let req = parse(GET).unwrap().unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, b"/api/verve/accept");
        assert_eq!(req.query, b"id=1");
        assert!(req.keep_alive);
        assert!(!req.http10);
        assert_eq!(req.len, GET.len());
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        for end in 0..GET.len() {
            assert_eq!(parse(&GET[..end]), Ok(None), "prefix of {end} bytes");
        }
    }

    #[test]
    fn pipelined_requests_frame_one_at_a_time() {
        let second = b"GET /api/verve/accept?id=2 HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut buf = GET.to_vec();
        buf.extend_from_slice(second);
        buf.extend_from_slice(&GET[..10]);
        let first = parse(&buf).unwrap().unwrap();
        assert_eq!(first.query, b"id=1");
        let rest = &buf[first.len..];
        let next = parse(rest).unwrap().unwrap();
        assert_eq!(next.query, b"id=2");
        assert!(!next.keep_alive);
        assert_eq!(parse(&rest[next.len..]), Ok(None));
    }

    #[test]
    fn connection_semantics() {
        let keep_alive = |raw: &[u8]| parse(raw).unwrap().unwrap().keep_alive;
        assert!(!keep_alive(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(keep_alive(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        ));
        assert!(parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().http10);
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
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.method, Method::Other);
        assert_eq!(&raw[req.len..], b"GET");
        assert_eq!(
            parse(&raw[..raw.len() - 4]),
            Ok(None),
            "body not all here yet"
        );
    }

    #[test]
    fn methods() {
        let method = |raw: &[u8]| parse(raw).unwrap().unwrap().method;
        assert_eq!(method(b"HEAD / HTTP/1.1\r\n\r\n"), Method::Head);
        assert_eq!(method(b"DELETE / HTTP/1.1\r\n\r\n"), Method::Other);
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(parse(b"GARBAGE\r\n\r\n"), Err(FrameError::Malformed));
        assert_eq!(parse(b"GET / HTTP/2.0\r\n\r\n"), Err(FrameError::Malformed));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(FrameError::Malformed)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(FrameError::UnsupportedBody)
        );
    }

    #[test]
    fn oversize_requests() {
        let mut huge = b"GET /".to_vec();
        huge.resize(MAX_REQUEST_BYTES, b'a');
        assert_eq!(parse(&huge), Err(FrameError::TooLarge));
        let big_body = format!("POST / HTTP/1.1\r\nContent-Length: {MAX_REQUEST_BYTES}\r\n\r\n");
        assert_eq!(parse(big_body.as_bytes()), Err(FrameError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(FrameError::TooLarge));
    }
}
