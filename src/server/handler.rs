//! Answering one framed request: routing it (the accept endpoint, or 404), the
//! accept endpoint itself (the id into its window's batch, or why not), the
//! response, and its count. No I/O: what it writes goes into the connection's
//! output buffer.

use super::context::RequestContext;
use super::counters::Route;
use super::query::parse_accept_query;
use super::response::{self, Persistence, Status};
use crate::http::{Method, Request};
use crate::window::WindowStart;

/// The path of the one counting endpoint.
pub const ACCEPT_PATH: &[u8] = b"/api/verve/accept";

/// Answers `req` into `out`, counting ids in `window` (the window of the read),
/// decoding an escaped endpoint into `scratch`.
#[inline]
pub(crate) fn answer(
    req: &Request<'_>,
    context: &RequestContext,
    window: WindowStart,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    let persistence = match (req.keep_alive, req.http10) {
        (false, _) => Persistence::Close,
        (true, false) => Persistence::KeepAlive,
        (true, true) => Persistence::KeepAliveHttp10,
    };
    let head_only = req.method == Method::Head;
    // Only the API: `/metrics` and `/healthz` have a listener of their own.
    let (route, status) = match req.query_if_path(ACCEPT_PATH) {
        Some(query) => (Route::Accept, accept(req, query, context, window, scratch)),
        None => (Route::Other, Status::NotFound),
    };
    response::write(out, status, persistence, head_only);
    context.counters().record(route, status);
}

/// Answers `status` to input that is not a request to route, announcing the close.
pub(crate) fn refuse(out: &mut Vec<u8>, context: &RequestContext, status: Status) {
    response::write(out, status, Persistence::Close, false);
    context.counters().record(Route::Other, status);
}

/// Answers the accept endpoint, accepting the id when it is valid.
fn accept(
    req: &Request<'_>,
    query: &[u8],
    context: &RequestContext,
    window: WindowStart,
    scratch: &mut Vec<u8>,
) -> Status {
    if req.method != Method::Get {
        return Status::MethodNotAllowed;
    }
    let query = match parse_accept_query(query, scratch) {
        Ok(query) => query,
        Err(err) => {
            tracing::debug!(error = %err, "refused accept request");
            return Status::BadRequest;
        }
    };
    if let Some(endpoint) = query.endpoint {
        if let Err(refusal) = context.callback_policy().check_host(endpoint.host) {
            tracing::debug!(endpoint = endpoint.url, %refusal, "refused endpoint");
            return Status::BadRequest;
        }
    }
    match context.accept(window, query.id, query.endpoint.map(|e| e.url)) {
        Ok(()) => Status::Ok,
        Err(_) => Status::Unavailable,
    }
}
