//! One client connection: read, frame, answer, in order, until either side closes.
//!
//! The connection owns its [`ConnectionBuffers`] for its whole life and hands them to
//! the kernel and back on every turn (monoio's owned-buffer I/O), so a request costs
//! no allocation. Everything that can be answered from one read is answered, in
//! order, with one write: pipelined requests are batched for free. After an error
//! response the connection closes, since what follows cannot be trusted.
//!
//! The connection tells its [`Registration`] what it waits for whenever that
//! changes, which sets its deadline (head, idle or write timeout, or the end of the
//! linger after an error); the worker's sweep ends the wait of a connection past
//! it. The connection arms no timer of its own.

use std::io;
use std::rc::Rc;
use std::time::SystemTime;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::buffers::{ConnectionBuffers, Next};
use super::context::RequestContext;
use super::registry::{Registration, Wait};

/// Read buffer growth step; a typical request is well under this.
const READ_CHUNK: usize = 4096;

/// After an error response, how much unread input is discarded before closing; see
/// `Connection::linger`.
const LINGER_BYTES: usize = 64 * 1024;

pub(crate) struct Connection {
    stream: TcpStream,
    buffers: ConnectionBuffers,
    registration: Registration,
}

impl Connection {
    pub(crate) fn new(stream: TcpStream, registration: Registration) -> Self {
        Connection {
            stream,
            buffers: ConnectionBuffers::with_capacity(READ_CHUNK),
            registration,
        }
    }

    /// Serves requests until the client closes, asks to close, errs, or times out.
    pub(crate) async fn run(mut self, context: Rc<RequestContext>) -> io::Result<()> {
        let request_bytes = context.limits().request_bytes();
        let mut next = Next::Read;
        // Whether anything was answered since the last read (over paused turns).
        let mut answered = false;
        loop {
            if next == Next::Read {
                if self.buffers.read_buf.capacity() - self.buffers.read_buf.len() < READ_CHUNK / 4 {
                    // Only a request longer than one chunk gets here; framing caps it.
                    self.buffers.read_buf.reserve(READ_CHUNK.min(request_bytes));
                }
                let buf = std::mem::take(&mut self.buffers.read_buf);
                let (len, capacity) = (buf.len(), buf.capacity());
                let (read, buf) = self.stream.read(buf.slice_mut(len..capacity)).await;
                self.buffers.read_buf = buf.into_inner();
                if read? == 0 {
                    if self.registration.expired() && !self.buffers.read_buf.is_empty() {
                        // Half a request, and its time is up: say so before closing,
                        // within a write deadline like any other answer.
                        self.buffers.time_out(&context);
                        self.registration.wait_for(Wait::Write);
                        self.send().await?;
                    }
                    // End of stream; a request cut short by it is simply not answered.
                    return Ok(());
                }
                answered = false;
            }

            let waited_for = self.registration.waiting_for();
            let window = context.window_of(SystemTime::now());
            next = self.buffers.answer_complete_requests(&context, window);
            if !self.buffers.write_buf.is_empty() {
                answered = true;
                self.registration.wait_for(Wait::Write);
                self.send().await?;
            }
            match next {
                Next::Read => {}
                // Requests already read wait for their answers; no wait to set.
                Next::AnswerMore => continue,
                Next::Close => return Ok(()),
                Next::CloseAfterError => {
                    self.registration.wait_for(Wait::Linger);
                    self.linger().await;
                    return Ok(());
                }
            }
            // What the connection waits for now: a new request; the rest of one
            // begun in this read, whose head timeout starts now (after the answers
            // to the requests before it); or the rest of one begun earlier (or the
            // first of the connection), whose deadline stands.
            if self.buffers.read_buf.is_empty() {
                self.buffers.shrink_idle(READ_CHUNK);
                self.registration.wait_for(Wait::Idle);
            } else if answered || waited_for == Wait::Idle {
                self.registration.wait_for(Wait::Head);
            }
        }
    }

    /// Writes out the responses collected in the write buffer.
    async fn send(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.buffers.write_buf);
        let (written, mut out) = self.stream.write_all(out).await;
        out.clear();
        self.buffers.write_buf = out;
        written.map(drop)
    }

    /// Closes gracefully after an error response while the client may still be
    /// sending (an oversize request, say): closing a socket with unread input makes
    /// the kernel send a reset, which can destroy the response before the client
    /// reads it. So: stop writing, then read and discard, within bounds: at most
    /// [`LINGER_BYTES`], and until the registry's linger deadline, when the sweep
    /// shuts the read side down and the pending read ends.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let mut discarded = 0;
        let mut buf = std::mem::take(&mut self.buffers.read_buf);
        while discarded < LINGER_BYTES {
            buf.clear();
            match self.stream.read(buf).await {
                (Ok(n), returned) if n > 0 => {
                    discarded += n;
                    buf = returned;
                }
                _ => return,
            }
        }
    }
}
