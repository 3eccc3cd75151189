//! The workers' request counters: one [`WorkerCounters`] per worker, written only
//! by that worker (a plain load and store, no locked instruction, no lock), and
//! summed by [`ServerCounters::totals`] when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::counter::bump;
use super::registry::{ConnectionCounters, WAITS};
use super::response::Status;

/// Which part of the API a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Accept,
    /// Anything else (404), including unframeable requests.
    Other,
}

/// Every route with its label, in declaration order, so `route as usize` indexes it.
const ROUTES: [(Route, &str); 2] = [(Route::Accept, "accept"), (Route::Other, "other")];

/// Every status, in declaration order, so `status as usize` indexes it.
const STATUSES: [Status; 10] = [
    Status::Ok,
    Status::BadRequest,
    Status::NotFound,
    Status::MethodNotAllowed,
    Status::RequestTimeout,
    Status::ContentTooLarge,
    Status::UriTooLong,
    Status::HeaderFieldsTooLarge,
    Status::NotImplemented,
    Status::Unavailable,
];

/// One worker's counters. Only that worker writes them.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Requests answered, by route and status. What became of the accept
    /// endpoint's ids is read from its row (200 accepted, 503 overloaded, any
    /// other refusal invalid), so a request costs one counter.
    requests: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    /// The worker's registry of connections keeps these.
    pub(crate) connections: Arc<ConnectionCounters>,
}

impl WorkerCounters {
    /// Counts one answered request.
    #[inline]
    pub fn record(&self, route: Route, status: Status) {
        bump(&self.requests[route as usize][status as usize]);
    }
}

/// Every worker's counters, registered as the workers start.
#[derive(Debug, Clone, Default)]
pub struct ServerCounters(Arc<Mutex<Vec<Arc<WorkerCounters>>>>);

/// The workers' counters summed, for a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTotals {
    /// Requests answered, by route label and status code; only those seen.
    pub requests: Vec<(&'static str, u16, u64)>,
    pub ids_accepted: u64,
    pub ids_invalid: u64,
    pub ids_overloaded: u64,
    pub connections_open: u64,
    pub connections_refused: u64,
    /// Connections closed for a missed deadline, by what they waited for.
    pub connections_timed_out: Vec<(&'static str, u64)>,
}

impl ServerCounters {
    /// A new worker's counters, summed into every scrape from now on.
    pub fn register(&self) -> Arc<WorkerCounters> {
        let counters = Arc::new(WorkerCounters::default());
        self.workers().push(counters.clone());
        counters
    }

    pub fn totals(&self) -> ServerTotals {
        let workers = self.workers().clone();
        let sum = |f: &dyn Fn(&WorkerCounters) -> &AtomicU64| -> u64 {
            workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
        };
        let mut requests = Vec::new();
        let (mut ids_accepted, mut ids_invalid, mut ids_overloaded) = (0, 0, 0);
        for (r, (route, label)) in ROUTES.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = sum(&|w| &w.requests[r][s]);
                if n > 0 {
                    requests.push((*label, status.code(), n));
                }
                if *route == Route::Accept {
                    match status {
                        Status::Ok => ids_accepted += n,
                        Status::Unavailable => ids_overloaded += n,
                        _ => ids_invalid += n,
                    }
                }
            }
        }
        ServerTotals {
            requests,
            ids_accepted,
            ids_invalid,
            ids_overloaded,
            connections_open: sum(&|w| &w.connections.open),
            connections_refused: sum(&|w| &w.connections.refused),
            connections_timed_out: WAITS
                .iter()
                .enumerate()
                .map(|(i, (_, waiting_for))| (*waiting_for, sum(&|w| &w.connections.timed_out[i])))
                .collect(),
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<WorkerCounters>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
impl ServerCounters {
    /// Two workers' answers, for tests: accept 200 twice, 400 and 503, other 404.
    pub(crate) fn record_sample_traffic(&self) {
        let (a, b) = (self.register(), self.register());
        a.record(Route::Accept, Status::Ok);
        b.record(Route::Accept, Status::Ok);
        b.record(Route::Accept, Status::BadRequest);
        a.record(Route::Accept, Status::Unavailable);
        b.record(Route::Other, Status::NotFound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::registry::Wait;

    #[test]
    fn totals_sum_the_workers() {
        let server = ServerCounters::default();
        server.record_sample_traffic();
        server.register().connections.timed_out(Wait::Idle);
        let totals = server.totals();
        assert_eq!(
            totals.requests,
            [
                ("accept", 200, 2),
                ("accept", 400, 1),
                ("accept", 503, 1),
                ("other", 404, 1)
            ]
        );
        assert_eq!(
            (
                totals.ids_accepted,
                totals.ids_invalid,
                totals.ids_overloaded
            ),
            (2, 1, 1)
        );
        assert_eq!(
            totals.connections_timed_out,
            [("head", 0), ("idle", 1), ("write", 0)]
        );
    }

    #[test]
    fn the_label_tables_follow_declaration_order() {
        for (i, (route, _)) in ROUTES.iter().enumerate() {
            assert_eq!(*route as usize, i);
        }
        for (i, status) in STATUSES.iter().enumerate() {
            assert_eq!(*status as usize, i);
        }
        for (i, (wait, _)) in WAITS.iter().enumerate() {
            assert_eq!(*wait as usize, i);
        }
    }
}
