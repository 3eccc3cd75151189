//! Where the count of each closed window goes.
//!
//! The [`Reporter`](crate::report::Reporter) hands every closed window, as a
//! [`WindowReport`], to each of its [`CountSink`]s in turn and does not know which
//! kinds it has. A sink must not block for long: it runs on the thread that closes
//! windows (the aggregator, or the Redis forwarder), once per window.

pub mod kafka;
pub mod log;

pub use kafka::{KafkaSettings, KafkaSink};
pub use log::LogSink;

use std::time::Instant;

use crate::window::WindowStart;

/// The outcome of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowReport {
    pub window_start: WindowStart,
    pub window_secs: u64,
    /// Distinct ids received in the window: by this instance, or by the whole
    /// fleet, as `scope` says.
    pub unique_requests: u64,
    pub scope: Scope,
    /// Closed early, at shutdown: the count covers the window only up to then.
    pub partial: bool,
    /// Reported well after the window closed (the shared store was unreachable).
    pub late: bool,
    /// This instance publishes the window to shared destinations: always in local
    /// mode; in Redis mode, the one instance elected for the window.
    pub reporter: bool,
}

/// Whose ids a count covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This instance's (the embedded local store).
    Instance,
    /// Every instance sharing the Redis store.
    Global,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Instance => "instance",
            Scope::Global => "global",
        }
    }
}

/// A destination for window counts.
pub trait CountSink: Send {
    /// Records one closed window. Failures are the sink's to log; the aggregator
    /// carries on with the next window either way.
    fn publish(&mut self, report: &WindowReport);

    /// Shutdown: delivers what is still pending, at most until `deadline`.
    fn flush(&mut self, _deadline: Instant) {}
}
