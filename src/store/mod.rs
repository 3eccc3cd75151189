//! Dedup stores: where "have we seen this id in this window?" is finally answered.
//!
//! The aggregator always dedups locally first, in one `scc::HashSet` per window, and
//! tells its [`DedupStore`] only about ids new to this instance, and about windows
//! it closes. The store settles each window's count and reports it:
//!
//! - [`LocalStore`] (the default): the local set is the truth; reported at once.
//! - [`RedisStore`] (`VERVE_REDIS_URL`): new ids go to one Redis set per window with
//!   `SADD`, from a thread of its own, so several instances count each id once;
//!   the fleet publishes the window's `SCARD` once every instance has handed over
//!   its ids (the fleet protocol, in `redis/fleet.rs`).
//!
//! A store may hold back intake through the shared `Admission`: while it is
//! closed, workers answer new ids `503 failed`.

mod local;
mod redis;

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use foldhash::SharedSeed;

pub use local::LocalStore;
pub use redis::{window_sets, RedisGauges, RedisSettings, RedisStore};

use crate::window::WindowStart;

/// The ids of one window, as this instance saw them: filled by the aggregator,
/// then handed whole to the store at close (the Redis store keeps it for as long
/// as it may have to send the window again).
pub type IdSet = scc::HashSet<i64, IdHasher>;

/// How [`IdSet`] hashes ids: foldhash, with seeds from the operating system's
/// randomness (through std's `RandomState`), one shared by the process and one per
/// set. Clients pick the ids, so the hash must be one they cannot aim collisions
/// at; SipHash, std's default, resists that even when its output leaks, at several
/// times the cost. Foldhash resists it while its seeds stay unknown, and here
/// nothing shows them: a request is answered before its id reaches the set, so no
/// answer's timing depends on where an id lands, and each window's set hashes
/// differently. (Foldhash's own default seeds come from addresses and the time.)
pub type IdHasher = foldhash::fast::SeedableRandomState;

/// An empty [`IdSet`] with room for `capacity` ids and a seed of its own.
pub fn id_set(capacity: usize) -> IdSet {
    static PROCESS_SEED: OnceLock<SharedSeed> = OnceLock::new();
    let random = || std::hash::RandomState::new().hash_one(0u8);
    let shared = PROCESS_SEED.get_or_init(|| SharedSeed::from_u64(random()));
    IdSet::with_capacity_and_hasher(capacity, IdHasher::with_seed(random(), shared))
}

/// A window the aggregator has closed.
pub struct ClosedWindow {
    pub window: WindowStart,
    /// Every id this instance received in the window.
    pub ids: IdSet,
    /// How many ids `ids` holds, counted as they were inserted.
    pub unique_requests: u64,
    /// Endpoints named in the window (at most `VERVE_CALLBACK_MAX_ENDPOINTS`).
    pub endpoints: Vec<Arc<str>>,
    /// This process did not run for the whole window: it started or stopped within it.
    pub partial: bool,
}

/// Where windows are deduplicated and reported. Hooks the local store needs not
/// are no-ops by default.
pub trait DedupStore: Send {
    /// `ids` were new to this instance in `window`.
    fn add(&mut self, _window: WindowStart, _ids: &[i64]) {}

    /// The aggregator closed a window: report it now, or as soon as the store can.
    fn close(&mut self, closed: ClosedWindow);

    /// Shutdown, after the last `close`: report what is pending, at most until
    /// `deadline`, and return by then whatever is still unreachable.
    fn finish(self: Box<Self>, _deadline: Instant) {}
}
