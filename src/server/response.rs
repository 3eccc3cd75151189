//! The responses the server sends, assembled from static pieces.
//!
//! Every answer is `text/plain` with body `ok` or `failed`: clients of the accept
//! endpoint only ever need to tell the two apart, and the status code says why.
//! Responses are appended to the connection's write buffer so that a pipelined
//! batch of requests goes back in one write.

use crate::http::FrameError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    ContentTooLarge,
    UriTooLong,
    HeaderFieldsTooLarge,
    NotImplemented,
    Unavailable,
}

impl Status {
    fn status_line(self) -> &'static [u8] {
        match self {
            Status::Ok => b"HTTP/1.1 200 OK\r\n",
            Status::BadRequest => b"HTTP/1.1 400 Bad Request\r\n",
            Status::NotFound => b"HTTP/1.1 404 Not Found\r\n",
            Status::MethodNotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\nallow: GET\r\n",
            Status::RequestTimeout => b"HTTP/1.1 408 Request Timeout\r\n",
            Status::ContentTooLarge => b"HTTP/1.1 413 Content Too Large\r\n",
            Status::UriTooLong => b"HTTP/1.1 414 URI Too Long\r\n",
            Status::HeaderFieldsTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            Status::NotImplemented => b"HTTP/1.1 501 Not Implemented\r\n",
            Status::Unavailable => b"HTTP/1.1 503 Service Unavailable\r\n",
        }
    }

    /// The numeric code, for logs and metrics.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::ContentTooLarge => 413,
            Status::UriTooLong => 414,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
            Status::Unavailable => 503,
        }
    }

    /// The answer to a request that cannot be framed.
    pub fn refusing(err: FrameError) -> Status {
        match err {
            FrameError::Malformed => Status::BadRequest,
            FrameError::RequestLineTooLong => Status::UriTooLong,
            FrameError::HeadTooLarge | FrameError::TooManyHeaders => Status::HeaderFieldsTooLarge,
            FrameError::BodyTooLarge => Status::ContentTooLarge,
            FrameError::UnsupportedBody => Status::NotImplemented,
        }
    }
}

/// What the response says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1 default: nothing to say.
    KeepAlive,
    /// An HTTP/1.0 client asked for keep-alive and must be told it got it.
    KeepAliveHttp10,
    /// The server closes after this response.
    Close,
}

/// The answer to nearly every request, whole, so that it is one copy.
const OK_KEEP_ALIVE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

/// Appends a full response to `out`. `head_only` leaves out the body (HEAD).
#[inline]
pub fn write(out: &mut Vec<u8>, status: Status, persistence: Persistence, head_only: bool) {
    if (status, persistence, head_only) == (Status::Ok, Persistence::KeepAlive, false) {
        out.extend_from_slice(OK_KEEP_ALIVE);
    } else {
        write_other(out, status, persistence, head_only);
    }
}

/// Every answer but the usual one, out of line so that the usual one is inlined.
#[inline(never)]
fn write_other(out: &mut Vec<u8>, status: Status, persistence: Persistence, head_only: bool) {
    let (length, body): (&[u8], &[u8]) = if status == Status::Ok {
        (b"content-length: 2\r\n", b"ok")
    } else {
        (b"content-length: 6\r\n", b"failed")
    };
    write_head(
        out,
        status,
        b"content-type: text/plain\r\n",
        length,
        persistence,
    );
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// Appends a response with a body made for the occasion (`/metrics`, `/healthz`).
pub fn write_body(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    body: &str,
    persistence: Persistence,
    head_only: bool,
) {
    let content_type = format!("content-type: {content_type}\r\n");
    let length = format!("content-length: {}\r\n", body.len());
    write_head(
        out,
        status,
        content_type.as_bytes(),
        length.as_bytes(),
        persistence,
    );
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

fn write_head(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &[u8],
    length: &[u8],
    persistence: Persistence,
) {
    out.extend_from_slice(status.status_line());
    out.extend_from_slice(content_type);
    out.extend_from_slice(length);
    out.extend_from_slice(match persistence {
        Persistence::KeepAlive => b"",
        Persistence::KeepAliveHttp10 => b"connection: keep-alive\r\n",
        Persistence::Close => b"connection: close\r\n",
    });
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(status: Status, persistence: Persistence, head_only: bool) -> String {
        let mut out = Vec::new();
        write(&mut out, status, persistence, head_only);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ok_keep_alive() {
        assert_eq!(
            render(Status::Ok, Persistence::KeepAlive, false),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
        );
    }

    #[test]
    fn the_whole_ok_answer_is_what_the_pieces_make() {
        let mut assembled = Vec::new();
        write_head(
            &mut assembled,
            Status::Ok,
            b"content-type: text/plain\r\n",
            b"content-length: 2\r\n",
            Persistence::KeepAlive,
        );
        assembled.extend_from_slice(b"ok");
        assert_eq!(assembled, OK_KEEP_ALIVE);
    }

    #[test]
    fn failures_close_or_confirm_keep_alive() {
        assert_eq!(
            render(Status::BadRequest, Persistence::Close, false),
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\
             connection: close\r\n\r\nfailed"
        );
        assert_eq!(
            render(Status::MethodNotAllowed, Persistence::KeepAliveHttp10, true),
            "HTTP/1.1 405 Method Not Allowed\r\nallow: GET\r\ncontent-type: text/plain\r\n\
             content-length: 6\r\nconnection: keep-alive\r\n\r\n"
        );
    }
}
