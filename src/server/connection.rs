//! One client connection: read, frame, answer, in order, until either side closes.
//!
//! The connection owns its [`Exchange`] buffers for its whole life and hands them to
//! the kernel and back on every turn (monoio's owned-buffer I/O), so a request costs
//! no allocation. Everything that can be answered from one read is answered, in
//! order, with one write: pipelined requests are batched for free. After an error
//! response the connection closes, since what follows cannot be trusted.

use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::exchange::{Exchange, Next};
use super::request::MAX_REQUEST_BYTES;
use super::worker::Worker;

/// Read buffer growth step; a typical request is well under this.
const READ_CHUNK: usize = 4096;

/// After an error response, how long and how much unread input is discarded before
/// closing; see `Connection::linger`.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

pub(crate) struct Connection {
    stream: TcpStream,
    exchange: Exchange,
}

impl Connection {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Connection {
            stream,
            exchange: Exchange::with_capacity(READ_CHUNK),
        }
    }

    /// Serves requests until the client closes, asks to close, or errs.
    pub(crate) async fn run(mut self, worker: Rc<Worker>) -> io::Result<()> {
        loop {
            if self.exchange.read_buf.capacity() - self.exchange.read_buf.len() < READ_CHUNK / 4 {
                // Only a request longer than one chunk gets here; `parse` caps it.
                self.exchange
                    .read_buf
                    .reserve(READ_CHUNK.min(MAX_REQUEST_BYTES));
            }
            let buf = std::mem::take(&mut self.exchange.read_buf);
            let (len, capacity) = (buf.len(), buf.capacity());
            let (read, buf) = self.stream.read(buf.slice_mut(len..capacity)).await;
            self.exchange.read_buf = buf.into_inner();
            if read? == 0 {
                // End of stream; a request cut short by it is simply not answered.
                return Ok(());
            }

            let window = worker.window_of(SystemTime::now());
            let next = self.exchange.answer(&worker, window);
            if !self.exchange.write_buf.is_empty() {
                let out = std::mem::take(&mut self.exchange.write_buf);
                let (written, mut out) = self.stream.write_all(out).await;
                out.clear();
                self.exchange.write_buf = out;
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

    /// Closes gracefully after an error response while the client may still be
    /// sending (an oversize request, say): closing a socket with unread input makes
    /// the kernel send a reset, which can destroy the response before the client
    /// reads it. So: stop writing, then read and discard, within bounds.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0;
        let mut buf = std::mem::take(&mut self.exchange.read_buf);
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
