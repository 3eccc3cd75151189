//! Telling endpoints the count, off the request path.
//!
//! Requests may name an `endpoint`. Workers pass the endpoints along with their
//! batches; the aggregator decides when an endpoint is due a call and hands a
//! [`CallbackJob`] to [`Callbacks::submit`], which never blocks. The [`Dispatcher`]
//! threads make the calls with ureq, with timeouts, bounded retries, and the
//! operator's [`CallbackPolicy`]. A slow or dead endpoint can hold up a dispatcher
//! thread, never a worker or the aggregator.
//!
//! Timing (`VERVE_CALLBACK_TIMING`): `close` calls each endpoint seen in a window
//! once, with the window's final count, when the window closes. `immediate` calls
//! on every batch that names the endpoint, with the count so far; calls to one
//! endpoint about one window are coalesced so that at most one is in flight and
//! only the latest waiting count is sent after it. Each window keeps its own
//! line, so a window's last count is never replaced by the next window's first.

mod counters;
mod dispatcher;
mod policy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clap::ValueEnum;
use flume::TrySendError;

pub use counters::{CallbackCounters, CallbackOutcome};
pub use dispatcher::{Dispatcher, DispatcherSettings};
pub use policy::{AllowList, CallbackPolicy, Refusal};

use crate::record::CountRecord;
use crate::window::WindowStart;

/// How an endpoint is told the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CallbackMethod {
    /// POST with a JSON body.
    Post,
    /// GET with `count=N` added to the endpoint's query.
    Get,
}

/// When an endpoint is told the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CallbackTiming {
    /// Once per endpoint and window, with the final count, when the window closes.
    Close,
    /// On each request with the endpoint, with the count so far; coalesced per endpoint.
    Immediate,
}

/// One call to make: tell `endpoint` about `record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackJob {
    pub endpoint: Arc<str>,
    pub record: CountRecord,
}

/// The submitting side of the dispatcher, owned by the aggregator.
pub struct Callbacks {
    jobs: flume::Sender<CallbackJob>,
    /// Present in immediate mode only.
    coalescer: Option<Coalescer>,
    counters: CallbackCounters,
}

impl Callbacks {
    fn new(
        jobs: flume::Sender<CallbackJob>,
        coalescer: Option<Coalescer>,
        counters: CallbackCounters,
    ) -> Self {
        Callbacks {
            jobs,
            coalescer,
            counters,
        }
    }

    /// A submitting side whose jobs go to the returned receiver, for tests.
    pub fn detached(capacity: usize, coalesce: bool) -> (Callbacks, flume::Receiver<CallbackJob>) {
        let (tx, rx) = flume::bounded(capacity);
        (
            Callbacks::new(
                tx,
                coalesce.then(Coalescer::default),
                CallbackCounters::default(),
            ),
            rx,
        )
    }

    /// Queues a call. When the queue is full the job is dropped, counted and
    /// logged: the aggregator must never wait for an endpoint.
    pub fn submit(&mut self, job: CallbackJob) {
        let job = match &self.coalescer {
            Some(coalescer) => match coalescer.claim(job) {
                Some(job) => job,
                None => return, // waits behind the call in flight
            },
            None => job,
        };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            self.jobs.try_send(job)
        {
            if let Some(coalescer) = &self.coalescer {
                coalescer.forget(&job);
            }
            let dropped_total = self.counters.record_many(CallbackOutcome::Dropped, 1);
            tracing::warn!(
                endpoint = %job.endpoint,
                window_start = %job.record.window_start,
                dropped_total,
                "callback queue full; callback dropped (raise VERVE_CALLBACK_QUEUE or VERVE_CALLBACK_CONCURRENCY)"
            );
        }
    }

    /// Callbacks dropped because the queue was full (or left at shutdown), since start.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.counters.count(CallbackOutcome::Dropped)
    }
}

/// Immediate mode's bookkeeping: which (endpoint, window) pairs have a call in
/// flight, and the latest job waiting behind each. Keyed by window too: a job for
/// the next window must not replace the waiting one, which carries the earlier
/// window's last count.
///
/// The mutex is taken once per submitted job and once per finished call, never per
/// request, and held only for a map lookup; the aggregator and the dispatcher
/// threads are the only users.
#[derive(Clone, Default)]
struct Coalescer {
    in_flight: Arc<Mutex<HashMap<Line, Option<CallbackJob>>>>,
}

/// The calls that are coalesced together: one endpoint, one window.
type Line = (Arc<str>, WindowStart);

fn line_of(job: &CallbackJob) -> Line {
    (job.endpoint.clone(), job.record.window_start)
}

impl Coalescer {
    /// Returns the job if its line is idle (it is now in flight); otherwise keeps
    /// it as the line's next call, replacing an older waiting one.
    fn claim(&self, job: CallbackJob) -> Option<CallbackJob> {
        let line = line_of(&job);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.get_mut(&line) {
            Some(waiting) => {
                *waiting = Some(job);
                None
            }
            None => {
                in_flight.insert(line, None);
                Some(job)
            }
        }
    }

    /// The call `done` finished: returns the job waiting behind it, if any (the
    /// line stays in flight), or marks the line idle.
    fn release(&self, done: &CallbackJob) -> Option<CallbackJob> {
        let line = line_of(done);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.get_mut(&line).and_then(Option::take) {
            Some(next) => Some(next),
            None => {
                in_flight.remove(&line);
                None
            }
        }
    }

    /// `job` could not be queued: its line is not in flight after all.
    fn forget(&self, job: &CallbackJob) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&line_of(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Scope, Timestamp};

    fn job(endpoint: &Arc<str>, count: u64) -> CallbackJob {
        job_in(endpoint, 60, count)
    }

    /// A job about the window that starts at `window` (Unix seconds).
    fn job_in(endpoint: &Arc<str>, window: u64, count: u64) -> CallbackJob {
        CallbackJob {
            endpoint: endpoint.clone(),
            record: CountRecord {
                window_start: WindowStart::from_unix_secs(window),
                window_seconds: 60,
                unique_requests: count,
                scope: Scope::Instance,
                revision: 0,
                complete: false,
                partial: false,
                instances: 1,
                published_at: Timestamp::from_unix_millis(61_000),
            },
        }
    }

    #[test]
    fn close_mode_queues_every_job() {
        let (mut callbacks, rx) = Callbacks::detached(8, false);
        let e: Arc<str> = "http://a/".into();
        callbacks.submit(job(&e, 1));
        callbacks.submit(job(&e, 2));
        assert_eq!(
            rx.drain()
                .map(|j| j.record.unique_requests)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn immediate_mode_keeps_one_in_flight_and_the_latest_waiting() {
        let (mut callbacks, rx) = Callbacks::detached(8, true);
        let coalescer = callbacks.coalescer.clone().unwrap();
        let (a, b): (Arc<str>, Arc<str>) = ("http://a/".into(), "http://b/".into());
        callbacks.submit(job(&a, 1));
        callbacks.submit(job(&a, 2));
        callbacks.submit(job(&a, 3));
        callbacks.submit(job(&b, 1));
        let queued: Vec<_> = rx
            .drain()
            .map(|j| (j.endpoint, j.record.unique_requests))
            .collect();
        assert_eq!(queued, vec![(a.clone(), 1), (b.clone(), 1)]);
        // The call to a finishes: the latest waiting count goes next, 2 is skipped.
        let next = coalescer.release(&job(&a, 1));
        assert_eq!(next, Some(job(&a, 3)));
        assert_eq!(coalescer.release(&job(&a, 3)), None);
        assert_eq!(coalescer.release(&job(&b, 1)), None);
        // a is idle again: the next job is queued at once.
        callbacks.submit(job(&a, 4));
        assert_eq!(rx.try_recv().map(|j| j.record.unique_requests), Ok(4));
    }

    #[test]
    fn immediate_mode_coalesces_each_window_apart() {
        let (mut callbacks, rx) = Callbacks::detached(8, true);
        let coalescer = callbacks.coalescer.clone().unwrap();
        let a: Arc<str> = "http://a/".into();
        callbacks.submit(job_in(&a, 60, 1));
        callbacks.submit(job_in(&a, 60, 5)); // waits behind 1
                                             // The next window's first call is not held behind the last one's, and does
                                             // not replace the count waiting there.
        callbacks.submit(job_in(&a, 120, 1));
        callbacks.submit(job_in(&a, 120, 2)); // waits behind 120's 1
        assert_eq!(
            rx.drain().collect::<Vec<_>>(),
            vec![job_in(&a, 60, 1), job_in(&a, 120, 1)]
        );
        assert_eq!(
            coalescer.release(&job_in(&a, 60, 1)),
            Some(job_in(&a, 60, 5))
        );
        assert_eq!(
            coalescer.release(&job_in(&a, 120, 1)),
            Some(job_in(&a, 120, 2))
        );
        assert_eq!(coalescer.release(&job_in(&a, 60, 5)), None);
        assert_eq!(coalescer.release(&job_in(&a, 120, 2)), None);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (mut callbacks, rx) = Callbacks::detached(1, true);
        let (a, b): (Arc<str>, Arc<str>) = ("http://a/".into(), "http://b/".into());
        callbacks.submit(job(&a, 1));
        callbacks.submit(job(&b, 1));
        assert_eq!(callbacks.dropped(), 1);
        assert_eq!(rx.try_recv().map(|j| j.endpoint), Ok(a));
        // b was not left marked as in flight.
        callbacks.submit(job(&b, 2));
        assert_eq!(rx.try_recv().map(|j| j.record.unique_requests), Ok(2));
    }
}
