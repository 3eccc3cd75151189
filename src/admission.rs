//! Whether workers may accept new ids: a flag the dedup store closes when it
//! cannot take more (its Redis buffer is full) and opens again once it drained.
//! Workers read it per request, so it is one relaxed load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether workers may accept new ids; a store closes it when it cannot take more.
#[derive(Debug, Clone)]
pub struct Admission(Arc<AtomicBool>);

impl Default for Admission {
    fn default() -> Self {
        Admission(Arc::new(AtomicBool::new(true)))
    }
}

impl Admission {
    /// One relaxed load: it only needs to be seen eventually, and the bound it
    /// protects has room for what is in flight meanwhile.
    #[inline]
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set_open(&self, open: bool) {
        self.0.store(open, Ordering::Relaxed);
    }
}
