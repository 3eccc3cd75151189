//! Counters that only one thread writes (a worker's): bumped with a plain load
//! and store, cheaper than an atomic read-modify-write, and exact because nobody
//! else writes them; any thread may read them for a scrape.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds one to `counter`, which only the calling thread writes.
#[inline]
pub(crate) fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}
