//! The last step of a window: its count to the sinks, its endpoints to the callbacks.
//!
//! A [`ClosedWindow`] is what the aggregator knows when it closes a window: its
//! set of ids and the endpoints named in it. The dedup store decides the count to
//! report (the set's size locally, `SCARD` with Redis) and hands both to the
//! [`Reporter`], which runs on whichever thread the store reports from.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::callback::{CallbackJob, Callbacks};
use crate::metrics::Telemetry;
use crate::sink::{CountSink, Scope, WindowReport};
use crate::store::IdSet;
use crate::window::WindowStart;

/// A window the aggregator has closed.
pub struct ClosedWindow {
    pub window: WindowStart,
    /// Every id this instance received in the window.
    pub ids: Arc<IdSet>,
    /// Endpoints named in the window (at most `VERVE_CALLBACK_MAX_ENDPOINTS`).
    pub endpoints: Vec<Arc<str>>,
    pub partial: bool,
    /// Closed at shutdown before `end + grace`: complete for this instance, but
    /// other instances' last ids may still be on their way to a shared store.
    pub before_grace: bool,
    pub closed_at: Instant,
}

/// The count the store settled on for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub unique_requests: u64,
    pub scope: Scope,
    pub late: bool,
    pub reporter: bool,
}

/// Sends each closed window to the sinks and, in close timing, to its endpoints.
pub struct Reporter {
    window_secs: u64,
    telemetry: Arc<Telemetry>,
    sinks: Vec<Box<dyn CountSink>>,
    /// Present in close timing; immediate calls are the aggregator's.
    close_callbacks: Option<Callbacks>,
}

impl Reporter {
    pub fn new(
        window_secs: u64,
        sinks: Vec<Box<dyn CountSink>>,
        close_callbacks: Option<Callbacks>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Reporter {
            window_secs,
            telemetry,
            sinks,
            close_callbacks,
        }
    }

    /// Shutdown: lets every sink deliver what is pending, at most until `deadline`.
    pub fn flush(&mut self, deadline: Instant) {
        for sink in &mut self.sinks {
            sink.flush(deadline);
        }
    }

    pub fn report(&mut self, closed: &ClosedWindow, count: Count) {
        let report = WindowReport {
            window_start: closed.window,
            window_secs: self.window_secs,
            unique_requests: count.unique_requests,
            scope: count.scope,
            partial: closed.partial,
            late: count.late,
            reporter: count.reporter,
        };
        tracing::info!(
            window_start = %closed.window,
            unique_requests = count.unique_requests,
            instance_unique_requests = closed.ids.len(),
            scope = %count.scope.as_str(),
            partial = closed.partial,
            late = count.late,
            "window closed"
        );
        for sink in &mut self.sinks {
            sink.publish(&report);
        }
        self.telemetry
            .windows_closed
            .fetch_add(1, Ordering::Relaxed);
        self.telemetry
            .last_window_unique
            .store(count.unique_requests, Ordering::Relaxed);
        if let Some(callbacks) = &mut self.close_callbacks {
            for endpoint in &closed.endpoints {
                callbacks.submit(CallbackJob {
                    endpoint: endpoint.clone(),
                    window_start: closed.window,
                    window_secs: self.window_secs,
                    unique_requests: count.unique_requests,
                    final_count: true,
                });
            }
        }
    }
}
