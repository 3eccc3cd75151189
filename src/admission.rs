//! Whether workers may accept new ids: a flag the dedup store closes when it
//! cannot take more (its Redis buffer is full), or may not yet deliver what it
//! takes (the fleet has not accepted this run, or may have stopped waiting for
//! it), and opens again once that is over. Workers read it per request, so it
//! is one relaxed load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Whether workers may accept new ids; a store closes it when it cannot take more.
#[derive(Debug, Clone, Default)]
pub struct Admission(Arc<AtomicU8>);

/// Why admission is closed. Each is a bit of its own, so that one reason ending
/// does not reopen admission while another lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The buffer of ids waiting for Redis is full.
    BufferFull = 1,
    /// The fleet has not accepted this run yet (no heartbeat answered), or refused
    /// it: an `ok` now would be a promise it may not keep.
    NotInFleet = 2,
    /// No heartbeat was answered for so long that the fleet may no longer wait
    /// for this run (its lease lapsed): an `ok` now could land in a window the
    /// fleet publishes complete without it.
    Lapsed = 4,
}

impl Admission {
    /// One relaxed load: it only needs to be seen eventually, and the bound it
    /// protects has room for what is in flight meanwhile.
    #[inline]
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }

    /// Opens or closes admission for a full buffer.
    pub fn set_open(&self, open: bool) {
        self.set(Closed::BufferFull, !open);
    }

    /// Closes admission for `reason` (`closed`), or ends that reason.
    pub fn set(&self, reason: Closed, closed: bool) {
        match closed {
            true => self.0.fetch_or(reason as u8, Ordering::Relaxed),
            false => self.0.fetch_and(!(reason as u8), Ordering::Relaxed),
        };
    }

    /// Whether admission is closed for `reason` (and maybe others).
    pub fn is_closed_for(&self, reason: Closed) -> bool {
        self.0.load(Ordering::Relaxed) & reason as u8 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_opens_only_once_every_reason_is_over() {
        let admission = Admission::default();
        assert!(admission.is_open());
        admission.set(Closed::NotInFleet, true);
        admission.set_open(false);
        admission.set(Closed::NotInFleet, false);
        assert!(!admission.is_open());
        assert!(admission.is_closed_for(Closed::BufferFull));
        assert!(!admission.is_closed_for(Closed::NotInFleet));
        admission.set_open(true);
        assert!(admission.is_open());
    }
}
