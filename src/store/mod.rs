//! Dedup stores: where "have we seen this id in this window?" is finally answered.
//!
//! The aggregator always dedups locally first, in one [`IdSet`] per window, and
//! tells its [`DedupStore`] only about ids new to this instance, and about windows
//! it closes. The store settles each window's count and reports it:
//!
//! - [`LocalStore`] (the default): the local set is the truth; reported at once.
//! - [`RedisStore`] (`VERVE_REDIS_URL`): new ids go to one Redis set per window with
//!   `SADD`, from a thread of its own, so several instances count each id once;
//!   the fleet publishes the window's `SCARD` once every instance has handed over
//!   its ids (the fleet protocol, in `redis/fleet.rs` and its parts).
//!
//! A store may hold back intake through the shared `Admission`: while it is
//! closed, workers answer new ids `503 failed`.

mod id_set;
mod local;
mod redis;

use std::sync::Arc;
use std::time::Instant;

pub use id_set::{id_hasher, IdHasher, IdSet};
pub use local::LocalStore;
pub use redis::{
    set_of_id, window_sets, window_shards, RedisGauges, RedisSettings, RedisStore, StoreError,
};

use crate::window::WindowStart;

/// A window the aggregator has closed.
pub struct ClosedWindow {
    pub window: WindowStart,
    /// Every id this instance received in the window, in disjoint parts (one per
    /// partition of the aggregator).
    pub ids: Vec<IdSet>,
    /// How many ids `ids` holds, counted as they were inserted.
    pub unique_requests: u64,
    /// Endpoints named in the window (at most `VERVE_CALLBACK_MAX_ENDPOINTS`).
    pub endpoints: Vec<Arc<str>>,
    /// This process did not run for the whole window: it started or stopped within it.
    pub partial: bool,
    /// The revision of the last record already out for the window (0: none):
    /// a stop within it published one, and the journal brought it back.
    pub published_before: u64,
}

/// Where windows are deduplicated and reported. Hooks the local store needs not
/// are no-ops by default.
pub trait DedupStore: Send {
    /// Whether [`DedupStore::add`] wants the ids new to this instance; the
    /// aggregator does not gather them for a store that does not.
    fn wants_new_ids(&self) -> bool {
        false
    }

    /// `ids` were new to this instance in `window`.
    fn add(&mut self, _window: WindowStart, _ids: &[i64]) {}

    /// Whether the store deletes a closed window's journal file itself, once the
    /// window needs it no more (Redis: once the fleet's record is complete); if
    /// not, the aggregator does as soon as the window's record is out.
    fn removes_journal_files(&self) -> bool {
        false
    }

    /// The aggregator closed a window: report it now, or as soon as the store can.
    fn close(&mut self, closed: ClosedWindow);

    /// Shutdown, after the last `close`: report what is pending, at most until
    /// `deadline`, and return by then whatever is still unreachable, with the
    /// number of ids it could not deliver (kept in the journal, if it is on).
    fn finish(self: Box<Self>, _deadline: Instant) -> u64 {
        0
    }
}
