//! One client connection: read, frame, answer, in order, until either side closes.
//!
//! The connection owns a read buffer and a write buffer for its whole life and hands
//! them to the kernel and back on every turn (monoio's owned-buffer I/O), so a
//! request costs no allocation. Everything that can be answered from one read is
//! answered, in order, with one write: pipelined requests are batched for free.
//! A request that is malformed, too large or unframeable gets its error response
//! and the connection closes, since what follows it cannot be trusted.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::query::parse_accept_query;
use super::request::{self, FrameError, Method, Request, MAX_REQUEST_BYTES};
use super::response::{self, Persistence, Status};
use super::worker::Worker;
use crate::window::WindowStart;

/// Read buffer growth step; a typical request is well under this.
const READ_CHUNK: usize = 4096;

/// After an error response, how long and how much unread input is discarded before
/// closing; see [`Connection::linger`].
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// The path of the one counting endpoint.
pub const ACCEPT_PATH: &[u8] = b"/api/verve/accept";

pub(crate) struct Connection {
    stream: TcpStream,
    /// Bytes read but not yet answered; always starts at a request boundary.
    read_buf: Vec<u8>,
    /// Responses to the requests of the current read, sent in one write.
    write_buf: Vec<u8>,
    /// Where an escaped endpoint is decoded.
    scratch: Vec<u8>,
}

impl Connection {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Connection {
            stream,
            read_buf: Vec::with_capacity(READ_CHUNK),
            write_buf: Vec::with_capacity(READ_CHUNK),
            scratch: Vec::new(),
        }
    }

    /// Serves requests until the client closes, asks to close, or errs.
    pub(crate) async fn run(mut self, worker: Rc<Worker>) -> io::Result<()> {
        loop {
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                // Only a request longer than one chunk gets here; `parse` caps it.
                self.read_buf.reserve(READ_CHUNK.min(MAX_REQUEST_BYTES));
            }
            let buf = std::mem::take(&mut self.read_buf);
            let (len, capacity) = (buf.len(), buf.capacity());
            let (read, buf) = self.stream.read(buf.slice_mut(len..capacity)).await;
            self.read_buf = buf.into_inner();
            if read? == 0 {
                // End of stream; a request cut short by it is simply not answered.
                return Ok(());
            }

            let window = worker.window_of(SystemTime::now());
            let next = self.answer_buffered(&worker, window);
            if !self.write_buf.is_empty() {
                let out = std::mem::take(&mut self.write_buf);
                let (written, mut out) = self.stream.write_all(out).await;
                out.clear();
                self.write_buf = out;
                written?;
            }
            match next {
                Next::Read => {}
                Next::Close => return Ok(()),
                Next::CloseAfterError => {
                    self.linger().await;
                    return Ok(());
                }
            }
        }
    }

    /// Answers every complete request in the read buffer into the write buffer and
    /// drops the answered bytes. Says what the connection does next.
    fn answer_buffered(&mut self, worker: &Worker, window: WindowStart) -> Next {
        let mut consumed = 0;
        let mut next = Next::Read;
        while consumed < self.read_buf.len() {
            match request::parse(&self.read_buf[consumed..]) {
                Ok(Some(req)) => {
                    consumed += req.len;
                    let keep_alive = req.keep_alive && !worker.is_draining();
                    let status = route(&req, worker, window, &mut self.scratch);
                    let persistence = match (keep_alive, req.http10) {
                        (false, _) => Persistence::Close,
                        (true, false) => Persistence::KeepAlive,
                        (true, true) => Persistence::KeepAliveHttp10,
                    };
                    response::write(
                        &mut self.write_buf,
                        status,
                        persistence,
                        req.method == Method::Head,
                    );
                    if !keep_alive {
                        next = Next::Close;
                        break;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(error = %err, "closing connection");
                    let status = match err {
                        FrameError::Malformed => Status::BadRequest,
                        FrameError::TooLarge => Status::TooLarge,
                        FrameError::UnsupportedBody => Status::NotImplemented,
                    };
                    response::write(&mut self.write_buf, status, Persistence::Close, false);
                    next = Next::CloseAfterError;
                    break;
                }
            }
        }
        self.read_buf.drain(..consumed);
        next
    }

    /// Closes gracefully after an error response while the client may still be
    /// sending (an oversize request, say): closing a socket with unread input makes
    /// the kernel send a reset, which can destroy the response before the client
    /// reads it. So: stop writing, then read and discard, within bounds.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0;
        let mut buf = std::mem::take(&mut self.read_buf);
        while discarded < LINGER_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            buf.clear();
            match monoio::time::timeout(left, self.stream.read(buf)).await {
                Ok((Ok(n), returned)) if n > 0 => {
                    discarded += n;
                    buf = returned;
                }
                _ => return,
            }
        }
    }
}

/// What a connection does after answering what it has read.
enum Next {
    Read,
    Close,
    /// Close after an unframeable request; see [`Connection::linger`].
    CloseAfterError,
}

/// Decides the answer to one request, accepting its id when it is valid.
fn route(req: &Request<'_>, worker: &Worker, window: WindowStart, scratch: &mut Vec<u8>) -> Status {
    if req.path != ACCEPT_PATH {
        return Status::NotFound;
    }
    if req.method != Method::Get {
        return Status::MethodNotAllowed;
    }
    match parse_accept_query(req.query, scratch) {
        Ok(query) => match worker.accept(window, query.id) {
            Ok(()) => Status::Ok,
            Err(_) => Status::Unavailable,
        },
        Err(err) => {
            tracing::debug!(error = %err, "refused accept request");
            Status::BadRequest
        }
    }
}
