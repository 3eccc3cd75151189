//! Where the count of each closed window goes.
//!
//! The aggregator hands every closed window, as a [`WindowReport`], to each of its
//! [`CountSink`]s in turn and does not know which kinds it has. A sink must not
//! block the aggregator for long: it runs once per window, but ids wait meanwhile.

pub mod log;

pub use log::LogSink;

use crate::window::WindowStart;

/// The outcome of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowReport {
    pub window_start: WindowStart,
    pub window_secs: u64,
    /// Distinct ids received in the window.
    pub unique_requests: u64,
    /// Closed early, at shutdown: the count covers the window only up to then.
    pub partial: bool,
}

/// A destination for window counts.
pub trait CountSink: Send {
    /// Records one closed window. Failures are the sink's to log; the aggregator
    /// carries on with the next window either way.
    fn publish(&mut self, report: &WindowReport);
}
