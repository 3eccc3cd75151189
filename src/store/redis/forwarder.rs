//! The thread that talks to Redis.
//!
//! It takes work in this order: a round that failed (once its backoff is over), a
//! heartbeat that is due, a window check that is due, then the next round off the
//! queue: a round of ids (pipelined `SADD`s, up to [`ROUND_IDS`] ids) or a closed
//! window (all of this instance's ids for it are in by then: it marks itself done
//! and starts following the window until the fleet's record is complete). Every
//! call that fails is retried after a backoff; nothing taken off the queue is
//! dropped, and the queue's lock is never held while waiting on Redis.
//!
//! Shutdown: the forwarder sends what is queued, leaves the fleet (publishing what
//! is pending if it was the last instance), flushes the sinks and stops, or gives
//! up at the deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use redis::{Client, Connection, RedisError, RedisResult};

use super::fleet::{Coverage, Fleet, Outcome, Settled, WindowView};
use super::{IdSet, Item, Queue, RedisSettings, Shared};
use crate::metrics;
use crate::report::{ClosedWindow, CountRecord, Reporter, Scope, Timestamp};
use crate::window::{WindowLength, WindowStart};

/// Ids sent in one round trip, at most.
pub(super) const ROUND_IDS: usize = 64 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) struct Forwarder {
    shared: Arc<Shared>,
    client: Client,
    url: String,
    timeout: Duration,
    length: WindowLength,
    connection: Option<Connection>,
    /// Redis has answered since start-up.
    ever_connected: bool,
    fleet: Fleet,
    reporter: Reporter,
    /// Open windows this instance has sent ids to: their `sending` mark is set.
    sent: BTreeSet<WindowStart>,
    /// Closed windows this instance is done with, followed until their record is
    /// complete (or for a window after the fleet's wait).
    tracked: BTreeMap<WindowStart, Tracked>,
    /// A round that failed, to send again first.
    retry: Option<Round>,
    next_heartbeat: Instant,
    /// After a failure nothing is tried before this.
    resume_at: Option<Instant>,
    backoff: Duration,
    /// Told once the first heartbeat has been tried (start-up waits for it).
    registered: Option<mpsc::Sender<()>>,
}

enum Round {
    Ids(Vec<(WindowStart, Vec<i64>)>),
    Close(ClosedWindow),
}

enum Work {
    Round(Round),
    Heartbeat,
    Check(WindowStart),
    Leave,
    GiveUp,
}

/// A window this instance is done with, until the fleet is.
struct Tracked {
    closed: ClosedWindow,
    view: WindowView,
    next_check: Instant,
    /// From then on, checks publish whatever the count is (`complete=false`).
    wait_over: Instant,
    /// Then this instance stops following the window.
    forget_at: Instant,
}

impl Tracked {
    fn is_complete(&self) -> bool {
        self.view.known.as_ref().is_some_and(|k| k.complete)
    }
}

impl Forwarder {
    pub(super) fn new(
        shared: Arc<Shared>,
        client: Client,
        settings: RedisSettings,
        reporter: Reporter,
        registered: mpsc::Sender<()>,
    ) -> Self {
        Forwarder {
            shared,
            client,
            timeout: settings.timeout,
            length: WindowLength::from_secs(settings.window_secs),
            connection: None,
            ever_connected: false,
            fleet: Fleet::new(
                &settings.prefix,
                &settings.instance,
                settings.window_secs,
                settings.fleet_wait,
            ),
            url: settings.url,
            reporter,
            sent: BTreeSet::new(),
            tracked: BTreeMap::new(),
            retry: None,
            next_heartbeat: Instant::now(),
            resume_at: None,
            backoff: FIRST_BACKOFF,
            registered: Some(registered),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            match self.next_work() {
                Work::Round(Round::Ids(batches)) => self.send_ids(batches),
                Work::Round(Round::Close(closed)) => self.close(closed),
                Work::Heartbeat => self.heartbeat(),
                Work::Check(window) => self.check(window),
                Work::Leave => return self.leave(),
                Work::GiveUp => return self.give_up(),
            }
        }
    }

    /// Waits for the next thing to do.
    fn next_work(&mut self) -> Work {
        let mut queue = self.shared.queue();
        loop {
            let now = Instant::now();
            let finishing = queue.finish_by;
            if finishing.is_some_and(|deadline| now >= deadline) {
                return Work::GiveUp;
            }
            let wake = match self.resume_at.filter(|&at| at > now) {
                Some(at) => at,
                None => {
                    if let Some(round) = self.retry.take() {
                        return Work::Round(round);
                    }
                    // Heartbeats go on until the instance leaves: while it finishes,
                    // it still has ids to deliver that the fleet must wait for.
                    if self.next_heartbeat <= now {
                        return Work::Heartbeat;
                    }
                    let next_check = self.tracked.iter().map(|(w, t)| (t.next_check, *w)).min();
                    if finishing.is_none() {
                        if let Some((_, window)) = next_check.filter(|(at, _)| *at <= now) {
                            return Work::Check(window);
                        }
                    }
                    if let Some(round) = take_round(&mut queue) {
                        return Work::Round(round);
                    }
                    if finishing.is_some() {
                        return Work::Leave;
                    }
                    next_check.map_or(self.next_heartbeat, |(at, _)| at.min(self.next_heartbeat))
                }
            };
            let wake = finishing.map_or(wake, |deadline| wake.min(deadline));
            queue = wait_until(&self.shared, queue, wake);
        }
    }

    /// Sends a round of ids (one entry per window).
    fn send_ids(&mut self, batches: Vec<(WindowStart, Vec<i64>)>) {
        let mut pipe = redis::pipe();
        let mut firsts = Vec::new();
        for (window, ids) in &batches {
            let first = !self.sent.contains(window);
            if first {
                firsts.push(*window);
            }
            self.fleet.queue_ids(&mut pipe, *window, ids, first);
        }
        if self.call(|connection, _| pipe.exec(connection)).is_none() {
            self.retry = Some(Round::Ids(batches));
            return;
        }
        self.sent.extend(firsts);
        let sent: usize = batches.iter().map(|(_, ids)| ids.len()).sum();
        self.delivered(sent);
    }

    /// Accounts for ids Redis took, and reopens admission once the buffer drained.
    fn delivered(&self, ids: usize) {
        let mut queue = self.shared.queue();
        queue.buffered_ids -= ids;
        let telemetry = &self.shared.telemetry;
        telemetry
            .redis_buffered_ids
            .store(queue.buffered_ids as u64, Ordering::Relaxed);
        telemetry.redis_rounds.fetch_add(1, Ordering::Relaxed);
        if !self.shared.admission.is_open() && queue.buffered_ids * 10 < self.shared.capacity * 9 {
            self.shared.admission.set_open(true);
            tracing::info!(
                buffered_ids = queue.buffered_ids,
                "Redis buffer drained; accepting new ids again"
            );
        }
    }

    /// Marks this instance done with a closed window (every id of it is in Redis by
    /// now) and starts following the window.
    fn close(&mut self, closed: ClosedWindow) {
        let window = closed.window;
        let end = self.length.end_of(window);
        let wait_over = instant_of(end + self.fleet.wait);
        let view = WindowView {
            coverage: match closed.partial {
                true => Coverage::Partial,
                false => Coverage::Full,
            },
            sent: self.sent.contains(&window),
            known: None,
            members: BTreeSet::new(),
        };
        let mut tracked = Tracked {
            closed,
            view,
            next_check: Instant::now() + self.fleet.poll_interval(),
            wait_over,
            forget_at: wait_over
                + self
                    .fleet
                    .wait
                    .max(Duration::from_secs(self.length.as_secs())),
        };
        match self.settle(&tracked, Instant::now() >= wait_over) {
            Some(settled) => {
                self.sent.remove(&window);
                self.learn(&mut tracked, &settled);
                if !tracked.is_complete() {
                    self.tracked.insert(window, tracked);
                }
            }
            None => self.retry = Some(Round::Close(tracked.closed)),
        }
    }

    /// Checks a window the fleet has not finished: publishes it once the fleet's
    /// wait is over, learns revisions, and forgets it when complete or old.
    fn check(&mut self, window: WindowStart) {
        let Some(mut tracked) = self.tracked.remove(&window) else {
            return;
        };
        let now = Instant::now();
        if let Some(settled) = self.settle(&tracked, now >= tracked.wait_over) {
            self.learn(&mut tracked, &settled);
            if tracked.is_complete() {
                return;
            }
            if now >= tracked.forget_at {
                tracing::warn!(
                    window_start = %window,
                    unique_requests = settled.count,
                    instances_done = settled.done,
                    "the fleet never completed this window; its last record says complete=false"
                );
                return;
            }
            tracked.next_check = now + self.fleet.poll_interval();
        }
        self.tracked.insert(window, tracked);
    }

    /// Runs `settle.lua` for a tracked window, sending the window's ids again as
    /// long as Redis answers that it lost them.
    fn settle(&mut self, tracked: &Tracked, force: bool) -> Option<Settled> {
        let window = tracked.closed.window;
        loop {
            let settled = self
                .call(|connection, fleet| fleet.settle(connection, window, &tracked.view, force))?;
            if settled.outcome != Outcome::Lost {
                return Some(settled);
            }
            if !self.replay(window, &tracked.closed.ids) {
                return None;
            }
        }
    }

    /// Reports a record newer than any seen for the window: to the shared sinks too
    /// if this process published it.
    fn learn(&mut self, tracked: &mut Tracked, settled: &Settled) {
        let view = &mut tracked.view;
        view.members.extend(settled.members.iter().cloned());
        let Some(record) = &settled.record else {
            return;
        };
        if view
            .known
            .as_ref()
            .is_some_and(|known| known.revision >= record.revision)
        {
            return;
        }
        // A publication whose answer was lost (a timeout) shows up as this
        // process's record on the next call.
        let published = settled.outcome == Outcome::Published || record.by == self.fleet.run;
        let window = tracked.closed.window;
        let count = record.to_record(window, self.length.as_secs());
        view.known = Some(record.clone());
        self.reporter
            .report(&count, published, &tracked.closed.endpoints);
    }

    /// Redis lost this instance's ids of `window`: sends them all again, with its
    /// `sending` mark first.
    fn replay(&mut self, window: WindowStart, ids: &IdSet) -> bool {
        self.fleet.lost_data();
        // Copied out once, to be sent in rounds of ROUND_IDS.
        let mut all = Vec::with_capacity(ids.len());
        ids.iter_sync(|&id| {
            all.push(id);
            true
        });
        self.shared
            .telemetry
            .redis_replays
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            window_start = %window,
            ids = all.len(),
            "Redis lost this instance's ids of a window (a restart, FLUSHALL or eviction); sending them again"
        );
        let mut rest = all.as_slice();
        let mut first = true;
        loop {
            let (chunk, next) = rest.split_at(rest.len().min(ROUND_IDS));
            let mut pipe = redis::pipe();
            self.fleet.queue_ids(&mut pipe, window, chunk, first);
            if self.call(|connection, _| pipe.exec(connection)).is_none() {
                return false;
            }
            (rest, first) = (next, false);
            if rest.is_empty() {
                return true;
            }
        }
    }

    fn heartbeat(&mut self) {
        if self
            .call(|connection, fleet| fleet.heartbeat(connection))
            .is_some()
        {
            self.next_heartbeat = Instant::now() + self.fleet.heartbeat_interval();
        }
        if let Some(registered) = self.registered.take() {
            let _ = registered.send(());
        }
    }

    /// Shutdown, once everything queued is sent: leaves the fleet, publishes the
    /// windows still pending if no other instance is left to, and flushes the sinks.
    fn leave(mut self) {
        let deadline = self.shared.queue().finish_by.unwrap_or_else(Instant::now);
        let others = self.call(|connection, fleet| fleet.leave(connection));
        let windows: Vec<WindowStart> = self.tracked.keys().copied().collect();
        for window in windows {
            let Some(mut tracked) = self.tracked.remove(&window) else {
                continue;
            };
            let settled = match others {
                Some(others) if Instant::now() < deadline => self.settle(&tracked, !others),
                _ => None,
            };
            if let Some(settled) = &settled {
                self.learn(&mut tracked, settled);
            }
            if tracked.view.known.is_none() {
                tracing::info!(window_start = %window, "leaving the window to the rest of the fleet");
                // Its clients' endpoints hear the count so far rather than nothing.
                let so_far = CountRecord {
                    window_start: window,
                    window_seconds: self.length.as_secs(),
                    unique_requests: settled
                        .as_ref()
                        .map_or(tracked.closed.unique_requests, |s| s.count),
                    scope: Scope::Global,
                    revision: 0,
                    complete: false,
                    partial: true,
                    instances: settled.as_ref().map_or(1, |s| s.done),
                    published_at: Timestamp::now(),
                };
                self.reporter.call_back(&so_far, &tracked.closed.endpoints);
            }
        }
        self.reporter.flush(deadline);
    }

    /// Shutdown, at the deadline, with Redis still failing: says what is lost.
    fn give_up(mut self) {
        let queue = self.shared.queue();
        let queued = queue
            .items
            .iter()
            .filter(|item| matches!(item, Item::Close(_)))
            .count();
        let retried = matches!(self.retry, Some(Round::Close(_)));
        tracing::error!(
            unreported_windows = queued + usize::from(retried),
            unsent_ids = queue.buffered_ids,
            "Redis unreachable at the shutdown deadline; giving up on what it has not taken"
        );
        drop(queue);
        self.reporter.flush(Instant::now());
    }

    /// Runs `op` on the connection (connecting first if needed). On failure, drops
    /// the connection, says so once per outage, and backs off.
    fn call<T>(
        &mut self,
        op: impl FnOnce(&mut Connection, &mut Fleet) -> RedisResult<T>,
    ) -> Option<T> {
        let result = self.connect().and_then(|()| {
            let connection = self.connection.as_mut().expect("connected above");
            op(connection, &mut self.fleet)
        });
        match result {
            Ok(value) => {
                self.recovered();
                Some(value)
            }
            Err(error) => {
                self.failed(&error);
                None
            }
        }
    }

    fn connect(&mut self) -> RedisResult<()> {
        if self.connection.is_some() {
            return Ok(());
        }
        let mut connection = self.client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
        connection.set_write_timeout(Some(self.timeout))?;
        if !self.ever_connected {
            self.ever_connected = true;
            Fleet::check_eviction_policy(&mut connection);
        }
        self.connection = Some(connection);
        Ok(())
    }

    fn recovered(&mut self) {
        self.backoff = FIRST_BACKOFF;
        self.resume_at = None;
        let since = self
            .shared
            .telemetry
            .redis_down_since_ms
            .swap(0, Ordering::Relaxed);
        if since != 0 {
            let down_ms = metrics::now_ms().saturating_sub(since);
            tracing::info!(down_ms, "Redis reachable again");
        }
    }

    fn failed(&mut self, error: &RedisError) {
        self.connection = None;
        self.resume_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        let telemetry = &self.shared.telemetry;
        telemetry.redis_errors.fetch_add(1, Ordering::Relaxed);
        let since = &telemetry.redis_down_since_ms;
        if since.load(Ordering::Relaxed) != 0 {
            tracing::debug!(%error, "Redis still failing");
            return;
        }
        since.store(metrics::now_ms(), Ordering::Relaxed);
        let unreachable = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal();
        let url = &self.url;
        if !self.ever_connected {
            tracing::warn!(%error, %url, "Redis unreachable at start-up; serving anyway and retrying");
        } else if unreachable {
            tracing::warn!(%error, %url, "Redis unreachable; buffering ids and retrying");
        } else {
            // An answer, but an error one (READONLY, OOM, NOPERM, WRONGTYPE…):
            // retrying will not help until someone fixes the cause.
            tracing::error!(%error, %url, "Redis refused a command; buffering ids and retrying until the cause is fixed");
        }
    }
}

/// The next round off the queue: one closed window, or ids up to [`ROUND_IDS`],
/// gathered by window (two windows interleave around a boundary).
fn take_round(queue: &mut Queue) -> Option<Round> {
    let (window, ids) = match queue.items.pop_front()? {
        Item::Close(closed) => return Some(Round::Close(closed)),
        Item::Ids { window, ids } => (window, ids),
    };
    let mut count = ids.len();
    let mut batches = vec![(window, ids)];
    while count < ROUND_IDS && matches!(queue.items.front(), Some(Item::Ids { .. })) {
        if let Some(Item::Ids { window, ids }) = queue.items.pop_front() {
            count += ids.len();
            match batches.iter_mut().find(|(w, _)| *w == window) {
                Some((_, gathered)) => gathered.extend_from_slice(&ids),
                None => batches.push((window, ids)),
            }
        }
    }
    Some(Round::Ids(batches))
}

/// Waits on the queue's condition until `at`, or until woken.
fn wait_until<'a>(
    shared: &'a Shared,
    queue: MutexGuard<'a, Queue>,
    at: Instant,
) -> MutexGuard<'a, Queue> {
    let timeout = at.saturating_duration_since(Instant::now());
    shared
        .wake
        .wait_timeout(queue, timeout)
        .map_or_else(|e| e.into_inner().0, |(queue, _)| queue)
}

/// The monotonic instant at which the wall clock reads `t`, as of now.
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => now + ahead,
        Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
    }
}
