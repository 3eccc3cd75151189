//! Turning the bytes a connection has read into the bytes it sends back.
//!
//! An [`Exchange`] is a connection's buffers: what was read and not yet answered
//! (always starting at a request boundary), the responses to send, and a scratch
//! buffer for decoding. [`Exchange::answer`] frames every complete request in the
//! read buffer, routes it, appends its response, and drops the bytes it used. It
//! does no I/O, so it can be driven and measured without a socket; after warm-up it
//! allocates nothing (a test with a counting allocator holds it to that).

use super::query::parse_accept_query;
use super::request::{self, FrameEnd, FrameError, Method, Request};
use super::response::{self, Persistence, Status};
use super::worker::Worker;
use crate::metrics::Route;
use crate::window::WindowStart;

/// The path of the one counting endpoint.
pub const ACCEPT_PATH: &[u8] = b"/api/verve/accept";

pub(crate) struct Exchange {
    pub(crate) read_buf: Vec<u8>,
    pub(crate) write_buf: Vec<u8>,
    /// Where an escaped endpoint is decoded.
    scratch: Vec<u8>,
}

/// What a connection does after answering what it has read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Read,
    Close,
    /// Close after an unframeable request, while the client may still be sending.
    CloseAfterError,
}

impl Exchange {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Exchange {
            read_buf: Vec::with_capacity(capacity),
            write_buf: Vec::with_capacity(capacity),
            scratch: Vec::new(),
        }
    }

    /// Answers every complete request in the read buffer into the write buffer and
    /// drops the answered bytes. Ids count in `window`, the window of the read.
    pub(crate) fn answer(&mut self, worker: &Worker, window: WindowStart) -> Next {
        let Exchange {
            read_buf,
            write_buf,
            scratch,
        } = self;
        let framed = request::frame_requests(read_buf, worker.limits(), |req| {
            let persistence = match (req.keep_alive, req.http10) {
                (false, _) => Persistence::Close,
                (true, false) => Persistence::KeepAlive,
                (true, true) => Persistence::KeepAliveHttp10,
            };
            let head_only = req.method == Method::Head;
            let (route, status) = match req.path {
                ACCEPT_PATH => (Route::Accept, accept(&req, worker, window, scratch)),
                b"/healthz" | b"/metrics" if !matches!(req.method, Method::Get | Method::Head) => {
                    (Route::Other, Status::MethodNotAllowed)
                }
                b"/healthz" => (
                    Route::Healthz,
                    healthz(worker, write_buf, persistence, head_only),
                ),
                b"/metrics" => (
                    Route::Metrics,
                    metrics(worker, write_buf, persistence, head_only),
                ),
                _ => (Route::Other, Status::NotFound),
            };
            if matches!(route, Route::Accept | Route::Other) {
                response::write(write_buf, status, persistence, head_only);
            }
            worker.counters().record(route, status);
        });
        read_buf.drain(..framed.consumed);
        match framed.end {
            FrameEnd::Close => Next::Close,
            FrameEnd::Error(err) => {
                tracing::debug!(error = %err, "closing connection");
                refuse(write_buf, worker, refusal_status(err));
                Next::CloseAfterError
            }
            // Shutting down: everything received is answered above; then the
            // connection closes instead of waiting for more.
            FrameEnd::NeedMore if worker.is_draining() => Next::Close,
            FrameEnd::NeedMore => Next::Read,
        }
    }

    /// Answers a request the client took too long to send, before the connection closes.
    pub(crate) fn time_out(&mut self, worker: &Worker) {
        refuse(&mut self.write_buf, worker, Status::RequestTimeout);
    }
}

/// Answers `status` to input that is not a request to route, announcing the close.
fn refuse(out: &mut Vec<u8>, worker: &Worker, status: Status) {
    response::write(out, status, Persistence::Close, false);
    worker.counters().record(Route::Other, status);
}

/// The answer to a request that cannot be framed.
fn refusal_status(err: FrameError) -> Status {
    match err {
        FrameError::Malformed => Status::BadRequest,
        FrameError::RequestLineTooLong => Status::UriTooLong,
        FrameError::HeadTooLarge | FrameError::TooManyHeaders => Status::HeaderFieldsTooLarge,
        FrameError::BodyTooLarge => Status::ContentTooLarge,
        FrameError::UnsupportedBody => Status::NotImplemented,
    }
}

/// `/healthz`: 200 `ok` while the service keeps up, else 503 and the reason.
fn healthz(
    worker: &Worker,
    out: &mut Vec<u8>,
    persistence: Persistence,
    head_only: bool,
) -> Status {
    let (status, body) = match worker.telemetry().health() {
        Ok(()) => (Status::Ok, "ok"),
        Err(reason) => (Status::Unavailable, reason),
    };
    response::write_body(out, status, "text/plain", body, persistence, head_only);
    status
}

/// `/metrics`: the Prometheus text exposition.
fn metrics(
    worker: &Worker,
    out: &mut Vec<u8>,
    persistence: Persistence,
    head_only: bool,
) -> Status {
    let body = worker.telemetry().render();
    let content_type = "text/plain; version=0.0.4";
    response::write_body(out, Status::Ok, content_type, &body, persistence, head_only);
    Status::Ok
}

/// Answers the accept endpoint, accepting the id when it is valid.
fn accept(
    req: &Request<'_>,
    worker: &Worker,
    window: WindowStart,
    scratch: &mut Vec<u8>,
) -> Status {
    if req.method != Method::Get {
        return Status::MethodNotAllowed;
    }
    let query = match parse_accept_query(req.query, scratch) {
        Ok(query) => query,
        Err(err) => {
            tracing::debug!(error = %err, "refused accept request");
            return Status::BadRequest;
        }
    };
    if let Some(endpoint) = query.endpoint {
        if let Err(refusal) = worker.callback_policy().check_host(endpoint.host) {
            tracing::debug!(endpoint = endpoint.url, %refusal, "refused endpoint");
            return Status::BadRequest;
        }
    }
    match worker.accept(window, query.id, query.endpoint.map(|e| e.url)) {
        Ok(()) => Status::Ok,
        Err(_) => Status::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::time::SystemTime;

    use super::*;
    use crate::batch::{Batcher, Handoff};
    use std::sync::Arc;

    use crate::callback::CallbackPolicy;
    use crate::metrics::Telemetry;
    use crate::server::registry::Timeouts;
    use crate::server::request::Limits;
    use crate::server::ClientLimits;
    use crate::store::Admission;
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

    fn worker() -> (Worker, flume::Receiver<Handoff>) {
        let (tx, rx) = flume::bounded(1024);
        let window = WindowLength::from_secs(60).window_of(SystemTime::now());
        let worker = Worker::new(
            WindowLength::from_secs(60),
            CallbackPolicy::default(),
            ClientLimits {
                request: Limits::DEFAULT,
                timeouts: Timeouts::DEFAULT,
                connections_per_worker: 1,
            },
            Batcher::new(tx, BATCH_IDS, Admission::default(), 0, window),
            Arc::new(Telemetry::new(60)),
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
        let mut exchange = Exchange::with_capacity(4096);
        let window = worker.window_of(SystemTime::now());
        let mut input = pipelined(3, 1);
        input.extend_from_slice(b"GET /api/verve/acc");
        exchange.read_buf.extend_from_slice(&input);
        assert_eq!(exchange.answer(&worker, window), Next::Read);
        let ok = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(
            String::from_utf8(exchange.write_buf.clone()).unwrap(),
            ok.repeat(3)
        );
        assert_eq!(exchange.read_buf, b"GET /api/verve/acc");
    }

    #[test]
    fn a_draining_worker_answers_everything_received_then_closes() {
        let (worker, rx) = worker();
        worker.start_draining();
        let mut exchange = Exchange::with_capacity(4096);
        exchange.read_buf.extend_from_slice(&pipelined(3, 1));
        assert_eq!(
            exchange.answer(&worker, worker.window_of(SystemTime::now())),
            Next::Close
        );
        let answers = String::from_utf8(exchange.write_buf.clone()).unwrap();
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
        let mut exchange = Exchange::with_capacity(64 * 1024);
        let window = worker.window_of(SystemTime::now());
        let rounds = 200;
        let per_round = 64;
        let inputs: Vec<Vec<u8>> = (0..rounds)
            .map(|r| pipelined(per_round, r * per_round))
            .collect();
        let mut round = |input: &[u8]| {
            exchange.read_buf.extend_from_slice(input);
            assert_eq!(exchange.answer(&worker, window), Next::Read);
            exchange.write_buf.clear();
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
