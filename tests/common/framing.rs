//! A connection's framing as a pure function of its input and of how the input is
//! split into reads, for the split-invariance checks: the property test in
//! tests/framing.rs and the fuzz target in fuzz/ both include this file.

use std::ops::ControlFlow;

use verve::http::{frame_requests, FrameEnd, FrameError, Limits, Method, Request};
use verve::server::query::{parse_accept_query, QueryError};
use verve::server::ACCEPT_PATH;

/// What the server makes of one request: everything its answer depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Request {
        method: Method,
        path: Vec<u8>,
        keep_alive: bool,
        http10: bool,
        len: usize,
        /// For the accept path: the id and the endpoint, or why the query is refused.
        accept: Option<Result<(i64, Option<String>), QueryError>>,
    },
    Refused(FrameError),
}

impl Event {
    fn of(req: Request<'_>, scratch: &mut Vec<u8>) -> Event {
        let accept = (req.path() == ACCEPT_PATH).then(|| {
            parse_accept_query(req.query(), scratch)
                .map(|q| (q.id, q.endpoint.map(|e| e.url.to_owned())))
        });
        Event::Request {
            method: req.method,
            path: req.path().to_vec(),
            keep_alive: req.keep_alive,
            http10: req.http10,
            len: req.len,
            accept,
        }
    }
}

/// Feeds `input` to a connection in reads that end at `cuts` (offsets into
/// `input`, in any order; those out of range are ignored) and returns what it made
/// of them, as connection.rs does: after each read, frame everything buffered, drop
/// what was used, stop at a close or a refusal. Panics if the buffer ever holds
/// more than one request may take, since that is memory a client could grow.
pub fn transcript(input: &[u8], cuts: &[usize], limits: &Limits) -> Vec<Event> {
    let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c < input.len()).collect();
    ends.push(input.len());
    ends.sort_unstable();
    ends.dedup();

    let (mut events, mut buffer, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    for end in ends {
        buffer.extend_from_slice(&input[start..end]);
        start = end;
        let framed = frame_requests(&buffer, limits, |req| {
            events.push(Event::of(req, &mut scratch));
            ControlFlow::Continue(())
        });
        buffer.drain(..framed.consumed);
        match framed.end {
            FrameEnd::NeedMore => assert!(
                buffer.len() < limits.request_bytes(),
                "{} bytes buffered, limits {limits:?}",
                buffer.len()
            ),
            FrameEnd::Close => break,
            FrameEnd::Paused => unreachable!("the handler never pauses"),
            FrameEnd::Error(err) => {
                events.push(Event::Refused(err));
                break;
            }
        }
    }
    events
}
