//! What a request needs from the worker that reads it: the window length, the
//! batch its id joins, the request limits, the callback policy, the worker's
//! counters, and whether the worker is draining.
//!
//! One per worker thread, shared by its connection tasks through `Rc`, with
//! `Cell`/`RefCell` instead of locks: the tasks never run at the same time. The
//! worker's own loop state (its listener, its registry of connections, its
//! chores) stays in `worker.rs`, so that answering a request depends on none of it.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::SystemTime;

use super::counters::WorkerCounters;
use crate::batch::{Batcher, Overloaded};
use crate::callback::CallbackPolicy;
use crate::http::Limits;
use crate::window::{WindowLength, WindowStart};

/// What the tasks of one worker thread share to answer requests.
pub(crate) struct RequestContext {
    window_length: WindowLength,
    /// This worker's request counters, summed into `/metrics`.
    counters: Arc<WorkerCounters>,
    callback_policy: CallbackPolicy,
    limits: Limits,
    batcher: RefCell<Batcher>,
    draining: Cell<bool>,
}

impl RequestContext {
    pub(crate) fn new(
        window_length: WindowLength,
        callback_policy: CallbackPolicy,
        limits: Limits,
        batcher: Batcher,
        counters: Arc<WorkerCounters>,
    ) -> Self {
        RequestContext {
            window_length,
            counters,
            callback_policy,
            limits,
            batcher: RefCell::new(batcher),
            draining: Cell::new(false),
        }
    }

    #[inline]
    pub(crate) fn window_of(&self, t: SystemTime) -> WindowStart {
        self.window_length.window_of(t)
    }

    /// Accepts an id (and its request's endpoint) into its window's batch, or
    /// refuses it under overload.
    #[inline]
    pub(crate) fn accept(
        &self,
        window: WindowStart,
        id: i64,
        endpoint: Option<&str>,
    ) -> Result<(), Overloaded> {
        self.batcher.borrow_mut().push(window, id, endpoint)
    }

    pub(crate) fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// How large a request may be.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The operator's rules for callback targets.
    pub(crate) fn callback_policy(&self) -> &CallbackPolicy {
        &self.callback_policy
    }

    /// Whether the worker is shutting down, so connections close once what they
    /// have received is answered.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Sends the batch in progress, if there is one, and passes the windows before
    /// the current one (see [`Batcher::flush`]).
    pub(crate) fn flush(&self) {
        let now = self.window_of(SystemTime::now());
        self.batcher.borrow_mut().flush(now);
    }

    pub(crate) fn start_draining(&self) {
        self.draining.set(true);
    }

    /// Hands over the last batch and lets go of the channel: the worker's end.
    pub(crate) fn finish(&self) {
        self.batcher.borrow_mut().finish();
    }
}
