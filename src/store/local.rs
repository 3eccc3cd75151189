//! The embedded store: each instance's own set is the truth.

use std::time::Instant;

use super::DedupStore;
use crate::report::{ClosedWindow, Count, Reporter};
use crate::sink::Scope;

/// Reports each window with the size of its local set, at once.
pub struct LocalStore {
    reporter: Reporter,
}

impl LocalStore {
    pub fn new(reporter: Reporter) -> Self {
        LocalStore { reporter }
    }
}

impl DedupStore for LocalStore {
    fn close(&mut self, closed: ClosedWindow) {
        let count = Count {
            unique_requests: closed.ids.len() as u64,
            scope: Scope::Instance,
            late: false,
            reporter: true,
        };
        self.reporter.report(&closed, count);
    }

    fn finish(mut self: Box<Self>, deadline: Instant) {
        self.reporter.flush(deadline);
    }
}
