//! How callbacks ended, by class: counted by the callback threads (and by the
//! submitting side for the dropped ones), read by `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a callback ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    Status(u16),
    /// No answer: connection error, timeout, refused by the policy.
    Error,
    /// Never attempted: the queue was full.
    Dropped,
}

const CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error", "dropped"];

/// Callbacks counted by outcome class; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct CallbackCounters(Arc<[AtomicU64; CLASSES.len()]>);

impl CallbackCounters {
    pub fn record(&self, outcome: CallbackOutcome) {
        self.record_many(outcome, 1);
    }

    /// Counts `n` callbacks with the same outcome; returns the class's new total.
    pub fn record_many(&self, outcome: CallbackOutcome, n: u64) -> u64 {
        self.class(outcome).fetch_add(n, Ordering::Relaxed) + n
    }

    /// Callbacks counted so far in the class of `outcome`.
    #[cfg(test)]
    pub fn count(&self, outcome: CallbackOutcome) -> u64 {
        self.class(outcome).load(Ordering::Relaxed)
    }

    /// Every class with its label and count, for a scrape.
    pub fn by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLASSES
            .iter()
            .zip(self.0.iter())
            .map(|(class, n)| (*class, n.load(Ordering::Relaxed)))
    }

    fn class(&self, outcome: CallbackOutcome) -> &AtomicU64 {
        let class = match outcome {
            CallbackOutcome::Status(code) => usize::from(code / 100).clamp(1, 5) - 1,
            CallbackOutcome::Error => 5,
            CallbackOutcome::Dropped => 6,
        };
        &self.0[class]
    }
}
