//! Turning the bytes a connection has read into the bytes it sends back.
//!
//! [`ConnectionBuffers`] are what was read and not yet answered (always starting at
//! a request boundary), the responses to send, and a scratch buffer for decoding.
//! [`ConnectionBuffers::answer_complete_requests`] frames every complete request in
//! the read buffer, has `handler` answer it, and drops the bytes it used,
//! pausing once the responses reach [`OUTPUT_LIMIT`] so that they go out first. It
//! does no I/O, so it can be driven and measured without a socket; after warm-up it
//! allocates nothing (a test with a counting allocator holds it to that).

use std::ops::ControlFlow;

use super::context::RequestContext;
use super::handler;
use super::response::Status;
use crate::http::{self, FrameEnd};
use crate::window::WindowStart;

pub(crate) struct ConnectionBuffers {
    pub(crate) read_buf: Vec<u8>,
    pub(crate) write_buf: Vec<u8>,
    /// Where an escaped endpoint is decoded.
    scratch: Vec<u8>,
}

/// Responses a connection collects before it stops framing and sends them: what
/// was read is answered in turns of at most this much output (plus one response),
/// so a client that pipelines without reading holds a bounded amount of memory.
pub(crate) const OUTPUT_LIMIT: usize = 64 * 1024;

/// A buffer larger than this when the connection goes idle is given back: a long
/// request or a burst of pipelined ones must not cost memory for the connection's
/// whole life. Above what a read of pipelined requests usually needs.
pub(crate) const IDLE_BUFFER_LIMIT: usize = 16 * 1024;

/// What a connection does after answering what it has read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Read,
    /// The output limit was reached with requests left in the read buffer: send,
    /// then answer them before reading more.
    AnswerMore,
    Close,
    /// Close after an unframeable request, while the client may still be sending.
    CloseAfterError,
}

impl ConnectionBuffers {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        ConnectionBuffers {
            read_buf: Vec::with_capacity(capacity),
            write_buf: Vec::with_capacity(capacity),
            scratch: Vec::new(),
        }
    }

    /// Answers every complete request in the read buffer into the write buffer and
    /// drops the answered bytes. Ids count in `window`, the window of the read.
    pub(crate) fn answer_complete_requests(
        &mut self,
        context: &RequestContext,
        window: WindowStart,
    ) -> Next {
        let ConnectionBuffers {
            read_buf,
            write_buf,
            scratch,
        } = self;
        let framed = http::frame_requests(read_buf, context.limits(), |req| {
            handler::answer(&req, context, window, scratch, write_buf);
            match write_buf.len() < OUTPUT_LIMIT {
                true => ControlFlow::Continue(()),
                false => ControlFlow::Break(()),
            }
        });
        read_buf.drain(..framed.consumed);
        match framed.end {
            FrameEnd::Close => Next::Close,
            FrameEnd::Paused => Next::AnswerMore,
            FrameEnd::Error(err) => {
                tracing::debug!(error = %err, "closing connection");
                handler::refuse(write_buf, context, Status::refusing(err));
                Next::CloseAfterError
            }
            // Shutting down: everything received is answered above; then the
            // connection closes instead of waiting for more.
            FrameEnd::NeedMore if context.is_draining() => Next::Close,
            FrameEnd::NeedMore => Next::Read,
        }
    }

    /// Gives back buffers that grew past their usual size, while the connection
    /// waits for its next request with nothing buffered.
    pub(crate) fn shrink_idle(&mut self, capacity: usize) {
        for buf in [&mut self.read_buf, &mut self.write_buf] {
            if buf.is_empty() && buf.capacity() > IDLE_BUFFER_LIMIT {
                *buf = Vec::with_capacity(capacity.min(IDLE_BUFFER_LIMIT));
            }
        }
    }

    /// Answers a request the client took too long to send, before the connection closes.
    pub(crate) fn time_out(&mut self, context: &RequestContext) {
        handler::refuse(&mut self.write_buf, context, Status::RequestTimeout);
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::batch::{Batcher, Handoff};

    use crate::admission::Admission;
    use crate::callback::CallbackPolicy;
    use crate::http::Limits;
    use crate::server::response::{self, Persistence};
    use crate::window::WindowLength;

    /// Counts allocations made by the current thread, so that tests running on
    /// other threads at the same time do not disturb the count.
    struct CountingAllocator;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: defers to the system allocator; only counts on the side.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    const BATCH_IDS: usize = 512;

    fn worker() -> (RequestContext, flume::Receiver<Handoff>) {
        let (tx, rx) = flume::bounded(1024);
        let window = WindowLength::from_secs(60).window_of(SystemTime::now());
        let worker = RequestContext::new(
            WindowLength::from_secs(60),
            CallbackPolicy::default(),
            Limits::DEFAULT,
            Batcher::new(tx, BATCH_IDS, Admission::default(), 0, window),
            Arc::default(),
        );
        (worker, rx)
    }

    fn pipelined(requests: usize, id_from: usize) -> Vec<u8> {
        (id_from..id_from + requests)
            .flat_map(|id| {
                format!("GET /api/verve/accept?id={id} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
            })
            .collect()
    }

    #[test]
    fn answers_every_complete_request_and_keeps_the_rest() {
        let (worker, _rx) = worker();
        let mut buffers = ConnectionBuffers::with_capacity(4096);
        let window = worker.window_of(SystemTime::now());
        let mut input = pipelined(3, 1);
        input.extend_from_slice(b"GET /api/verve/acc");
        buffers.read_buf.extend_from_slice(&input);
        assert_eq!(
            buffers.answer_complete_requests(&worker, window),
            Next::Read
        );
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(
            String::from_utf8(buffers.write_buf.clone()).unwrap(),
            ok.repeat(3)
        );
        assert_eq!(buffers.read_buf, b"GET /api/verve/acc");
    }

    #[test]
    fn output_is_sent_in_turns_of_at_most_the_limit() {
        let (worker, _rx) = worker();
        let mut buffers = ConnectionBuffers::with_capacity(4096);
        let window = worker.window_of(SystemTime::now());
        let not_found = b"GET / HTTP/1.1\r\n\r\n";
        let response_len = {
            let mut one = Vec::new();
            response::write(&mut one, Status::NotFound, Persistence::KeepAlive, false);
            one.len()
        };
        let requests = 4 * OUTPUT_LIMIT / response_len;
        buffers.read_buf = not_found.repeat(requests);
        let (mut answered, mut turns) = (0, 0);
        loop {
            let next = buffers.answer_complete_requests(&worker, window);
            let out = buffers.write_buf.len();
            assert!(out < OUTPUT_LIMIT + response_len, "{out} bytes in one turn");
            assert_eq!(out % response_len, 0);
            answered += out / response_len;
            buffers.write_buf.clear();
            turns += 1;
            match next {
                Next::AnswerMore => assert!(out >= OUTPUT_LIMIT),
                Next::Read => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(answered, requests);
        assert_eq!(
            turns,
            requests.div_ceil(OUTPUT_LIMIT.div_ceil(response_len))
        );
        assert!(buffers.read_buf.is_empty());
    }

    #[test]
    fn buffers_that_grew_are_given_back_when_idle() {
        let mut buffers = ConnectionBuffers::with_capacity(4096);
        buffers.read_buf.reserve(IDLE_BUFFER_LIMIT * 4);
        buffers.write_buf.reserve(IDLE_BUFFER_LIMIT);
        let kept = buffers.write_buf.capacity();
        buffers.shrink_idle(4096);
        assert_eq!(buffers.read_buf.capacity(), 4096);
        assert_eq!(buffers.write_buf.capacity(), kept, "not past the limit");
        // A buffer holding a request's first bytes is not idle.
        buffers.read_buf.reserve(IDLE_BUFFER_LIMIT * 4);
        buffers.read_buf.push(b'G');
        buffers.shrink_idle(4096);
        assert!(buffers.read_buf.capacity() > IDLE_BUFFER_LIMIT);
    }

    #[test]
    fn a_draining_worker_answers_everything_received_then_closes() {
        let (worker, rx) = worker();
        worker.start_draining();
        let mut buffers = ConnectionBuffers::with_capacity(4096);
        buffers.read_buf.extend_from_slice(&pipelined(3, 1));
        assert_eq!(
            buffers.answer_complete_requests(&worker, worker.window_of(SystemTime::now())),
            Next::Close
        );
        let answers = String::from_utf8(buffers.write_buf.clone()).unwrap();
        assert_eq!(answers.matches("200 OK").count(), 3);
        worker.flush();
        let Ok(Handoff::Ids(batch)) = rx.try_recv() else {
            panic!("expected the batch")
        };
        assert_eq!(batch.ids, vec![1, 2, 3]);
    }

    #[test]
    fn the_request_path_does_not_allocate() {
        let (worker, rx) = worker();
        let mut buffers = ConnectionBuffers::with_capacity(64 * 1024);
        let window = worker.window_of(SystemTime::now());
        let rounds = 200;
        let per_round = 64;
        let inputs: Vec<Vec<u8>> = (0..rounds)
            .map(|r| pipelined(per_round, r * per_round))
            .collect();
        let mut round = |input: &[u8]| {
            buffers.read_buf.extend_from_slice(input);
            assert_eq!(
                buffers.answer_complete_requests(&worker, window),
                Next::Read
            );
            buffers.write_buf.clear();
            while rx.try_recv().is_ok() {}
        };
        // Warm-up, long enough to seal a batch: buffers and the channel's queue
        // reach their working size.
        let warm_up = BATCH_IDS / per_round + 1;
        for input in &inputs[..warm_up] {
            round(input);
        }
        let before = allocations();
        for input in &inputs[warm_up..] {
            round(input);
        }
        let (done_before, done) = (warm_up * per_round, rounds * per_round);
        // A new batch vector each time one is sealed, and nothing else.
        let seals = done / BATCH_IDS - done_before / BATCH_IDS;
        assert!(seals > 10);
        assert_eq!(
            allocations() - before,
            seals as u64,
            "{} requests",
            done - done_before
        );
    }
}
