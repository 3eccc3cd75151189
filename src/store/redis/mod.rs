//! The Redis store: exact dedup across instances, surviving Redis outages.
//!
//! The aggregator queues ids new to this instance, and closed windows, with
//! [`RedisStore`]; a forwarder thread of its own sends them, so Redis being slow or
//! gone never stalls the aggregator, let alone a worker. Ids go to a window's Redis
//! sets (`VERVE_REDIS_SHARDS` on a Redis Cluster's slots, each split into as
//! many sets as the window's traffic needs for Redis to keep them compact) with
//! `SADD` (an id two instances send at once is added once), in pipelined
//! rounds that wait a little for ids to gather (a 128th of a window). A closed window comes after this instance's last ids
//! for it in the queue, so when the forwarder reaches it, every id is in: it marks
//! the instance done and the fleet protocol (`fleet`) decides when the window's
//! count is published, and by whom.
//!
//! Outages: ids wait in the queue (at most `VERVE_REDIS_BUFFER_IDS`; beyond that the
//! [`Admission`] closes and workers answer 503) and are sent once Redis is back,
//! with backoff between attempts. If Redis lost ids this instance had sent (a
//! restart, `FLUSHALL`, eviction, a failover), a set's sentinel says so when the
//! instance settles the window, and every id of that set is sent again from the local set,
//! which the store keeps until the fleet's record is complete: the counts stay exact.
//!
//! With the journal on, a window's journal file is deleted once the fleet is done
//! with it (its record complete), not when it closes here: until then the file
//! is what a restart delivers again. A stop gives up on Redis a little before its
//! deadline ([`REPORT_RESERVE`]), so that every window it closed gets a record
//! (this instance's own count, `scope=instance`, `revision=0`, when the fleet's
//! cannot be had) and the last line says how many ids Redis did not take, and
//! whether the journal keeps them.

mod delivery;
mod fleet;
mod forwarder;
mod keys;
mod lease;
mod membership;
#[cfg(test)]
mod model;
mod rules;
mod sets;
mod settle;
mod slots;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{ClosedWindow, DedupStore, IdSet};
use crate::admission::{Admission, Closed};
use crate::config::RedisMode;
use crate::redis_link::{EndpointError, RedisEndpoint};
use crate::report::Reporter;
use crate::sink::Acknowledged;
use crate::window::{WindowLength, WindowStart};
use forwarder::Forwarder;
pub use keys::{set_of_id, window_sets, window_shards};
use lease::Lease;

/// How to reach Redis, what to call things there, and how long the fleet waits.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub mode: RedisMode,
    /// One URL, or in cluster mode seed nodes, comma-separated.
    pub url: String,
    /// Keys start with `<prefix>:`.
    pub prefix: String,
    /// Ids queued for Redis before workers answer 503.
    pub buffer_ids: usize,
    /// Connect, read and write timeout of each Redis call.
    pub timeout: Duration,
    /// This instance's name in the fleet; unique among the instances sharing Redis.
    pub instance: String,
    pub length: WindowLength,
    /// How long after a window ends the fleet waits for every instance to be done
    /// before the count is published anyway; also how long an instance that stops
    /// sending heartbeats still counts as live.
    pub fleet_wait: Duration,
    /// How long window keys live, if not the default (five windows, at least five
    /// minutes and four fleet waits): a test hook.
    pub key_ttl_secs: Option<u64>,
    /// `VERVE_MAX_CLOCK_SKEW_MS`: past this difference from Redis's clock, warn.
    pub max_clock_skew: Duration,
    /// The window this process started in.
    pub first_window: WindowStart,
    /// Sets each window's ids are split over; the same in every instance.
    pub shards: usize,
    /// Records the shared sinks acknowledged (Kafka's delivery reports), if any.
    pub acks: Option<flume::Receiver<Acknowledged>>,
    /// How long a record's publisher has to get it acknowledged before another
    /// instance sends it, once the publisher no longer runs: the fleet's wait and
    /// a whole shutdown.
    pub redeliver_after: Duration,
    /// `VERVE_DATA_DIR` with the journal on: where the closed windows' files
    /// are, to delete once the fleet is done with them.
    pub journal_dir: Option<PathBuf>,
}

/// A stop gives up on Redis this long before its deadline, to publish the
/// windows it closed and say what is left.
const REPORT_RESERVE: Duration = Duration::from_millis(250);

/// What the Redis store publishes for `/metrics` and `/healthz`; only it writes.
#[derive(Debug, Default)]
pub struct RedisGauges {
    /// `VERVE_REDIS_BUFFER_IDS`.
    pub buffer_capacity: AtomicU64,
    /// Ids queued for Redis or in the round being sent.
    pub buffered_ids: AtomicU64,
    pub rounds: AtomicU64,
    pub errors: AtomicU64,
    /// Windows sent to Redis again because it had lost this instance's ids.
    pub replays: AtomicU64,
    /// Since when Redis has been unreachable, in ms since the epoch; 0 while reachable.
    pub down_since_ms: AtomicU64,
    /// How far Redis's clock was ahead of this host's at the last heartbeat, in ms
    /// (negative: behind).
    pub clock_offset_ms: AtomicI64,
    /// 1 once the fleet took this run in (a heartbeat answered, its layout the
    /// fleet's); 0 before, and while the fleet refuses it: new ids get 503.
    pub in_fleet: AtomicU64,
    /// 1 while this run's lease is over (no heartbeat answered for most of the
    /// fleet's wait, see `lease.rs`): new ids get 503.
    pub lease_lapsed: AtomicU64,
    /// When the fleet's epoch began (its start, or Redis's last loss of data), in
    /// ms since the Unix epoch by Redis's clock; 0 before a heartbeat told.
    pub epoch_began_ms: AtomicU64,
}

/// Why the Redis store could not start, as one line that says what to do.
#[derive(Debug)]
pub enum StoreError {
    /// `VERVE_REDIS_URL` cannot be used.
    Endpoint(EndpointError),
    /// The fleet refused this instance (another shard count or window length),
    /// with the fleet's reason.
    Refused(String),
    /// The store's threads could not start.
    Thread(std::io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Endpoint(e) => e.fmt(f),
            StoreError::Refused(reason) => f.write_str(reason),
            StoreError::Thread(e) => write!(f, "cannot start the Redis store's threads: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Endpoint(e) => Some(e),
            StoreError::Refused(_) => None,
            StoreError::Thread(e) => Some(e),
        }
    }
}

impl RedisGauges {
    /// `Ok` while the Redis store keeps up (always without Redis: its capacity
    /// is then 0); otherwise why not. `now_ms` is this host's clock; Redis
    /// unreachable for longer than `down_limit` (a window), or a clock further
    /// than `max_clock_skew_ms` from Redis's, is unhealthy.
    pub fn health(
        &self,
        now_ms: u64,
        down_limit: Duration,
        max_clock_skew_ms: u64,
    ) -> Result<(), &'static str> {
        let capacity = self.buffer_capacity.load(Ordering::Relaxed);
        if capacity == 0 {
            return Ok(());
        }
        if self.buffered_ids.load(Ordering::Relaxed) * 10 > capacity * 9 {
            return Err("dedup buffer over 90%");
        }
        // Before "unreachable": both hold once Redis is gone for a window, and
        // this one says that ids are refused.
        if self.lease_lapsed.load(Ordering::Relaxed) == 1
            && self.in_fleet.load(Ordering::Relaxed) == 1
        {
            return Err("no heartbeat answered within the lease: refusing ids");
        }
        let down_since = self.down_since_ms.load(Ordering::Relaxed);
        if down_since != 0 && now_ms.saturating_sub(down_since) > down_limit.as_millis() as u64 {
            return Err("redis unreachable for longer than a window");
        }
        let offset = self.clock_offset_ms.load(Ordering::Relaxed);
        if offset.unsigned_abs() > max_clock_skew_ms {
            return Err("clock off Redis's by more than VERVE_MAX_CLOCK_SKEW_MS");
        }
        Ok(())
    }
}

pub struct RedisStore {
    shared: Arc<Shared>,
    forwarder: JoinHandle<()>,
    /// Closes admission while the fleet may no longer wait for this run.
    _lease: Lease,
}

/// What the aggregator and the forwarder share.
struct Shared {
    gauges: Arc<RedisGauges>,
    /// Held by the aggregator for a push per batch, by the forwarder to take a round
    /// off the front: both short, neither ever waits on Redis while holding it.
    queue: Mutex<Queue>,
    wake: Condvar,
    admission: Admission,
    capacity: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Ids queued or in the round being sent.
    buffered_ids: usize,
    /// Set at shutdown: send what is queued, leave the fleet, stop by then.
    finish_by: Option<Instant>,
    /// Closed windows queued: the ids before them go without waiting for
    /// more to join their round.
    closes: usize,
}

enum Item {
    Ids {
        window: WindowStart,
        ids: Vec<i64>,
        /// When the first of them was queued.
        since: Instant,
    },
    Close(ClosedWindow),
}

impl RedisStore {
    /// Checks the URL, starts the forwarder and waits for its first heartbeat, so
    /// that an instance that can reach Redis is known to the fleet before it
    /// accepts an id. Redis need not be reachable: the wait ends with the
    /// heartbeat's first attempt, whatever its outcome; but until a heartbeat is
    /// answered and the fleet accepts this run (its shards and window length are
    /// the fleet's), new ids get 503: an `ok` then would be a promise the run may
    /// not be allowed to keep.
    pub fn start(
        settings: RedisSettings,
        reporter: Reporter,
        admission: Admission,
        gauges: Arc<RedisGauges>,
    ) -> Result<Self, StoreError> {
        let endpoint = RedisEndpoint::open(
            settings.mode,
            &settings.url,
            "VERVE_REDIS_URL",
            settings.timeout,
        )
        .map_err(StoreError::Endpoint)?;
        gauges
            .buffer_capacity
            .store(settings.buffer_ids as u64, Ordering::Relaxed);
        admission.set(Closed::NotInFleet, true);
        let shared = Arc::new(Shared {
            gauges,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            admission,
            capacity: settings.buffer_ids,
        });
        // Connecting, reading the eviction policy, the heartbeat: a timeout each.
        let first_attempt = 3 * settings.timeout + Duration::from_millis(100);
        let (registered, attempted) = std::sync::mpsc::channel();
        let term = rules::lease_term(settings.fleet_wait, settings.max_clock_skew);
        let (lease, renewal) = Lease::start(shared.admission.clone(), shared.gauges.clone(), term)
            .map_err(StoreError::Thread)?;
        let forwarder = Forwarder::new(
            shared.clone(),
            endpoint,
            settings,
            reporter,
            registered,
            renewal,
        );
        let forwarder = std::thread::Builder::new()
            .name("verve-redis".into())
            .spawn(move || forwarder.run())
            .map_err(StoreError::Thread)?;
        if let Ok(Err(refusal)) = attempted.recv_timeout(first_attempt) {
            return Err(StoreError::Refused(refusal));
        }
        Ok(RedisStore {
            shared,
            forwarder,
            _lease: lease,
        })
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DedupStore for RedisStore {
    fn wants_new_ids(&self) -> bool {
        true
    }

    fn add(&mut self, window: WindowStart, ids: &[i64]) {
        let mut queue = self.shared.queue();
        queue.buffered_ids += ids.len();
        self.shared
            .gauges
            .buffered_ids
            .store(queue.buffered_ids as u64, Ordering::Relaxed);
        // Ids already accepted are always queued; only new ones are refused.
        let admission = &self.shared.admission;
        if queue.buffered_ids >= self.shared.capacity
            && !admission.is_closed_for(Closed::BufferFull)
        {
            self.shared.admission.set_open(false);
            tracing::warn!(
                buffered_ids = queue.buffered_ids,
                "Redis buffer full (VERVE_REDIS_BUFFER_IDS): refusing new ids with 503 until it drains"
            );
        }
        match queue.items.back_mut() {
            Some(Item::Ids {
                window: last,
                ids: queued,
                ..
            }) if *last == window && queued.len() < forwarder::ROUND_IDS => {
                queued.extend_from_slice(ids)
            }
            _ => queue.items.push_back(Item::Ids {
                window,
                ids: ids.to_vec(),
                since: Instant::now(),
            }),
        }
        drop(queue);
        self.shared.wake.notify_one();
    }

    fn close(&mut self, closed: ClosedWindow) {
        let mut queue = self.shared.queue();
        queue.items.push_back(Item::Close(closed));
        queue.closes += 1;
        drop(queue);
        self.shared.wake.notify_one();
    }

    fn removes_journal_files(&self) -> bool {
        true
    }

    fn finish(self: Box<Self>, deadline: Instant) -> u64 {
        let give_up_at = deadline.checked_sub(REPORT_RESERVE).unwrap_or(deadline);
        self.shared.queue().finish_by = Some(give_up_at);
        self.shared.wake.notify_one();
        while !self.forwarder.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.forwarder.is_finished() {
            // The forwarder is inside a Redis call that has not timed out yet; it
            // reports what it gives up on when it returns, if the process lives.
            let queue = self.shared.queue();
            tracing::error!(
                unsent_ids = queue.buffered_ids,
                "Redis still busy at the shutdown deadline; leaving without it"
            );
        }
        self.shared.queue().buffered_ids as u64
    }
}
