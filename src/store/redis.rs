//! The Redis store: exact dedup across instances, surviving Redis outages.
//!
//! The aggregator queues ids new to this instance (and closed windows) with
//! [`RedisStore`]; a forwarder thread of its own sends them, so Redis being slow or
//! gone never stalls the aggregator, let alone a worker. Each round is one pipeline:
//! `SADD <prefix>:{<window_start>} id id …` per window (atomic per command: an id
//! two instances send at once is added once) with an `EXPIRE` of a few window
//! lengths. A closed window is counted after this instance's last ids for it are
//! in: `SCARD` of the key, and `SET <key>:reporter <instance> NX EX` elects the one
//! instance that publishes the window to shared destinations.
//!
//! Outages: ids wait in the queue (at most `VERVE_REDIS_BUFFER_IDS`; beyond that
//! the [`Admission`] closes and workers answer 503) and are sent once Redis is back,
//! with backoff between attempts. A window that closed meanwhile is reported when
//! it can be, with `late=true`. If Redis came back empty (its `run_id` changed),
//! every id of the windows not yet reported is sent again from the local sets,
//! which the aggregator keeps filling concurrently: the counts stay exact.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisResult};

use super::{Admission, DedupStore, IdSet};
use crate::metrics::{self, Telemetry};
use crate::report::{ClosedWindow, Count, Reporter};
use crate::sink::Scope;
use crate::window::WindowStart;

/// Ids sent in one round trip, at most; a round also ends at a closed window.
const ROUND_IDS: usize = 64 * 1024;
/// Ids per `SADD` command.
const SADD_IDS: usize = 4096;
/// A window reported this long after it closed is marked late.
const LATE_AFTER: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How to reach Redis and what to call things there.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Keys are `<prefix>:{<window_start>}`.
    pub prefix: String,
    /// Ids queued for Redis before workers answer 503.
    pub buffer_ids: usize,
    /// Connect, read and write timeout of each Redis call.
    pub timeout: Duration,
    /// Written to the reporter key by the instance elected for a window.
    pub instance: String,
    pub window_secs: u64,
}

pub struct RedisStore {
    shared: Arc<Shared>,
    forwarder: JoinHandle<()>,
}

/// What the aggregator and the forwarder share.
struct Shared {
    telemetry: Arc<Telemetry>,
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
    /// Sets of the windows still open, for a replay after a Redis restart.
    open: BTreeMap<WindowStart, Arc<IdSet>>,
    /// Set at shutdown: send what is queued, then flush the sinks by then.
    finish_by: Option<Instant>,
}

enum Item {
    Ids { window: WindowStart, ids: Vec<i64> },
    Close(ClosedWindow),
}

impl RedisStore {
    /// Checks the URL and starts the forwarder. Redis need not be reachable yet.
    pub fn start(
        settings: RedisSettings,
        reporter: Reporter,
        admission: Admission,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, String> {
        let client = Client::open(settings.url.as_str())
            .map_err(|e| format!("invalid VERVE_REDIS_URL '{}': {e}", settings.url))?;
        telemetry
            .redis_buffer_capacity
            .store(settings.buffer_ids as u64, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            telemetry,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            admission,
            capacity: settings.buffer_ids,
        });
        let forwarder = Forwarder {
            shared: shared.clone(),
            client,
            connection: None,
            run_id: None,
            ttl_secs: (settings.window_secs * 5).max(300),
            settings,
            reporter,
        };
        let forwarder = std::thread::Builder::new()
            .name("verve-redis".into())
            .spawn(move || forwarder.run())
            .map_err(|e| format!("cannot start the Redis thread: {e}"))?;
        Ok(RedisStore { shared, forwarder })
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DedupStore for RedisStore {
    fn opened(&mut self, window: WindowStart, ids: &Arc<IdSet>) {
        self.shared.queue().open.insert(window, ids.clone());
    }

    fn add(&mut self, window: WindowStart, ids: &[i64]) {
        let mut queue = self.shared.queue();
        queue.buffered_ids += ids.len();
        self.shared
            .telemetry
            .redis_buffered_ids
            .store(queue.buffered_ids as u64, Ordering::Relaxed);
        // Ids already accepted are always queued; only new ones are refused.
        if queue.buffered_ids >= self.shared.capacity && self.shared.admission.is_open() {
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
            }) if *last == window && queued.len() < ROUND_IDS => queued.extend_from_slice(ids),
            _ => queue.items.push_back(Item::Ids {
                window,
                ids: ids.to_vec(),
            }),
        }
        drop(queue);
        self.shared.wake.notify_one();
    }

    fn close(&mut self, closed: ClosedWindow) {
        let mut queue = self.shared.queue();
        queue.open.remove(&closed.window);
        queue.items.push_back(Item::Close(closed));
        drop(queue);
        self.shared.wake.notify_one();
    }

    fn finish(self: Box<Self>, deadline: Instant) {
        self.shared.queue().finish_by = Some(deadline);
        self.shared.wake.notify_one();
        while !self.forwarder.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let queue = self.shared.queue();
        if !self.forwarder.is_finished() {
            let windows = queue
                .items
                .iter()
                .filter(|i| matches!(i, Item::Close(_)))
                .count();
            tracing::error!(
                unreported_windows = windows,
                unsent_ids = queue.buffered_ids,
                "Redis still unreachable at shutdown; giving up on what it has not taken"
            );
        }
    }
}

/// The thread that talks to Redis.
struct Forwarder {
    shared: Arc<Shared>,
    settings: RedisSettings,
    client: Client,
    connection: Option<Connection>,
    /// The server's `run_id` when last connected: a new one means Redis restarted.
    run_id: Option<String>,
    ttl_secs: u64,
    reporter: Reporter,
}

impl Forwarder {
    fn run(mut self) {
        if let Err(error) = self.connect(&[]) {
            self.mark_down();
            tracing::warn!(%error, url = %self.settings.url, "Redis unreachable at start-up; serving anyway and retrying");
        }
        while let Some(round) = self.next_round() {
            self.deliver(&round);
            let sent: usize = round.iter().map(Item::id_count).sum();
            let mut queue = self.shared.queue();
            queue.buffered_ids -= sent;
            let telemetry = &self.shared.telemetry;
            telemetry
                .redis_buffered_ids
                .store(queue.buffered_ids as u64, Ordering::Relaxed);
            telemetry.redis_rounds.fetch_add(1, Ordering::Relaxed);
            if !self.shared.admission.is_open()
                && queue.buffered_ids * 10 < self.shared.capacity * 9
            {
                self.shared.admission.set_open(true);
                tracing::info!(
                    buffered_ids = queue.buffered_ids,
                    "Redis buffer drained; accepting new ids again"
                );
            }
        }
    }

    /// Takes the next round off the queue, waiting for one; `None` once finishing
    /// and everything is sent (the sinks are flushed then).
    fn next_round(&mut self) -> Option<Vec<Item>> {
        let mut queue = self.shared.queue();
        while queue.items.is_empty() {
            if let Some(deadline) = queue.finish_by {
                drop(queue);
                self.reporter.flush(deadline);
                return None;
            }
            queue = self
                .shared
                .wake
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        let mut round = Vec::new();
        let mut ids = 0;
        while let Some(item) = queue.items.pop_front() {
            let last = matches!(item, Item::Close(_));
            ids += item.id_count();
            round.push(item);
            if last || ids >= ROUND_IDS {
                break;
            }
        }
        Some(round)
    }

    /// Sends a round, retrying with backoff until Redis takes it.
    fn deliver(&mut self, round: &[Item]) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.try_deliver(round) {
                Ok(()) => {
                    let telemetry = &self.shared.telemetry;
                    let since = telemetry.redis_down_since_ms.swap(0, Ordering::Relaxed);
                    if since != 0 {
                        let down_ms = metrics::now_ms().saturating_sub(since);
                        tracing::info!(down_ms, "Redis reachable again");
                    }
                    return;
                }
                Err(error) => {
                    self.connection = None;
                    self.shared
                        .telemetry
                        .redis_errors
                        .fetch_add(1, Ordering::Relaxed);
                    let unreachable = error.is_io_error()
                        || error.is_timeout()
                        || error.is_connection_dropped()
                        || error.is_connection_refusal();
                    let url = &self.settings.url;
                    if !self.mark_down() {
                        tracing::debug!(%error, "Redis still failing");
                    } else if unreachable {
                        tracing::warn!(%error, %url, "Redis unreachable; buffering ids and retrying");
                    } else {
                        // An answer, but an error one (READONLY, OOM, NOPERM, WRONGTYPE…):
                        // retrying will not help until someone fixes the cause.
                        tracing::error!(%error, %url, "Redis refused the round; buffering ids and retrying until the cause is fixed");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn try_deliver(&mut self, round: &[Item]) -> RedisResult<()> {
        self.connect(round)?;
        let mut pipe = redis::pipe();
        let mut any_ids = false;
        for item in round {
            if let Item::Ids { window, ids } = item {
                self.queue_sadd(&mut pipe, *window, ids);
                any_ids = true;
            }
        }
        if any_ids {
            pipe.exec(self.connection.as_mut().expect("connected above"))?;
        }
        if let Some(Item::Close(closed)) = round.last() {
            self.report(closed)?;
        }
        Ok(())
    }

    fn queue_sadd(&self, pipe: &mut redis::Pipeline, window: WindowStart, ids: &[i64]) {
        let key = self.key(window);
        for chunk in ids.chunks(SADD_IDS) {
            pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(self.ttl_secs).ignore();
    }

    /// Counts a closed window (all of this instance's ids are in by now), elects
    /// its reporter, and reports it.
    fn report(&mut self, closed: &ClosedWindow) -> RedisResult<()> {
        let key = self.key(closed.window);
        let connection = self.connection.as_mut().expect("connected");
        // A window cut short by this instance's shutdown does not stand for the
        // fleet: it takes the count for its own log but leaves the election to an
        // instance that closes the window normally.
        let stands = !(closed.partial || closed.before_grace);
        let (unique_requests, reporter) = if stands {
            let reporter_key = format!("{key}:reporter");
            // SET NX then GET: asking twice (a retry after a lost answer) elects the same.
            let (count, holder): (u64, Option<String>) = redis::pipe()
                .cmd("SCARD")
                .arg(&key)
                .cmd("SET")
                .arg(&reporter_key)
                .arg(&self.settings.instance)
                .arg("NX")
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore()
                .cmd("GET")
                .arg(&reporter_key)
                .query(connection)?;
            (
                count,
                holder.as_deref() == Some(self.settings.instance.as_str()),
            )
        } else {
            (redis::cmd("SCARD").arg(&key).query(connection)?, false)
        };
        let count = Count {
            unique_requests,
            scope: Scope::Global,
            late: closed.closed_at.elapsed() > LATE_AFTER,
            reporter,
        };
        self.reporter.report(closed, count);
        Ok(())
    }

    /// Makes sure there is a connection; after a Redis restart, first sends again
    /// every id of the windows not yet reported.
    fn connect(&mut self, round: &[Item]) -> RedisResult<()> {
        if self.connection.is_some() {
            return Ok(());
        }
        let timeout = self.settings.timeout;
        let mut connection = self.client.get_connection_with_timeout(timeout)?;
        connection.set_read_timeout(Some(timeout))?;
        connection.set_write_timeout(Some(timeout))?;
        let info: String = redis::cmd("INFO").arg("server").query(&mut connection)?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        if self.run_id.as_ref().is_some_and(|known| *known != run_id) {
            self.replay(&mut connection, round)?;
        }
        self.run_id = Some(run_id);
        self.connection = Some(connection);
        Ok(())
    }

    /// Sends every id of every window not yet reported: open ones, closed ones
    /// still queued, and the one in this round.
    fn replay(&self, connection: &mut Connection, round: &[Item]) -> RedisResult<()> {
        let mut sets: Vec<(WindowStart, Arc<IdSet>)> = {
            let queue = self.shared.queue();
            let queued = queue.items.iter().chain(round);
            let closed = queued.filter_map(|item| match item {
                Item::Close(closed) => Some((closed.window, closed.ids.clone())),
                Item::Ids { .. } => None,
            });
            closed
                .chain(queue.open.iter().map(|(w, ids)| (*w, ids.clone())))
                .collect()
        };
        sets.sort_by_key(|(window, _)| *window);
        let total: usize = sets.iter().map(|(_, ids)| ids.len()).sum();
        tracing::warn!(
            windows = sets.len(),
            ids = total,
            "Redis restarted empty; sending every id of the unreported windows again"
        );
        for (window, ids) in sets {
            // Copied out first: iterating holds locks on parts of the set, and the
            // aggregator, inserting meanwhile, must not wait on Redis round trips.
            let mut all = Vec::with_capacity(ids.len());
            ids.iter_sync(|&id| {
                all.push(id);
                true
            });
            for slice in all.chunks(ROUND_IDS) {
                let mut pipe = redis::pipe();
                self.queue_sadd(&mut pipe, window, slice);
                pipe.exec(connection)?;
            }
        }
        Ok(())
    }

    /// Notes when Redis started failing (for `/healthz` and the recovery log line);
    /// true when it was fine until now.
    fn mark_down(&self) -> bool {
        let since = &self.shared.telemetry.redis_down_since_ms;
        let was_up = since.load(Ordering::Relaxed) == 0;
        if was_up {
            since.store(metrics::now_ms(), Ordering::Relaxed);
        }
        was_up
    }

    fn key(&self, window: WindowStart) -> String {
        // The hash tag keeps a window's keys on one Redis Cluster slot.
        format!("{}:{{{window}}}", self.settings.prefix)
    }
}

impl Item {
    fn id_count(&self) -> usize {
        match self {
            Item::Ids { ids, .. } => ids.len(),
            Item::Close(_) => 0,
        }
    }
}
